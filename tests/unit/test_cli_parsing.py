"""The ``trims-ray`` command line without Ray: its parser and help texts against what exists
(every command, the benchmarks of workloads/), the shapes its read commands print (tables and
JSON built from plain data), and the push's tqdm progress. The commands themselves run against a
real Ray in tests/integration/test_cli.py.
"""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from trims_ray import cli
from trims_ray._cli_output import (
    UploadProgress,
    dump_json,
    format_bytes,
    format_table,
    hit_ratio,
    parse_bytes,
    residency_json,
    residency_rows,
    residency_summary,
)
from trims_ray.cli import BENCHMARKS, JSON_SHAPES, build_parser, main

WORKLOADS = Path(__file__).resolve().parents[2] / "workloads"
# Workloads with a main that `trims-ray` does not run, and why.
NOT_THROUGH_THE_CLI = {
    "peers": "runs as 'trims-ray bench peers' through workloads.bench",
    "cli_showcase": "starts a 3-node cluster to show ls and status: python -m workloads.cli_showcase",
    "ray_env_race": "a diagnostic of Ray, not of trims_ray (it may crash): python -m workloads.ray_env_race",
}


def model(name: str, tenant: str, sha: str, nbytes: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, tenant=tenant, sha256=sha, nbytes=nbytes)


# -- the parser ----------------------------------------------------------------------------------


def test_every_command_has_help_and_every_read_command_a_json_format(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {
        "push", "start", "ls", "status", "prefetch", "evict", "scrub", "budget", "quota", "dashboard", "bench", "demo"
    }
    for name in commands:
        assert main([name, "--help"]) == 0, name
        out = capsys.readouterr().out
        assert "usage:" in out
        if name in JSON_SHAPES:
            assert "--format {table,json}" in out and "--format json prints:" in out, name
    # Every command that prints a result has the json format (push prints one line, bench and
    # demo are the workloads' own output).
    assert set(JSON_SHAPES) == set(commands) - {"push", "bench", "demo"}


@pytest.mark.parametrize("command", ["prefetch", "evict"])
@pytest.mark.parametrize("tier", ["gpu", "host", "disk"])
def test_prefetch_and_evict_take_every_tier(command, tier):
    args = build_parser().parse_args([command, "m", "--tier", tier, "--format", "json"])
    assert (args.tier, args.format, args.start, args.store) == (tier, "json", False, None)


def test_only_commands_that_change_the_caches_can_start_trims_ray(capsys):
    parser = build_parser()
    for command in ("prefetch m", "evict m", "scrub", "budget host 1GiB", "quota acme disk none"):
        args = parser.parse_args([*command.split(), "--start", "--store", "memory://x"])
        assert args.start and args.store == "memory://x"
    # The read commands have neither --start nor --store: they cannot start anything.
    for command in ("ls", "status"):
        for option in ("--start", "--store"):
            code = main([command, option, "memory://x"] if option == "--store" else [command, option])
            assert code == 2, (command, option)
            assert "unrecognized arguments" in capsys.readouterr().err


def test_status_json_flag_is_the_json_format():
    args = build_parser().parse_args(["status", "--json"])
    assert args.json and args.format == "table"  # _cli_commands reads either


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench"], "bench needs a benchmark: one of load"),
        (["bench", "nosuch"], "no benchmark 'nosuch': choose one of load"),
        (["ls", "--format", "yaml"], "invalid choice: 'yaml'"),
        (["prefetch", "m", "--tier", "process"], "invalid choice: 'process'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trims-ray: error: ") and fragment in err[0], err


# -- bench: what exists in workloads/ ------------------------------------------------------------


def _modules_with_main() -> set[str]:
    found = set()
    for path in WORKLOADS.glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            found.add(path.stem)
    return found


def test_bench_help_lists_every_benchmark_of_workloads(capsys):
    from workloads import bench

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    choices = re.search(r"\{([a-z_,]+)\}", capsys.readouterr().out).group(1).split(",")
    ours = {name for name, (module, _) in BENCHMARKS.items() if module == "workloads.bench"}
    assert ours == set(choices), "BENCHMARKS must name workloads.bench's subcommands, no more, no less"

    reached = {module.removeprefix("workloads.") for module, _ in BENCHMARKS.values()} | {"demo"}
    assert _modules_with_main() - reached == set(NOT_THROUGH_THE_CLI)

    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, _) in BENCHMARKS.items():
        assert re.search(rf"^  {name}\s", out, re.MULTILINE), name
        assert f"python -m {module}" in out
    assert "DESIGN.md" not in out and "../shared" not in out  # nothing outside the repository


