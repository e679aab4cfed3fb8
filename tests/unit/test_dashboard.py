"""Installing the packaged Grafana dashboard where Ray's Grafana provisioning reads it, with real
files: an explicit folder, the folders Ray's environment variables name, and a Ray session
directory laid out as Ray's dashboard leaves it (no Ray started; the Prometheus test installs
into a live session's folder, the one Ray's provisioning file names).
"""

from __future__ import annotations

import json
import os

import pytest
import ray

from trims_ray import TrimsError, _dashboard

ENV = ("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", "RAY_METRICS_OUTPUT_ROOT", "RAY_TMPDIR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    if ray.is_initialized():  # the default follows a connected session; these tests want disk's
        pytest.skip("Ray is initialized in this process")


def fake_session(temp_dir, name="session_2026-12-03_10-00-00_000000_1", grafana=True):
    """A Ray temp dir with one session, ``session_latest`` pointing at it, and (``grafana``) the
    dashboards folder Ray's dashboard creates when it starts."""
    session = temp_dir / name
    session.mkdir(parents=True)
    latest = temp_dir / "session_latest"
    if latest.is_symlink():
        latest.unlink()
    latest.symlink_to(session)
    if grafana:
        (session / "metrics" / "grafana" / "dashboards").mkdir(parents=True)
    return session


def installed(path):
    assert path.name == _dashboard.DASHBOARD_FILE_NAME
    assert path.read_text() == _dashboard.dashboard_json()
    return json.loads(path.read_text())


def test_packaged_dashboard_is_grafana_json():
    dashboard = json.loads(_dashboard.dashboard_json())
    assert dashboard["uid"] == "trims-ray" and dashboard["panels"] and dashboard["templating"]["list"]


def test_installs_into_an_explicit_folder_creating_it(tmp_path):
    folder = tmp_path / "grafana" / "dashboards"
    path = _dashboard.install_dashboard(folder)
    assert path.parent == folder
    assert installed(path)["title"] == "trims_ray"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    # Again over an older file: replaced whole, and nothing else left in the folder.
    path.write_text("{}")
    assert _dashboard.install_dashboard(str(folder)) == path
    installed(path)
    assert sorted(p.name for p in folder.iterdir()) == [_dashboard.DASHBOARD_FILE_NAME]


def test_refuses_a_destination_that_is_a_file(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        _dashboard.install_dashboard(not_a_folder)


def test_default_is_the_current_sessions_grafana_dashboards_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir is then tmp_path/ray
    fake_session(tmp_path / "ray", "session_old")
    session = fake_session(tmp_path / "ray")
    path = _dashboard.install_dashboard()
    assert path == session.resolve() / "metrics" / "grafana" / "dashboards" / _dashboard.DASHBOARD_FILE_NAME
    installed(path)
    assert not (tmp_path / "ray" / "session_old" / "metrics" / "grafana" / "dashboards" / path.name).exists()


def test_default_without_a_session_or_its_grafana_folder_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(TrimsError, match="no Ray session on this machine"):
        _dashboard.install_dashboard()
    fake_session(tmp_path / "ray", grafana=False)  # a head started without its dashboard
    with pytest.raises(TrimsError, match="include-dashboard"):
        _dashboard.install_dashboard()


def test_rays_environment_variables_choose_the_folder_as_they_do_for_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-session-here"))
    root = tmp_path / "metrics-root"
    (root / "grafana" / "dashboards").mkdir(parents=True)
    monkeypatch.setenv("RAY_METRICS_OUTPUT_ROOT", str(root))
    assert _dashboard.install_dashboard().parent == root / "grafana" / "dashboards"
    # The dashboards folder variable wins, and is created: Ray creates it too, and never
    # deletes it (it lives outside the session), so it outlives restarts.
    lasting = tmp_path / "lasting-dashboards"
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(lasting))
    assert _dashboard.grafana_dashboards_dir() == lasting
    installed(_dashboard.install_dashboard())
    assert os.listdir(lasting) == [_dashboard.DASHBOARD_FILE_NAME]
