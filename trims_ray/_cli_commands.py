"""The commands of ``trims-ray`` that act on a store or on a running cluster: push, start, ls,
status, prefetch, evict and scrub. ``cli`` parses the command line and connects to Ray; each
function here takes the parsed arguments, prints its result (a table, or JSON with
``--format json``) and returns the exit code.

What starts trims_ray is explicit: ``start``, or ``--start`` on prefetch, evict and scrub. The
read commands (ls, status) look its actors up and start nothing; on a cluster where it does not
run they say so and fail, as prefetch, evict and scrub do without ``--start``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trims_ray

from . import _api, _cluster
from ._cli_output import (
    UploadProgress,
    dump_json,
    format_bytes,
    format_table,
    hit_ratio,
    residency_json,
    residency_rows,
    residency_summary,
    short_node,
)
from ._config import env_store_uri
from ._errors import TrimsError
from ._fsio import translate_store_errors
from ._names import check_name
from ._protocol import cache_key

__all__ = ["UsageError", "COMMANDS", "push", "not_running"]


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2, like argparse's errors)."""


def not_running(*, start_hint: str | None = None) -> TrimsError:
    """The error of a command that needs trims_ray on a cluster where it does not run."""
    how = "'trims-ray start --store URI' (or trims_ray.init(store=URI) in a driver)"
    if start_hint:
        how += f", or add --start --store URI to this command: {start_hint}"
    return TrimsError(f"trims_ray is not running on this Ray cluster: start it with {how}")


def _json(args: argparse.Namespace) -> bool:
    return getattr(args, "format", "table") == "json" or getattr(args, "json", False)


# --------------------------------------------------------------------------------------------
# push (no cluster)
# --------------------------------------------------------------------------------------------


def push(args: argparse.Namespace) -> int:
    tenant = _api.tenant_for_write(args.tenant)  # refused before any weights are read or built
    weights, default_name, factory = _resolve_source(args.source, args.seed)
    name = args.name or default_name
    if args.name is None:  # a name taken from a file name gets a hint on how to choose another
        try:
            check_name(name)
        except ValueError as exc:
            raise UsageError(f"{exc}; choose a name with --name") from None
    store = trims_ray.ModelStore(args.store)  # None: $TRIMS_RAY_STORE or ~/.cache/trims_ray/store
    progress = UploadProgress(f"push {name}", sys.stderr, enabled=args.progress)
    try:
        info = store.register(name, weights, tenant=tenant, factory=args.factory or factory, progress=progress)
    finally:
        progress.close()  # a failed upload's bar ends its line before the error
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
# Starting trims_ray, and attaching to it
# --------------------------------------------------------------------------------------------


def _start(store: str | None) -> trims_ray.Cluster:
    """``trims_ray.init`` with ``store`` (default ``$TRIMS_RAY_STORE``) on the connected cluster.

    Raises:
        UsageError: no store given.
        StoreUnavailableError: the store cannot be reached.
        TrimsError: trims_ray already runs there with another store.
    """
    store = store if store is not None else env_store_uri()
    if store is None:
        raise UsageError("starting trims_ray needs --store URI (or $TRIMS_RAY_STORE): the store every node reads from")
    # init() checks the store too, but (for now) lets an unreachable S3 endpoint through as
    # botocore's own error: check it here, where it becomes StoreUnavailableError.
    model_store = trims_ray.ModelStore(store)
    with translate_store_errors(model_store.fs, model_store.uri):
        model_store._check_reachable()
    return trims_ray.init(store)


def _attach(args: argparse.Namespace, example: str) -> None:
    """Makes sure trims_ray runs before a command that changes the caches: it starts it only
    with ``--start``. ``example``: the command line to show in the error that asks for it.

    Raises:
        TrimsError: not running and no ``--start``; or running with another store than ``--store``.
    """
    if not _cluster.is_running():
        if not args.start:
            raise not_running(start_hint=example)
        _start(args.store)
        return
    if args.store is not None:
        running, _ = _cluster.running_store()
        asked = trims_ray.ModelStore(args.store).uri
        if asked != running:
            raise TrimsError(
                f"trims_ray already runs on this cluster with store {running}, not {asked}: leave --store "
                "out, or stop trims_ray first (trims_ray.shutdown() in a driver; its caches are emptied)"
            )


def start(args: argparse.Namespace) -> int:
    already = _cluster.is_running()
    cluster = _start(args.store)
    if _json(args):
        print(dump_json({"store": cluster.store, "nodes": list(cluster.nodes), "started": not already}))
        return 0
    verb = "already runs" if already else "started"
    print(f"trims_ray {verb} on {len(cluster.nodes)} node(s) with store {cluster.store}")
    return 0


