"""The ``trims-ray`` command line: push models into a store; start trims_ray on a running Ray
cluster; list what the caches hold (``ls``, ``status``); steer them (``prefetch``, ``evict``,
``scrub``, ``budget``, ``quota``); and hand ``bench`` and ``demo`` over to the repository's ``workloads``.

Every command is a thin wrapper around the public API (``init``, ``register``, ``prefetch``,
``evict``, ``scrub``, ``set_budget``, ``set_quota``, ``stats``) and the read-only views of ``_cluster``; the commands
themselves are in ``_cli_commands``, what they print in ``_cli_output``. Cluster commands join a
running cluster and never start one; only ``start``, or ``--start``, starts trims_ray on it.
Every error ends as one line on stderr and a non-zero exit code (2 for bad arguments, 1 for the
rest).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence

import trims_ray

from ._cli_commands import COMMANDS, UsageError, push
from ._cli_output import UploadProgress, format_bytes, format_table, parse_bytes
from ._errors import TrimsError
from .actors._naming import NAMESPACE
from .cache.placement import TIERS

__all__ = ["BENCHMARKS", "UploadProgress", "UsageError", "build_parser", "format_bytes", "format_table", "main"]

PROG = "trims-ray"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# How long to wait for a TCP answer from the cluster's GCS before calling it unreachable: Ray
# itself would retry a dead address for minutes.
CONNECT_TIMEOUT_S = 3.0

# The documented shapes of --format json (one JSON object on stdout; keys sorted).
_MODEL_SHAPE = (
    '{"name": NAME, "tenant": OWNER, "sha256": HEX, "nbytes": INT,\n'
    '    "resident": [{"node": NODE_ID, "tier": "gpu"|"host"|"loading"|"disk", "nbytes": INT}, ...]}'
)
JSON_SHAPES = {
    "ls": '{"store": URI, "tenant": TENANT, "nodes": [NODE_ID, ...],\n "models": [MODEL, ...]}\n'
    f"MODEL: {_MODEL_SHAPE}",
    "status": '{"store": URI, "tenant": TENANT, "nodes": {NODE_ID: NODE, ...}, "models": [MODEL, ...]}\n'
    "NODE: trims_ray.stats().to_dict()'s per node (tiers gpu, host, disk with bytes_used, capacity,\n"
    "  models, hits, misses, loads, evictions, ... and hit_ratio: null before any access; leases,\n"
    "  pinned, object_store_bytes_used, gpu, tenants: your own tenant's only)\n"
    f"MODEL: as in ls, resident models only: {_MODEL_SHAPE}",
    "prefetch": '{"model": NAME, "tier": TIER, "nodes": {NODE_ID: "gpu"|"host"|"disk"|"store", ...}}',
    "evict": '{"model": NAME, "tier": TIER|null, "nodes": {NODE_ID: {TIER: "evicted"|"deferred"|"absent"}, ...}}',
    "scrub": '{"nodes": {NODE_ID: {"scrubbed": INT, "corrupt": INT, "reloaded": INT}, ...}}',
    "budget": '{"tier": TIER, "nodes": {NODE_ID: {"budget": INT, "bytes_used": INT, "evicted": INT,\n'
    '    "over_budget": INT[, "gpus": INT]}, ...}}',
    "quota": '{"tenant": TENANT, "tier": TIER, "nodes": {NODE_ID: {"quota": INT|null, "bytes_used": INT,\n'
    '    "evicted": INT, "over_quota": INT}, ...}}',
    "start": '{"store": URI, "nodes": [NODE_ID, ...], "started": BOOL}',
    "dashboard": '{"installed": PATH}',
}

# `trims-ray bench NAME ARGS...`: the module that runs benchmark NAME, and what it measures.
# Those of workloads.bench are its subcommands (NAME goes on to it); the others have a module of
# their own (NAME is dropped). tests/unit/test_cli_parsing.py checks this against workloads.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "load": ("workloads.bench", "the store reader's rate against the raw read rate, local disk and S3"),
    "handoff": ("workloads.bench", "task start to a usable module in a fresh worker: host hit vs loading"),
    "routing": ("workloads.bench", "the cost of one routing decision, 1,000 models on 64 nodes"),
    "peer": ("workloads.bench", "a miss copied from a peer node's memory vs read from the store"),
    "locality": ("workloads.bench", "where invocations of a model resident on one node of three run"),
    "build": ("workloads.bench", "a zoo model's build on meta: initialisers run vs skipped"),
    "overhead": ("workloads.bench", "a decorated call on a warm model vs a plain Ray task"),
    "peers": ("workloads.bench", "trims_ray vs Ray Serve multiplexing, an LRU actor and no cache"),
    "miss": ("workloads.bench", "a host-tier miss vs the same load in a plain task, one node"),
    "buffers": ("workloads.bench", "a blob read into a new buffer vs one used again (the node cache's loads)"),
    "replay": ("workloads.replay", "a multi-model trace on a local multi-node Ray: policies, no cache, Serve"),
    "soak": ("workloads.soak", "minutes of a multi-tenant trace through a node's loss and a cache's kill"),
    "gpu": ("workloads.gpu_bench", "the GPU tier: handoff, swap-in, pipelined swap, TrIMS table (needs CUDA)"),
    "simulate": ("workloads.simulate", "the trace-driven cache simulator: hit ratio vs size per policy, no Ray"),
}
_OWN_MODULE = {"workloads.bench"}  # modules whose subcommand is the benchmark's name
_PASSTHROUGH = {
    "bench": "run one of the repository's benchmarks ('trims-ray bench --help' lists them)",
    "demo": "the demo on an embedded local Ray (arguments go to python -m workloads.demo)",
}


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and then the error, and exits; we want one line and a return code.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``trims-ray`` command; returns its exit code (0 ok, 1 error, 2 bad arguments).

    In a process already connected to Ray (a test, a notebook), cluster commands use that
    connection and leave it open; otherwise they connect and disconnect.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        # Everything after the command is the workload's own command line, options included.
        return _passthrough(argv[0], argv[1:], debug=False)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE)
    except SystemExit as exc:  # --help and --version print and exit 0
        return _exit_code(exc)
    if args.command in _PASSTHROUGH:  # reached only with options before the command
        return _passthrough(args.command, args.args, debug=args.debug)
    connected = False
    try:
        if args.command == "push":
            return push(args)
        if args.command == "dashboard":  # files on this machine: no cluster to join
            return COMMANDS["dashboard"](args)
        connected = _connect(args.address)
        return COMMANDS[args.command](args)
    except Exception as exc:
        if args.debug:
            raise
        return _fail(exc, EXIT_USAGE if isinstance(exc, (UsageError, ValueError, TypeError)) else EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    finally:
        if connected:
            import ray

            ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``trims-ray`` (exposed for docs and tests)."""
    parser = _Parser(
        prog=PROG,
        description="trims_ray: push models into a store; see and steer the model caches of a Ray cluster.",
        epilog="ls and status only read: they never start trims_ray. start starts it on a running Ray "
        "cluster; prefetch, evict, scrub, budget and quota do only when given --start.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {trims_ray.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_push(sub)

    start = _command(sub, "start", "start trims_ray (placement and one cache per node) on a running Ray cluster")
    _add_store(
        start,
        "the store every node reads models from (default: $TRIMS_RAY_STORE); tier budgets come from "
        "this shell's TRIMS_RAY_* variables",
    )
    _add_cluster(start)

    ls = _command(sub, "ls", "list your models: registered in the store, and resident on which node in which tier")
    ls.add_argument(
        "--tenant",
        help="list your own tenant's models and the public ones (default; you are $TRIMS_RAY_TENANT or "
        "'default'), or 'public' for the public ones alone; another tenant is refused",
    )
    _add_cluster(ls)

    status = _command(
        sub, "status", "per node and tier: bytes used / capacity, models, hit ratio; where your models are resident"
    )
    status.add_argument("--json", action="store_true", help="the same as --format json")
    _add_cluster(status)

    prefetch = _command(sub, "prefetch", "warm a tier with a model ahead of traffic")
    prefetch.add_argument("name", help="the model's name")
    prefetch.add_argument(
        "--tier", choices=TIERS, default="host",
        help="the tier to warm (default: host; gpu: the node's GPU with the most room, through its host tier)",
    )  # fmt: skip
    _add_tenant(prefetch)
    _add_nodes(prefetch)
    _add_cluster(prefetch, changes=True)

    evict = _command(sub, "evict", "drop a model from a tier (a copy in use goes when released)")
    evict.add_argument("name", help="the model's name")
    evict.add_argument("--tier", choices=TIERS, default=None, help="the tier (default: every tier)")
    _add_tenant(evict)
    _add_nodes(evict)
    _add_cluster(evict, changes=True)

    scrub = _command(
        sub, "scrub", "re-hash the host-tier copies against their manifests now; corrupt ones are dropped and reloaded"
    )
    _add_nodes(scrub)
    _add_cluster(scrub, changes=True)

    budget = _command(
        sub, "budget", "change a tier's byte budget on running caches (and those that start later); "
        "a lower one evicts idle models now"
    )
    budget.add_argument("tier", choices=TIERS, help="the tier (gpu: the budget of each GPU)")
    budget.add_argument(
        "size", type=_byte_count, help="the new budget in bytes: 123, 512MiB, 1.5GiB or 20GB (KiB..TiB: "
        "powers of 1024; KB..TB: of 1000)"
    )
    _add_nodes(budget)
    _add_cluster(budget, changes=True)

    quota = _command(
        sub, "quota", "change a tenant's byte quota in a tier on running caches (and those that start later); "
        "a lower one evicts that tenant's idle models now"
    )
    quota.add_argument("tenant", help="the tenant whose quota changes")
    quota.add_argument("tier", choices=("host", "disk"), help="the tier (the GPU tier has no per-tenant quota)")
    quota.add_argument(
        "size", type=_quota_size, help="the new quota in bytes, as for budget; none: drop the tenant's own quota, "
        "so that its share of the budget (CacheConfig.tenant_share) holds"
    )
    _add_nodes(quota)
    _add_cluster(quota, changes=True)

    dashboard = _command(sub, "dashboard", "install trims_ray's Grafana dashboard where Ray's Grafana finds it")
    dashboard.add_argument("action", choices=("install",), help="install: write the dashboard's JSON")
    dashboard.add_argument(
        "--dest", metavar="DIR",
        help="the folder to write into (default: the Grafana dashboards folder of this machine's current Ray "
        "session, or $RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR)",
    )  # fmt: skip

    for name, what in _PASSTHROUGH.items():
        p = sub.add_parser(name, add_help=False, help=what)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _quota_size(text: str) -> int | None:
    return None if text.strip().lower() == "none" else _byte_count(text)


def _command(sub, name: str, what: str) -> argparse.ArgumentParser:
    """A cluster command's parser; one that prints JSON documents its shape under --help."""
    shape = JSON_SHAPES.get(name)
    parser = sub.add_parser(
        name,
        help=what,
        description=what,
        epilog=f"--format json prints:\n{shape}" if shape else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if shape:
        parser.add_argument(
            "--format", choices=("table", "json"), default="table",
            help="table (default) or json: one JSON object of the shape below",
        )  # fmt: skip
    return parser


def _add_push(sub) -> None:
    push = sub.add_parser(
        "push", help="register a .safetensors file, a directory of shards (Hugging Face's too) or a built model"
    )
    push.add_argument(
        "source",
        help="a .safetensors file, a directory of safetensors shards, an fsspec URI of either, or MODULE:ATTR, "
        "a zero-argument factory whose model is built here with seeded weights (e.g. workloads.zoo:resnet50)",
    )
    push.add_argument("--name", help="the model's name (default: the factory's ATTR, or the file or directory name)")
    push.add_argument("--seed", type=int, default=0, help="seed of a built model's weights (default 0)")
    _add_store(push, "the store to write to (default: $TRIMS_RAY_STORE or ~/.cache/trims_ray/store)")
    push.add_argument(
        "--tenant",
        help="whose model it is: your own (default; you are $TRIMS_RAY_TENANT or 'default') or 'public' to share it",
    )
    push.add_argument(
        "--factory", metavar="MODULE:ATTR", help="builds the architecture (default for a built model: its factory)"
    )
    push.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (tqdm) on stderr (default: for uploads over 32 MiB when stderr is a terminal)",
    )


def _add_store(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--store", metavar="URI", help=help_text)


def _add_tenant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tenant",
        help="act as your own tenant (default; you are $TRIMS_RAY_TENANT or 'default') or as 'public'; "
        "another tenant is refused",
    )


def _add_nodes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node",
        action="append",
        metavar="ID",
        help="a node id, or a unique prefix of one (repeatable; default: every node)",
    )


