"""The ``trims-ray`` command line on a real local Ray and real stores under tmp_path: push (a
file, a directory of shards, a zoo model), status, prefetch and evict, the installed console
script as a second driver, and the one-line errors (unknown model, unreachable store, no
cluster, another tenant, bad arguments).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import save_file

import trims_ray
from trims_ray.cli import ProgressBar, format_bytes, format_table, main

from ..conftest import free_port

SCRIPT = Path(sys.executable).with_name("trims-ray")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Runs ``trims-ray argv`` in this process; returns (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trims-ray: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def tiny_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(512, 512, generator=g),  # 1 MiB
        "layer.bias": torch.randn(512, generator=g),
        "steps": torch.arange(1000, dtype=torch.int64),
    }


@pytest.fixture
def weights_file(tmp_path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_tensors(), str(path))
    return path


def stats_json(capsys) -> dict:
    code, out, err = cli(capsys, "status", "--json")
    assert code == 0, err
    return json.loads(out)


# -- push (no cluster needed) ----------------------------------------------------------------


def test_push_file_registers_its_weights(tmp_path, weights_file, capsys):
    store = (tmp_path / "s").as_uri()
    code, out, err = cli(capsys, "push", str(weights_file), "--store", store)
    assert code == 0, err
    assert out.startswith("pushed default/tiny: 1.0 MiB") and store in out
    assert err == ""  # small upload, stderr not a terminal: no bar
    loaded = trims_ray.ModelStore(store).load("tiny", tenant="default")
    assert set(loaded) == set(tiny_tensors())
    assert all(torch.equal(loaded[k], v) for k, v in tiny_tensors().items())


def test_push_directory_of_shards(tmp_path, capsys):
    shards = tmp_path / "sharded"
    shards.mkdir()
    tensors = tiny_tensors(1)
    save_file({"layer.weight": tensors["layer.weight"]}, str(shards / "model-00001-of-00002.safetensors"))
    rest = {k: v for k, v in tensors.items() if k != "layer.weight"}
    save_file(rest, str(shards / "model-00002-of-00002.safetensors"))
    store = (tmp_path / "s").as_uri()
    code, out, err = cli(capsys, "push", str(shards), "--store", store, "--tenant", "public")
    assert code == 0, err
    assert "pushed public/sharded" in out
    loaded = trims_ray.ModelStore(store).load("sharded", tenant="someone")  # public: every tenant sees it
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and len(loaded) == len(tensors)


def test_push_a_model_built_by_a_factory_with_progress_bar(tmp_path, capsys):
    from workloads.zoo import build

    store = (tmp_path / "s").as_uri()
    code, out, err = cli(
        capsys, "push", "workloads.zoo:resnet50", "--store", store, "--name", "rn50", "--progress"
    )
    assert code == 0, err
    manifest = trims_ray.ModelStore(store).manifest("rn50", tenant="default")
    assert manifest.factory == {"import": "workloads.zoo:resnet50"}
    assert f"pushed default/rn50: {format_bytes(manifest.nbytes)}" in out
    # The bar is redrawn in place: the first and the last state are on stderr, and it ends the line.
    frames = [f for f in err.split("\r") if f]
    assert len(frames) >= 2 and err.endswith("\n")
    assert "  0.0%" in frames[0] and "100.0%" in frames[-1]
    assert f"{format_bytes(manifest.nbytes)} / {format_bytes(manifest.nbytes)}" in frames[-1]
    model = trims_ray.ModelStore(store).load("rn50", tenant="default")
    assert torch.equal(model.fc.weight, build("resnet50").fc.weight)


def test_push_of_neither_a_path_nor_a_factory_says_what_push_takes(tmp_path, capsys):
    code, _, err = cli(capsys, "push", "resnet5O", "--store", (tmp_path / "s").as_uri())
    assert_one_line_error(
        code, err, 1, "'resnet5O' is not a file, a directory, a URI or a factory", "workloads.zoo:resnet50"
    )
    code, _, err = cli(capsys, "push", "workloads.zoo:resnet5O", "--store", (tmp_path / "s").as_uri())
    assert_one_line_error(code, err, 1, "cannot be imported here", "workloads.zoo:resnet50")


def test_push_for_another_tenant_is_denied(tmp_path, weights_file, capsys):
    store = (tmp_path / "s").as_uri()
    code, _, err = cli(capsys, "push", str(weights_file), "--store", store, "--tenant", "other")
    assert_one_line_error(code, err, 1, "cannot register models for tenant 'other'")
    assert trims_ray.ModelStore(store).list_models(tenant="other") == []


def test_push_to_an_unreachable_store(monkeypatch, weights_file, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    # botocore retries a refused connection with backoff for ~15 s; one attempt says the same.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, _, err = cli(capsys, "push", str(weights_file), "--store", "s3://models/x")
    assert_one_line_error(code, err, 1, "cannot reach the S3 endpoint", dead)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "required: COMMAND"),
        (["prefetch"], "required: name"),
        (["prefetch", "m", "--tier", "gpu"], "invalid choice: 'gpu'"),
        (["status", "--address", "local"], "would start a new cluster"),
        (["push", "WEIGHTS", "--name", "../x"], "invalid model name '../x'"),
        (["push", "WEIGHTS", "--tenant", "no/such"], "tenant"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, fragment, weights_file, capsys):
    argv = [str(weights_file) if a == "WEIGHTS" else a for a in argv]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, 2, fragment)


def test_a_file_name_that_is_no_model_name_asks_for_name(tmp_path, weights_file, capsys):
    odd = weights_file.rename(tmp_path / "my model.safetensors")
    code, _, err = cli(capsys, "push", str(odd), "--store", (tmp_path / "s").as_uri())
    assert_one_line_error(code, err, 2, "invalid model name 'my model'", "--name")


# -- cluster commands --------------------------------------------------------------------------


def test_status_prefetch_evict(cache, ray_node, weights_file, capsys):
    assert cli(capsys, "push", str(weights_file), "--store", cache.uri)[0] == 0
    nbytes = cache.manifest("tiny", tenant="default").nbytes

    before = stats_json(capsys)
    assert before["store"] == cache.uri and set(before["nodes"]) == {ray_node}
    host = before["nodes"][ray_node]["tiers"]["host"]
    assert host["models"] == 0 and host["hit_ratio"] is None

    code, out, err = cli(capsys, "prefetch", "tiny")
    assert code == 0, err
    assert re.search(rf"^{ray_node[:12]}\s+store$", out, re.MULTILINE), out  # loaded from the store
    code, out, _ = cli(capsys, "prefetch", "tiny", "--node", ray_node[:8])
    assert code == 0 and re.search(rf"^{ray_node[:12]}\s+host$", out, re.MULTILINE), out  # now a hit

    host = stats_json(capsys)["nodes"][ray_node]["tiers"]["host"]
    assert host["models"] == 1 and host["bytes_used"] >= nbytes
    assert (host["hits"], host["misses"], host["hit_ratio"]) == (1, 1, 0.5)

    code, out, _ = cli(capsys, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"store {cache.uri}, 1 node(s)"
    assert lines[1].split() == [
        "NODE", "TIER", "USED", "CAPACITY", "USE", "MODELS", "HITS", "MISSES", "HIT", "RATIO", "LOADS", "EVICTIONS"
    ]
    # The node's first row carries its id; later rows (one per tier) start blank.
    rows = [line.split() for line in lines[2:]]
    start = next(i for i, row in enumerate(rows) if row[0] == ray_node[:12])
    node_rows = [rows[start][1:]] + [row for row in rows[start + 1 : start + 3]]
    assert [row[0] for row in node_rows] == ["gpu", "host", "disk"]
    host_row = lines[2 + start + 1]
    assert host_row.split()[0:2] == ["host", format_bytes(host["bytes_used"]).split()[0]]
    assert host_row.split()[-6:-3] == ["1", "1", "1"] and "50.0%" in host_row  # models, hits, misses
    widths = {len(line) for line in lines[1:] if line.rstrip().endswith(tuple("0123456789"))}
    assert len(widths) == 1, "right-aligned columns end at the same place"

    code, out, err = cli(capsys, "evict", "tiny", "--tier", "host")
    assert code == 0, err
    assert re.search(rf"^{ray_node[:12]}\s+host\s+evicted$", out, re.MULTILINE), out
    host = stats_json(capsys)["nodes"][ray_node]["tiers"]["host"]
    assert (host["models"], host["bytes_used"], host["evictions"]) == (0, 0, 1)


def test_cluster_command_errors(cache, monkeypatch, capsys):
    code, _, err = cli(capsys, "prefetch", "nosuch")
    assert_one_line_error(code, err, 1, "no model named 'nosuch'")
    code, _, err = cli(capsys, "evict", "nosuch")
    assert_one_line_error(code, err, 1, "no model named 'nosuch'")
    code, _, err = cli(capsys, "prefetch", "nosuch", "--node", "zzzz")
    assert_one_line_error(code, err, 2, "--node 'zzzz' matches no alive node")
    code, _, err = cli(capsys, "status", "--store", (cache.root + "-other"))
    assert_one_line_error(code, err, 1, "already runs on this cluster with store")

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # see test_push_to_an_unreachable_store
    code, _, err = cli(capsys, "status", "--store", "s3://models/x")
    assert_one_line_error(code, err, 1, "cannot reach the S3 endpoint", dead)


def test_status_starts_trims_ray_only_when_given_a_store(ray_node, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRIMS_RAY_STORE")
    monkeypatch.setenv("TRIMS_RAY_DISK_DIR", str(tmp_path / "disk"))
    monkeypatch.setenv("TRIMS_RAY_HOST_BYTES", str(32 * 1024 * 1024))
    code, _, err = cli(capsys, "status")
    assert_one_line_error(code, err, 1, "trims_ray is not running on this cluster", "--store")
    store = (tmp_path / "store").as_uri()
    try:
        code, out, err = cli(capsys, "status", "--store", store)
        assert code == 0, err
        assert out.startswith(f"store {store}, 1 node(s)")
        assert stats_json(capsys)["nodes"][ray_node]["tiers"]["host"]["capacity"] == 32 * 1024 * 1024
    finally:
        trims_ray.shutdown()


# -- the console script, a second driver process -----------------------------------------------


def run_script(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install the project (pip install -e .)"
    # The timeout only guards against a hang: a dead address must fail at once, not retry.
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=120, env=env, check=False)


def test_console_script_joins_the_test_cluster(cache, ray_node, weights_file):
    gcs = ray.get_runtime_context().gcs_address
    pushed = run_script("push", str(weights_file), "--store", cache.uri)
    assert pushed.returncode == 0 and "pushed default/tiny" in pushed.stdout, pushed.stderr
    # A second driver on this machine: Ray's token auth finds ~/.ray/auth_token by itself.
    done = run_script("prefetch", "tiny", "--address", gcs)
    assert done.returncode == 0, done.stderr
    status = run_script("status", "--json", "--address", gcs)
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert seen["store"] == cache.uri
    assert seen["nodes"][ray_node]["tiers"]["host"]["models"] == 1
    # What the other process did is what this one sees.
    assert trims_ray.stats().nodes[ray_node].tiers["host"].models == 1


def test_console_script_without_a_cluster_fails_at_once(tmp_path):
    # RAY_ADDRESS names a closed port, so the script cannot find this test's cluster either.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    done = run_script("status", env=env)
    assert done.stdout == ""
    assert_one_line_error(done.returncode, done.stderr, 1, "no Ray cluster answers at", "$RAY_ADDRESS=127.0.0.1:")


# -- bench and demo hand over --------------------------------------------------------------------


def test_bench_and_demo_pass_their_arguments_on(capsys):
    code, out, _ = cli(capsys, "bench", "routing", "--models", "10", "--nodes", "4", "--calls", "50")
    assert code == 0 and "routing: 50 route() calls, 10 models, 4 nodes" in out
    code, out, _ = cli(capsys, "bench", "--help")
    assert code == 0 and "python -m workloads.bench" in out
    code, _, err = cli(capsys, "demo", "--models", "nosuch")
    assert code == 2 and "unknown zoo models ['nosuch']" in err
    for bench, module in (("replay", "workloads.replay"), ("soak", "workloads.soak")):
        code, out, _ = cli(capsys, "bench", bench, "--help")
        assert code == 0 and f"python -m {module}" in out


# -- output helpers ------------------------------------------------------------------------------


def test_progress_bar_redraws_in_place_and_skips_small_uploads_in_auto_mode():
    now = [0.0]
    stream = io.StringIO()
    bar = ProgressBar("push m", stream, enabled=True, clock=lambda: now[0], width=10)
    for done, t in [(0, 0.0), (4 << 20, 0.05), (8 << 20, 0.5), (16 << 20, 1.0)]:
        now[0] = t
        bar(done, 16 << 20)
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 3  # the redraw 0.05 s after the first was skipped; the last never is
    assert frames[1].startswith("push m [#####.....]  50.0% 8.0 MiB / 16.0 MiB, 16.0 MiB/s")
    assert frames[2].endswith("100.0% 16.0 MiB / 16.0 MiB, 16.0 MiB/s\n")

    quiet = io.StringIO()
    auto = ProgressBar("push m", quiet, min_bytes=1 << 20)  # StringIO is no terminal
    auto(0, 64 << 20)
    auto(64 << 20, 64 << 20)
    assert quiet.getvalue() == ""


def test_format_helpers():
    sizes = [format_bytes(n) for n in (0, 1023, 1536, 64 << 20, 20 << 30)]
    assert sizes == ["0 B", "1023 B", "1.5 KiB", "64.0 MiB", "20.0 GiB"]
    table = format_table(["A", "NUM"], [["x", 1], ["long", 1234]], align="lr").splitlines()
    assert table == ["A      NUM", "x        1", "long  1234"]


def test_register_reports_upload_progress_in_slices(tmp_path):
    # The hook behind push's bar: one tensor larger than a slice is reported piece by piece.
    calls = []
    big = {"big": torch.zeros(5 * 1024 * 1024), "small": torch.ones(3)}  # 20 MiB + 12 B
    store = trims_ray.ModelStore((tmp_path / "s").as_uri())
    info = store.register("big", big, tenant="default", progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, info.nbytes) and calls[-1] == (info.nbytes, info.nbytes)
    steps = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
    assert len(steps) >= 3 and all(0 < s <= 16 * 1024 * 1024 for s in steps)
    assert {total for _, total in calls} == {info.nbytes}
