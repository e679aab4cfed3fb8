"""The ``trims-ray`` command line: push models into a store, and look at and steer the node caches
of a running Ray cluster (``status``, ``prefetch``, ``evict``); ``bench`` and ``demo`` hand over
to ``workloads``.

Every command is a thin wrapper around the public API (``init``, ``register``, ``prefetch``,
``evict``, ``stats``). Cluster commands join a running cluster and never start one; every error
ends as one line on stderr and a non-zero exit code (2 for bad arguments, 1 for the rest).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trims_ray

from . import _api, _cluster
from ._config import default_store_uri, env_store_uri
from ._errors import TrimsError
from ._fsio import translate_store_errors
from ._names import check_name
from ._cli_output import ProgressBar, format_bytes, format_table
from .actors._naming import NAMESPACE

__all__ = ["ProgressBar", "UsageError", "format_bytes", "format_table", "main"]

PROG = "trims-ray"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# How long to wait for a TCP answer from the cluster's GCS before calling it unreachable: Ray
# itself would retry a dead address for minutes.
CONNECT_TIMEOUT_S = 3.0
_TIERS = ("host", "disk")  # the tiers prefetch and evict accept (the GPU tier comes later)


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2, like argparse's errors)."""


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
        return _passthrough(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE)
    except SystemExit as exc:  # --help and --version print and exit 0
        return _exit_code(exc)
    if args.command in _PASSTHROUGH:  # reached only with options before the command
        return _passthrough(args.command, args.args)
    connected = False
    try:
        if args.command == "push":
            return _push(args)
        connected = _connect(args.address)
        return _COMMANDS[args.command](args)
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
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {trims_ray.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        help="progress bar on stderr (default: for uploads over 32 MiB when stderr is a terminal)",
    )

    status = sub.add_parser("status", help="per node and tier: bytes used / capacity, models, hit ratio")
    status.add_argument("--json", action="store_true", help="print stats().to_dict() and hit ratios as JSON")
    _add_cluster(status)

    prefetch = sub.add_parser("prefetch", help="warm a tier with a model ahead of traffic")
    prefetch.add_argument("name", help="the model's name")
    prefetch.add_argument("--tier", choices=_TIERS, default="host", help="the tier to warm (default: host)")
    _add_tenant(prefetch)
    _add_nodes(prefetch)
    _add_cluster(prefetch)

    evict = sub.add_parser("evict", help="drop a model from a tier (a copy in use goes when released)")
    evict.add_argument("name", help="the model's name")
    evict.add_argument("--tier", choices=_TIERS, default=None, help="the tier (default: every tier)")
    _add_tenant(evict)
    _add_nodes(evict)
    _add_cluster(evict)

    for name, (_, what) in _PASSTHROUGH.items():
        p = sub.add_parser(name, add_help=False, help=f"{what} (arguments go to python -m workloads.{name})")
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


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


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default="auto",
        help="the running Ray cluster (default 'auto': $RAY_ADDRESS, else the cluster on this machine)",
    )
    _add_store(
        parser,
        "the store trims_ray runs with (default: the cluster's; starts trims_ray there when it is not running yet)",
    )


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------


def _push(args: argparse.Namespace) -> int:
    tenant = _api.tenant_for_write(args.tenant)  # refused before any weights are read or built
    weights, default_name, factory = _resolve_source(args.source, args.seed)
    name = args.name or default_name
    if args.name is None:  # a name taken from a file name gets a hint on how to choose another
        try:
            check_name(name)
        except ValueError as exc:
            raise UsageError(f"{exc}; choose a name with --name") from None
    store = trims_ray.ModelStore(args.store if args.store is not None else default_store_uri())
    bar = ProgressBar(f"push {name}", sys.stderr, enabled=args.progress)
    info = store.register(name, weights, tenant=tenant, factory=args.factory or factory, progress=bar)
    print(f"pushed {info.tenant}/{info.name}: {format_bytes(info.nbytes)}, sha256 {info.sha256[:16]}, to {store.uri}")
    return 0


def _resolve_source(source: str, seed: int) -> tuple[object, str, str | None]:
    """What ``push SOURCE`` registers: ``(weights, default name, default factory)``.

    A URI or an existing path wins over a factory reference of the same spelling. A factory's
    model is built here, its initialisers drawing from ``seed`` (the global RNG is left as it
    was), and registered with that factory.

    Raises:
        TrimsError: ``source`` is neither a file, a directory, a URI nor a factory that builds.
    """
    if "://" in source:
        return source, _stem(source.rstrip("/").rsplit("/", 1)[-1]), None
    path = Path(source).expanduser()
    if path.exists():
        return str(path), _stem(path.resolve().name), None
    from ._factory import check_factory_ref, resolve_factory

    try:
        factory = resolve_factory({"import": check_factory_ref(source)})
    except (TypeError, ValueError) as exc:
        detail = f" ({exc})" if ":" in source else ""
        raise TrimsError(
            f"{source!r} is not a file, a directory, a URI or a factory{detail}: give the path of a "
            ".safetensors file or of a directory of shards, a URI, or MODULE:ATTR (e.g. "
            "workloads.zoo:resnet50)"
        ) from None
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    return model.eval(), source.rsplit(":", 1)[1].rsplit(".", 1)[-1], source


def _stem(filename: str) -> str:
    return filename.removesuffix(".safetensors")


# --------------------------------------------------------------------------------------------
# Cluster commands
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


