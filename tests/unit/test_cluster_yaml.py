"""The `ray up` configs at the repository root and the Dockerfile they run, checked with Ray's own
validator (the schema and the defaults `ray up` fills in, without contacting AWS) and against what
trims_ray needs: every node runs the image the Dockerfile builds (our Ray, Python, torch and
trims_ray; nothing installed at start), every AWS node type has store access and the pinned Deep
Learning AMI, a GPU node's set-up fails with the reason when torch cannot use its GPU, the disk
tier sits on the instance's NVMe, the object store is sized from the instance's memory, metrics
are exported, and the commands the files document exist.

The shell the configs run is run here where it can be: the CUDA check (with this CPU torch, and
with a stand-in torch that reports a GPU), the memory sizing against this machine's
/proc/meminfo, and `bash -n` over every command. Nothing here starts Ray.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

import trims_ray
from trims_ray._config import CacheConfig
from trims_ray.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["ray-cluster.yaml", "ray-cluster.local.yaml"]
TESTED_PYTHON = "311"  # the Python trims_ray is tested on (README), as rayproject/ray spells it
METRICS_FLAG = "--metrics-export-port=8080"
# The Dockerfile's base: rayproject/ray:{Ray}-py{Python}-cu{CUDA major}{minor}
BASE_RE = re.compile(r"^FROM rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<cuda>cu\d+)\s*$", re.MULTILINE)
# The tag the Dockerfile's header builds: trims-ray:{trims_ray}-ray{Ray}-py{Python}-cu{CUDA}
BUILD_RE = re.compile(r"docker build -t trims-ray:(?P<tag>\S+) \.")
DLAMI_FAMILY = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)"
NVME_MOUNT = "/opt/dlami/nvme"  # where the AWS config mounts (or finds) the instance store


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def prepared(name: str) -> dict:
    """What `ray up` validates: the file merged with the provider's defaults, then checked."""
    config = prepare_config(load(name))
    validate_config(config)
    return config


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)\s*$", dockerfile(), re.MULTILINE)
    return value


def images(config: dict) -> list[str]:
    docker = config.get("docker", {})
    found = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for node_type in config["available_node_types"].values():
        found += [v for k, v in node_type.get("docker", {}).items() if k.endswith("image")]
    return found


def every_command(config: dict) -> list[str]:
    """Every shell command `ray up` runs for this config, node types' own lists included."""
    keys = [k for k in config if k.endswith("_commands")]
    found = [c for k in keys for c in config[k]]
    for node_type in config.get("available_node_types", {}).values():  # the local provider fills them in
        found += [c for k, cmds in node_type.items() if k.endswith("_commands") for c in cmds]
    return found


def gpu_types(config: dict) -> dict[str, dict]:
    return {n: t for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}


def bash(command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, timeout=120, **kwargs)


def evaluated(expression: str) -> int:
    """A `$(( ... ))` of a config, evaluated by bash on this machine."""
    result = bash(f"echo {expression}")
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().removesuffix("b"))


