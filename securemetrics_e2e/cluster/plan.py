"""The ordered plan of a cluster run: every command and every manifest, touching nothing.

The backend builds what it applies with the same functions (:func:`variant_plan`,
:func:`scraper_plan`, the command builders of :mod:`.istio`), so the plan is what a run
does, not a description of it. Steps whose execution depends on what the cluster
already holds (an installed Istio, Gateway API CRDs, a Prometheus Operator) say so.
"""

from __future__ import annotations

from collections.abc import Iterable

from securemetrics_e2e.catalog import (
    SCENARIOS,
    MtlsMode,
    RunUnit,
    Scenario,
)
from securemetrics_e2e.cluster import pins
from securemetrics_e2e.cluster.layout import (
    SCRAPER_DEPLOYMENT,
    kind_identity,
    planned_target,
    planned_version,
    run_scope_reason,
    scraper_plan,
    skipped_variant,
    variant_plan,
)
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.steps import (
    Detected,
    Plan,
    Step,
    _variant_steps,
    cluster_steps,
    creates_lines,
    istio_creates,
    istio_removal,
    istio_step,
    teardown_steps,
    tools_step,
)
from securemetrics_e2e.cluster.tools import (
    ToolCache,
    istioctl_spec,
)
from securemetrics_e2e.cluster.upgrade import upgrade_plan
from securemetrics_e2e.versions import (
    capabilities,
)


def _units(
    scenarios: Iterable[Scenario | tuple[Scenario, MtlsMode] | RunUnit] | None,
) -> list[RunUnit]:
    """Every run unit of the scenarios (of a (scenario, mode): every variant in that mode)."""
    units: list[RunUnit] = []
    for item in SCENARIOS if scenarios is None else scenarios:
        if isinstance(item, Scenario):
            units += item.run_units()
        elif isinstance(item, RunUnit):
            units.append(item)
        else:
            units += [u for u in item[0].run_units() if u.mtls_mode is item[1]]
    return units


def render_plan(
    options: ClusterOptions,
    scenarios: Iterable[Scenario | tuple[Scenario, MtlsMode] | RunUnit] | None = None,
    *,
    cache: ToolCache | None = None,
    detected: Detected | None = None,
) -> Plan:
    """What a run with ``options`` would do for ``scenarios`` (default: all), in order.

    An upgrade run (``options.upgrade_from``) has a plan of its own
    (:func:`securemetrics_e2e.cluster.upgrade.upgrade_plan`); the other scenarios are
    listed there as skipped.
    """
    options = options.validated()
    if options.upgrade_from is not None:
        return upgrade_plan(options, cache=cache, scenarios=_units(scenarios), detected=detected)
    version = planned_version(options)
    caps = capabilities(version)
    cache = cache or ToolCache(options.cache_dir)
    run_id = options.run_id
    kind = kind_identity(options)
    target = planned_target(options, kind)
    istioctl = str(options.istioctl_bin or "istioctl")
    variants = []
    for u in _units(scenarios):
        scope = run_scope_reason(u.scenario, options)
        variants.append(
            skipped_variant(u.scenario, u.mtls_mode, run_id, scope, u.variant)
            if scope is not None
            else variant_plan(
                u.scenario,
                u.mtls_mode,
                version,
                run_id,
                revision=options.revision,
                variant=u.variant,
            )
        )
    active = [v for v in variants if v.skip is None]
    steps: list[Step] = [
        tools_step(options, cache, [istioctl_spec(str(version))]),
        *cluster_steps(options, kind),
    ]
    installs = detected is None or detected.istio is None
    steps.append(istio_step(options, version, target, istioctl, detected))
    if any(v.needs_gateway_api for v in active):
        files = pins.gateway_api_files(caps.gateway_api_version)
        steps.append(
            Step(
                "crds",
                f"unless CRD {pins.GATEWAY_CRD} exists: apply the Gateway API "
                f"{caps.gateway_api_version} CRDs server-side, each file checked against its "
                "pinned sha256 and labelled with the run label",
                details=[f"{f.url} sha256 {f.sha256}" for f in files],
            )
        )
    if any(v.needs_operator for v in active):
        bundle = pins.PROMETHEUS_OPERATOR_BUNDLE
        steps.append(
            Step(
                "operator",
                f"unless a Prometheus Operator runs: apply Prometheus Operator "
                f"{pins.PROMETHEUS_OPERATOR_VERSION} (CRDs + operator, namespace default) "
                "server-side, checked against its pinned sha256, labelled with the run label; "
                "wait for deployment/prometheus-operator",
                details=[f"{bundle.url} sha256 {bundle.sha256}"],
            )
        )
    scraper = scraper_plan(version, run_id, revision=options.revision)
    steps.append(
        Step(
            "scraper",
            f"deploy the secure-metrics Prometheus in {scraper.namespace}; wait for "
            f"deployment/{SCRAPER_DEPLOYMENT}; its API is read through the Kubernetes API "
            f"service proxy /api/v1/namespaces/{scraper.namespace}/services/"
            f"{scraper.service}:{scraper.port}/proxy/",
            manifests=list(scraper.manifests),
        )
    )
    for index, v in enumerate(active):
        holder = next((o for o in active[:index] if o.conflicts(v)), None)
        steps += _variant_steps(v, after=holder)
    removal = istio_removal(istioctl, target, [options.revision]) if installs else []
    teardown = teardown_steps(options, active, scraper, kind, removal, detected=detected)
    creates = creates_lines(options, active, scraper, installs=istio_creates(options, detected))
    return Plan(options, version, steps, variants, teardown, creates=creates)
