"""Work-arounds for broken combinations of third-party packages, in one place, each with the reason.

Called by the loaders that need them (never at import of `renderer`), so a healthy install pays nothing.
"""

from __future__ import annotations

import logging
import sys
import types

logger = logging.getLogger(__name__)


def import_torchvision() -> types.ModuleType | None:
    """Import torchvision so that its pure-Python parts work even when its C++ ops cannot load.

    PyPI only has CUDA builds of torchvision; next to a CPU-only torch (this project's CI) `import torchvision` dies
    registering the meta kernels of its C++ ops ("operator torchvision::nms does not exist"). That also breaks
    transformers and diffusers, which import torchvision whenever it is installed. None of our stages uses those ops
    (face-detection NMS is done in numpy), so skip that one registration module and import again.
    Returns None when torchvision is not installed.
    """
    try:
        import torchvision
    except ModuleNotFoundError:
        return None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        logger.warning("torchvision's C++ ops do not load (%s); using its Python parts only", exc)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision
