"""Conformance: Prometheus scrapes Istio proxies over mTLS, and plaintext is refused.

One test, generated from the check registry (securemetrics_e2e/checks.py): one item per
run unit and check that applies to it, named ``test_check[<unit>-<check id>]``, e.g.
``test_check[native-sidecar[STRICT/as-documented]-mtls-scrape]``. A run unit is a
scenario x mTLS mode x configuration variant (securemetrics_e2e/catalog.py); the
``deployment`` fixture deploys each unit once on the selected backend, and units or
checks the backend or the Istio version cannot run are skipped with the reason. The
check runs through the one runner (securemetrics_e2e/runner.py) and its result goes
through the known-gap table (securemetrics_e2e/knowngaps.py): KNOWN-GAP or FIXED where a
gap is known. Adding a check adds no code here (CONTRIBUTING.md, "Adding a check").
"""

from collections.abc import Callable


def test_check(run_check: Callable[[], None]) -> None:
    """The check of this item, on the run unit of this item."""
    run_check()
