"""Ray actors of trims_ray: the node cache, the GPU tier holder and the placement actor.

Each is a thin Ray wrapper around a plain class that is testable without Ray (DESIGN.md, Layout).
The actors arrive with the node cache issue; this package holds their place in the layout.
"""
