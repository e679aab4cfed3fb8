"""deploy/kuberay/: the RayCluster, the RayJob that starts trims_ray on it, the service account
and the PodMonitor, checked as far as their schemas can be had here, then against what trims_ray
needs: a head without work, /dev/shm memory-backed and sized above the object store, the disk
tier on the node's NVMe, GPU workers that request GPUs and fail their init when torch cannot use
one, metrics scraped, store credentials from the service account or a Secret (never inline), and
every pod on the image the Dockerfile builds.

KubeRay's CRD schema is not installed here, nor kept in this repository. So the schema below is
this test's own: the part of ray.io/v1 (KubeRay 1.7's RayCluster and RayJob CRDs) and of the pod
template that these manifests use, with the CRDs' field names, types and required fields
(rayStartParams values are strings, quantities are Kubernetes quantities), and strict about
fields it does not know, as `kubectl apply` is with server-side field validation. A field that
KubeRay has and this schema lacks fails here too: add it to the schema with the manifest. The
PodMonitor (Prometheus Operator) and the ServiceAccount are checked by structure only.
Nothing here starts Ray or talks to a Kubernetes cluster.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kuberay"
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# -- the schema: ray.io/v1 as far as these manifests use it ----------------------------------------


def obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR_MAP = {"type": "object", "additionalProperties": STR}
QUANTITIES = {"type": "object", "additionalProperties": {"anyOf": [INT, {"type": "string", "pattern": QUANTITY}]}}
CONTAINER = obj(
    {
        "name": {"type": "string", "pattern": DNS_LABEL},
        "image": STR,
        "command": array(STR),
        "args": array(STR),
        "env": array(obj({"name": STR, "value": STR, "valueFrom": {"type": "object"}}, ("name",))),
        "envFrom": array(obj({"secretRef": obj({"name": STR, "optional": BOOL}, ("name",)), "prefix": STR})),
        "ports": array(obj({"containerPort": INT, "name": STR, "protocol": STR}, ("containerPort",))),
        "resources": obj({"limits": QUANTITIES, "requests": QUANTITIES}),
        "volumeMounts": array(obj({"name": STR, "mountPath": STR, "readOnly": BOOL, "subPath": STR}, ("mountPath", "name"))),
        "securityContext": obj({"runAsUser": INT, "runAsGroup": INT, "runAsNonRoot": BOOL}),
    },
    ("name",),
)
VOLUME = obj(
    {
        "name": {"type": "string", "pattern": DNS_LABEL},
        "emptyDir": obj({"medium": {"enum": ["", "Memory"]}, "sizeLimit": {"anyOf": [INT, {"type": "string", "pattern": QUANTITY}]}}),
        "hostPath": obj({"path": STR, "type": {"enum": ["", "DirectoryOrCreate", "Directory"]}}, ("path",)),
    },
    ("name",),
)
POD_TEMPLATE = obj(
    {
        "metadata": obj({"labels": STR_MAP, "annotations": STR_MAP}),
        "spec": obj(
            {
                "serviceAccountName": STR,
                "nodeSelector": STR_MAP,
                "tolerations": array(obj({"key": STR, "operator": {"enum": ["Exists", "Equal"]}, "value": STR, "effect": STR})),
                "initContainers": array(CONTAINER),
                "containers": {**array(CONTAINER), "minItems": 1},
                "volumes": array(VOLUME),
            },
            ("containers",),
        ),
    }
)
METADATA = obj({"name": {"type": "string", "pattern": DNS_LABEL}, "labels": STR_MAP, "annotations": STR_MAP}, ("name",))
RAY_CLUSTER = obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": METADATA,
        "spec": obj(
            {
                "rayVersion": STR,
                "enableInTreeAutoscaling": BOOL,
                "autoscalerOptions": obj({"idleTimeoutSeconds": INT}),
                "headGroupSpec": obj({"rayStartParams": STR_MAP, "template": POD_TEMPLATE}, ("template",)),
                "workerGroupSpecs": array(
                    obj(
                        {
                            "groupName": STR, "replicas": INT, "minReplicas": INT, "maxReplicas": INT,
                            "rayStartParams": STR_MAP, "template": POD_TEMPLATE,
                        },
                        ("groupName", "maxReplicas", "minReplicas", "template"),
                    )
                ),
            },
            ("headGroupSpec",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)
RAY_JOB = obj(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": METADATA,
        "spec": obj({"entrypoint": STR, "clusterSelector": STR_MAP, "shutdownAfterJobFinishes": BOOL, "runtimeEnvYAML": STR}),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


def load(name: str) -> dict:
    (document,) = yaml.safe_load_all((DEPLOY / name).read_text())  # one object per file
    return document


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load("raycluster.yaml")


def pods(cluster: dict) -> dict[str, dict]:
    """Group name ("head" for the head) -> its pod template."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]} | {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}


