"""easynlp-ldm: the framework layer (flags, tables, training loop, processes, HTTP). Knows nothing of diffusion."""

from easynlp_ldm.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
