"""``sampler=`` for the flow-matching DiTs (Z-Image, Qwen-Image): short name → a diffusers scheduler built from the
folder's own scheduler config, that the family's pipelines run.

Those pipelines set the schedule with ``retrieve_timesteps(scheduler, sigmas=..., mu=...)``: a scheduler runs there
only if its ``set_timesteps`` takes custom ``sigmas`` and ``mu``. What that leaves (checked with the pinned diffusers,
each giving the pipeline's own image with the scheduler swapped in, ``pipe.scheduler = X.from_config(...)``):

* ``euler``: ``FlowMatchEulerDiscreteScheduler``, the folders' own (the default).
* ``unipc``: ``UniPCMultistepScheduler`` on flow sigmas (``use_flow_sigmas``, ``flow_prediction``, ``flow_shift`` the
  folder's ``shift``; a folder's dynamic shifting carries over), Qwen-Image only: ZImagePipeline hands its sigmas over
  as a list, which UniPC's shift cannot multiply. Not with the img2img and inpainting pipelines (and the edit
  inpainting one): they noise the image with ``scale_noise``, which UniPC lacks (``runs_scheduler``). The pipelines
  that start from noise run it: text-to-image, ControlNet, ControlNet inpainting, and the edit pipelines (their input
  image's latents sit beside the noise, never noised).

Refused, and why: ``heun`` (FlowMatchHeunDiscreteScheduler), ``dpm-solver++`` / ``dpm-solver`` / ``dpm-solver-sde``
(DPMSolverMultistepScheduler), ``dpm-solver-single`` and ``deis``: their ``set_timesteps`` takes no ``sigmas``, so the
pipelines raise. ``lcm`` (FlowMatchLCMScheduler) runs, but re-noises every step from torch's global generator (the
pipelines pass it none), so an image would no longer be its seed's alone.
"""

from __future__ import annotations

import functools
import inspect

import diffusers

from modelzoo.samplers import canonical_name

# name: (diffusers class, config overrides over the folder's scheduler config)
FLOW_SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
DEFAULT_SAMPLER = "euler"


def flow_scheduler(name: str, offered: tuple[str, ...], family: str, config: dict):
    """The scheduler of sampler ``name`` (empty: ``euler``) from the folder's scheduler ``config``; a name not in
    ``offered`` (the family's samplers) → ``ValueError`` listing them."""
    key = canonical_name(name) if name else DEFAULT_SAMPLER
    if key not in offered:
        raise ValueError(f"unknown sampler '{name}' for {family} models; choose one of {', '.join(offered)} (the "
                         f"flow-matching schedulers its pipelines run)")
    class_name, overrides = FLOW_SAMPLERS[key]
    config = dict(config, **overrides)
    if overrides.get("use_flow_sigmas"):
        config["flow_shift"] = config.get("shift", 1.0)
    cls = getattr(diffusers, class_name)
    takes = inspect.signature(cls.__init__).parameters  # the flow-matching keys another class has no use for: unsaid
    scheduler = cls.from_config({name: value for name, value in config.items() if name in takes})
    # ... yet kept in its config, without from_config's warning: the pipelines read their resolution-dependent shift
    # (base_image_seq_len, max_image_seq_len, base_shift, max_shift) from scheduler.config, whatever the class
    scheduler.register_to_config(**{name: value for name, value in config.items()
                                    if name not in takes and not name.startswith("_")})
    return scheduler


def runs_scheduler(pipeline_class: type, scheduler) -> bool:
    """Whether ``pipeline_class`` can run ``scheduler``: one that noises its input image with the scheduler's
    ``scale_noise`` (img2img, inpainting) cannot run a scheduler without it."""
    return hasattr(scheduler, "scale_noise") or not calls_scale_noise(pipeline_class)


@functools.cache
def calls_scale_noise(pipeline_class: type) -> bool:
    """Whether the pipeline's code calls ``scheduler.scale_noise`` (read from the installed diffusers' source, so a
    pipeline is judged by what it does; no source: assumed to)."""
    try:
        return "scale_noise(" in inspect.getsource(pipeline_class)
    except (OSError, TypeError):
        return True
