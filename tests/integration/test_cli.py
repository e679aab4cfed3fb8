"""The ``trims-ray`` command line on a real local Ray and real stores under tmp_path: push (a
file, a directory of shards, a zoo model), start, ls and status (what is resident where, for
the caller's tenant only, as tables and JSON), prefetch, evict and scrub (the GPU tier's refusal
on this GPU-less machine included), read commands that start nothing, the installed console
script as a second driver, and the one-line errors (unknown model, unreachable store, no
cluster, another tenant, bad arguments). Parsing and formatting alone: tests/unit/test_cli_parsing.py.
"""

from __future__ import annotations

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
from trims_ray._protocol import cache_key
from trims_ray.actors._naming import NAMESPACE, node_cache_actor_name
from trims_ray.cli import format_bytes, main

from ..conftest import free_port
from .conftest import wait_for
from .multinode import corrupt_resident_copy

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


def cli_json(capsys, *argv: str) -> dict:
    code, out, err = cli(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def our_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


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
    # tqdm's bar is redrawn in place: the first and the last state are on stderr, and it ends the line.
    frames = [f for f in err.split("\r") if f]
    assert len(frames) >= 2 and err.endswith("\n")
    assert frames[0].startswith("push rn50:   0%") and frames[-1].startswith("push rn50: 100%")
    size = f"{manifest.nbytes / 2**20:.1f}M"  # tqdm's binary units (unit_divisor 1024)
    assert f"{size}/{size}" in frames[-1], frames[-1]
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
        (["prefetch", "m", "--tier", "process"], "invalid choice: 'process'"),
        (["status", "--store", "memory://x"], "unrecognized arguments: --store"),
        (["status", "--address", "local"], "would start a new cluster"),
        (["ls", "--address", "local"], "would start a new cluster"),
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


def test_status_prefetch_evict_scrub(cache, ray_node, weights_file, capsys):
    assert cli(capsys, "push", str(weights_file), "--store", cache.uri)[0] == 0
    nbytes = cache.manifest("tiny", tenant="default").nbytes

    before = stats_json(capsys)
    assert before["store"] == cache.uri and set(before["nodes"]) == {ray_node}
    host = before["nodes"][ray_node]["tiers"]["host"]
    assert host["models"] == 0 and host["hit_ratio"] is None
    assert before["models"] == [] and before["tenant"] == "default"

    code, out, err = cli(capsys, "prefetch", "tiny")
    assert code == 0, err
    assert re.search(rf"^{ray_node[:12]}\s+store$", out, re.MULTILINE), out  # loaded from the store
    code, out, _ = cli(capsys, "prefetch", "tiny", "--node", ray_node[:8])
    assert code == 0 and re.search(rf"^{ray_node[:12]}\s+host$", out, re.MULTILINE), out  # now a hit

    after = stats_json(capsys)
    host = after["nodes"][ray_node]["tiers"]["host"]
    assert host["models"] == 1 and host["bytes_used"] >= nbytes
    assert (host["hits"], host["misses"], host["hit_ratio"]) == (1, 1, 0.5)
    assert [(m["name"], m["resident"]) for m in after["models"]] == [
        ("tiny", [{"node": ray_node, "tier": "host", "nbytes": nbytes}])
    ]

    code, out, _ = cli(capsys, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"store {cache.uri}, 1 node(s)"
    assert lines[1].split() == [
        "NODE", "TIER", "USED", "CAPACITY", "USE", "MODELS", "HITS", "MISSES", "HIT", "RATIO", "LOADS", "EVICTIONS"
    ]
    # The node's first row carries its id; later rows (one per tier) start blank.
    rows = [line.split() for line in lines[2:]]
    start = next(i for i, row in enumerate(rows) if row and row[0] == ray_node[:12])
    node_rows = [rows[start][1:]] + [row for row in rows[start + 1 : start + 3]]
    assert [row[0] for row in node_rows] == ["gpu", "host", "disk"]
    host_row = lines[2 + start + 1]
    assert host_row.split()[0:2] == ["host", format_bytes(host["bytes_used"]).split()[0]]
    assert host_row.split()[-6:-3] == ["1", "1", "1"] and "50.0%" in host_row  # models, hits, misses
    widths = {len(line) for line in lines[1:5]}
    assert len(widths) == 1, "right-aligned columns end at the same place"
    # Below the tiers: where the caller's models are.
    resident = lines[lines.index("resident models of tenant default and public:") + 2 :]
    assert [line.split()[-2:] for line in resident] == [[ray_node[:12], "host"]] and resident[0].startswith("tiny ")

    code, out, err = cli(capsys, "evict", "tiny", "--tier", "host")
    assert code == 0, err
    assert re.search(rf"^{ray_node[:12]}\s+host\s+evicted$", out, re.MULTILINE), out
    after = stats_json(capsys)
    host = after["nodes"][ray_node]["tiers"]["host"]
    assert (host["models"], host["bytes_used"], host["evictions"]) == (0, 0, 1)
    copies = [c["tier"] for m in after["models"] for c in m["resident"]]
    assert copies in ([], ["disk"])  # the disk copy the load wrote behind it stays, once written

    # scrub: back in the host tier, a copy that matches; then one changed in place.
    found = cli_json(capsys, "prefetch", "tiny")["nodes"][ray_node]
    assert found in ("disk", "store")
    code, out, err = cli(capsys, "scrub")
    assert code == 0, err
    assert out.splitlines()[0] == "scrubbed the host tier of 1 node(s): every copy matches its manifest"
    assert re.search(rf"^{ray_node[:12]}\s+1\s+0\s+0$", out, re.MULTILINE), out
    ray.get(corrupt_resident_copy.remote(ray_node, cache_key(cache.manifest("tiny", tenant="default"))))
    assert cli_json(capsys, "scrub") == {"nodes": {ray_node: {"scrubbed": 1, "corrupt": 1, "reloaded": 1}}}

    # The GPU tier: this machine has none, and the node's refusal comes through as one line.
    code, out, err = cli(capsys, "prefetch", "tiny", "--tier", "gpu")
    assert out == ""
    assert_one_line_error(code, err, 1, "cannot prefetch 'tiny' to the GPU tier of node", "no GPU on this node")
    evicted = cli_json(capsys, "evict", "tiny", "--tier", "gpu")
    assert evicted == {"model": "tiny", "tier": "gpu", "nodes": {ray_node: {"gpu": "absent"}}}


def test_ls_and_status_show_the_callers_models_where_they_are(cache, ray_node, weights_file, capsys):
    for argv in (["--name", "tiny"], ["--name", "shared", "--tenant", "public"]):
        assert cli(capsys, "push", str(weights_file), "--store", cache.uri, *argv)[0] == 0
    cold = cache.register("cold", tiny_tensors(2), tenant="default")
    # Another tenant's model, resident here too: asked of the node's cache as bob's driver would.
    secret = cache.register("secret", tiny_tensors(3), tenant="bob")
    ray.get(ray.get_actor(node_cache_actor_name(ray_node), namespace=NAMESPACE).prefetch.remote("secret", "bob", "host"))
    assert cli(capsys, "prefetch", "tiny")[0] == 0
    assert cli(capsys, "prefetch", "shared", "--tier", "disk")[0] == 0
    tiny = cache.manifest("tiny", tenant="default")

    def on_disk() -> dict | None:  # the disk tier writes its copy behind the prefetch's return
        listing = cli_json(capsys, "ls")
        shared = next(m for m in listing["models"] if m["name"] == "shared")
        return listing if shared["resident"] else None

    listing = wait_for(on_disk, what="the public model's disk copy in ls")
    assert (listing["store"], listing["tenant"], listing["nodes"]) == (cache.uri, "default", [ray_node])
    models = {m["name"]: m for m in listing["models"]}
    assert set(models) == {"tiny", "cold", "shared"}  # bob's model is not there
    assert models["tiny"] == {
        "name": "tiny", "tenant": "default", "sha256": tiny.sha256, "nbytes": tiny.nbytes,
        "resident": [{"node": ray_node, "tier": "host", "nbytes": tiny.nbytes}],
    }  # fmt: skip
    assert models["shared"]["tenant"] == "public"
    assert models["shared"]["resident"] == [{"node": ray_node, "tier": "disk", "nbytes": models["shared"]["nbytes"]}]
    assert models["cold"]["resident"] == [] and models["cold"]["sha256"] == cold.sha256
    assert secret.sha256 not in json.dumps(listing) and "bob" not in json.dumps(listing)

    code, out, err = cli(capsys, "ls")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"store {cache.uri}, tenant default and public, 1 node(s)"
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert rows["tiny"][-2:] == [ray_node[:12], "host"] and rows["shared"][-2:] == [ray_node[:12], "disk"]
    assert rows["cold"][-2:] == ["-", "-"] and "secret" not in out
    assert lines[-1].startswith("3 model(s), 2 resident: 2 cop(ies) holding ")

    public = cli_json(capsys, "ls", "--tenant", "public")
    assert [m["name"] for m in public["models"]] == ["shared"] and public["tenant"] == "public"
    code, _, err = cli(capsys, "ls", "--tenant", "bob")
    assert_one_line_error(code, err, 1, "cannot list models for tenant 'bob'")

    status = stats_json(capsys)
    assert [m["name"] for m in status["models"]] == ["tiny", "shared"]  # resident only; by tenant, name
    assert status["nodes"][ray_node]["tiers"]["host"]["models"] == 2  # bob's counts, unnamed
    assert set(status["nodes"][ray_node]["tenants"]) <= {"default"}
    assert "secret" not in json.dumps(status) and secret.sha256 not in json.dumps(status)
    assert cache_key(secret) not in json.dumps(status)


def test_cluster_command_errors(cache, monkeypatch, capsys):
    code, _, err = cli(capsys, "prefetch", "nosuch")
    assert_one_line_error(code, err, 1, "no model named 'nosuch'")
    code, _, err = cli(capsys, "evict", "nosuch")
    assert_one_line_error(code, err, 1, "no model named 'nosuch'")
    code, _, err = cli(capsys, "prefetch", "nosuch", "--node", "zzzz")
    assert_one_line_error(code, err, 2, "--node 'zzzz' matches no alive node")
    code, _, err = cli(capsys, "prefetch", "nosuch", "--store", (cache.root + "-other"))
    assert_one_line_error(code, err, 1, "already runs on this cluster with store")
    code, _, err = cli(capsys, "start", "--store", (cache.root + "-other"))
    assert_one_line_error(code, err, 1, "already runs on this cluster with store")

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # see test_push_to_an_unreachable_store
    code, _, err = cli(capsys, "start", "--store", "s3://models/x")
    assert_one_line_error(code, err, 1, "cannot reach the S3 endpoint", dead)


def test_only_start_or_start_flag_starts_trims_ray(ray_node, tmp_path, weights_file, monkeypatch, capsys):
    monkeypatch.delenv("TRIMS_RAY_STORE")
    monkeypatch.setenv("TRIMS_RAY_DISK_DIR", str(tmp_path / "disk"))
    monkeypatch.setenv("TRIMS_RAY_HOST_BYTES", str(32 * 1024 * 1024))
    store = (tmp_path / "store").as_uri()
    assert cli(capsys, "push", str(weights_file), "--store", store)[0] == 0
    assert our_actors() == []
    # Read commands say that trims_ray does not run, and how to start it; commands that change
    # the caches say so too without --start, a --store notwithstanding.
    for argv in (["status"], ["ls"], ["ls", "--format", "json"], ["status", "--json"]):
        code, out, err = cli(capsys, *argv)
        assert out == ""
        assert_one_line_error(code, err, 1, "trims_ray is not running on this Ray cluster", "trims-ray start --store URI")
    for argv in (["prefetch", "tiny"], ["evict", "tiny", "--store", store], ["scrub"]):
        code, _, err = cli(capsys, *argv)
        assert_one_line_error(code, err, 1, "trims_ray is not running", f"trims-ray {argv[0]}", "--start --store URI")
    code, _, err = cli(capsys, "start")
    assert_one_line_error(code, err, 2, "needs --store URI")
    assert our_actors() == [], "a command without --start started actors"
    try:
        code, out, err = cli(capsys, "prefetch", "tiny", "--start", "--store", store)
        assert code == 0 and "prefetched tiny into the host tier of 1 node(s)" in out, err
        assert our_actors() == sorted(["trims_ray:placement", node_cache_actor_name(ray_node)])
        assert cli_json(capsys, "start", "--store", store) == {"store": store, "nodes": [ray_node], "started": False}
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
    actors = our_actors()
    status = run_script("status", "--json", "--address", gcs)
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert seen["store"] == cache.uri
    assert seen["nodes"][ray_node]["tiers"]["host"]["models"] == 1
    listing = run_script("ls", "--format", "json", "--address", gcs)
    assert listing.returncode == 0, listing.stderr
    assert [(m["name"], [c["tier"] for c in m["resident"]]) for m in json.loads(listing.stdout)["models"]] == [
        ("tiny", ["host"])
    ]
    assert our_actors() == actors  # the read commands of another driver started nothing
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


# -- push's progress hook ------------------------------------------------------------------------------


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
