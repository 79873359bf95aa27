"""Sampler short name → a diffusers scheduler built from the model's own scheduler config (``from_config``), so the
noise schedule (betas, training steps, prediction type) always stays the model's."""

from __future__ import annotations

import inspect

import diffusers
import torch

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


def scheduler_class_name(name: str | None, model_scheduler_class: str) -> str | None:
    """The diffusers class ``name`` samples with (empty: the model's own); None for an unknown name."""
    if not name:
        return model_scheduler_class if hasattr(diffusers, model_scheduler_class or "") else \
            "DPMSolverMultistepScheduler"
    entry = SAMPLERS.get(canonical_name(name))
    return entry[0] if entry else None


def step_takes(class_name: str, argument: str) -> bool:
    """Whether the scheduler's ``step`` takes ``argument`` (diffusers' pipelines pass ``eta`` only to those)."""
    try:
        return argument in inspect.signature(getattr(diffusers, class_name).step).parameters
    except ImportError:  # a placeholder for a scheduler whose backend is missing: it cannot run at all
        return False


def eta_samplers() -> list[str]:
    """The samplers that use DDIM's ``eta`` (``ddim_eta``); the others are deterministic or draw their own noise."""
    return [name for name in sampler_names() if step_takes(SAMPLERS[name][0], "eta")]


def sampler_label(name: str | None, model_scheduler_class: str) -> str:
    """How messages name a sampler: ``sampler NAME``, or the model's own scheduler and its class."""
    if name:
        return f"sampler {name}"
    return f"the model's own scheduler ({scheduler_class_name(name, model_scheduler_class)})"


def make_scheduler(name: str | None, model_scheduler_config: dict, model_scheduler_class: str):
    """``name`` empty: the model's own scheduler. Unknown name → ``ValueError`` listing the known ones."""
    if not name:
        return _build(getattr(diffusers, scheduler_class_name(name, model_scheduler_class)), model_scheduler_config)
    key = canonical_name(name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(sampler_names())}")
    class_name, overrides = SAMPLERS[key]
    config = dict(model_scheduler_config)
    config.update(overrides)
    try:
        return _build(getattr(diffusers, class_name), config)
    except ImportError as err:  # diffusers' placeholder for a scheduler whose backend (e.g. scipy for lms) is missing
        reason = " ".join(str(err).split()).split(" You can install")[0]
        raise ValueError(f"sampler '{name}' cannot be used here: {reason}") from None


def _build(cls, config: dict):
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        config = _zero_snr_as_trained_betas(config)
    return cls.from_config(config)


def _zero_snr_as_trained_betas(config: dict) -> dict:
    """A zero-terminal-SNR schedule (``rescale_betas_zero_snr``) for a scheduler class that does not know the flag
    (PNDM, Heun, LMS, KDPM2, DEIS, single-step DPM-Solver), as explicit betas: the rescaled schedule with the last
    step at alphas_cumprod 2**-24 instead of 0, as DPM-Solver and Euler do it themselves (a zero would be an infinite
    sigma). Without this the flag would be dropped silently and the sampler would run another noise schedule."""
    ddpm = diffusers.DDPMScheduler.from_config(config)
    alphas_cumprod = ddpm.alphas_cumprod.double().clone()
    alphas_cumprod[-1] = 2.0 ** -24
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = 1.0 - alphas_cumprod / previous
    out = {k: v for k, v in config.items() if k != "rescale_betas_zero_snr"}
    out["trained_betas"] = betas.tolist()
    return out
