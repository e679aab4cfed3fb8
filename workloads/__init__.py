"""Workloads for trims_ray: the model zoo, the demo, and benchmarks (traces and replay to come).

Installed with the project (``pip install -e .``) so that ``python -m workloads.<tool>`` works
from the repository and zoo factories ("workloads.zoo:resnet50") import on every worker.
"""
