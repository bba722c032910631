"""Sessions: `nox -l` lists them. Each installs what it needs, system packages included.

Every session runs on the interpreter nox itself runs on (Python 3.11 to 3.13, whichever
the machine has): naming versions here would either skip sessions on a machine without
them or run each session once per version. `nox --force-python 3.12` picks another one.
A session that cannot run fails: nox never exits 0 without having run it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
#: the Python versions the package supports (pyproject.toml: requires-python, classifiers)
SUPPORTED = ((3, 11), (3, 12), (3, 13))
PYTHON = None  # the interpreter running nox; see the module docstring


def _supported_python(session: nox.Session) -> None:
    """Fail (never skip) on an interpreter outside 3.11-3.13."""
    # run_install: it runs under --install-only too (.ci/run installs first, then times)
    done = session.run_install(
        "python", "-c", "import sys; print(*sys.version_info[:2])", silent=True
    )
    found = tuple(int(p) for p in str(done).split())
    if found not in SUPPORTED:
        shown = ", ".join(f"{a}.{b}" for a, b in SUPPORTED)
        session.error(
            f"Python {'.'.join(map(str, found)) or sys.version.split()[0]} is not supported; "
            f"run nox with one of {shown} (e.g. nox --force-python 3.12)"
        )


def _install(session: nox.Session, *requirements: str) -> None:
    """``session.install(*requirements)``, skipped when this virtualenv already installed
    exactly these from this pyproject.toml (a stamp inside it): in a reused environment
    pip only found everything satisfied, 5 s of each ``nox -s tests`` (the checkout is
    installed editable, so changed sources need no install; a changed pyproject.toml
    does, and changes the stamp; ``nox --reinstall`` starts a fresh environment)."""
    wanted = hashlib.sha256(
        Path("pyproject.toml").read_bytes() + "\0".join(requirements).encode()
    ).hexdigest()
    location = getattr(session.virtualenv, "location", None)
    stamp = Path(location) / ".securemetrics-installed" if location else None
    if stamp is not None and stamp.is_file() and stamp.read_text() == wanted:
        session.log(f"{' '.join(requirements)}: installed already (pyproject.toml unchanged)")
        return
    session.install(*requirements)
    if stamp is not None:
        stamp.write_text(wanted)


def _system_packages(session: nox.Session) -> None:
    """Debian's prometheus, iproute2 and iptables (the local backend's inbound capture),
    installed when missing and we may (root)."""
    missing = [
        pkg
        for pkg, binary in (
            ("prometheus", "prometheus"),
            ("iproute2", "ip"),
            ("iptables", "iptables-restore"),
        )
        if shutil.which(binary) is None
    ]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        session.error(
            f"missing {', '.join(missing)}: install the Debian packages {' '.join(missing)} "
            "(or put a prometheus binary on PATH) and run again"
        )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-qq", external=True, env=env)
    session.run(
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *missing,
        external=True,
        env=env,
    )


#: inotify instances a user may hold (fs.inotify.max_user_instances): each local Envoy
#: holds two (its watched SDS files) and aborts when none is left; the full tier runs up
#: to about sixty Envoys side by side (108 instances were seen in use), and a second
#: suite beside it doubles that, past the kernel's default of 128
INOTIFY_INSTANCES = 1024


def _inotify_instances(session: nox.Session) -> None:
    """Raise fs.inotify.max_user_instances to :data:`INOTIFY_INSTANCES` when it is lower
    and we may (root), as the packages above are installed; otherwise say how."""
    limit = Path("/proc/sys/fs/inotify/max_user_instances")
    try:
        current = int(limit.read_text())
    except (OSError, ValueError):
        return  # not Linux, or not readable: the local backend says so itself
    if current >= INOTIFY_INSTANCES:
        return
    try:
        limit.write_text(f"{INOTIFY_INSTANCES}\n")
    except OSError:
        session.warn(
            f"fs.inotify.max_user_instances is {current}: local Envoys abort when none is "
            f"left; raise it with `sysctl -w fs.inotify.max_user_instances="
            f"{INOTIFY_INSTANCES}` (as root)"
        )
        return
    session.log(
        f"raised fs.inotify.max_user_instances from {current} to {INOTIFY_INSTANCES} "
        "(each local Envoy watches its SDS files with two)"
    )


#: pytest-xdist workers: the real-process tests mostly wait (for Prometheus' discovery
#: cycle, a TLS handshake, a subprocess), so more workers than cores keep two cores busy
#: (measured on 2 cores, longest units first: 4 workers 120.9 s, 5 112.1 s, 6 110.3 s,
#: 8 117.8 s); which tests share a worker is decided in conftest.py (a file's tests
#: together, the conformance scenarios on one worker)
WORKERS = "6"


def _bytecode(session: nox.Session) -> dict[str, str | None]:
    """Compiled bytecode kept under the session's virtualenv, whatever PYTHONDONTWRITEBYTECODE
    says: without it every worker and every CLI or pytest subprocess of the tests compiles
    the package again and pytest rewrites the asserts of every test module and plugin
    module again (about a third of a worker's collection CPU, a second per pytest
    subprocess); the prefix keeps the checkout free of __pycache__ directories."""
    location = getattr(session.virtualenv, "location", None) or ".nox"
    return {
        "PYTHONDONTWRITEBYTECODE": None,
        "PYTHONPYCACHEPREFIX": str(Path(location).resolve() / "pycache"),
    }


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The full tier (CI runs it): the library's own tests, the negative controls and the
    conformance scenarios on the local backend, side by side on pytest-xdist workers."""
    _supported_python(session)
    _system_packages(session)
    _inotify_instances(session)
    _install(session, "-e", ".[dev]")
    args = session.posargs or ["tests", "scenarios", "--benchmark-skip"]
    session.run("pytest", "-p", "no:cacheprovider", "-n", WORKERS, *args, env=_bytecode(session))