# --------------------------------------------------------------------------------------------
# Read commands: they never start anything
# --------------------------------------------------------------------------------------------


def _running_store() -> tuple[str, trims_ray.ModelStore]:
    """The running trims_ray's store (its URI, and a store handle to list it), or the error
    that says it does not run."""
    if not _cluster.is_running():
        raise not_running()
    uri, options = _cluster.running_store()
    return uri, _api.store_for(uri, options)


def _models(store: trims_ray.ModelStore, tenant: str) -> list[dict]:
    """``residency_json`` of the models ``tenant`` sees in ``store`` (its own and the public
    ones; "public": those alone): only their keys are looked up in placement's table."""
    infos = store.list_models(tenant=tenant)
    return residency_json(infos, _cluster.residency(cache_key(i) for i in infos))


def ls(args: argparse.Namespace) -> int:
    uri, store = _running_store()
    tenant = _api.acting_tenant(args.tenant, "list models")
    models = _models(store, tenant)
    nodes = _cluster.cache_nodes()
    if _json(args):
        print(dump_json({"store": uri, "tenant": tenant, "nodes": nodes, "models": models}))
        return 0
    seen = f"tenant {tenant}" + (" and public" if tenant != "public" else "")
    print(f"store {uri}, {seen}, {len(nodes)} node(s)")
    if not models:
        print(f"no models registered for {seen} (register one: trims-ray push)")
        return 0
    headers, rows, align = residency_rows(models, registered=True)
    print(format_table(headers, rows, align=align))
    print(residency_summary(models))
    return 0


def status(args: argparse.Namespace) -> int:
    uri, store = _running_store()
    tenant = _api.caller_tenant()
    data = _cluster.stats_of(_cluster.cache_nodes()).to_dict()
    for node in data["nodes"].values():
        for tier in node["tiers"].values():
            tier["hit_ratio"] = hit_ratio(tier)
    resident = [m for m in _models(store, tenant) if m["resident"]]
    if _json(args):
        print(dump_json({"store": uri, "tenant": tenant, "nodes": data["nodes"], "models": resident}))
        return 0
    rows = []
    for node_id, node in sorted(data["nodes"].items()):
        for i, (tier, s) in enumerate(node["tiers"].items()):
            use = f"{s['bytes_used'] / s['capacity']:.0%}" if s["capacity"] else "-"
            ratio = "-" if s["hit_ratio"] is None else f"{s['hit_ratio']:.1%}"
            rows.append(
                [short_node(node_id) if i == 0 else "", tier, format_bytes(s["bytes_used"]),
                 format_bytes(s["capacity"]), use, s["models"], s["hits"], s["misses"], ratio, s["loads"],
                 s["evictions"]]
            )  # fmt: skip
    print(f"store {uri}, {len(data['nodes'])} node(s)")
    headers = ["NODE", "TIER", "USED", "CAPACITY", "USE", "MODELS", "HITS", "MISSES", "HIT RATIO", "LOADS", "EVICTIONS"]
    print(format_table(headers, rows, align="ll" + "r" * 9))
    print()
    if not resident:
        print(f"no model of tenant {tenant} or public is resident")
        return 0
    print(f"resident models of tenant {tenant} and public:")
    headers, rows, align = residency_rows(resident, registered=False)
    print(format_table(headers, rows, align=align))
    return 0


# --------------------------------------------------------------------------------------------
# Commands that change the caches
# --------------------------------------------------------------------------------------------


def prefetch(args: argparse.Namespace) -> int:
    _attach(args, f"trims-ray prefetch {args.name} --start --store URI")
    found = trims_ray.prefetch(args.name, tier=args.tier, nodes=_node_ids(args.node), tenant=args.tenant)
    if _json(args):
        print(dump_json({"model": args.name, "tier": args.tier, "nodes": found}))
        return 0
    print(f"prefetched {args.name} into the {args.tier} tier of {len(found)} node(s)")
    print(format_table(["NODE", "FOUND IN"], [[short_node(n), where] for n, where in sorted(found.items())], align="ll"))
    return 0