def start_params(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["rayStartParams"]} | {g["groupName"]: g["rayStartParams"] for g in spec["workerGroupSpecs"]}


def ray_container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]  # KubeRay starts Ray in the first container


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def to_bytes(quantity: int | str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(quantity))
    assert match, f"not a byte quantity: {quantity!r}"
    return float(match[1]) * units.get(match[2] or "", 1)


# -- schema ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, schema", [("raycluster.yaml", RAY_CLUSTER), ("rayjob-start.yaml", RAY_JOB)])
def test_manifest_matches_the_ray_io_v1_schema(name, schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(load(name), schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["spec"]["headGroupSpec"].update(rayStartParam=c["spec"]["headGroupSpec"].pop("rayStartParams")),
        lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),  # KubeRay wants strings
        lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"),
        lambda c: ray_container(c["spec"]["workerGroupSpecs"][0]["template"])["resources"]["limits"].update(memory="26 GB"),
        lambda c: c["spec"]["headGroupSpec"]["template"]["spec"].pop("containers"),
        lambda c: c.update(apiVersion="ray.io/v1alpha1"),
    ],
)
def test_the_schema_rejects_a_broken_variant(cluster, break_it):
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RAY_CLUSTER, cls=jsonschema.Draft202012Validator)


def test_every_mount_names_a_volume_of_its_pod_and_every_volume_is_mounted(cluster):
    for group, pod in pods(cluster).items():
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
        mounted = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
        assert mounted <= volumes, f"{group}: mounts of no volume: {mounted - volumes}"
        assert volumes <= mounted, f"{group}: volumes nobody mounts: {volumes - mounted}"
        names = [c["name"] for c in containers]
        assert len(names) == len(set(names)), f"{group}: container names repeat: {names}"


# -- what trims_ray needs ----------------------------------------------------------------------------


def test_head_does_no_work(cluster):
    assert start_params(cluster)["head"]["num-cpus"] == "0"


def test_dev_shm_is_memory_backed_and_holds_the_object_store(cluster):
    params = start_params(cluster)
    for group, pod in pods(cluster).items():
        container = ray_container(pod)
        (shm,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == shm]
        assert volume["emptyDir"]["medium"] == "Memory", f"{group}: /dev/shm is not in memory"
        size = to_bytes(volume["emptyDir"]["sizeLimit"])
        store = int(params[group]["object-store-memory"])
        memory = to_bytes(container["resources"]["limits"]["memory"])
        # The shared memory counts against the pod's memory: it must hold the object store and
        # leave the tasks room.
        assert store < size < 0.6 * memory, f"{group}: object store {store}, /dev/shm {size}, memory {memory}"
        if group != "head":  # the host tier is sized from the pod's memory
            assert store >= 0.4 * memory, f"{group}: an object store of {store} wastes a {memory}-byte pod"


def test_disk_tier_is_on_the_node_nvme(cluster):
    settings = {group: env(ray_container(pod)) for group, pod in pods(cluster).items()}
    assert len({tuple(sorted(s.items())) for s in settings.values()}) == 1, f"groups disagree: {settings}"
    for group, pod in pods(cluster).items():
        disk_dir = settings[group]["TRIMS_RAY_DISK_DIR"]
        mounts = {m["mountPath"]: m["name"] for m in ray_container(pod)["volumeMounts"]}
        (name,) = [n for path, n in mounts.items() if disk_dir == path or disk_dir.startswith(path.rstrip("/") + "/")]
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == name]
        assert volume["hostPath"]["path"].startswith("/mnt/k8s-disks/0/"), f"{group}: {volume}"
        # An init container hands the host directory to the image's user (uid 1000).
        owners = [c for c in pod["spec"]["initContainers"] if any(m["name"] == name for m in c.get("volumeMounts", []))]
        assert any("chown 1000:100" in " ".join(c["command"]) and c["securityContext"]["runAsUser"] == 0 for c in owners)
    assert 0 < int(settings["head"]["TRIMS_RAY_DISK_BYTES"]) <= 400 * 10**9  # a g5.2xlarge has 450 GB