def test_bench_hands_its_arguments_to_the_module_that_runs_it(capsys):
    # A module of its own drops the benchmark's name; workloads.bench gets it as its subcommand.
    assert main(["bench", "simulate", "--help"]) == 0
    assert "usage: python -m workloads.simulate" in capsys.readouterr().out
    assert main(["bench", "routing", "--help"]) == 0
    assert "usage: python -m workloads.bench routing" in capsys.readouterr().out


def test_a_missing_workload_module_says_where_workloads_are():
    with pytest.raises(cli.TrimsError, match="run them from the root of a checkout"):
        cli._import_workload("workloads.nosuch")


# -- what the read commands print ----------------------------------------------------------------


def test_format_helpers():
    sizes = [format_bytes(n) for n in (0, 1023, 1536, 64 << 20, 20 << 30)]
    assert sizes == ["0 B", "1023 B", "1.5 KiB", "64.0 MiB", "20.0 GiB"]
    table = format_table(["A", "NUM"], [["x", 1], ["long", 1234]], align="lr").splitlines()
    assert table == ["A      NUM", "x        1", "long  1234"]
    assert hit_ratio({"hits": 1, "misses": 3}) == 0.25 and hit_ratio({"hits": 0, "misses": 0}) is None


def test_byte_counts_parse_as_people_write_them(capsys):
    written = ["1073741824", "512MiB", "1.5 GiB", "20GB", "4g", "0", "2 TiB", "3k", "10 b", "8.03GB", "2.01GB"]
    assert [parse_bytes(t) for t in written] == [
        1 << 30, 512 << 20, 3 << 29, 20 * 10**9, 4 * 10**9, 0, 2 << 40, 3000, 10, 8_030_000_000, 2_010_000_000
    ]
    assert parse_bytes("99999999999999999999GB") == 99999999999999999999 * 10**9  # exact, however large
    for bad in ("", "-1", "1.5", "1.0000001KiB", "5 parsecs", "MiB", "1e9"):
        with pytest.raises(ValueError, match="byte"):
            parse_bytes(bad)
    args = build_parser().parse_args(["budget", "disk", "20GiB", "--node", "ab12", "--format", "json"])
    assert (args.tier, args.size, args.node, args.format) == ("disk", 20 << 30, ["ab12"], "json")
    assert main(["budget", "host", "lots"]) == 2
    assert "'lots' is not a byte count" in capsys.readouterr().err
    assert main(["budget", "nvme", "1GiB"]) == 2
    assert "invalid choice: 'nvme'" in capsys.readouterr().err
    args = build_parser().parse_args(["quota", "acme", "host", "2GiB", "--node", "ab12"])
    assert (args.tenant, args.tier, args.size, args.node) == ("acme", "host", 2 << 30, ["ab12"])
    assert build_parser().parse_args(["quota", "acme", "disk", "None"]).size is None
    assert main(["quota", "acme", "gpu", "1GiB"]) == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    assert main(["quota", "acme", "host", "lots"]) == 2
    assert "'lots' is not a byte count" in capsys.readouterr().err


