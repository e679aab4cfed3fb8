"""The Ray options a decorated function's task is built with (``trims_ray._lease._make_remote``):
a GPU task reuses its worker unless the user says otherwise (Ray's default for GPU tasks is one
task per worker, ray#29624), and every other option passes through as given. No cluster: Ray
builds remote functions without one.
"""

from __future__ import annotations

import pytest

from trims_ray._lease import _make_remote


def _infer(model, x):
    return x


def test_a_gpu_task_reuses_its_worker_by_default():
    remote = _make_remote(_infer, "m", {"num_gpus": 1})
    assert remote._default_options["max_calls"] == 0  # unlimited: Ray would have set 1


@pytest.mark.parametrize("max_calls", [1, 5])
def test_a_gpu_task_keeps_the_max_calls_the_user_gave(max_calls):
    remote = _make_remote(_infer, "m", {"num_gpus": 0.5, "max_calls": max_calls})
    assert remote._default_options["max_calls"] == max_calls


def test_a_cpu_task_gets_rays_defaults():
    remote = _make_remote(_infer, "m", {"num_cpus": 1})
    assert remote._default_options.get("max_calls") in (None, 0)
    assert remote._default_options["num_cpus"] == 1


def test_a_task_returns_the_seconds_it_held_its_slot_unless_the_user_chose_its_returns():
    assert _make_remote(_infer, "m", {})._default_options["num_returns"] == 2
    assert _make_remote(_infer, "m", {"num_returns": 3})._default_options["num_returns"] == 3


def test_the_caller_gets_the_results_ref_and_keeps_the_timing_apart():
    from trims_ray._lease import _returns

    assert _returns(["result", "seconds"], {}) == ("result", "seconds")
    assert _returns(["a", "b"], {"num_returns": 2}) == (["a", "b"], None)  # the user's own two


def test_a_tasks_service_time_leaves_out_the_wait_for_a_model_it_loaded():
    # What the router learns a model's service time from (the task's second return): the slot
    # time, less the wait for the model when this task's lease loaded it (routing prices loads
    # apart), not when it found the model ready.
    from trims_ray import _lease

    started, ready, ended = 10.0, 10.5, 10.75
    for tier in ("store", "disk", "peer", "bypass"):
        assert _lease._service_seconds(tier, started, ready, ended) == pytest.approx(0.25), tier
    for tier in ("process", "host", "gpu"):
        assert _lease._service_seconds(tier, started, ready, ended) == pytest.approx(0.75), tier
