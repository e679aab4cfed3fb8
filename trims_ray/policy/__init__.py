"""Eviction policies: pure Python, no Ray, weighted by bytes and told each model's miss cost.

A registry maps names ("lru", "gdsf", ...) to policies chosen in config. The policies arrive
with the node cache and policy issues; this package holds their place in the layout.
"""
