"""The latent_diffusion app: a dispatch table, mode → the module whose ``run(flags, params)`` carries it out.

A mode module imports the shared modules (loading, generation, settings, inputs, data) and never another mode; it is
imported only when its mode runs, so ``--mode=export`` does not pay for the trainer's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError

MODES = {mode: f"appzoo.latent_diffusion.{mode}" for mode in ("train", "predict", "evaluate", "serve", "export")}


class LatentDiffusionApp:
    name = "latent_diffusion"

    def __init__(self, flags: ParsedFlags, params: dict[str, Any]):
        self.flags = flags
        self.params = params

    def run(self, mode: str) -> int:
        if mode not in MODES:
            raise UserError(f"--mode={mode} is not available for app {self.name} in this version")
        return importlib.import_module(MODES[mode]).run(self.flags, self.params) or 0