def _add_cluster(parser: argparse.ArgumentParser, *, changes: bool = False) -> None:
    parser.add_argument(
        "--address",
        default="auto",
        help="the running Ray cluster (default 'auto': $RAY_ADDRESS, else the cluster on this machine)",
    )
    if changes:
        parser.add_argument(
            "--start",
            action="store_true",
            help="start trims_ray first if it is not running (with --store URI or $TRIMS_RAY_STORE)",
        )
        _add_store(
            parser,
            "the store trims_ray runs with (checked against the running one); with --start, the store to start it with",
        )


# --------------------------------------------------------------------------------------------
# Joining the cluster
# --------------------------------------------------------------------------------------------


def _connect(address: str) -> bool:
    """Joins the running Ray cluster at ``address`` unless this process already is connected.

    Returns whether it connected (and so should disconnect at the end).

    Raises:
        UsageError: ``address`` is "local", which would start a new cluster.
        TrimsError: no cluster answers there.
    """
    import ray

    if address == "local":
        raise UsageError("--address local would start a new cluster; trims-ray joins a running one")
    if ray.is_initialized():
        return False
    if not address.startswith("ray://"):  # Ray Client addresses are dialled by ray.init itself
        address = _reachable_gcs(address)
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    return True


def _reachable_gcs(address: str) -> str:
    """The GCS ``host:port`` that ``address`` ("auto" or host:port) means, checked to answer.

    Ray would retry an address where nothing listens for minutes; a TCP connect tells at once.
    """
    from ray._private.services import canonicalize_bootstrap_address_or_die

    origin = f"--address {address}"
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        origin = f"$RAY_ADDRESS={env}" if env else "this machine's latest cluster"
    try:
        gcs = canonicalize_bootstrap_address_or_die(address)
    except ConnectionError as exc:
        if "multiple" in str(exc).lower():
            raise TrimsError(f"{_one_line(str(exc))}: pass --address HOST:PORT to pick one") from None
        raise TrimsError(
            "no running Ray cluster found ($RAY_ADDRESS is not set and none runs on this machine): "
            "start one ('ray start --head', 'ray up ray-cluster.yaml') or pass --address HOST:PORT"
        ) from None
    host, _, port = gcs.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise TrimsError(
            f"no Ray cluster answers at {gcs} ({origin}): {reason}; check the address, or start the cluster first"
        ) from None
    return gcs