def test_residency_json_shows_only_the_models_asked_for():
    mine = model("bert", "alice", "b" * 64, 3 << 20)
    shared = model("resnet", "public", "a" * 64, 1 << 20)
    cold = model("cold", "alice", "c" * 64, 5)
    where = {
        f"alice/{'b' * 64}": {"n2": ("host",), "n1": ("gpu", "host")},
        f"public/{'a' * 64}": {"n3": ("disk",)},
        f"bob/{'d' * 64}": {"n1": ("host",)},  # another tenant's blob in placement's table
    }
    models = residency_json([mine, cold, shared], where)
    assert [m["name"] for m in models] == ["bert", "cold", "resnet"]  # by tenant, then name
    assert models[0]["resident"] == [
        {"node": "n1", "tier": "gpu", "nbytes": 3 << 20},
        {"node": "n1", "tier": "host", "nbytes": 3 << 20},
        {"node": "n2", "tier": "host", "nbytes": 3 << 20},
    ]
    assert models[1] == {"name": "cold", "tenant": "alice", "sha256": "c" * 64, "nbytes": 5, "resident": []}
    assert models[2]["resident"] == [{"node": "n3", "tier": "disk", "nbytes": 1 << 20}]
    assert "bob" not in dump_json(models) and "d" * 64 not in dump_json(models)
    assert json.loads(dump_json(models)) == models  # round-trips

    assert residency_summary(models) == "3 model(s), 2 resident: 4 cop(ies) holding 10.0 MiB"


def test_residency_table_one_row_per_node_and_the_cold_models_only_for_ls():
    models = residency_json(
        [model("bert", "alice", "b" * 64, 3 << 20), model("cold", "alice", "c" * 64, 5)],
        {f"alice/{'b' * 64}": {"node-one-0123456789": ("gpu", "host"), "node-two-0123456789": ("disk",)}},
    )
    headers, rows, align = residency_rows(models, registered=True)
    lines = format_table(headers, rows, align=align).splitlines()
    assert lines[0].split() == ["MODEL", "OWNER", "SIZE", "SHA256", "NODE", "TIERS"]
    assert lines[1].split() == ["bert", "alice", "3.0", "MiB", "b" * 12, "node-one-012", "gpu+host"]
    assert lines[2].split() == ["node-two-012", "disk"]  # the model's columns only on its first row
    assert lines[3].split() == ["cold", "alice", "5", "B", "c" * 12, "-", "-"]
    _, resident_rows, _ = residency_rows(models, registered=False)
    assert [r[0] for r in resident_rows] == ["bert", ""]  # status leaves the cold model out


# -- push's progress -----------------------------------------------------------------------------


def test_upload_progress_draws_a_tqdm_bar_that_ends_its_line():
    stream = io.StringIO()
    progress = UploadProgress("push m", stream, enabled=True)
    for done in (0, 4 << 20, 16 << 20):
        progress(done, 16 << 20)
    frames = [f for f in stream.getvalue().split("\r") if f]
    assert frames[0].startswith("push m:   0%") and frames[-1].startswith("push m: 100%")
    assert "16.0M/16.0M" in frames[-1] and stream.getvalue().endswith("\n")
    progress.close()  # closing twice (a failed upload's cleanup) is harmless
    assert stream.getvalue().count("\n") == 1


def test_upload_progress_in_auto_mode_stays_quiet_off_a_terminal_and_for_small_uploads():
    quiet = io.StringIO()  # no terminal
    auto = UploadProgress("push m", quiet, min_bytes=1)
    auto(0, 64 << 20)
    auto(64 << 20, 64 << 20)
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    small, big = Terminal(), Terminal()
    for stream, total in ((small, 1 << 20), (big, 64 << 20)):
        bar = UploadProgress("push m", stream, min_bytes=32 << 20)
        bar(0, total)
        bar(total, total)
    assert small.getvalue() == "" and "100%" in big.getvalue()

    never = io.StringIO()
    off = UploadProgress("push m", never, enabled=False, min_bytes=1)
    off(0, 64 << 20)
    off(64 << 20, 64 << 20)
    assert never.getvalue() == ""


def test_dashboard_install_writes_the_packaged_json_and_refuses_a_file(tmp_path, capsys):
    from trims_ray._dashboard import dashboard_json

    dest = tmp_path / "grafana" / "dashboards"
    assert cli.main(["dashboard", "install", "--dest", str(dest), "--format", "json"]) == 0
    written = json.loads(capsys.readouterr().out)["installed"]
    assert Path(written).parent == dest and Path(written).read_text() == dashboard_json()
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    assert cli.main(["dashboard", "install", "--dest", str(a_file)]) == 1
    assert "not a folder" in capsys.readouterr().err
