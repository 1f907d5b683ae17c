"""Digital Human Batch runner: manifests, planning, cache and scheduling.

`import batch` stays light (no torch): planning a thousand videos must take well under a second.
"""

__version__ = "0.1.0"
