"""The commands that run no scenario: plan, list, matrix, audit, scrape-config."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securemetrics_e2e.catalog import SCENARIOS, Feature
from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.selection import (
    BACKENDS,
    EXIT_OK,
    PROG,
    Selection,
    check_backend_flags,
    distribution,
    local_preflight,
    select,
)

# ---------------------------------------------------------------------- plan


def _local_plan(args: argparse.Namespace, sel: Selection) -> str:
    from securemetrics_e2e.applicability import unit_skip_reason
    from securemetrics_e2e.checks import CHECKS
    from securemetrics_e2e.knowngaps import gaps_for
    from securemetrics_e2e.local.backend import LocalBackend
    from securemetrics_e2e.runner import skip_reason as check_skip_reason

    backend = LocalBackend(
        network=args.local_network,
        istio_version=sel.istio_version,
        upgrade_from=args.upgrade_from,
    )
    lines = [
        f"{PROG} run plan: backend local, Istio {sel.istio_version}, profile {sel.profile}",
        "",
        "Environment (read, not changed):",
    ]
    try:
        found = local_preflight()
        lines += [f"  {name}: {path}" for name, path in found.items()]
    except EnvironmentProblem as exc:
        lines.append(f"  MISSING: {exc}")
    network = {
        "auto": "network namespaces when `ip netns add` works (root), else 127.0.0.0/8 addresses",
        "netns": "network namespaces (fails without root)",
        "loopback": "127.0.0.0/8 addresses (no pod isolation: hardened checks skip)",
    }[args.local_network]
    lines += [
        f"  pod network: {network}",
        "",
        "Steps:",
        "  1. create a temporary directory, a mesh CA and a foreign CA (for the negative checks)",
        "  2. start the scraper pod: Prometheus loaded with "
        "charts/secure-metrics-prometheus/files/prometheus.yml (file_sd instead of Kubernetes SD)",
        "  3. per run unit below: start one pod per workload (Envoy configured as pilot-agent "
        "would, the agent's status port, the app), then run its checks",
        "  4. stop every process, delete every namespace and the temporary directory",
        "",
        "Run units (scenario[MODE/variant]):",
    ]
    units = [u for s in sel.scenarios for u in s.run_units()]
    for v in units:
        reason = unit_skip_reason(v, backend, sel.istio_version)
        if reason:
            lines.append(f"  SKIP {v.id}: {reason}")
            continue
        lines.append(f"  RUN  {v.id} ({v.scenario.profile.value}): {v.scenario.description}")
        lines.append(f"         variant {v.variant.id}: {v.variant.description}")
        for gap in gaps_for(v.scenario.name, v.mtls_mode.value, v.variant.id, sel.istio_version):
            lines.append(f"         known gap {gap.id} (fix: {gap.fix_text})")
        if v.scenario.name == "upgrade":
            old, new = backend.upgrade_versions()
            lines.append(
                f"         from Istio {old}'s configuration to {new}'s: the pod is replaced "
                "while Prometheus scrapes (no istioctl: that part needs a cluster)"
            )
        for c in CHECKS:
            if not c.applies_to(v.scenario):
                continue
            why = check_skip_reason(c, backend)
            mark = f"skip: {why}" if why else c.code
            lines.append(f"         {c.id:<32} {mark}")
    return "\n".join(lines) + "\n"


def _cluster_plan(args: argparse.Namespace, sel: Selection) -> str:
    from securemetrics_e2e.cluster.options import ClusterOptions
    from securemetrics_e2e.cluster.plan import render_plan

    options = ClusterOptions(
        mode=sel.backend,
        istio_version=sel.istio_version
        if sel.backend == "kind" or args.istio_version is not None
        else None,
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        context=args.context,
        keep_cluster=args.keep,
        hub=args.hub,
        tag=args.tag,
        upgrade_from=args.upgrade_from,
        canary=args.canary,
        plan_only=True,
    )
    return render_plan(options, list(sel.scenarios)).render_text().rstrip("\n") + "\n"


#: Istio's default images: pilot.image and global.proxy.image in
#: manifests/charts/istio-control/istio-discovery/values.yaml, on the release hub
ISTIO_IMAGES = {"istiod": "pilot", "proxy": "proxyv2"}
ISTIO_RELEASE_HUB = "docker.io/istio"


def _plan_meta(args: argparse.Namespace, sel: Selection) -> Any:
    """A plan-only report's metadata: what a run would install, as the plan names it."""
    from securemetrics_e2e.report import ReportMeta

    details: dict[str, str] = {}
    if sel.backend == "local":
        from securemetrics_e2e.local.provenance import stand_ins

        details.update(stand_ins())
    else:
        hub, tag = args.hub or ISTIO_RELEASE_HUB, args.tag or sel.istio_version
        for name, image in ISTIO_IMAGES.items():
            details[f"{name}_image"] = f"{hub}/{image}:{tag}"  # planned: no digest yet
            details[f"{name}_version"] = sel.istio_version
    return ReportMeta(
        distribution=distribution(args),
        istio_version=sel.istio_version,
        istio_hub=args.hub or "",
        istio_tag=args.tag or "",
        backend=sel.backend,
        backend_details=details,
        profiles=sel.profiles,
        scenarios=tuple(s.name for s in sel.scenarios) if sel.explicit else (),
        plan_only=True,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from securemetrics_e2e.outputs import check_writable, report_format

    check_backend_flags(args)
    sel = select(args)
    if args.report:
        report_format(Path(args.report))
        check_writable(Path(args.report), "--report")
    text = _local_plan(args, sel) if sel.backend == "local" else _cluster_plan(args, sel)
    sys.stdout.write(text)
    if args.report:  # only then the report machinery (pytest, the schema: 0.3 s)
        from securemetrics_e2e.report import write_report
        from securemetrics_e2e.results import RunResult

        write_report(Path(args.report), RunResult(), _plan_meta(args, sel))
    return EXIT_OK


# ---------------------------------------------------------------------- list


def _backend_features(name: str, local_network: str) -> frozenset[Feature]:
    from securemetrics_e2e.backends import backend_entry

    return backend_entry(name).features(local_network)


def applicability(
    backends: Sequence[str], versions: Sequence[str], profile: str, local_network: str = "auto"
) -> list[dict[str, Any]]:
    """One row per run unit x Istio version x backend: whether it runs, why not, and the
    known gaps that apply to it."""
    from securemetrics_e2e.applicability import skip_reason
    from securemetrics_e2e.checks import CHECKS
    from securemetrics_e2e.knowngaps import gaps_for

    features = {b: _backend_features(b, local_network) for b in backends}
    rows = []
    for s in SCENARIOS:
        if profile not in ("all", s.profile.value):
            continue
        checks = [c for c in CHECKS if c.applies_to(s)]
        for v in s.run_units():
            for b in backends:
                skipped = [c.id for c in checks if c.needs - features[b]]
                for version in versions:
                    reason = skip_reason(
                        v, backend=b, backend_features=features[b], version=version
                    )
                    gaps = gaps_for(s.name, v.mtls_mode.value, v.variant.id, version)
                    rows.append(
                        {
                            "id": v.id,
                            "scenario": s.name,
                            "mode": v.mtls_mode.value,
                            "variant": v.variant.id.value,
                            "knownGaps": [g.id for g in gaps],
                            "profile": s.profile.value,
                            "backend": b,
                            "istioVersion": version,
                            "applies": reason is None,
                            "reason": reason or "",
                            "checks": 0 if reason else len(checks) - len(skipped),
                            "skippedChecks": [] if reason else skipped,
                        }
                    )
    return rows


def _render_list(rows: list[dict[str, Any]], versions: Sequence[str]) -> str:
    notes: dict[str, int] = {}
    table: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        key = (r["id"], r["profile"], r["backend"])
        if r["applies"]:
            cell = f"yes ({r['checks']})"
            if r["skippedChecks"]:
                why = f"checks skipped here: {', '.join(r['skippedChecks'])}"
                cell += f" [{notes.setdefault(why, len(notes) + 1)}]"
        else:
            cell = f"no [{notes.setdefault(r['reason'], len(notes) + 1)}]"
        table.setdefault(key, {})[r["istioVersion"]] = cell
    header = ["SCENARIO[MODE/VARIANT]", "PROFILE", "BACKEND", *versions]
    body = [[*key, *(cells.get(v, "") for v in versions)] for key, cells in table.items()]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in [header, *body]]  # fmt: skip
    out.append("")
    out.append("yes (N): the run unit runs, with N checks; no: it is skipped, because:")
    out += [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join([*out, *_variants_and_gaps(rows)]) + "\n"


def _variants_and_gaps(rows: list[dict[str, Any]]) -> list[str]:
    """Each listed scenario's variants, and the known upstream gaps with their evidence."""
    from securemetrics_e2e.catalog import scenario
    from securemetrics_e2e.knowngaps import KNOWN_GAPS

    listed = list(dict.fromkeys(r["scenario"] for r in rows))
    out = ["", "Variants:"]
    for name in listed:
        s = scenario(name)
        for v in s.variants:
            modes = ", ".join(m.value for m in (v.mtls_modes or s.mtls_modes))
            out.append(f"  {name} {v.id} ({modes}): {v.description}")
    out += ["", "Known upstream gaps (a check failing as predicted is KNOWN-GAP, not FAIL):"]
    for gap in KNOWN_GAPS:
        if not {u[0] for u in gap.units} & set(listed):
            continue
        units = ", ".join(gap.unit_ids)
        out.append(f"  {gap.id} (Istio {gap.versions}; fix: {gap.fix_text})")
        out.append(f"    {gap.title}")
        out.append(f"    units: {units}")
        for p in gap.predictions:
            out.append(f"    predicts {p.check}: {', '.join(sorted(p.outcomes))}")
        out += [f"    evidence: {e}" for e in gap.evidence]
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from securemetrics_e2e.versions import resolve, supported_versions

    backends = list(dict.fromkeys(args.backend or BACKENDS))
    if args.istio_version is not None:
        versions = [str(resolve(v)) for v in dict.fromkeys(args.istio_version)]
    else:
        versions = [str(v) for v in supported_versions()]
    rows = applicability(backends, versions, args.profile, args.local_network)
    if args.format == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write(_render_list(rows, versions))
    return EXIT_OK


# ---------------------------------------------------------------------- matrix


def cmd_matrix(args: argparse.Namespace) -> int:
    from securemetrics_e2e.matrix import build_matrix, load_reports, render_html, render_markdown
    from securemetrics_e2e.outputs import check_writable, write_atomically

    for option, path in (("--markdown", args.markdown), ("--html", args.html)):
        if path:
            check_writable(Path(path), option)  # before reading a single report
    matrix = build_matrix(load_reports([Path(p) for p in args.reports]))
    markdown = render_markdown(matrix)
    if args.markdown:
        write_atomically(Path(args.markdown), markdown.encode("utf-8"), "--markdown")
    if args.html:
        write_atomically(Path(args.html), render_html(matrix).encode("utf-8"), "--html")
    if not args.markdown and not args.html:
        sys.stdout.write(markdown)
    else:
        written = [p for p in (args.markdown, args.html) if p]
        print(
            f"{PROG} matrix: {len(matrix.rows)} run units x {len(matrix.columns)} runs "
            f"-> {', '.join(written)}"
        )
    return EXIT_OK


# ---------------------------------------------------------------------- audit


def cmd_audit(args: argparse.Namespace) -> int:
    from securemetrics_e2e.audit import Severity, audit, render_json, render_text

    fail_on = Severity[args.fail_on.upper()]
    result = audit([Path(p) for p in args.paths])
    if args.format == "json":
        sys.stdout.write(render_json(result, fail_on))
    else:
        sys.stdout.write(render_text(result))
    return result.exit_status(fail_on)


def cmd_scrape_config(args: argparse.Namespace) -> int:
    """Print the shipped Prometheus scrape configuration (what the suite proves works)."""
    from securemetrics_e2e.local.promconfig import chart_scrape_config_path

    sys.stdout.write(chart_scrape_config_path().read_text(encoding="utf-8"))
    return EXIT_OK
