"""What a command line selects: backend, Istio version, scenarios, distribution metadata.

Shared by ``run`` (cli.py) and ``plan`` / ``list`` (commands.py); every check here runs
before anything starts and raises a UsageError naming the input.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from securemetrics_e2e.backends import NAMES
from securemetrics_e2e.catalog import SCENARIOS, Profile, Scenario, scenario, scenario_names
from securemetrics_e2e.errors import UsageError

PROG = "securemetrics-e2e"
BACKENDS = NAMES
PROFILES = ("core", "extended", "all")

EXIT_OK = 0
EXIT_NOT_CONFORMANT = 1
EXIT_USAGE = 2

#: CLI flag -> the pytest option it becomes for the cluster backends
CLUSTER_FLAGS = {
    "hub": "--istio-hub",
    "tag": "--istio-tag",
    "kubeconfig": "--kubeconfig",
    "context": "--kube-context",
    "keep": "--keep-cluster",
    "canary": "--canary",
}


@dataclass(frozen=True)
class Selection:
    backend: str
    istio_version: str
    profile: str
    scenarios: tuple[Scenario, ...]
    explicit: bool  # the user named scenarios

    @property
    def profiles(self) -> tuple[str, ...]:
        if self.profile != "all":
            return (self.profile,)
        return tuple(p.value for p in Profile)


def select(args: argparse.Namespace) -> Selection:
    """The backend, version and scenarios ``args`` ask for; UsageError naming a bad value."""
    from securemetrics_e2e.versions import DEFAULT_VERSION, check_released, resolve

    # "" is a mistake (an unset shell variable), not a request for the default
    asked = args.istio_version is not None
    version = resolve(args.istio_version) if asked else DEFAULT_VERSION
    check_released(version, custom_build=bool(getattr(args, "tag", None)))
    names = scenario_names(args.scenario)
    if names:
        chosen = [scenario(n) for n in names]
        if args.profile != "all":
            wrong = [s.name for s in chosen if s.profile.value != args.profile]
            if wrong:
                raise UsageError(
                    f"scenario {', '.join(wrong)} is not in profile {args.profile!r}; "
                    f"drop --profile or use --profile all"
                )
    else:
        chosen = [s for s in SCENARIOS if args.profile in ("all", s.profile.value)]
    return Selection(args.backend, str(version), args.profile, tuple(chosen), bool(names))


def local_preflight() -> dict[str, str]:
    """The binaries the local backend runs; EnvironmentProblem naming how to get a missing one."""
    from securemetrics_e2e.local.envoy import envoy_binary
    from securemetrics_e2e.local.promserver import prometheus_binary

    return {"prometheus": prometheus_binary(), "envoy": envoy_binary()}


def check_backend_flags(args: argparse.Namespace) -> None:
    if args.backend == "local":
        used = [f"--{k}" for k in CLUSTER_FLAGS if getattr(args, k, None)]
        if used:
            raise UsageError(
                f"{', '.join(used)}: only for a cluster backend; the local backend runs no Istio "
                "control plane and keeps nothing after the run (use --backend kind or existing)"
            )
    elif getattr(args, "local_fault", None) or args.local_network != "auto":
        raise UsageError("--local-network and --local-fault apply to --backend local only")
    if getattr(args, "canary", False) and not args.upgrade_from:
        raise UsageError("--canary chooses how --upgrade-from upgrades: add --upgrade-from")


#: the report's distribution options (``--org`` for `run`, ``--sm-org`` for pytest): here,
#: not in report.py, so that building the command line imports no report machinery
DISTRIBUTION_OPTIONS = {
    "org": "organization of the distribution under test, e.g. 'Example Corp.'",
    "project": "distribution name, e.g. 'Example Mesh'",
    "url": "distribution URL",
    "dist-version": "distribution version",
    "contact": "contact (repeatable)",
}


def distribution(args: argparse.Namespace) -> Any:
    from securemetrics_e2e.report import Distribution

    return Distribution(
        organization=args.org or "",
        project=args.project or "",
        url=args.url or "",
        version=args.dist_version or "",
        contact=tuple(args.contact or ()),
    )