# --------------------------------------------------------------------------------------------
# bench and demo: the repository's workloads
# --------------------------------------------------------------------------------------------


def bench_help() -> str:
    """What ``trims-ray bench --help`` prints: every benchmark and the module that runs it."""
    width = max(map(len, BENCHMARKS))
    lines = [
        f"usage: {PROG} bench BENCHMARK [ARGS ...]",
        "",
        "Runs one of the benchmarks in the repository's workloads/ (a checkout of the repository, run",
        f"from its root); the arguments after BENCHMARK go to it ('{PROG} bench BENCHMARK --help' shows them).",
        "",
        "benchmarks:",
    ]
    for name, (module, what) in BENCHMARKS.items():
        command = f"python -m {module}" + (f" {name}" if module in _OWN_MODULE else "")
        lines.append(f"  {name.ljust(width)}  {what}\n  {' ' * width}  ({command})")
    return "\n".join(lines)


def _passthrough(command: str, argv: list[str], *, debug: bool) -> int:
    """Hands ``argv`` to the ``main`` of the workload that ``command`` names."""
    if command == "bench":
        if not argv:
            return _fail(UsageError(f"bench needs a benchmark: one of {', '.join(BENCHMARKS)}"), EXIT_USAGE)
        if argv[0] in ("-h", "--help"):
            print(bench_help())
            return 0
        name = argv[0]
        if name not in BENCHMARKS:
            return _fail(
                UsageError(f"no benchmark {name!r}: choose one of {', '.join(BENCHMARKS)} (see '{PROG} bench --help')"),
                EXIT_USAGE,
            )
        module_name = BENCHMARKS[name][0]
        argv = argv if module_name in _OWN_MODULE else argv[1:]
    else:
        module_name = "workloads.demo"
    try:
        module = _import_workload(module_name)
        return int(module.main(argv) or 0)
    except SystemExit as exc:  # their argparse (--help, bad arguments)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if debug:
            raise
        return _fail(exc, EXIT_ERROR)


def _import_workload(name: str):
    """Imports workload module ``name``; says what is missing when it cannot be.

    Raises:
        TrimsError: ``workloads`` is not here (an installed package without the repository), or
            the workload needs a package that is not installed.
    """
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == "workloads" or exc.name.startswith("workloads.")):
            raise TrimsError(
                f"{name} is not importable here: the benchmarks and the demo are in the repository's "
                "workloads/, run them from the root of a checkout"
            ) from None
        raise TrimsError(
            f"{name} needs {exc.name}, which is not installed here: install the benchmark dependencies "
            "(the optional dependencies in pyproject.toml)"
        ) from None


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "")


def _fail(error: BaseException | str, code: int) -> int:
    if isinstance(error, str):
        message = error
    else:
        text = _one_line(str(error))
        # Our own errors say what to do; anything else is named by its type too.
        known = isinstance(error, (TrimsError, UsageError, ValueError, TypeError, OSError))
        message = text if known and text else f"{type(error).__name__}: {text}".rstrip(": ")
        if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
            message = f"{message}: {error.filename}"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
