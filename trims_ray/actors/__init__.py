"""Ray actors of trims_ray: thin wrappers, one per plain class of the cache core (trims_ray.cache).

Each actor module is named after the class it wraps: ``node_cache_actor`` (NodeCacheActor around
NodeCache), ``gpu_tier_actor`` (GpuTierActor around GpuTier, one per GPU: "the GPU holder") and
``placement_actor`` (PlacementActor around Placement). ``_naming`` holds every actor's name and
the one per-process cache of their handles. The logic lives in the core, which imports no Ray.
"""
