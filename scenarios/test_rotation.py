"""Continuity: certificate rotation does not interrupt scraping over mTLS.

Workload and scraper certificates with short lifetimes are rotated several times while
Prometheus scrapes. After each rotation the workload must serve its new certificate,
and Prometheus' own ``up`` samples must show every scrape succeeding with no gap longer
than two scrape intervals (istio#28050: certificates copied once, then expired).
"""

from collections.abc import Callable

import pytest


@pytest.mark.check("rotation-continuity")
def test_rotation_keeps_scraping_continuous(run_check: Callable[[], None]) -> None:
    """Every rotation is served at once and no scrape is lost across the window."""
    run_check()