def evict(args: argparse.Namespace) -> int:
    _attach(args, f"trims-ray evict {args.name} --start --store URI")
    result = trims_ray.evict(args.name, tier=args.tier, nodes=_node_ids(args.node), tenant=args.tenant)
    if _json(args):
        print(dump_json({"model": args.name, "tier": args.tier, "nodes": result}))
        return 0
    rows = [
        [short_node(n) if i == 0 else "", tier, outcome]
        for n, tiers in sorted(result.items())
        for i, (tier, outcome) in enumerate(tiers.items())
    ]
    deferred = any(outcome == "deferred" for _, _, outcome in rows)
    note = " (deferred: in use now, freed when its last lease ends)" if deferred else ""
    print(f"evicted {args.name} from {args.tier or 'every'} tier on {len(result)} node(s){note}")
    print(format_table(["NODE", "TIER", "RESULT"], rows, align="lll"))
    return 0


def scrub(args: argparse.Namespace) -> int:
    _attach(args, "trims-ray scrub --start --store URI")
    result = trims_ray.scrub(nodes=_node_ids(args.node))
    if _json(args):
        print(dump_json({"nodes": result}))
        return 0
    counts = ("scrubbed", "corrupt", "reloaded")
    rows = [[short_node(n), *(r[c] for c in counts)] for n, r in sorted(result.items())]
    corrupt = sum(r["corrupt"] for r in result.values())
    verdict = f"{corrupt} corrupt cop(ies) dropped" if corrupt else "every copy matches its manifest"
    print(f"scrubbed the host tier of {len(result)} node(s): {verdict}")
    print(format_table(["NODE", "SCRUBBED", "CORRUPT", "RELOADED"], rows, align="lrrr"))
    return 0


def budget(args: argparse.Namespace) -> int:
    _attach(args, f"trims-ray budget {args.tier} {args.size} --start --store URI")
    result = trims_ray.set_budget(args.tier, args.size, nodes=_node_ids(args.node))
    if _json(args):
        print(dump_json({"tier": args.tier, "nodes": result}))
        return 0
    rows = [
        [short_node(n), *(format_bytes(r[k]) for k in ("budget", "bytes_used")), r["evicted"], format_bytes(r["over_budget"])]
        for n, r in sorted(result.items())
    ]
    per_gpu = " per GPU" if args.tier == "gpu" else ""
    later = ", and on caches that start later" if args.node is None else ""
    print(f"the {args.tier} budget is {format_bytes(args.size)}{per_gpu} on {len(result)} node(s){later}")
    print(format_table(["NODE", "BUDGET", "USED", "EVICTED", "OVER (LEASED)"], rows, align="lrrrr"))
    if any(r["over_budget"] for r in result.values()):
        print("over: bytes of models in use beyond the budget; they are freed when their last lease ends")
    return 0


def quota(args: argparse.Namespace) -> int:
    size = "none" if args.size is None else args.size
    _attach(args, f"trims-ray quota {args.tenant} {args.tier} {size} --start --store URI")
    result = trims_ray.set_quota(args.tenant, args.tier, args.size, nodes=_node_ids(args.node))
    if _json(args):
        print(dump_json({"tenant": args.tenant, "tier": args.tier, "nodes": result}))
        return 0
    rows = [
        [short_node(n), "none" if r["quota"] is None else format_bytes(r["quota"]), format_bytes(r["bytes_used"]),
         r["evicted"], format_bytes(r["over_quota"])]
        for n, r in sorted(result.items())
    ]
    what = "its share of the budget" if args.size is None else format_bytes(args.size)
    later = ", and on caches that start later" if args.node is None else ""
    print(f"tenant {args.tenant!r}'s {args.tier} quota is {what} on {len(result)} node(s){later}")
    print(format_table(["NODE", "QUOTA", "USED", "EVICTED", "OVER"], rows, align="lrrrr"))
    if any(r["over_quota"] for r in result.values()):
        print("over: the tenant's bytes beyond its quota, in use or on their way in or out; its models "
              "in use go when released, disk copies being written when they land")
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
                f"--node {prefix!r} matches {found}; alive nodes: {', '.join(short_node(n) for n in alive)}"
            )
        ids.append(matches[0])
    return ids


# The commands that run on a cluster, by name (``cli`` connects first).
def dashboard(args: argparse.Namespace) -> int:
    """``dashboard install``: writes the Grafana dashboard where Ray's Grafana provisioning (or
    ``--dest``) finds it; needs no cluster connection."""
    from ._dashboard import install_dashboard

    path = install_dashboard(args.dest)
    if _json(args):
        print(json.dumps({"installed": str(path)}, sort_keys=True))
    else:
        print(f"installed {path}")
    return 0


COMMANDS = {
    "start": start,
    "ls": ls,
    "status": status,
    "prefetch": prefetch,
    "evict": evict,
    "scrub": scrub,
    "budget": budget,
    "quota": quota,
    "dashboard": dashboard,
}
