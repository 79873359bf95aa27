"""Sampler short name → a diffusers scheduler built from the model's own scheduler config (``from_config``), so the
noise schedule (betas, training steps, prediction type) always stays the model's."""

from __future__ import annotations

import diffusers

# name: (diffusers class, extra config overrides)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # diffusers refuses dpmsolver with final_sigmas_type="zero" (its default): end at sigma_min as it asks
    "dpm-solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpm-solver-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm-solver-single": ("DPMSolverSinglestepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
ALIASES = {"dpmsolver++": "dpm-solver++", "dpm++": "dpm-solver++", "dpmsolver": "dpm-solver",
           "euler_a": "euler-ancestral", "euler-a": "euler-ancestral", "k_euler": "euler",
           "k_euler_ancestral": "euler-ancestral", "k_lms": "lms", "uni-pc": "unipc"}


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-") if name else ""
    key = ALIASES.get(key, ALIASES.get(name.strip().lower(), key))
    return key


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def make_scheduler(name: str | None, model_scheduler_config: dict, model_scheduler_class: str):
    """``name`` empty: the model's own scheduler. Unknown name → ``ValueError`` listing the known ones."""
    if not name:
        cls = getattr(diffusers, model_scheduler_class, None) or diffusers.DPMSolverMultistepScheduler
        return cls.from_config(model_scheduler_config)
    key = canonical_name(name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(sampler_names())}")
    class_name, overrides = SAMPLERS[key]
    config = dict(model_scheduler_config)
    config.update(overrides)
    try:
        return getattr(diffusers, class_name).from_config(config)
    except ImportError as err:  # diffusers' placeholder for a scheduler whose backend (e.g. scipy for lms) is missing
        reason = " ".join(str(err).split()).split(" You can install")[0]
        raise ValueError(f"sampler '{name}' cannot be used here: {reason}") from None
