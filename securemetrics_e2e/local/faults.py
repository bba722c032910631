"""Seeded misconfigurations: the negative controls that prove the suite can say FAIL.

Each fault breaks the local mesh the way a real deployment gets broken. The suite's
negative-control tests deploy a scenario with one fault and assert that the verdict is
FAIL and that the failing check is the one that should catch it.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping
from typing import Any


class Fault(enum.StrEnum):
    PLAINTEXT_SECURE_PORT = "plaintext-secure-port"  # 15091/15092 serve plain HTTP
    CLIENT_CERT_OPTIONAL = "client-cert-optional"  # TLS without a required client certificate
    FOREIGN_ROOT_TRUSTED = "foreign-root-trusted"  # client certs of a foreign CA are accepted
    SCRAPE_JOB_PLAINTEXT = "scrape-job-plaintext"  # the job scrapes plaintext 15090 over http
    HARDENED_FLAG_MISSING = "hardened-flag-missing"  # METRICS_LOCALHOST_ACCESS_ONLY not applied
    EXPIRED_WORKLOAD_CERT = "expired-workload-cert"  # the proxy serves an expired certificate
    # the proxy serves a valid mesh certificate of another service account: only a scraper
    # that checks the SPIFFE ID notices (Prometheus runs with insecure_skip_verify)
    WRONG_IDENTITY = "wrong-identity"
    STATS_ROUTE_MISSING = "stats-route-missing"  # no /stats/prometheus route on the secure ports
    # the Envoy-only port's stats route answers 200 itself with an empty page (a route or
    # EnvoyFilter with a direct response in place of the forward to Envoy's stats)
    STATS_ROUTE_EMPTY = "stats-route-empty"
    # the Envoy-only secure port forwards every other path to the agent (a catch-all route
    # or EnvoyFilter), exposing the merged metrics on it: /metrics answers 200
    ENVOY_PORT_ROUTES_ALL = "envoy-port-routes-all"
    SECURE_PORT_ANNOTATION_MISSING = "secure-port-annotation-missing"  # job finds zero targets
    # the injector does not auto-annotate native sidecars with secure-port (pre-PR #60430)
    INJECTOR_NO_SECURE_PORT = "injector-no-secure-port"
    # the pods an upgrade restarts come back without the secure-port annotations, so the
    # scrape jobs silently lose the workload (istio#19874); its first pods are healthy
    UPGRADE_DROPS_TARGETS = "upgrade-drops-targets"
    # the scraper's OUTPUT_CERTS are written once, never renewed, and expire (istio#28050)
    SCRAPER_CERTS_NOT_REFRESHED = "scraper-certs-not-refreshed"
    # the sidecar's inbound path (istio-iptables, virtualInbound): capture rules never
    # installed (a failed istio-init / CNI), a STRICT chain group that also accepts
    # plaintext, a PERMISSIVE passthrough chain terminating the plain TLS it must pass on
    CAPTURE_MISSING = "capture-missing"
    STRICT_CHAIN_ACCEPTS_PLAINTEXT = "strict-chain-accepts-plaintext"
    PASSTHROUGH_TERMINATES_TLS = "passthrough-terminates-tls"
    # the fix of a known gap broken: the gateway-api proxyconfig variant's ProxyConfig
    # selects no pod, so the generated gateway opens no secure port (a FAIL, not KNOWN-GAP)
    PROXYCONFIG_SELECTS_NOTHING = "proxyconfig-selects-nothing"


#: faults of the scraper (its configuration or its certificates): one per backend
SCRAPER_FAULTS = frozenset({Fault.SCRAPE_JOB_PLAINTEXT, Fault.SCRAPER_CERTS_NOT_REFRESHED})


def select_nothing(proxy_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a ProxyConfig whose selector matches no pod (a typo in the gateway name)."""
    broken = copy.deepcopy(dict(proxy_config))
    labels = broken.setdefault("spec", {}).setdefault("selector", {}).setdefault("matchLabels", {})
    for key in list(labels) or ["gateway.networking.k8s.io/gateway-name"]:
        labels[key] = "no-such-gateway"
    return broken
