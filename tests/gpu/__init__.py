"""GPU tests (marked ``gpu``, skipped without a CUDA GPU). They need neither Ray nor a cluster:
``import trims_ray`` loads nothing Ray-bound until a public name that needs Ray is used, so the
GPU tier's plain classes, the CUDA device and the model store import where Ray is missing (a GPU
machine with torch alone).
"""
