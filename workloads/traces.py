"""Request traces: seeded generators, the real Azure LLM arrivals, and the Parquet schemas.

A trace is what the simulator (workloads.simulate) and the replay harness consume: one row per
request (time, tenant, model, size, miss cost, tokens). The replay writes one RESULT row per
request it served. Every generator is deterministic under its seed.

Real arrivals: the Azure LLM inference trace 2023 (Azure Public Dataset; Patel et al.,
"Splitwise", ISCA 2024), licensed CC-BY 4.0; read in place from ../shared/data/azure_llm_2023/.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

__all__ = [
    "AZURE_ATTRIBUTION",
    "HOST_HIT_TIERS",
    "RESULT_SCHEMA",
    "TRACE_SCHEMA",
    "Catalog",
    "azure_trace",
    "azure_trace_dir",
    "build_trace",
    "miss_cost",
    "onoff_arrivals",
    "pareto_catalog",
    "poisson_arrivals",
    "popularity",
    "read_azure_arrivals",
    "read_results",
    "read_trace",
    "synthetic_trace",
    "validate_results",
    "validate_trace",
    "write_results",
    "write_trace",
    "zoo_catalog",
]

TRACE_SCHEMA = pa.schema(
    [
        pa.field("time", pa.float64(), nullable=False),  # seconds from the trace's start
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # one name, one set of weights
        pa.field("size", pa.int64(), nullable=False),  # the model's bytes
        pa.field("cost", pa.float64(), nullable=False),  # modelled miss cost (load) in seconds
        pa.field("tokens", pa.int64(), nullable=False),  # tokens in + out; 0 when unknown
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),  # row of the trace
        pa.field("time", pa.float64(), nullable=False),  # when it was sent, trace seconds
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("system", pa.string(), nullable=False),  # "trims_ray", "serve", "nocache", ...
        pa.field("policy", pa.string(), nullable=False),  # eviction policy; "" if none
        pa.field("node", pa.string(), nullable=False),  # Ray node id hex that served it
        pa.field("tier", pa.string(), nullable=False),  # "gpu", "host", "disk", "store", ...
        pa.field("latency_s", pa.float64(), nullable=False),
        pa.field("ok", pa.bool_(), nullable=False),  # the result was correct
    ]
)
# The tiers of a result row that count as a hit on a node's host copy: by lease ("host"), or by
# the model a worker kept built ("process", which only a host copy feeds). What the replay
# compares with Belady's host-tier hit ratio.
HOST_HIT_TIERS = ("host", "process")

AZURE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Azure Public Dataset, github.com/Azure/AzurePublicDataset; "
    "Patel et al., Splitwise, ISCA 2024), CC-BY 4.0"
)
AZURE_SERVICES = ("conv", "code")
TRACE_DIR_ENV = "TRIMS_RAY_TRACE_DIR"
_AZURE_FILE = "AzureLLMInferenceTrace_{}.csv"

# The default miss cost model: what a read from a cloud store costs (first-byte latency plus
# bytes over a single client's throughput). The replay measures real costs; the simulator
# needs a number per model, and this one makes small models dearer per byte, as they are.
STORE_LATENCY_S = 0.05
STORE_BANDWIDTH = 500e6  # bytes per second


def _rng(seed: int, stream: int) -> np.random.Generator:
    # One independent stream per purpose, so that changing one draw (the request count, say)
    # leaves the others (the catalog, the popularity ranking) as they were.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return np.random.default_rng([int(seed), stream])


def _check_count(label: str, n: int, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise ValueError(f"{label} must be an int >= {minimum}, got {n!r}")
    return int(n)


def _check_positive(label: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{label} must be a number > 0, got {value!r}")
    return float(value)


# -- model catalogs ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Catalog:
    """The models a trace draws from.

    Attributes:
        names: Model names, unique.
        sizes: Bytes of each model (int64), aligned with names.
    """

    names: tuple[str, ...]
    sizes: np.ndarray

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("catalog model names must be unique")
        if len(self.sizes) != len(self.names) or (np.asarray(self.sizes) < 0).any():
            raise ValueError("catalog needs one size >= 0 per model")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_bytes(self) -> int:
        """Bytes of all models together (the working set if every model is requested)."""
        return int(np.sum(self.sizes))


# The architectures zoo_catalog draws from, in a fixed order: drawing from all of ZOO would
# change every seeded catalog (and the figures made from them) whenever the zoo grows.
CATALOG_ARCHITECTURES = ("alexnet", "vgg16", "resnet50", "bert_base", "gpt2", "gpt2_medium")


def zoo_catalog(n_models: int, *, seed: int, fp16_share: float = 0.5) -> Catalog:
    """Variants (fine-tunes) of the zoo's architectures, at their real sizes.

    Model i is a variant of a seeded draw of workloads.zoo's architectures, stored in fp32 or,
    for about fp16_share of them, fp16: sizes are parameter count times 4 or 2 bytes (the
    safetensors header aside), 51 MB to 1.4 GB.

    Args:
        n_models: How many models, >= 1.
        seed: Seed of the draws.
        fp16_share: Fraction of models stored in fp16, in [0, 1].

    Raises:
        ValueError: On a bad count, seed or share.
    """
    from workloads.zoo import ZOO  # imports torch; only this catalog needs it

    n_models = _check_count("n_models", n_models)
    if not 0 <= fp16_share <= 1:
        raise ValueError(f"fp16_share must be in [0, 1], got {fp16_share!r}")
    rng = _rng(seed, 1)
    archs = [ZOO[name] for name in CATALOG_ARCHITECTURES]
    picks = rng.integers(len(archs), size=n_models)
    width = rng.random(n_models) < fp16_share
    names = tuple(f"{archs[a].name}-{i:04d}" for i, a in enumerate(picks))
    params = np.array([archs[a].params for a in picks], dtype=np.int64)
    return Catalog(names, params * np.where(width, 2, 4))


def pareto_catalog(
    n_models: int,
    *,
    seed: int,
    alpha: float = 1.2,
    min_bytes: int = 50_000_000,
    max_bytes: int = 16_000_000_000,
) -> Catalog:
    """Models with Pareto-distributed sizes: many small ones and a heavy tail of huge ones.

    Args:
        n_models: How many models, >= 1.
        seed: Seed of the draws.
        alpha: Pareto shape (smaller: heavier tail), > 0.
        min_bytes: The smallest size (the Pareto scale), > 0.
        max_bytes: Sizes are capped here (no one deploys a model larger than a host).

    Raises:
        ValueError: On a bad count, seed, shape or bounds.
    """
    n_models = _check_count("n_models", n_models)
    alpha = _check_positive("alpha", alpha)
    if not 0 < min_bytes <= max_bytes:
        raise ValueError(f"need 0 < min_bytes <= max_bytes, got {min_bytes}, {max_bytes}")
    rng = _rng(seed, 2)
    sizes = np.minimum(min_bytes * (1.0 + rng.pareto(alpha, n_models)), max_bytes)
    names = tuple(f"model-{i:04d}" for i in range(n_models))
    return Catalog(names, sizes.astype(np.int64))


# -- popularity --------------------------------------------------------------------------------


def popularity(
    kind: str, n_models: int, *, seed: int, exponent: float = 0.9, alpha: float = 1.2
) -> np.ndarray:
    """Request probabilities over n_models models, in catalog order.

    Args:
        kind: "zipf" (the r-th most popular model gets weight 1 / r**exponent), "pareto"
            (i.i.d. Pareto(alpha) weights) or "uniform".
        n_models: How many models, >= 1.
        seed: Seed of which model gets which rank (and of the Pareto weights).
        exponent: Zipf exponent, >= 0 (0 is uniform).
        alpha: Pareto shape, > 0.

    Returns:
        float64 probabilities summing to 1; ranks are assigned to models by a seeded shuffle,
        so popularity is independent of the catalog's order (and of size).

    Raises:
        ValueError: On an unknown kind or bad parameters.
    """
    n_models = _check_count("n_models", n_models)
    rng = _rng(seed, 3)
    if kind == "zipf":
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or exponent < 0:
            raise ValueError(f"exponent must be a number >= 0, got {exponent!r}")
        weights = 1.0 / np.arange(1, n_models + 1, dtype=np.float64) ** exponent
    elif kind == "pareto":
        weights = 1.0 + rng.pareto(_check_positive("alpha", alpha), n_models)
    elif kind == "uniform":
        weights = np.ones(n_models)
    else:
        raise ValueError(f"unknown popularity {kind!r}; choose zipf, pareto or uniform")
    weights = weights[rng.permutation(n_models)]
    return weights / weights.sum()


# -- arrivals ----------------------------------------------------------------------------------


def poisson_arrivals(n: int, *, rate: float, seed: int) -> np.ndarray:
    """Times in seconds of n arrivals of a Poisson process of the given rate (per second).

    Raises:
        ValueError: If n < 1, rate <= 0 or the seed is bad.
    """
    n = _check_count("n", n)
    gaps = _rng(seed, 4).exponential(1.0 / _check_positive("rate", rate), n)
    return np.cumsum(gaps)


def onoff_arrivals(
    n: int, *, rate_on: float, mean_on: float, mean_off: float, seed: int
) -> np.ndarray:
    """Bursty arrivals: Poisson at rate_on during on periods, none during off periods.

    On and off periods alternate, starting with on; their lengths are exponential with means
    mean_on and mean_off seconds (an on/off Markov-modulated Poisson process). The long-run
    rate is rate_on * mean_on / (mean_on + mean_off).

    Raises:
        ValueError: If n < 1, a rate or mean is <= 0, or the seed is bad.
    """
    n = _check_count("n", n)
    rng = _rng(seed, 5)
    # Arrivals in "on time" (the clock that runs only while on), then each is shifted by the
    # off periods that came before its on period.
    on_time = np.cumsum(rng.exponential(1.0 / _check_positive("rate_on", rate_on), n))
    periods = int(on_time[-1] / _check_positive("mean_on", mean_on) * 2) + 16
    on_ends = np.cumsum(rng.exponential(mean_on, periods))
    while on_ends[-1] < on_time[-1]:  # rare: the draws came out short
        on_ends = np.concatenate(
            [on_ends, on_ends[-1] + np.cumsum(rng.exponential(mean_on, periods))]
        )
    offs = rng.exponential(_check_positive("mean_off", mean_off), len(on_ends))
    period = np.searchsorted(on_ends, on_time, side="right")
    off_before = np.concatenate([[0.0], np.cumsum(offs)])[period]
    return on_time + off_before


# -- the Azure LLM inference trace -------------------------------------------------------------


def azure_trace_dir(trace_dir: str | os.PathLike | None = None) -> Path:
    """Where the Azure trace is: trace_dir, else $TRIMS_RAY_TRACE_DIR, else the shared data.

    The default is ``../shared/data/azure_llm_2023/`` relative to the project root (the
    directory holding workloads/). Nothing is checked here; the reader says what is missing.
    """
    if trace_dir is not None:
        return Path(trace_dir)
    if os.environ.get(TRACE_DIR_ENV, "").strip():
        return Path(os.environ[TRACE_DIR_ENV].strip())
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "azure_llm_2023"


def read_azure_arrivals(
    trace_dir: str | os.PathLike | None = None, *, services: Sequence[str] = AZURE_SERVICES
) -> pa.Table:
    """Reads the real request arrivals of the Azure LLM inference trace 2023 (CC-BY 4.0).

    Data: Azure Public Dataset (github.com/Azure/AzurePublicDataset), published with
    "Splitwise: Efficient generative LLM inference using phase splitting" (Patel et al., ISCA
    2024), license CC-BY 4.0: keep this attribution wherever the data or figures from it are
    shown (AZURE_ATTRIBUTION says it in one line).

    Args:
        trace_dir: The directory with AzureLLMInferenceTrace_<service>.csv (see
            azure_trace_dir for the default).
        services: Which files: "conv" (19,366 requests) and/or "code" (8,819).

    Returns:
        A table sorted by time (stable), columns ``time`` (float64 seconds from the earliest
        request of the files read, so services stay aligned), ``service`` (string),
        ``context_tokens`` and ``generated_tokens`` (int64).

    Raises:
        FileNotFoundError: If the directory or a service's file is missing.
        ValueError: If services is empty or names an unknown service.
    """
    directory = azure_trace_dir(trace_dir)
    if isinstance(services, str) or not services or set(services) - set(AZURE_SERVICES):
        raise ValueError(
            f"services must be a non-empty subset of {AZURE_SERVICES}, got {services!r}"
        )
    parts = []
    for service in services:
        path = directory / _AZURE_FILE.format(service)
        if not path.is_file():
            raise FileNotFoundError(
                f"Azure LLM trace file {path} not found: put the trace in "
                f"{azure_trace_dir()} or point ${TRACE_DIR_ENV} (or trace_dir) at its directory"
            )
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "TIMESTAMP": pa.timestamp("ns"),
                    "ContextTokens": pa.int64(),
                    "GeneratedTokens": pa.int64(),
                },
                include_columns=["TIMESTAMP", "ContextTokens", "GeneratedTokens"],
            ),
        )
        parts.append((service, table))
    start = min(pc.min(t["TIMESTAMP"]).value for _, t in parts)
    columns: dict[str, list[np.ndarray]] = {"time": [], "service": [], "ctx": [], "gen": []}
    for service, table in parts:
        ns = table["TIMESTAMP"].cast(pa.int64()).to_numpy()
        columns["time"].append((ns - start) / 1e9)
        columns["service"].append(np.full(len(ns), service, dtype=object))
        columns["ctx"].append(table["ContextTokens"].to_numpy())
        columns["gen"].append(table["GeneratedTokens"].to_numpy())
    time = np.concatenate(columns["time"])
    order = np.argsort(time, kind="stable")
    return pa.table(
        {
            "time": pa.array(time[order], pa.float64()),
            "service": pa.array(np.concatenate(columns["service"])[order], pa.string()),
            "context_tokens": pa.array(np.concatenate(columns["ctx"])[order], pa.int64()),
            "generated_tokens": pa.array(np.concatenate(columns["gen"])[order], pa.int64()),
        }
    )


# -- traces ------------------------------------------------------------------------------------


def miss_cost(
    sizes: np.ndarray, *, latency: float = STORE_LATENCY_S, bandwidth: float = STORE_BANDWIDTH
) -> np.ndarray:
    """The modelled load time in seconds of models of the given sizes: latency + size/bandwidth."""
    return latency + np.asarray(sizes, dtype=np.float64) / _check_positive("bandwidth", bandwidth)


def build_trace(
    times: np.ndarray,
    models: np.ndarray,
    catalog: Catalog,
    *,
    tenants: np.ndarray | str = "default",
    tokens: np.ndarray | None = None,
    cost: np.ndarray | None = None,
) -> pa.Table:
    """Assembles a trace table (TRACE_SCHEMA) from per-request arrays.

    Args:
        times: Request times in seconds, non-decreasing.
        models: Index into catalog of each request's model.
        catalog: The models.
        tenants: Each request's tenant, or one tenant for all.
        tokens: Each request's tokens (0 for all when None).
        cost: Miss cost in seconds per catalog model (miss_cost(catalog.sizes) when None).

    Raises:
        ValueError: If the arrays disagree in length or the result breaks the schema.
    """
    models = np.asarray(models, dtype=np.int64)
    n = len(models)
    if len(times) != n:
        raise ValueError(f"times has {len(times)} entries for {n} requests")
    costs = miss_cost(catalog.sizes) if cost is None else np.asarray(cost, dtype=np.float64)
    names = pa.array(catalog.names, pa.string())
    index = pa.array(models)
    tenant = pa.array(
        np.full(n, tenants, dtype=object) if isinstance(tenants, str) else tenants, pa.string()
    )
    table = pa.table(
        {
            "time": pa.array(np.asarray(times, dtype=np.float64)),
            "tenant": tenant,
            "model": names.take(index),
            "size": pa.array(np.asarray(catalog.sizes, dtype=np.int64)[models]),
            "cost": pa.array(costs[models]),
            "tokens": pa.array(
                np.zeros(n, np.int64) if tokens is None else np.asarray(tokens, np.int64)
            ),
        }
    )
    return validate_trace(table)


def synthetic_trace(
    n_requests: int,
    catalog: Catalog,
    *,
    seed: int,
    popularity_kind: str = "zipf",
    exponent: float = 0.9,
    alpha: float = 1.2,
    arrivals: str = "poisson",
    rate: float = 50.0,
    mean_on: float = 10.0,
    mean_off: float = 30.0,
    tenants: int = 1,
) -> pa.Table:
    """A seeded trace: models drawn by popularity, arriving as a Poisson or on/off process.

    Args:
        n_requests: Number of requests, >= 1.
        catalog: The models (zoo_catalog, pareto_catalog or your own).
        seed: Seed of every draw.
        popularity_kind, exponent, alpha: As for popularity().
        arrivals: "poisson" (rate per second) or "onoff" (bursts at rate, on/off periods of
            mean_on and mean_off seconds).
        tenants: Model i belongs to tenant "tenant-<i mod tenants>".

    Raises:
        ValueError: On bad parameters.
    """
    n_requests = _check_count("n_requests", n_requests)
    tenants = _check_count("tenants", tenants)
    weights = popularity(popularity_kind, len(catalog), seed=seed, exponent=exponent, alpha=alpha)
    models = _rng(seed, 6).choice(len(catalog), size=n_requests, p=weights)
    if arrivals == "poisson":
        times = poisson_arrivals(n_requests, rate=rate, seed=seed)
    elif arrivals == "onoff":
        times = onoff_arrivals(
            n_requests, rate_on=rate, mean_on=mean_on, mean_off=mean_off, seed=seed
        )
    else:
        raise ValueError(f"unknown arrivals {arrivals!r}; choose poisson or onoff")
    owners = np.array([f"tenant-{i % tenants}" for i in range(len(catalog))], dtype=object)
    return build_trace(times, models, catalog, tenants=owners[models])


def azure_trace(
    catalog: Catalog,
    *,
    seed: int,
    exponent: float = 0.9,
    trace_dir: str | os.PathLike | None = None,
    services: Sequence[str] = AZURE_SERVICES,
    limit: int | None = None,
) -> pa.Table:
    """The real Azure LLM arrivals (CC-BY 4.0, see AZURE_ATTRIBUTION) mapped onto catalog models.

    The data has no model column, so each service becomes a tenant with its own seeded Zipf
    popularity over the whole catalog (the services' hot models differ); tokens are the
    request's context plus generated tokens.

    Args:
        catalog: The models.
        seed: Seed of the popularity rankings and the draws.
        exponent: Zipf exponent of each service's popularity.
        trace_dir, services: As for read_azure_arrivals.
        limit: Keep only the first limit requests (all when None).

    Raises:
        FileNotFoundError: If the trace is not there (see read_azure_arrivals).
        ValueError: On bad parameters.
    """
    arrivals = read_azure_arrivals(trace_dir, services=services)
    if limit is not None:
        arrivals = arrivals.slice(0, _check_count("limit", limit))
    service = arrivals["service"].to_numpy(zero_copy_only=False)
    models = np.empty(len(service), dtype=np.int64)
    rng = _rng(seed, 7)
    for k, name in enumerate(AZURE_SERVICES):
        mine = service == name
        weights = popularity(
            "zipf", len(catalog), seed=seed * len(AZURE_SERVICES) + k, exponent=exponent
        )
        models[mine] = rng.choice(len(catalog), size=int(mine.sum()), p=weights)
    tokens = pc.add(arrivals["context_tokens"], arrivals["generated_tokens"]).to_numpy()
    return build_trace(arrivals["time"].to_numpy(), models, catalog, tenants=service, tokens=tokens)


# -- Parquet -----------------------------------------------------------------------------------


def _validate(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    if not isinstance(table, pa.Table):
        raise TypeError(f"a {what} must be a pyarrow.Table, got {type(table).__name__}")
    expected = {f.name: f.type for f in schema}
    found = {f.name: f.type for f in table.schema}
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    wrong = [
        f"{n}: {found[n]} (want {t})" for n, t in expected.items() if n in found and found[n] != t
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"not a {what} table: missing columns {missing}, unexpected columns {extra}, wrong "
            f"types {wrong}; a {what} has exactly "
            + ", ".join(f"{n} {t}" for n, t in expected.items())
        )
    nulls = [n for n in expected if table[n].null_count]
    if nulls:
        raise ValueError(f"{what} column(s) {nulls} have nulls; every field is required")
    return table.select(list(expected)).cast(schema)


def validate_trace(table: pa.Table) -> pa.Table:
    """Checks a trace against TRACE_SCHEMA and returns it with the schema's column order.

    Raises:
        TypeError: If table is not a pyarrow.Table.
        ValueError: On missing, extra or mistyped columns, nulls, times that are negative,
            not finite or decreasing, or negative sizes or costs.
    """
    table = _validate(table, TRACE_SCHEMA, "trace")
    time = table["time"].to_numpy()
    if len(time) and (not np.isfinite(time).all() or time[0] < 0 or (np.diff(time) < 0).any()):
        raise ValueError("trace times must be finite seconds >= 0 in non-decreasing order")
    if pc.any(pc.less(table["size"], 0)).as_py() or pc.any(pc.less(table["cost"], 0)).as_py():
        raise ValueError("trace sizes and costs must be >= 0")
    return table


def validate_results(table: pa.Table) -> pa.Table:
    """Checks a replay result table against RESULT_SCHEMA; returns it in the schema's order.

    Raises:
        TypeError: If table is not a pyarrow.Table.
        ValueError: On missing, extra or mistyped columns, or nulls.
    """
    return _validate(table, RESULT_SCHEMA, "result")


def write_trace(table: pa.Table, path: str | os.PathLike) -> None:
    """Validates a trace (see validate_trace) and writes it to a Parquet file at path."""
    pq.write_table(validate_trace(table), path)


def read_trace(path: str | os.PathLike) -> pa.Table:
    """Reads a Parquet trace and validates it (see validate_trace)."""
    return validate_trace(pq.read_table(path))


def write_results(table: pa.Table, path: str | os.PathLike) -> None:
    """Validates replay results (see validate_results) and writes them to Parquet at path."""
    pq.write_table(validate_results(table), path)


def read_results(path: str | os.PathLike) -> pa.Table:
    """Reads a Parquet file of replay results and validates it (see validate_results)."""
    return validate_results(pq.read_table(path))
