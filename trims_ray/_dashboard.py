"""trims_ray's Grafana dashboard, shipped in the package (``trims_ray/dashboards/trims_ray.json``),
and the one function that installs it where Ray's Grafana provisioning reads dashboards, so that
it appears next to Ray's own in the Grafana that Ray's dashboard embeds.

Ray's dashboard process, when the head starts, writes Grafana's configuration to
``<session dir>/metrics/grafana``: a ``grafana.ini`` whose provisioning folder is
``<temp dir>/session_latest/metrics/grafana/provisioning``, and a dashboard provider there
(``provisioning/dashboards/default.yml``) that reads every JSON file in one folder, by default
``<session dir>/metrics/grafana/dashboards``, or ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR``
(``$RAY_METRICS_OUTPUT_ROOT`` moves the whole tree). Grafana picks a new file there up within its
provisioning interval (10 s), with no restart. Ray deletes and rewrites ``metrics/grafana`` each
time its dashboard starts, so a dashboard installed into the session folder lasts for the
session; a folder named by ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR`` outlives restarts.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from ._errors import TrimsError

__all__ = ["DASHBOARD_FILE_NAME", "dashboard_json", "grafana_dashboards_dir", "install_dashboard"]

# Named as Ray names its own (default_grafana_dashboard.json, serve_grafana_dashboard.json, ...).
DASHBOARD_FILE_NAME = "trims_ray_grafana_dashboard.json"

# The environment variables Ray's dashboard reads for the same folders (ray/dashboard/modules/
# metrics/metrics_head.py); honoured here so that both agree when both see them.
_DASHBOARDS_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
_METRICS_ROOT_ENV = "RAY_METRICS_OUTPUT_ROOT"


def dashboard_json() -> str:
    """The packaged dashboard, as JSON text (Grafana's dashboard model)."""
    return resources.files("trims_ray").joinpath("dashboards", "trims_ray.json").read_text(encoding="utf-8")


def grafana_dashboards_dir(session_dir: str | os.PathLike | None = None) -> Path:
    """The folder Ray's Grafana provisioning reads dashboards from, as Ray's dashboard decides it:
    ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR``, else ``$RAY_METRICS_OUTPUT_ROOT/grafana/
    dashboards``, else ``<session dir>/metrics/grafana/dashboards``.

    Args:
        session_dir: the Ray session's directory; None means the session this process is
            connected to, else the newest one on this machine (``<Ray's temp dir>/
            session_latest``, the temp dir from ``$RAY_TMPDIR`` or ``$TMPDIR`` as Ray reads them,
            default ``/tmp/ray``). Ignored when one of the variables above is set.

    Raises:
        TrimsError: no variable is set and there is no Ray session on this machine.
    """
    explicit = os.environ.get(_DASHBOARDS_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get(_METRICS_ROOT_ENV, "").strip()
    if root:
        return Path(root).expanduser() / "grafana" / "dashboards"
    session = Path(session_dir) if session_dir is not None else _current_session_dir()
    return session / "metrics" / "grafana" / "dashboards"


def install_dashboard(destination: str | os.PathLike | None = None) -> Path:
    """Writes trims_ray's Grafana dashboard where Ray's Grafana provisioning finds it.

    Run it on the head node (where Ray's dashboard process writes Grafana's configuration),
    after the head has started: Grafana shows the dashboard within its provisioning interval.
    The file is replaced atomically, so an install over an older one is safe while Grafana reads.

    Args:
        destination: the folder to write into (created if missing), e.g. the folder your own
            Grafana provisions dashboards from; None means the folder of
            :func:`grafana_dashboards_dir` for this machine's current Ray session, which must
            already exist: Ray's dashboard creates it when it starts (with metrics enabled).

    Returns:
        The path of the file written (``<folder>/trims_ray_grafana_dashboard.json``).

    Raises:
        TrimsError: no destination, and no Ray session on this machine or Ray's dashboard has
            not written its Grafana configuration in it.
        NotADirectoryError: the destination exists and is not a folder.
        OSError: the folder cannot be created or written.
    """
    if destination is None:
        folder = grafana_dashboards_dir()
        if not folder.is_dir() and not os.environ.get(_DASHBOARDS_DIR_ENV, "").strip():
            raise TrimsError(
                f"Ray's Grafana dashboards folder {folder} does not exist: Ray's dashboard has not "
                "written its Grafana configuration for this session (is the head node's dashboard "
                "running, with metrics? `ray start --head --include-dashboard=true`); or pass the "
                "folder your Grafana provisions dashboards from"
            )
    else:
        folder = Path(destination).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"dashboard destination {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    text = dashboard_json()
    json.loads(text)  # never install a file Grafana would reject
    target = folder / DASHBOARD_FILE_NAME
    # Written beside the target and renamed over it: Grafana never reads half a file.
    fd, temporary = tempfile.mkstemp(prefix=".trims_ray_dashboard.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)  # Grafana may run as another user
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _current_session_dir() -> Path:
    """The session this process is connected to, else ``session_latest`` under Ray's temp dir."""
    try:
        import ray

        if ray.is_initialized():
            return Path(ray._private.worker._global_node.get_session_dir_path())
    except (ImportError, AttributeError):  # no Ray here, or a Ray client process: look on disk
        pass
    latest = _ray_temp_dir() / "session_latest"
    if not latest.exists():
        raise TrimsError(
            f"no Ray session on this machine ({latest} does not exist): run this on the head node "
            "after `ray start --head`, or pass the folder to install into"
        )
    return latest.resolve()


def _ray_temp_dir() -> Path:
    """Ray's temp dir on this machine, as Ray computes its default (``ray start --temp-dir``
    is not recorded anywhere this process can see: pass a destination then)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir

        return Path(get_default_ray_temp_dir())
    except ImportError:  # an older or newer Ray without it: its documented default
        return Path(os.environ.get("RAY_TMPDIR") or "/tmp") / "ray"
