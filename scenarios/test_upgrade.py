"""Continuity: an Istio minor upgrade does not interrupt scraping over mTLS.

The workload starts with the older minor's configuration (the legacy 15091 workaround),
is verified, upgraded (on a cluster: istioctl, then a restart onto the new proxies; on
the local backend: its pod replaced by one with the new configuration) and switched to
the native ports where the new version has them, then verified again. Prometheus' own
``up`` samples must show the namespace never without a successful scrape
(istio#19874: targets that silently went away across an upgrade).
"""

from collections.abc import Callable

import pytest


@pytest.mark.check("upgrade-continuity")
def test_upgrade_keeps_scraping_continuous(run_check: Callable[[], None]) -> None:
    """Scraped before and after the upgrade, and covered by a successful scrape throughout."""
    run_check()