def cuda_check(cluster: dict, group: str) -> list[str]:
    pod = pods(cluster)[group]
    (check,) = [c for c in pod["spec"].get("initContainers", []) if "torch.cuda.is_available()" in " ".join(c["command"])]
    assert to_bytes(check["resources"]["limits"]["nvidia.com/gpu"]) >= 1, "the check must see the pod's GPU"
    return check["command"]


def gpu_groups(cluster: dict) -> list[str]:
    return [g for g, pod in pods(cluster).items() if "nvidia.com/gpu" in ray_container(pod)["resources"]["limits"]]


def test_gpu_workers_request_gpus_and_fail_their_init_without_cuda(cluster):
    groups = gpu_groups(cluster)
    assert groups and "head" not in groups
    for group in groups:
        command = cuda_check(cluster, group)
        assert command[:2] == ["python", "-c"]
        # Run as the pod would, with this machine's CPU torch: it must fail with the reason.
        result = subprocess.run([sys.executable, *command[1:]], check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "torch.cuda.is_available() is False on this GPU node" in result.stderr
        assert torch.__version__ in result.stderr


def test_the_cuda_check_is_the_one_ray_up_runs(cluster):
    """One check for both launchers (the `ray up` one runs in tests/unit/test_cluster_yaml.py)."""
    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    (ray_up,) = [
        c for t in config["available_node_types"].values() for c in t.get("worker_setup_commands", []) if "torch.cuda" in c
    ]
    (_, _, code) = shlex.split(ray_up)  # python -c "CODE"
    for group in gpu_groups(cluster):
        assert " ".join(cuda_check(cluster, group)[2].split()) == " ".join(code.split()), group


def test_metrics_are_exported_and_scraped(cluster):
    for group, pod in pods(cluster).items():
        assert start_params(cluster)[group]["metrics-export-port"] == "8080"
        ports = {p.get("name"): p["containerPort"] for p in ray_container(pod)["ports"]}
        assert ports.get("metrics") == 8080, f"{group}: {ports}"
        notes = pod["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == "8080"
    monitor = load("podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}.items() <= (
        endpoint["relabelings"][0].items()
    )


def test_store_credentials_come_from_the_service_account_or_a_secret(cluster):
    account = load("serviceaccount.yaml")
    assert (account["apiVersion"], account["kind"]) == ("v1", "ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role
    for group, pod in pods(cluster).items():
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"], group
        for container in pod["spec"]["containers"]:
            inline = [e["name"] for e in container.get("env", []) if e["name"].startswith("AWS_") and "value" in e]
            assert not inline, f"{group}: credentials inline: {inline}"
            assert all(set(source) <= {"secretRef"} for source in container.get("envFrom", []))


FILES = [*sorted(DEPLOY.glob("*.yaml")), ROOT / "ray-cluster.yaml", ROOT / "ray-cluster.local.yaml", ROOT / "Dockerfile"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_file_holds_a_key_and_every_placeholder_is_marked(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert not re.search(r"(?i)(secret_access_key|aws_secret)\s*[:=]\s*\S", text), "a secret key"
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.search(r"123456789012|YOUR-BUCKET", line) and not line.lstrip().startswith("#"):
            above = " ".join(lines[max(0, number - 5) : number + 1])
            assert re.search(r"(?i)replace", above), f"{path.name}:{number + 1}: unmarked placeholder: {line.strip()}"


def test_every_pod_runs_the_image_of_the_ray_up_config_and_our_ray(cluster):
    """The `ray up` config's image is the Dockerfile's (tests/unit/test_cluster_yaml.py)."""
    image = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())["docker"]["image"]
    for group, pod in pods(cluster).items():
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            assert container["image"] == image, f"{group}/{container['name']}: {container['image']}"
    assert cluster["spec"]["rayVersion"] == ray.__version__


def test_the_job_starts_trims_ray_on_this_cluster(cluster):
    job = load("rayjob-start.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert not job["spec"].get("shutdownAfterJobFinishes"), "the cluster outlives the job"
    program, flag, code = shlex.split(job["spec"]["entrypoint"])
    assert (program, flag) == ("python", "-c")
    calls = [n.func for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)]
    assert any(ast.unparse(f) == "trims_ray.init" for f in calls), code
    # With no store argument, init takes $TRIMS_RAY_STORE: the head pod's environment has it.
    assert env(ray_container(pods(cluster)["head"]))["TRIMS_RAY_STORE"].startswith("s3://")
