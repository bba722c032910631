"""What explains a local failure, saved before teardown removes it.

For each workload of the failing variant: the proxy's config_dump and the listeners
parsed from it, the bootstrap and Envoy's log; for the scraper:
Prometheus' active and dropped targets, the configuration it really loaded, the
discovery file and its log (every failed scrape with its error).
Private keys are never copied.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securemetrics_e2e.configdump import listeners_from_config_dump

if TYPE_CHECKING:
    from securemetrics_e2e.backend import Deployment
    from securemetrics_e2e.local.envoy import Envoy
    from securemetrics_e2e.prometheus import PrometheusAPI


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
    for name in ("envoy-bootstrap.json", "envoy.log", "inbound-access.log"):
        source = envoy.workdir / name
        if source.exists():
            shutil.copyfile(source, pod_dir / name)


def capture(
    deployment: Deployment,
    reason: str,
    target: Path,
    *,
    proxies: Mapping[str, Envoy],
    api: PrometheusAPI,
    scraper_files: Iterable[tuple[Path, str]],
) -> Path:
    """Save the variant's diagnostics under ``target``; return it.

    ``proxies``: each workload pod's name and its Envoy; ``scraper_files``: the
    scraper's files worth keeping (discovery file, loaded configuration, log) and the
    name each is saved under. The backend hands them over, so this module knows nothing
    of how the backend holds them.
    """
    target.mkdir(parents=True, exist_ok=True)
    with (target / "failures.txt").open("a") as failures:  # one line per failing check
        failures.write(reason.replace("\n", " ") + "\n")
    for pod_name, envoy in proxies.items():
        _capture_proxy(envoy, target / pod_name)
    _write(target / "prometheus-targets.json", lambda: [asdict(t) for t in api.active_targets()])
    _write(target / "prometheus-config.yml", api.config_yaml)
    for source, name in scraper_files:
        if source.exists():
            shutil.copyfile(source, target / name)
    return target
