"""What explains a local failure, saved before teardown removes it.

For each workload of the failing variant: the proxy's config_dump and the listeners
parsed from it, the bootstrap and Envoy's log; for the scraper: Prometheus' active and
dropped targets, the configuration it really loaded, the discovery file and its log.
Private keys are never copied.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securemetrics_e2e.configdump import listeners_from_config_dump

if TYPE_CHECKING:
    from securemetrics_e2e.backend import Deployment
    from securemetrics_e2e.local.backend import LocalBackend
    from securemetrics_e2e.local.envoy import Envoy


def _write(path: Path, produce: Any) -> None:
    """Write what ``produce()`` returns; a diagnostic that fails says why instead."""
    try:
        data = produce()
    except Exception as exc:  # one missing piece must not lose the others
        path.with_suffix(path.suffix + ".error").write_text(f"{type(exc).__name__}: {exc}\n")
        return
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1, default=str))


def _capture_proxy(envoy: Envoy, pod_dir: Path) -> None:
    pod_dir.mkdir(exist_ok=True)
    dump: dict[str, Any] = {}

    def config_dump() -> dict[str, Any]:
        dump.update(envoy.config_dump())
        return dump

    _write(pod_dir / "config_dump.json", config_dump)
    _write(
        pod_dir / "listeners.json",
        lambda: [asdict(lst) for lst in listeners_from_config_dump(dump)],
    )
    for name in ("envoy-bootstrap.json", "envoy.log"):
        source = envoy.workdir / name
        if source.exists():
            shutil.copyfile(source, pod_dir / name)


def capture(backend: LocalBackend, deployment: Deployment, reason: str, root: Path) -> Path:
    """Save the variant's diagnostics under ``root``; return the directory."""
    variant = f"{deployment.scenario.name}-{deployment.mtls_mode.value.lower()}"
    target = root / f"local-{backend.run_id}" / variant
    target.mkdir(parents=True, exist_ok=True)
    with (target / "failures.txt").open("a") as failures:  # one line per failing check
        failures.write(reason.replace("\n", " ") + "\n")
    for workload in deployment.workloads:
        _capture_proxy(backend.runtime_of(workload).envoy, target / workload.pod_name)
    api = backend.prometheus()
    _write(target / "prometheus-targets.json", lambda: [asdict(t) for t in api.active_targets()])
    _write(target / "prometheus-config.yml", api.config_yaml)
    server = backend.prometheus_server
    for source, name in (
        (backend.sd_file, "pods-file-sd.json"),
        (server.config_path, "prometheus.yml"),
        (server.process.log_path, "prometheus.log"),
    ):
        if source.exists():
            shutil.copyfile(source, target / name)
    return target
