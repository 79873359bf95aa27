"""The latent_diffusion app: one method per mode."""

from __future__ import annotations

from typing import Any

from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError


class LatentDiffusionApp:
    name = "latent_diffusion"

    def __init__(self, flags: ParsedFlags, params: dict[str, Any]):
        self.flags = flags
        self.params = params

    def run(self, mode: str) -> int:
        handler = getattr(self, f"run_{mode}", None)
        if handler is None:
            raise UserError(f"--mode={mode} is not available for app {self.name} in this version")
        return handler() or 0
