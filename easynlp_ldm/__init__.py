"""easynlp-ldm: the framework layer (flags, tables, training loop, processes, HTTP). Knows nothing of diffusion.

``from easynlp_ldm import pipeline`` is the Python API (see ``easynlp_ldm.pipelines``)."""

from easynlp_ldm.errors import UserError
from easynlp_ldm.pipelines import pipeline

__version__ = "0.1.0"
__all__ = ["UserError", "__version__", "pipeline"]
