"""The Ray-free cache core: the plain classes the actors wrap (DESIGN.md, Layout).

``node_cache`` (NodeCache: one node's host and disk tiers, composed of ``host_tier``,
``disk_tier``, ``host_loader``, ``scrub`` and ``quotas``), ``gpu_tier`` (GpuTier: one GPU's
tier), ``placement`` (Placement: the cluster's residency table and routing), ``leases`` (the one
lease table, used by the host and GPU tiers) and ``gpu_testing`` (device test doubles). Nothing
here imports Ray; every class is unit-tested in a plain process.
"""
