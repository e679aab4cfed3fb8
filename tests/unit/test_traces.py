"""Workload generators are seeded and sane; traces and results keep their Parquet schemas.

The Azure reader tests that need the real data skip when ../shared/data/azure_llm_2023/ is not
there; the reader's own logic is also checked on a tiny CSV written here. No Ray.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from workloads import traces
from workloads.zoo import ZOO


def small_catalog() -> traces.Catalog:
    return traces.pareto_catalog(50, seed=3)


# -- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("arrivals", ["poisson", "onoff"])
@pytest.mark.parametrize("kind", ["zipf", "pareto", "uniform"])
def test_a_seed_fixes_the_trace_and_another_seed_changes_it(kind, arrivals):
    catalog = small_catalog()

    def make(seed):
        return traces.synthetic_trace(
            2000, catalog, seed=seed, popularity_kind=kind, arrivals=arrivals, tenants=3
        )

    assert make(1).equals(make(1))
    other = make(2)
    assert not make(1)["model"].equals(other["model"])
    assert not make(1)["time"].equals(other["time"])


def test_catalogs_are_seeded():
    assert (
        traces.pareto_catalog(30, seed=1).sizes.tolist()
        == traces.pareto_catalog(30, seed=1).sizes.tolist()
    )
    assert (
        traces.pareto_catalog(30, seed=1).sizes.tolist()
        != traces.pareto_catalog(30, seed=2).sizes.tolist()
    )
    assert traces.zoo_catalog(30, seed=1).names == traces.zoo_catalog(30, seed=1).names
    assert traces.zoo_catalog(30, seed=1).names != traces.zoo_catalog(30, seed=2).names


def test_the_request_count_does_not_change_the_popularity_draws():
    # Separate random streams: a longer trace starts with the shorter one's models.
    catalog = small_catalog()
    short = traces.synthetic_trace(500, catalog, seed=4)
    long = traces.synthetic_trace(1000, catalog, seed=4)
    assert long["model"].slice(0, 500).equals(short["model"])


# -- distributions -----------------------------------------------------------------------------


def test_zipf_weights_follow_the_exponent():
    weights = np.sort(traces.popularity("zipf", 100, seed=0, exponent=0.9))[::-1]
    assert weights.sum() == pytest.approx(1.0)
    # Rank r gets weight proportional to 1 / r**0.9.
    assert weights[0] / weights[1] == pytest.approx(2**0.9)
    assert weights[0] / weights[9] == pytest.approx(10**0.9)


def test_zipf_draws_match_their_weights():
    catalog = small_catalog()
    n = 100_000
    trace = traces.synthetic_trace(n, catalog, seed=5, exponent=1.0)
    counts = dict(
        zip(*np.unique(trace["model"].to_numpy(zero_copy_only=False), return_counts=True))
    )
    weights = traces.popularity("zipf", len(catalog), seed=5, exponent=1.0)
    for name, weight in zip(catalog.names, weights):
        expected = n * weight
        # Binomial: within 5 standard deviations (plus one for rounding).
        assert abs(counts.get(name, 0) - expected) <= 5 * np.sqrt(expected * (1 - weight)) + 1, name


def test_uniform_and_pareto_popularity():
    assert np.allclose(traces.popularity("uniform", 8, seed=0), 1 / 8)
    pareto = np.sort(traces.popularity("pareto", 1000, seed=0, alpha=1.2))[::-1]
    assert pareto.sum() == pytest.approx(1.0)
    # Heavy tail: the top 10% of models get far more than 10% of the requests.
    assert pareto[:100].sum() > 0.3
    assert traces.popularity("zipf", 8, seed=0, exponent=0.0) == pytest.approx(np.full(8, 1 / 8))


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    times = traces.poisson_arrivals(50_000, rate=20.0, seed=1)
    gaps = np.diff(times)
    assert (gaps >= 0).all() and times[0] > 0
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1


def test_onoff_arrivals_are_bursty_at_the_long_run_rate():
    times = traces.onoff_arrivals(50_000, rate_on=40.0, mean_on=5.0, mean_off=15.0, seed=1)
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    # Long-run rate: 40 * 5 / (5 + 15) = 10 per second.
    assert len(times) / times[-1] == pytest.approx(10.0, rel=0.15)
    assert gaps.std() / gaps.mean() > 2  # far burstier than Poisson (CV 1)
    assert (gaps > 5.0).sum() > 50  # quiet periods between bursts


def test_catalog_sizes():
    heavy = traces.pareto_catalog(2000, seed=0, alpha=1.2, min_bytes=1000, max_bytes=10**6)
    assert heavy.sizes.min() >= 1000 and heavy.sizes.max() <= 10**6
    assert np.median(heavy.sizes) < 2 * 1000  # Pareto(1.2) median: 1000 * 2**(1/1.2) = 1782
    zoo = traces.zoo_catalog(40, seed=0)
    params = {m.name: m.params for m in ZOO.values()}
    for name, size in zip(zoo.names, zoo.sizes.tolist()):
        arch = name.rsplit("-", 1)[0]
        assert size in (2 * params[arch], 4 * params[arch]), name


def test_trace_columns_follow_the_catalog():
    catalog = small_catalog()
    trace = traces.synthetic_trace(3000, catalog, seed=2, tenants=2)
    size_of = dict(zip(catalog.names, catalog.sizes.tolist()))
    rows = trace.slice(0, 200).to_pylist()
    for row in rows:
        assert row["size"] == size_of[row["model"]]
        assert row["cost"] == pytest.approx(
            traces.STORE_LATENCY_S + row["size"] / traces.STORE_BANDWIDTH
        )
        assert row["tenant"] == f"tenant-{catalog.names.index(row['model']) % 2}"
    assert set(trace["tenant"].to_pylist()) == {"tenant-0", "tenant-1"}


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: traces.popularity("zipfian", 5, seed=0), ValueError),
        (lambda: traces.popularity("zipf", 0, seed=0), ValueError),
        (lambda: traces.popularity("zipf", 5, seed=-1), ValueError),
        (lambda: traces.poisson_arrivals(10, rate=0, seed=0), ValueError),
        (
            lambda: traces.onoff_arrivals(10, rate_on=1.0, mean_on=-1.0, mean_off=1.0, seed=0),
            ValueError,
        ),
        (
            lambda: traces.synthetic_trace(10, small_catalog(), seed=0, arrivals="bursty"),
            ValueError,
        ),
        (lambda: traces.pareto_catalog(5, seed=0, min_bytes=10, max_bytes=5), ValueError),
    ],
)
def test_bad_generator_arguments_are_rejected(call, error):
    with pytest.raises(error):
        call()


# -- Parquet schemas ---------------------------------------------------------------------------


def test_trace_round_trips_through_parquet(tmp_path):
    trace = traces.synthetic_trace(1000, small_catalog(), seed=0)
    path = tmp_path / "trace.parquet"
    traces.write_trace(trace, path)
    back = traces.read_trace(path)
    assert back.schema == traces.TRACE_SCHEMA
    assert back.equals(trace)


def test_results_round_trip_through_parquet(tmp_path):
    results = pa.table(
        {
            "request_id": pa.array([0, 1], pa.int64()),
            "time": [0.0, 0.5],
            "tenant": ["a", "b"],
            "model": ["m0", "m1"],
            "size": pa.array([10, 20], pa.int64()),
            "system": ["trims_ray", "serve"],
            "policy": ["gdsf", ""],
            "node": ["ab12", "cd34"],
            "tier": ["host", "store"],
            "latency_s": [0.01, 1.5],
            "ok": [True, False],
        }
    )
    path = tmp_path / "results.parquet"
    traces.write_results(results.select(list(reversed(results.column_names))), path)  # any order
    back = traces.read_results(path)
    assert back.schema == traces.RESULT_SCHEMA
    assert back.to_pylist() == results.to_pylist()


def _good_trace() -> pa.Table:
    return traces.synthetic_trace(20, small_catalog(), seed=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["cost"]), r"missing columns \['cost'\]"),
        (
            lambda t: t.append_column("extra", pa.array([1] * t.num_rows)),
            r"unexpected columns \['extra'\]",
        ),
        (
            lambda t: t.set_column(3, "size", t["size"].cast(pa.int32())),
            r"size: int32 \(want int64\)",
        ),
        (lambda t: t.set_column(2, "model", pa.array([None] * t.num_rows, pa.string())), "nulls"),
        (
            lambda t: t.set_column(0, "time", pa.array(np.arange(t.num_rows)[::-1], pa.float64())),
            "non-decreasing",
        ),
        (lambda t: t.set_column(4, "cost", pa.array([-1.0] * t.num_rows)), ">= 0"),
    ],
)
def test_a_bad_trace_is_rejected_on_write_and_on_read(tmp_path, change, message):
    bad = change(_good_trace())
    with pytest.raises(ValueError, match=message):
        traces.write_trace(bad, tmp_path / "bad.parquet")
    pa.parquet.write_table(bad, tmp_path / "bad.parquet")  # written by someone else
    with pytest.raises(ValueError, match=message):
        traces.read_trace(tmp_path / "bad.parquet")


def test_a_trace_is_not_a_result_and_not_a_dict(tmp_path):
    with pytest.raises(ValueError, match="not a result table"):
        traces.write_results(_good_trace(), tmp_path / "r.parquet")
    with pytest.raises(TypeError):
        traces.validate_trace({"time": [0.0]})


# -- the Azure LLM trace -----------------------------------------------------------------------


def _require_azure() -> dict[str, int]:
    """Skips without the data; returns each service's request count (its CSV's data lines)."""
    directory = traces.azure_trace_dir()
    if not (directory / "AzureLLMInferenceTrace_conv.csv").is_file():
        pytest.skip(f"Azure LLM trace not found in {directory}")
    files = {s: directory / f"AzureLLMInferenceTrace_{s}.csv" for s in ("conv", "code")}
    return {service: len(path.read_text().splitlines()) - 1 for service, path in files.items()}


def test_azure_arrivals_are_read_in_time_order():
    lines = _require_azure()
    arrivals = traces.read_azure_arrivals()
    # About 19,400 conversation and 8,800 coding requests in about one hour (the README says
    # 19,365 and 8,818; the files hold one more each, their last line has no newline).
    counts = dict(
        zip(*np.unique(arrivals["service"].to_numpy(zero_copy_only=False), return_counts=True))
    )
    assert counts == lines
    time = arrivals["time"].to_numpy()
    assert time[0] == 0.0 and (np.diff(time) >= 0).all()
    assert 3000 < time[-1] < 4000
    assert arrivals["context_tokens"].to_numpy().min() >= 0


def test_azure_trace_maps_each_service_to_a_tenant_with_its_own_favourites():
    lines = _require_azure()
    catalog = small_catalog()
    trace = traces.azure_trace(catalog, seed=0)
    assert trace.equals(traces.azure_trace(catalog, seed=0))
    assert trace.num_rows == lines["conv"] + lines["code"]
    assert set(trace["tenant"].to_pylist()) == {"conv", "code"}
    favourite = {}
    for tenant in ("conv", "code"):
        models = trace.filter(pa.compute.equal(trace["tenant"], tenant))["model"].to_numpy(
            zero_copy_only=False
        )
        names, counts = np.unique(models, return_counts=True)
        favourite[tenant] = names[np.argmax(counts)]
    assert favourite["conv"] != favourite["code"]
    assert (trace["tokens"].to_numpy() > 0).all()


def test_azure_reader_on_a_small_copy_via_the_environment(tmp_path, monkeypatch):
    (tmp_path / "AzureLLMInferenceTrace_conv.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    (tmp_path / "AzureLLMInferenceTrace_code.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:47.0000000,10,5\n"
    )
    monkeypatch.setenv(traces.TRACE_DIR_ENV, str(tmp_path))
    arrivals = traces.read_azure_arrivals()
    assert arrivals["service"].to_pylist() == ["conv", "code", "conv"]
    assert arrivals["time"].to_numpy() == pytest.approx([0.0, 0.31941, 4.314579])
    assert arrivals["generated_tokens"].to_pylist() == [44, 5, 109]
    only_code = traces.read_azure_arrivals(tmp_path, services=["code"])
    assert only_code["time"].to_pylist() == [0.0]


def test_azure_reader_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="TRIMS_RAY_TRACE_DIR"):
        traces.read_azure_arrivals(tmp_path / "nowhere")
    with pytest.raises(ValueError):
        traces.read_azure_arrivals(tmp_path, services=["chat"])
