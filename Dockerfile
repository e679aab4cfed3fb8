# The image every node of a trims_ray cluster runs: Ray's own image (Ray, Python 3.11, CUDA 12.6
# user-space libraries) plus torch's CUDA 12.6 build and trims_ray, so that nodes install nothing
# when they start. ray-cluster.yaml, ray-cluster.local.yaml and deploy/kuberay/ name this image by
# the tag below; tests/unit/test_cluster_yaml.py checks that the tags agree with this file.
#
# Build from the repository root, tag it with what it carries (trims_ray, Ray, Python, CUDA), and
# push it where the nodes can pull it (here: an ECR repository; replace the account and region):
#   docker build -t trims-ray:0.1.0-ray2.60.0-py311-cu126 .
#   docker tag trims-ray:0.1.0-ray2.60.0-py311-cu126 \
#       123456789012.dkr.ecr.us-west-2.amazonaws.com/trims-ray:0.1.0-ray2.60.0-py311-cu126
#   docker push 123456789012.dkr.ecr.us-west-2.amazonaws.com/trims-ray:0.1.0-ray2.60.0-py311-cu126

# Ray's tag is {Ray version}-py{Python}-cu{CUDA}. Keep the Ray version equal to the one trims_ray
# is tested with, or the cluster's Ray and the drivers' Ray differ.
FROM rayproject/ray:2.60.0-py311-cu126

# Ray frees released objects every 100 ms rather than every second, as the Rays trims_ray.init
# starts do: a host tier's evicted copies then stop counting against the object store sooner, and
# the store stays under the 70% mark where the raylet has every worker on the node run a full
# gc.collect at once (trims_ray/_gc.py; docs/operations.md, "Ray's global GC").
ENV RAY_free_objects_period_milliseconds=100

# torch first, and its CUDA 12.6 build from PyTorch's index: PyPI's default Linux wheel of torch
# 2.13 is the CUDA 13 build, which needs a newer NVIDIA driver than CUDA 12.6 does. trims_ray's
# own requirement (a torch range) is then already met, so pip keeps this build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# trims_ray from this checkout (.dockerignore keeps tests, notebooks and local environments out).
# Naming the torch pin again makes pip fail rather than swap torch for another build.
COPY --chown=ray:users . /tmp/trims_ray-src
RUN pip install --no-cache-dir "/tmp/trims_ray-src" "torch==${TORCH_VERSION}" \
    && rm -rf /tmp/trims_ray-src

# Fail the build, not the cluster, when the image does not hold what its tag says.
RUN python -c "import sys, ray, torch, trims_ray; \
print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'trims_ray', trims_ray.__version__); \
sys.exit(0 if torch.version.cuda and torch.version.cuda.startswith('12.') else 'torch is not a CUDA 12 build')"
