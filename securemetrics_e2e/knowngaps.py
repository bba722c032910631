"""Known upstream gaps: where Istio's documented configuration does not do what it says.

A vendor running the suite must tell an upstream gap from a regression of their
distribution. Each :class:`KnownGap` names the run units it affects, the failure it
predicts per check (which check, which observed outcomes), the Istio versions, the
evidence in Istio's source and the fix variant. :func:`judge` is the one place a check's
result is mapped through the table:

* a failure the gap predicts (the check is predicted, and every outcome the check observed
  is one the gap predicts) -> KNOWN-GAP, naming the gap and its fix;
* a pass where a gap predicts a failure -> FIXED: this distribution closes the gap;
* any other failure (a check the gap does not predict, or an outcome it does not) -> FAIL.

Observed outcomes are the machine-readable ``clause:outcome`` tokens a :class:`CheckFailed`
carries (``securemetrics_e2e.checks``), e.g. ``scrape:closed`` or ``target:down``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from securemetrics_e2e.catalog import MtlsMode, RunUnit, VariantId, unit_id
from securemetrics_e2e.results import CheckOutcome, Status

if TYPE_CHECKING:
    from securemetrics_e2e.checks import Check

_TARGET_DOWN = frozenset({"target:down", "target:timeout"})
#: what a TLS client sees when a sidecar terminates its TLS and the plaintext it forwards is
#: closed by the TLS-only static listener (or the chain resets a TLS client with no Istio ALPN)
_CLOSED_AFTER_TLS = frozenset({"closed", "handshake-rejected"})


@dataclass(frozen=True)
class Prediction:
    """One check the gap makes fail, and the outcomes that failure shows."""

    check: str
    outcomes: frozenset[str]


#: a run unit as the table names it: (scenario, mTLS mode, variant)
Unit = tuple[str, MtlsMode, VariantId]


@dataclass(frozen=True)
class KnownGap:
    id: str
    title: str
    units: tuple[Unit, ...]
    predictions: tuple[Prediction, ...]
    #: first Istio version the gap applies to (among those the suite supports); ``until``:
    #: the first version that closes it (none yet)
    since: str
    evidence: tuple[str, ...]
    #: variants that fix it; the first is the one to recommend
    fixes: tuple[VariantId, ...]
    until: str | None = None

    def affects(self, scenario: str, mode: str, variant: str) -> bool:
        return any((s, m.value, v.value) == (scenario, mode, variant) for s, m, v in self.units)

    @property
    def unit_ids(self) -> tuple[str, ...]:
        return tuple(unit_id(s, m.value, v.value) for s, m, v in self.units)

    def applies_to_version(self, version: str) -> bool:
        v = _minor_patch(version)
        if v < _minor_patch(self.since):
            return False
        return self.until is None or v < _minor_patch(self.until)

    def predicted(self, check_id: str) -> frozenset[str] | None:
        for p in self.predictions:
            if p.check == check_id:
                return p.outcomes
        return None

    def is_fix_unit(self, scenario: str, mode: str, variant: str) -> bool:
        """Whether the unit is one of this gap's fixes, where the gap applies (a scenario
        and mode the gap affects)."""
        return variant in {f.value for f in self.fixes} and any(
            (s, m.value) == (scenario, mode) for s, m, _ in self.units
        )

    @property
    def versions(self) -> str:
        return f">= {self.since}" + (f", < {self.until}" if self.until else "")

    @property
    def fix_text(self) -> str:
        return " or ".join(f.value for f in self.fixes)


def _minor_patch(version: str) -> tuple[int, ...]:
    core = version.split("-", 1)[0]
    return tuple(int(p) for p in core.split(".") if p.isdigit())


def _pred(check: str, *outcomes: Collection[str] | str) -> Prediction:
    flat: set[str] = set()
    for o in outcomes:
        flat.update({o} if isinstance(o, str) else o)
    return Prediction(check, frozenset(flat))


def _prefixed(clause: str, outcomes: Collection[str]) -> frozenset[str]:
    return frozenset(f"{clause}:{o}" for o in outcomes)


KNOWN_GAPS: tuple[KnownGap, ...] = (
    KnownGap(
        id="strict-captures-secure-ports",
        title="STRICT mTLS captures 15091/15092: the sidecar terminates the scraper's TLS and "
        "hands plaintext to the TLS-only secure listener, which closes it",
        units=(
            ("native-sidecar", MtlsMode.STRICT, VariantId.AS_DOCUMENTED),
            ("hardened", MtlsMode.STRICT, VariantId.AS_DOCUMENTED),
            # its ServiceMonitor / PodMonitor on the secure merged port is captured too
            ("servicemonitor", MtlsMode.STRICT, VariantId.AS_DOCUMENTED),
            ("servicemonitor", MtlsMode.STRICT, VariantId.TCP_APP_PORT),
            ("servicemonitor", MtlsMode.STRICT, VariantId.PODMONITOR),
        ),
        predictions=(
            _pred("mtls-scrape", _prefixed("scrape", _CLOSED_AFTER_TLS)),
            _pred("envoy-port-stats-only", _prefixed("stats-only", _CLOSED_AFTER_TLS)),
            _pred("targets-up-merged", _TARGET_DOWN),
            _pred("targets-up-envoy", _TARGET_DOWN),
            # the ServiceMonitor / PodMonitor target on the secure merged port
            _pred("servicemonitor-targets-up", "down:15092"),
        ),
        since="1.31.0",
        evidence=(
            "manifests/charts/istio-control/istio-discovery/files/injection-template.yaml "
            "(excludeInboundPorts: only 15090, 15021 and the status port)",
            "pilot/pkg/networking/core/listener_inbound.go (passthrough chains, no "
            "use_original_dst) and filterchain_options.go (STRICT terminates TLS)",
            "tools/packaging/common/envoy_bootstrap.json (secure listeners match "
            "transport_protocol tls only)",
        ),
        fixes=(VariantId.EXCLUDE_CAPTURE, VariantId.PORT_PERMISSIVE),
    ),
    KnownGap(
        id="legacy-sidecar-permissive-plaintext",
        title="The pre-1.31 Sidecar ingress on 15091 (protocol HTTP) in PERMISSIVE serves "
        "plaintext and resets a TLS client without an Istio ALPN, such as Prometheus",
        units=(("legacy-sidecar", MtlsMode.PERMISSIVE, VariantId.AS_DOCUMENTED),),
        predictions=(
            _pred("listeners-tls-only", "listener:not-tls-only", "listener:no-client-cert"),
            _pred("mtls-scrape", _prefixed("scrape", _CLOSED_AFTER_TLS)),
            # only from another pod: inside the pod the probe dials 127.0.0.1:15091, which
            # istio-iptables never redirects (tools/istio-iptables/pkg/capture/run.go:
            # ISTIO_INBOUND is in PREROUTING; loopback traffic never passes it) and on
            # which nothing listens, so that attempt is refused
            _pred("plaintext-refused", "plaintext-other-pod:served"),
            _pred("targets-up-merged", _TARGET_DOWN),
        ),
        since="1.28.0",  # the oldest version the suite supports; never closed
        evidence=(
            "pilot/pkg/networking/core/filterchain_options.go (getFilterChainMatchOptions: "
            "PERMISSIVE HTTP port = Istio-ALPN mTLS chain + plaintext chain)",
            "pilot/pkg/networking/core/listener_inbound.go (Sidecar ingress ports get "
            "their own destination_port chains, governed by PeerAuthentication)",
            "istio.io task secure-metrics (< 1.31) shows no PeerAuthentication",
        ),
        fixes=(VariantId.PORT_STRICT,),
    ),
    KnownGap(
        id="gateway-api-infrastructure-annotations",
        title="proxy.istio.io/config in a Gateway's spec.infrastructure.annotations never "
        "reaches the generated gateway's environment: no secure ports; hardened, 15090 "
        "turns localhost-only while 15020 stays open to other pods",
        units=(("gateway-api", MtlsMode.PERMISSIVE, VariantId.AS_DOCUMENTED),),
        predictions=(
            _pred("listeners-tls-only", "listener:missing"),
            _pred("mtls-scrape", "scrape:refused"),
            _pred("envoy-port-stats-only", "stats-only:refused"),
            _pred("targets-up-merged", _TARGET_DOWN),
            _pred("targets-up-envoy", _TARGET_DOWN),
            # a hardened Gateway API gateway: 15020 serves other pods instead of 403
            _pred("hardened-agent-forbidden", "other-pod:served"),
        ),
        since="1.31.0",
        evidence=(
            "pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go "
            "(GetProxyConfigOrDefault with the gateway-name label only)",
            "manifests/charts/istio-control/istio-discovery/files/kube-gateway.yaml "
            "(env from .ProxyConfig.ProxyMetadata)",
            "pilot/cmd/pilot-agent/options/options.go (secure ports from process env)",
            "pkg/features/telemetry.go, pilot/cmd/pilot-agent/status/server.go (403 rule "
            "from process env); pkg/bootstrap/option/instances.go (15090 bind from the "
            "annotation's proxyMetadata)",
        ),
        fixes=(VariantId.PROXYCONFIG,),
    ),
    KnownGap(
        id="servicemonitor-http-app-port-permissive",
        title="A ServiceMonitor scraping the application port with TLS: an HTTP-declared port "
        "in PERMISSIVE resets a TLS client without an Istio ALPN",
        units=(("servicemonitor", MtlsMode.PERMISSIVE, VariantId.AS_DOCUMENTED),),
        predictions=(_pred("servicemonitor-targets-up", "down:8080"),),
        since="1.28.0",  # the oldest version the suite supports; never closed
        evidence=(
            "pilot/pkg/networking/core/filterchain_options.go (PERMISSIVE HTTP port: no "
            "chain for TLS without an Istio ALPN; TCP port: passed through)",
        ),
        fixes=(VariantId.TCP_APP_PORT, VariantId.PODMONITOR),
    ),
)

_BY_ID = {g.id: g for g in KNOWN_GAPS}


def known_gap(gap_id: str) -> KnownGap:
    return _BY_ID[gap_id]


def gaps_for(scenario: str, mode: str, variant: str, version: str) -> list[KnownGap]:
    """The gaps that apply to one run unit at ``version``."""
    return [
        g
        for g in KNOWN_GAPS
        if g.affects(scenario, mode, variant) and g.applies_to_version(version)
    ]


def fix_of(scenario: str, mode: str, variant: str) -> tuple[str, ...]:
    """Ids of the gaps this run unit is a fix of (it must pass for a conformant verdict)."""
    return tuple(g.id for g in KNOWN_GAPS if g.is_fix_unit(scenario, mode, variant))


@dataclass(frozen=True)
class Judgement:
    status: Status
    message: str
    gap: str = ""


def judge(
    *,
    scenario: str,
    mode: str,
    variant: str,
    check: str,
    version: str,
    status: Status,
    message: str,
    observed: Collection[str] = (),
) -> Judgement:
    """Map one check's PASS / FAIL / SKIP through the known-gap table."""
    if status is Status.SKIP:
        return Judgement(status, message)
    predicting = [
        (g, outcomes)
        for g in gaps_for(scenario, mode, variant, version)
        if (outcomes := g.predicted(check)) is not None
    ]
    if not predicting:
        return Judgement(status, message)
    if status is Status.PASS:
        gap = predicting[0][0]
        return Judgement(
            Status.FIXED,
            f"this distribution closes upstream gap {gap.id} (predicted to fail: {gap.title})",
            gap.id,
        )
    seen = frozenset(observed)
    for gap, outcomes in predicting:
        if seen and seen <= outcomes:
            return Judgement(
                Status.KNOWN_GAP,
                f"known upstream gap {gap.id}; fix: variant {gap.fix_text} ({message})",
                gap.id,
            )
    gap, outcomes = predicting[0]
    shown = ", ".join(sorted(seen)) or "no machine-readable outcome"
    return Judgement(
        Status.FAIL,
        f"{message} (not known gap {gap.id}: it predicts {', '.join(sorted(outcomes))}; "
        f"observed {shown})",
    )


def checked(
    unit: RunUnit,
    check: Check,
    version: str,
    status: Status,
    message: str,
    observed: Collection[str] = (),
    *,
    duration_s: float = 0.0,
    nodeid: str = "",
    diagnostics: str = "",
) -> CheckOutcome:
    """The outcome of ``check`` on ``unit``: its PASS / FAIL / SKIP judged by :func:`judge`."""
    scenario, mode, variant = unit.scenario.name, unit.mtls_mode.value, unit.variant.id.value
    verdict = judge(
        scenario=scenario,
        mode=mode,
        variant=variant,
        check=check.id,
        version=version,
        status=status,
        message=message,
        observed=observed,
    )
    failed = verdict.status is Status.FAIL
    return CheckOutcome(
        scenario=scenario,
        mode=mode,
        variant=variant,
        check=check.id,
        status=verdict.status,
        message=verdict.message,
        code=check.code if failed or verdict.status is Status.KNOWN_GAP else "",
        profile=unit.scenario.profile.value,
        duration_s=duration_s,
        diagnostics=diagnostics if failed else "",
        nodeid=nodeid,
        gap=verdict.gap,
        fix_of=fix_of(scenario, mode, variant),
    )
