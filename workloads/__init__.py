"""Workloads for trims_ray: the model zoo, the demo, benchmarks, trace generators and readers,
the trace-driven policy simulator, the replay harness (replay.py, serve_baseline.py) and the
soak test (soak.py).

Installed with the project (``pip install -e .``) so that ``python -m workloads.<tool>`` works
from the repository and zoo factories ("workloads.zoo:resnet50") import on every worker.
"""