def _attach(args: argparse.Namespace) -> trims_ray.Cluster:
    """``trims_ray.init`` on the connected cluster, with the store trims_ray runs with there.

    Raises:
        TrimsError: trims_ray does not run there and no store was given to start it with; or it
            runs with another store than ``--store``.
        StoreUnavailableError: the store cannot be reached.
    """
    store, options = args.store, None
    if store is None:
        try:
            store, options = _cluster.call(_cluster.placement_actor().store_spec.remote())
        except TrimsError:  # not running: a store from the environment starts it
            store = env_store_uri()
        if store is None:
            raise TrimsError(
                "trims_ray is not running on this cluster: pass --store URI (or set "
                "$TRIMS_RAY_STORE) to start it with that store"
            )
    # init() checks the store too, but (for now) lets an unreachable S3 endpoint through as
    # botocore's own error: check it here, where it becomes StoreUnavailableError.
    model_store = trims_ray.ModelStore(store, storage_options=options)
    with translate_store_errors(model_store.fs, model_store.uri):
        model_store._check_reachable()
    return trims_ray.init(store, storage_options=options)


def _status(args: argparse.Namespace) -> int:
    cluster = _attach(args)
    data = trims_ray.stats().to_dict()
    for node in data["nodes"].values():
        for tier in node["tiers"].values():
            tier["hit_ratio"] = _hit_ratio(tier)
    if args.json:
        print(json.dumps({"store": cluster.store, **data}, indent=2, sort_keys=True))
        return 0
    rows = []
    for node_id, node in sorted(data["nodes"].items()):
        for i, (tier, s) in enumerate(node["tiers"].items()):
            use = f"{s['bytes_used'] / s['capacity']:.0%}" if s["capacity"] else "-"
            ratio = "-" if s["hit_ratio"] is None else f"{s['hit_ratio']:.1%}"
            rows.append(
                [_short(node_id) if i == 0 else "", tier, format_bytes(s["bytes_used"]), format_bytes(s["capacity"]),
                 use, s["models"], s["hits"], s["misses"], ratio, s["loads"], s["evictions"]]
            )  # fmt: skip
    print(f"store {cluster.store}, {len(data['nodes'])} node(s)")
    headers = ["NODE", "TIER", "USED", "CAPACITY", "USE", "MODELS", "HITS", "MISSES", "HIT RATIO", "LOADS", "EVICTIONS"]
    print(format_table(headers, rows, align="ll" + "r" * 9))
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    _attach(args)
    found = trims_ray.prefetch(args.name, tier=args.tier, nodes=_node_ids(args.node), tenant=args.tenant)
    print(f"prefetched {args.name} into the {args.tier} tier of {len(found)} node(s)")
    print(format_table(["NODE", "FOUND IN"], [[_short(n), where] for n, where in sorted(found.items())], align="ll"))
    return 0


def _evict(args: argparse.Namespace) -> int:
    _attach(args)
    result = trims_ray.evict(args.name, tier=args.tier, nodes=_node_ids(args.node), tenant=args.tenant)
    rows = [
        [_short(n) if i == 0 else "", tier, outcome]
        for n, tiers in sorted(result.items())
        for i, (tier, outcome) in enumerate(tiers.items())
    ]
    deferred = any(outcome == "deferred" for _, _, outcome in rows)
    note = " (deferred: in use now, freed when its last lease ends)" if deferred else ""
    print(f"evicted {args.name} from {args.tier or 'every'} tier on {len(result)} node(s){note}")
    print(format_table(["NODE", "TIER", "RESULT"], rows, align="lll"))
    return 0


def _node_ids(prefixes: list[str] | None) -> list[str] | None:
    """Full ids of the alive nodes that ``prefixes`` name (None: every node).

    Raises:
        UsageError: a prefix names no alive node, or more than one.
    """
    if prefixes is None:
        return None
    import ray

    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    ids = []
    for prefix in prefixes:
        matches = [n for n in alive if n.startswith(prefix.strip().lower())] if prefix.strip() else []
        if len(matches) != 1:
            found = "no alive node" if not matches else f"{len(matches)} nodes"
            raise UsageError(
                f"--node {prefix!r} matches {found}; alive nodes: {', '.join(_short(n) for n in alive)}"
            )
        ids.append(matches[0])
    return ids


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": _status,
    "prefetch": _prefetch,
    "evict": _evict,
}


# --------------------------------------------------------------------------------------------
# bench and demo
# --------------------------------------------------------------------------------------------

_PASSTHROUGH = {
    "bench": ("workloads.bench", "run a benchmark (replay, soak and gpu: workloads.replay, .soak, .gpu_bench)"),
    "demo": ("workloads.demo", "the demo on an embedded local Ray"),
}


# Benchmarks with a module of their own: `trims-ray bench replay ...` runs workloads.replay.
_BENCH_MODULES = {"replay": "workloads.replay", "soak": "workloads.soak", "gpu": "workloads.gpu_bench"}


def _passthrough(command: str, argv: list[str]) -> int:
    import importlib

    name = _PASSTHROUGH[command][0]
    if command == "bench" and argv and argv[0] in _BENCH_MODULES:
        name, argv = _BENCH_MODULES[argv[0]], argv[1:]
    module = importlib.import_module(name)
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exc:  # their argparse (--help, bad arguments)
        return _exit_code(exc)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _hit_ratio(tier: dict) -> float | None:
    accesses = tier["hits"] + tier["misses"]
    return tier["hits"] / accesses if accesses else None


def _short(node_id: str) -> str:
    return node_id[:12]


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
