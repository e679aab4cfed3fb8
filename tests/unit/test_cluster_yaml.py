"""The `ray up` configs at the repository root, checked with Ray's own validator (the schema and
the defaults `ray up` fills in, without contacting AWS) and against what trims_ray needs: the
image's Ray and Python, trims_ray and torch installed on every node, metrics exported, a GPU
worker type, and a documented way to start trims_ray there.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from trims_ray.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["ray-cluster.yaml", "ray-cluster.local.yaml"]
TESTED_PYTHON = "311"  # the Python trims_ray is tested on (README), as rayproject/ray spells it
METRICS_FLAG = "--metrics-export-port=8080"
IMAGE_RE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<platform>cpu|gpu|cu\d+)")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def prepared(name: str) -> dict:
    """What `ray up` validates: the file merged with the provider's defaults, then checked."""
    config = prepare_config(load(name))
    validate_config(config)
    return config


def images(config: dict) -> list[str]:
    docker = config.get("docker", {})
    found = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for node_type in config["available_node_types"].values():
        found += [v for k, v in node_type.get("docker", {}).items() if k.endswith("image")]
    return found


def torch_requirement() -> str:
    """pyproject.toml's torch requirement, e.g. "torch>=2.4,<3" (tomllib needs Python 3.11)."""
    (torch,) = re.findall(r'^\s*"(torch\b[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return torch


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_config(name):
    config = prepared(name)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["max_workers"] >= 1


@pytest.mark.parametrize("name", CONFIGS)
def test_image_runs_our_ray_and_python(name):
    found = images(prepared(name))
    assert found, f"{name} names no docker image"
    for image in found:
        match = IMAGE_RE.fullmatch(image)
        assert match, f"{image!r} is not a rayproject/ray:<version>-py<python>-<platform> tag"
        assert match["ray"] == ray.__version__, f"{name}: image has Ray {match['ray']}, installed is {ray.__version__}"
        assert match["py"] == TESTED_PYTHON


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_installs_trims_ray_and_torch(name):
    config = prepared(name)
    mounts = config["file_mounts"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = config[key]
        torch_at = [i for i, c in enumerate(commands) if "pip install" in c and f'"{torch_requirement()}"' in c]
        wheel_at = [i for i, c in enumerate(commands) if re.search(r"pip install .*trims_ray-\*\.whl", c)]
        assert torch_at and wheel_at, f"{name} {key}: {commands}"
        assert torch_at[0] < wheel_at[0], "torch first, so that trims_ray's range does not pick another build"
        # The wheel comes from a file mount of the local dist/ directory.
        wheel_dir = commands[wheel_at[0]].split()[-1].rsplit("/", 1)[0]
        assert mounts.get(wheel_dir) == "./dist", f"{wheel_dir} is not mounted from ./dist: {mounts}"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_exports_metrics(name):
    config = prepared(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, f"{name} {key} starts no Ray"
        assert all(METRICS_FLAG in c for c in starts), f"{name} {key}: {starts}"


def test_aws_config_has_a_gpu_worker_type():
    config = prepared("ray-cluster.yaml")
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, f"no worker type with GPUs: {workers}"
    assert all(t["max_workers"] >= 1 and t["node_config"]["InstanceType"] for t in gpu.values())


@pytest.mark.parametrize("name", CONFIGS)
def test_documents_how_to_start_trims_ray_with_commands_that_exist(name, capsys):
    text = (ROOT / name).read_text()
    assert "trims-ray status --store" in text
    used = set(re.findall(r"trims-ray (\w+)", text))
    assert used
    for command in used:
        assert main([command, "--help"]) == 0, f"{name} mentions 'trims-ray {command}', which is no command"
    assert main(["nosuchcommand", "--help"]) == 2  # the check above can fail


def test_local_variant_uses_the_local_provider_with_placeholders():
    provider = load("ray-cluster.local.yaml")["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]


@pytest.mark.parametrize(
    "name, break_it, error",
    [
        ("ray-cluster.yaml", lambda c: c.update(setup_comands=c.pop("setup_commands")), jsonschema.ValidationError),
        (
            "ray-cluster.yaml",
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(resorces={"GPU": 1}),
            jsonschema.ValidationError,
        ),
        (
            "ray-cluster.yaml",
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(resources={"GPU": 0.5}),
            jsonschema.ValidationError,
        ),
        ("ray-cluster.yaml", lambda c: c.update(head_node_type="ray.head.gpu"), ValueError),
        (
            "ray-cluster.local.yaml",
            lambda c: c.update(head_start_ray_command=c.pop("head_start_ray_commands")),
            jsonschema.ValidationError,
        ),
        # Ray checks docker settings with an assert while it fills in defaults.
        ("ray-cluster.local.yaml", lambda c: c["docker"].update(imag=c["docker"].pop("image")), AssertionError),
    ],
)
def test_the_validator_rejects_a_broken_variant(name, break_it, error):
    config = copy.deepcopy(load(name))
    break_it(config)
    with pytest.raises(error):
        validate_config(prepare_config(config))