def mem_total_bytes() -> int:
    (kib,) = re.findall(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(kib) * 1024


def option_value(options: list[str] | str, flag: str) -> str:
    """The value of ``flag=VALUE`` in a list of options or a command; the value may be a
    `$(( ... ))` with spaces inside."""
    text = options if isinstance(options, str) else " ".join(options)
    match = re.search(rf"{re.escape(flag)}=(\$\(\(.+?\)\)b?|\S+)(?=\s|$)", text)
    assert match, f"no {flag}= in {text!r}"
    return match[1]


# -- the configs as Ray sees them ---------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_config(name):
    config = prepared(name)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["max_workers"] >= 1


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_exports_metrics(name):
    config = prepared(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, f"{name} {key} starts no Ray"
        assert all(METRICS_FLAG in c for c in starts), f"{name} {key}: {starts}"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_command_is_valid_shell(name):
    commands = every_command(load(name))
    assert commands
    for command in commands:
        result = bash(f"set -n; {command}")  # parse only
        assert result.returncode == 0, f"{name}: {command!r}: {result.stderr}"
    assert bash("set -n; if true; then echo").returncode != 0  # the check above can fail


# -- the image -----------------------------------------------------------------------------------


def test_dockerfile_builds_on_our_ray_and_python():
    (base,) = BASE_RE.finditer(dockerfile())
    assert base["ray"] == ray.__version__, f"the Dockerfile's base has Ray {base['ray']}, installed is {ray.__version__}"
    assert base["py"] == TESTED_PYTHON
    assert base["cuda"].startswith("cu12"), "a CUDA 12 image, which the pinned AMI's driver runs"


def test_dockerfile_pins_the_torch_we_test_with_in_its_cuda_12_build():
    pinned = dockerfile_arg("TORCH_VERSION")
    (requirement,) = [r for r in map(Requirement, trims_ray_requirements()) if r.name == "torch"]
    assert requirement.specifier.contains(pinned), f"torch {pinned} is outside pyproject's {requirement}"
    assert pinned == torch.__version__.split("+")[0], f"tests run torch {torch.__version__}, the image {pinned}"
    # torch's CUDA build matches the base image's CUDA (cu126 and cu126).
    (base,) = BASE_RE.finditer(dockerfile())
    assert dockerfile_arg("TORCH_INDEX_URL") == f"https://download.pytorch.org/whl/{base['cuda']}"
    install = re.search(r'RUN pip install [^\n]*"torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', dockerfile())
    assert install, "torch is installed from its CUDA index, pinned"


def trims_ray_requirements() -> list[str]:
    """pyproject.toml's core dependencies (tomllib needs Python 3.11)."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_dockerfile_installs_trims_ray_from_this_checkout_without_swapping_torch():
    text = dockerfile()
    copy_to = re.search(r"^COPY (?:--chown=\S+ )?\. (\S+)$", text, re.MULTILINE)
    assert copy_to, "the checkout is copied into the image"
    install = re.search(rf'^RUN pip install [^\n]*"{re.escape(copy_to[1])}" "torch==\$\{{TORCH_VERSION\}}"', text, re.MULTILINE)
    assert install, "trims_ray is installed from the copy, with the torch pin named again"
    assert text.index("--index-url") < install.start(), "torch's CUDA build first"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored), ignored


def test_every_ray_the_image_starts_frees_released_objects_as_trims_ray_init_does():
    # The image's environment reaches `ray start` under `ray up` and in KubeRay's pods alike.
    from trims_ray._gc import QUICK_FREES

    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", dockerfile(), re.MULTILINE))
    assert QUICK_FREES.items() <= env.items(), env


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_runs_the_image_the_dockerfile_builds(name):
    (built,) = BUILD_RE.finditer(dockerfile())
    (base,) = BASE_RE.finditer(dockerfile())
    assert built["tag"] == f"{trims_ray.__version__}-ray{base['ray']}-py{base['py']}-{base['cuda']}", (
        "the documented tag names what the image carries"
    )
    found = images(prepared(name))
    assert found, f"{name} names no docker image"
    for image in found:
        registry, _, tagged = image.rpartition("/")
        assert registry and tagged == f"trims-ray:{built['tag']}", f"{name}: {image!r} is not trims-ray:{built['tag']}"
    # The Dockerfile's push commands name the same image.
    assert f"docker push {found[0]}" in dockerfile()


@pytest.mark.parametrize("name", CONFIGS)
def test_no_node_installs_at_start(name):
    config = prepared(name)
    installs = [c for c in every_command(config) if re.search(r"\bpip\d* install\b", c)]
    assert not installs, f"{name}: the image carries everything, yet: {installs}"
    assert "./dist" not in config.get("file_mounts", {}).values()


# -- the AWS cluster -------------------------------------------------------------------------------


def test_aws_config_has_a_gpu_worker_type():
    config = prepared("ray-cluster.yaml")
    gpu = gpu_types(config)
    assert gpu and config["head_node_type"] not in gpu
    assert all(t["max_workers"] >= 1 and t["node_config"]["InstanceType"] for t in gpu.values())


def test_every_aws_node_type_has_store_access():
    """An instance profile on every node type, head and workers alike (each node cache reads the
    store itself), with a placeholder ARN that is marked for replacing."""
    text = (ROOT / "ray-cluster.yaml").read_text()
    for name, node_type in load("ray-cluster.yaml")["available_node_types"].items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), f"{name}: {arn!r}"
        above = text[: text.index(arn)].splitlines()[-4:]
        assert any("REPLACE" in line for line in above), f"{name}: the placeholder {arn} is not marked"


def test_every_aws_node_type_runs_the_pinned_deep_learning_ami():
    config = load("ray-cluster.yaml")
    text = (ROOT / "ray-cluster.yaml").read_text()
    amis = {t["node_config"].get("ImageId") for t in config["available_node_types"].values()}
    assert len(amis) == 1, f"one AMI for every node type, not {amis}"
    (ami,) = amis
    assert re.fullmatch(r"ami-[0-9a-f]{17}", ami or ""), f"{ami!r} is not a pinned AMI id"
    # The comment above its first use names the family, the region and the driver it carries.
    comment = " ".join(text[: text.index(f"ImageId: {ami}")].splitlines()[-8:])
    comment = re.sub(r"\s*#\s*", " ", comment)
    assert DLAMI_FAMILY in comment and config["provider"]["region"] in comment, comment
    assert re.search(r"NVIDIA driver .*\d{3}", comment) and "CUDA" in comment, comment


def test_gpu_node_set_up_fails_loudly_without_cuda(tmp_path):
    (node_type,) = gpu_types(load("ray-cluster.yaml")).values()
    commands = node_type["worker_setup_commands"]
    (check,) = [c for c in commands if "torch.cuda.is_available()" in c]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    # Here: this CPU torch. Every GPU check must fail, each with the reason.
    failed = bash(check, env=env)
    assert failed.returncode != 0
    assert "torch.cuda.is_available() is False on this GPU node" in failed.stderr
    assert torch.__version__ in failed.stderr
    if subprocess.run(["sh", "-c", "command -v nvidia-smi"], check=False, capture_output=True).returncode != 0:
        (smi,) = [c for c in commands if "nvidia-smi" in c]
        no_driver = bash(smi, env=env)
        assert no_driver.returncode != 0 and "trims_ray: nvidia-smi fails" in no_driver.stderr
    # A torch that sees a GPU passes the same command (a stand-in package: no GPU here).
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "__version__ = '2.13.0+cu126'\n"
        "class version:\n    cuda = '12.6'\n"
        "class cuda:\n    is_available = staticmethod(lambda: True)\n    device_count = staticmethod(lambda: 1)\n"
    )
    passed = bash(check, env={**env, "PYTHONPATH": str(tmp_path)})
    assert passed.returncode == 0, passed.stderr
    assert "sees 1 GPU(s)" in passed.stdout


def test_disk_tier_is_on_the_instance_nvme(monkeypatch):
    config = load("ray-cluster.yaml")
    options = config["docker"]["run_options"]
    disk_dir = option_value([o.replace("-e ", "") for o in options if o.startswith("-e ")], "TRIMS_RAY_DISK_DIR")
    mounts = dict(o.removeprefix("-v ").split(":", 1) for o in options if o.startswith("-v "))
    host = [h for h, c in mounts.items() if disk_dir == c or disk_dir.startswith(c.rstrip("/") + "/")]
    assert host, f"{disk_dir} is on no volume of the host: {mounts}"
    assert host[0].startswith(NVME_MOUNT + "/"), f"the disk tier's volume {host[0]} is not on {NVME_MOUNT}"
    # The host commands mount the instance store there (or find it mounted) and give the
    # directory to the image's user; with no instance store they fail.
    (prepare,) = [c for c in config["initialization_commands"] if NVME_MOUNT in c]
    assert "Instance Storage" in prepare and "mount " in prepare and "exit 1" in prepare
    assert f"chown 1000:100 \"$NVME/{Path(host[0]).name}\"" in prepare
    # trims_ray reads the variable: every node cache's directory is under it.
    budget = option_value([o.replace("-e ", "") for o in options if o.startswith("-e ")], "TRIMS_RAY_DISK_BYTES")
    monkeypatch.setenv("TRIMS_RAY_DISK_DIR", disk_dir)
    monkeypatch.setenv("TRIMS_RAY_DISK_BYTES", budget)
    cache = CacheConfig.from_env()
    assert cache.disk_path("abc") == Path(disk_dir) / "abc"
    assert 100 * 1024**3 <= cache.disk_bytes <= 300 * 10**9, "fits the 300 GB NVMe of the smaller node type"


def test_host_tier_is_sized_from_the_instance_memory():
    config = load("ray-cluster.yaml")
    total = mem_total_bytes()
    (start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    store = evaluated(option_value(start, "--object-store-memory"))
    assert 0.3 * total <= store <= 0.7 * total, f"object store {store} of {total} bytes"
    # Docker's /dev/shm (on the GPU workers) holds it, with room to spare, and no more than the memory.
    for node_type in gpu_types(config).values():
        shm = evaluated(option_value(node_type["docker"]["worker_run_options"], "--shm-size"))
        assert store < shm <= total
    # The head serves no tasks.
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert all("--num-cpus=0" in c for c in config["head_start_ray_commands"] if "ray start" in c)


# -- what the files tell a user --------------------------------------------------------------------


DOCUMENTED = CONFIGS + ["docs/deploy.md", "deploy/kuberay/rayjob-start.yaml"]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documents_commands_that_exist(name, capsys):
    text = (ROOT / name).read_text()
    used = set(re.findall(r"trims-ray (\w[\w-]*)", text))
    starts = "trims_ray.init()" in text or "trims-ray start" in text
    assert used or starts, f"{name} documents no way to start or use trims_ray"
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
        (
            "ray-cluster.yaml",
            lambda c: c["available_node_types"]["ray.worker.gpu"]["docker"].update(run_options=["--gpus all"]),
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
