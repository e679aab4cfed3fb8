"""GPU tests (marked ``gpu``, skipped without a CUDA GPU). They need neither Ray nor a cluster:
where Ray is missing (a GPU machine with torch alone), trims_ray's Ray-free modules are imported
without its package ``__init__`` (see ``workloads.rayless``); processes these tests spawn import
this package too, so they get the same.
"""

from workloads import rayless

rayless.install()