@nox.session(python=PYTHON)
def quick(session: nox.Session) -> None:
    """The fast tier, for each edit: the library's own tests without the scenarios and
    without the tests marked slow (wheel builds, the vendor walk-through, the files that
    run real meshes, Prometheus or the CLI)."""
    _supported_python(session)
    _system_packages(session)
    _inotify_instances(session)
    _install(session, "-e", ".[dev]")
    args = session.posargs or ["tests", "-m", "not slow", "--benchmark-skip"]
    session.run("pytest", "-p", "no:cacheprovider", "-n", WORKERS, *args, env=_bytecode(session))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check), mypy --strict on the package and on the fake Kubernetes
    API (tests/fakekube.py, against the KubeAPI Protocol), and the CI workflows:
    zizmor's security audit (offline: no GitHub API, so it runs without network) and
    GitHub's workflow schema (check-jsonschema's vendored copy, no download)."""
    _install(session, "-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
    # the one fake, held to the Protocol it stands in for (its _CONFORMS assignment)
    session.run("mypy", "--strict", "tests/fakekube.py")
    session.run("zizmor", "--offline", ".github/workflows")
    workflows = sorted(str(p) for p in Path(".github/workflows").glob("*.yml"))
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows)


@nox.session(python=PYTHON)
def mutation(session: nox.Session) -> None:
    """Mutation testing of the check bodies (checkbase, checks, checkbodies) and the probe
    (tests/mutation/driver.py): mutmut writes and switches the mutants, the driver deploys
    the negative controls and the clean conformance units once and re-runs, per mutant,
    the checks that reach it; one worker. CPU-heavy, not in CI: `-- 'PATTERN'` narrows it
    to mutant names, `-- --budget-minutes N` stops starting mutants after N minutes.
    Fails on a survivor CONTRIBUTING.md ("Mutation testing") does not list as equivalent;
    `mutmut results` and `mutmut show NAME` read its verdicts."""
    _supported_python(session)
    _system_packages(session)
    _inotify_instances(session)
    # the driver uses mutmut's mutant writer and trampoline switch: pinned to the minor
    _install(session, "-e", ".[dev]", "mutmut>=3.8.1,<3.9")
    session.run("python", "-m", "tests.mutation.driver", *session.posargs)


def _backend(session: nox.Session, args: list[str]) -> str:
    """The backend the package's registry (securemetrics_e2e/backends.py) runs in this
    session given ``args``, asked in the session's virtualenv, where the package is."""
    code = (
        "import sys; from securemetrics_e2e.backends import session_backend; "
        "print(session_backend(sys.argv[1], sys.argv[2:]))"
    )
    out = session.run("python", "-c", code, session.name, *args, silent=True)
    return str(out).strip()


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """The conformance suite on the local backend: PASS/FAIL/SKIP per scenario and a verdict."""
    _supported_python(session)
    _system_packages(session)
    _inotify_instances(session)
    _install(session, "-e", ".")
    args = session.posargs or []
    session.run("securemetrics-e2e", "run", "--backend", _backend(session, args), *args)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """The conformance suite on a cluster: kind by default, `-- --kubeconfig` for yours."""
    _supported_python(session)
    _install(session, "-e", ".")
    args = session.posargs or []
    backend = _backend(session, args)
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        "-rA",
        "scenarios",
        "--sm-backend",
        backend,
        *args,
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Phase timings of the local backend (Envoy ready, first UP per job, total)."""
    _supported_python(session)
    _system_packages(session)
    _inotify_instances(session)
    _install(session, "-e", ".[dev]")
    session.run(
        "pytest",
        "-p",
        "no:cacheprovider",
        "-s",
        "tests/bench",
        "--benchmark-only",
        *session.posargs,
    )
