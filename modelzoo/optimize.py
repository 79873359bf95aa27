"""Inference acceleration (the role PAI-Blade played): precision, memory layout, fused kernels, another runtime.

Levels (``optimize``):
* ``none``: fp32 eager with diffusers' defaults — the reference every other level is measured against.
* ``auto`` (default): on CPU, ``openvino`` when the ``openvino`` package is installed (it is a dependency; measured
  faster than ``torch`` on every CPU bench, ``bench/cpu_speed.py``), else ``torch``; on CUDA, ``torch``.
* ``max``: the fastest end to end where it differs from ``auto``: on CUDA ``compile``; on CPU the same as ``auto``
  (``compile`` never paid for a CPU job: its compile time is not won back, and its steady state is behind OpenVINO's).
* ``openvino`` (CPU): the UNet and VAE decoder run as OpenVINO compiled models (``modelzoo/openvino_backend.py``):
  IR converted once per model and cached on disk, static shapes per batch, bf16 inference where the CPU has it;
  the text encoder, the initial noise, the latents and the scheduler stay PyTorch fp32.
* ``torch``: PyTorch eager — the UNet and text encoder in bf16 on CPUs with bf16 support (fp16 on CUDA), PyTorch SDPA
  attention, fused QKV projections, oneDNN GEGLUs on CPU, and the channels_last memory layout where it pays, which
  depends on size (see ``prefers_channels_last``). The numerically sensitive parts stay fp32: the scheduler
  arithmetic (latents stay fp32; the UNet casts its input down and its output back up), the initial noise draw (so
  seeds mean the same images as in fp32) and the whole VAE decoder.
* ``compile``: ``torch`` + ``torch.compile`` of the UNet and the VAE decoder (``dynamic=False``: each new batch size
  or image size compiles once, then is cached; the inductor cache on disk makes later processes start warm). On CPU
  with inductor's ``freezing``: weights become constants (inference only).

Compiled models per input shape are bounded (``limit_compiled_shapes``; serve's ``max_cached_shapes``): OpenVINO
keeps the most recently used shapes and releases the others; ``torch.compile`` keeps the first ones it compiled and
runs further shapes eagerly (dynamo's ``recompile_limit``).

``precision`` (``fp32``/``bf16``/``fp16``) overrides the dtype chosen by the level.
"""

from __future__ import annotations

import logging

import torch

from modelzoo.families import family_of

logger = logging.getLogger(__name__)

LEVELS = ("none", "auto", "max", "openvino", "torch", "compile")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_dtype(level: str, precision: str, device: torch.device) -> torch.dtype:
    if precision:
        return PRECISIONS[precision]
    if level == "none":
        return torch.float32
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def _cast_inputs_hook(dtype: torch.dtype):
    def pre_hook(module, args, kwargs):
        args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].to(dtype)
        return args, kwargs

    return pre_hook


def _fp32_output_hook(module, args, kwargs, output):
    if isinstance(output, tuple):
        return tuple(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in output)
    if hasattr(output, "sample"):
        output.sample = output.sample.float()
        return output
    return output.float() if torch.is_tensor(output) else output


# On CPU, oneDNN's channels_last convolutions only pay once the feature maps are large: on the embedded model's 16×16
# latents they made a bf16 UNet call (batch 32, 2 threads) 1.35× slower (148 vs 110 ms); on 32×32 and larger latents
# (SD-1.x at 256² and up) they are faster (bench/unet_speed.py). CUDA kernels prefer channels_last at every size.
# Fused QKV projections measured the same as separate ones on the small UNet and are kept everywhere.
CPU_LAYOUT_MIN_LATENT = 32


def prefers_channels_last(unet, device: torch.device) -> bool:
    """Whether the channels_last layout is worth it for this UNet on this device."""
    return device.type == "cuda" or int(unet.config.sample_size) >= CPU_LAYOUT_MIN_LATENT


def compile_options(device: torch.device) -> dict:
    """``torch.compile`` arguments of level ``max``: fixed shapes; on CPU, inductor's freezing (see the module doc);
    on CUDA, CUDA graphs (what ``mode="reduce-overhead"`` turns on: one graph launch per UNet call instead of hundreds
    of kernel launches; not measured here, no GPU was lent)."""
    options = {"freezing": True} if device.type == "cpu" else {"triton.cudagraphs": device.type == "cuda"}
    return {"dynamic": False, "options": options}


def _onednn_geglu(module, linear):
    """GEGLU (``proj`` → chunk → ``h · gelu(gate)``) as two oneDNN linears with fused epilogues: ``gelu(x·W_g + b_g)``,
    then ``(x·W_h + b_h) · that`` — the same arithmetic without the broadcast bias copies, the GELU pass and the
    product pass eager PyTorch makes (on the embedded model's UNet: 1.08–1.24× per call in bf16, 2 cores)."""
    weight_h, weight_g = (w.contiguous() for w in module.proj.weight.detach().chunk(2, dim=0))
    bias_h, bias_g = (b.contiguous() for b in module.proj.bias.detach().chunk(2, dim=0))
    approximate = getattr(module, "approximate", "none")

    def forward(hidden_states, *args, **kwargs):
        gate = linear(hidden_states, weight_g, bias_g, "gelu", [], approximate)
        return linear.binary(hidden_states, gate, weight_h, bias_h, "mul")

    return forward


def fuse_geglu_cpu(unet) -> int:
    """Swap every GEGLU of a CPU UNet for :func:`_onednn_geglu` (eager levels only: ``max``'s compiler fuses these
    itself). The swapped modules hold copies of their weights taken now: inference only, like the other levels.
    Returns how many were swapped; 0 where oneDNN's fused linear is not available."""
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if unet.device.type != "cpu" or linear is None or not torch.backends.mkldnn.is_available():
        return 0
    from diffusers.models.activations import GEGLU

    count = 0
    for module in unet.modules():
        if isinstance(module, GEGLU) and type(module.proj) is torch.nn.Linear and module.proj.bias is not None:
            module.forward = _onednn_geglu(module, linear)
            count += 1
    return count


def optimize_unet(unet, level: str, dtype: torch.dtype) -> dict:
    """The UNet part of a level (memory layout, fused projections, dtype, compilation), in place. Used by
    ``prepare_for_inference`` and by ``bench/unet_speed.py``, so the bench measures what predict runs."""
    done: dict = {"channels_last": False, "fused_qkv": False}
    # Switchable LoRA adapters live on the projections: fused copies of them would bypass the adapters.
    switchable = bool(getattr(unet, "peft_config", None))
    if level not in ("none", "torch", "compile"):
        raise ValueError(f"optimize_unet takes the PyTorch levels none, torch and compile, not {level!r}")
    if level != "none":
        if prefers_channels_last(unet, unet.device):
            unet.to(memory_format=torch.channels_last)
            done["channels_last"] = True
        if switchable:
            done["fused_qkv"] = "no (switchable LoRA adapters)"
        else:
            try:
                unet.fuse_qkv_projections()
                done["fused_qkv"] = True
            except Exception as err:  # some attention processors cannot be fused; nothing is lost
                logger.info("QKV fusion skipped: %s", err)
    if dtype != torch.float32:
        # nn.Module.to, not ModelMixin.to: the latter warns about "modules to keep in float32" even when its list of
        # them is empty; the parts that need fp32 (scheduler, latents, VAE) are kept outside the UNet here
        torch.nn.Module.to(unet, dtype)
    if level == "torch" and not switchable:
        done["fused_geglu"] = fuse_geglu_cpu(unet)
    if level == "compile":
        unet.forward = torch.compile(unet.forward, **compile_options(unet.device))
    return done


def resolve_level(level: str, device: torch.device, switchable: bool = False,
                  openvino_parts: tuple[str, ...] = ("unet", "vae_decoder")) -> tuple[str, str]:
    """``auto``/``max`` → the concrete level for this device and model, with the reason (for logs).
    ``openvino_parts``: what the model's family converts to OpenVINO (none: it runs in PyTorch)."""
    if level not in LEVELS:
        raise ValueError(f"optimize must be one of {', '.join(LEVELS)}")
    if level not in ("auto", "max"):
        return level, ""
    if device.type == "cuda":
        return ("compile", "max on CUDA") if level == "max" else ("torch", "auto on CUDA")
    from modelzoo import openvino_backend

    if switchable:
        return "torch", "switchable LoRA adapters need PyTorch modules"
    if not openvino_parts:
        return "torch", "the model's family converts nothing to OpenVINO"
    if not openvino_backend.available():
        return "torch", "the openvino package is not installed"
    return "openvino", f"{level} on CPU"


def prepare_for_inference(model, level: str = "auto", precision: str = "") -> dict:
    """Apply an optimisation level in place; returns what was done (for logs and benchmarks)."""
    device = model.device
    denoiser = getattr(model, family_of(model).denoiser)
    switchable = bool(getattr(denoiser, "peft_config", None))
    parts = family_of(model).openvino_parts
    concrete, reason = resolve_level(level, device, switchable, parts)
    model.eval()
    if concrete == "openvino":
        if device.type != "cpu":
            raise ValueError(f"optimize=openvino runs on CPU only (the model is on {device}); use optimize=auto")
        if switchable:
            raise ValueError("optimize=openvino cannot keep switchable LoRA adapters (they need the PyTorch "
                             "modules); merge them (lora=...) or use optimize=torch")
        from modelzoo.openvino_backend import use_openvino

        if not parts:
            raise ValueError("optimize=openvino: the model's family converts nothing to OpenVINO; use optimize=auto")
        done = {"level": level, "ran_as": concrete, **use_openvino(model, precision, parts=parts)}
        if reason:
            done["why"] = reason
        model.optimization = done
        return done
    dtype = choose_dtype(concrete, precision, device)
    if denoiser is not getattr(model, "unet", None):
        # A transformer family's pipelines cast their own inputs and keep the VAE's; the fused kernels, layouts and
        # compilation below are the UNet's. (nn.Module.to: ModelMixin.to warns of an empty list of fp32 modules.)
        torch.nn.Module.to(denoiser, dtype)
        model.text_encoder.to(dtype)
        model.optimization = {"level": level, "ran_as": concrete, "dtype": str(dtype).replace("torch.", ""),
                              **({"why": reason} if reason else {})}
        return model.optimization
    done = {"level": level, "ran_as": concrete, "dtype": str(dtype).replace("torch.", ""),
            **optimize_unet(model.unet, concrete, dtype)}
    if reason:
        done["why"] = reason
    if dtype != torch.float32:
        model.text_encoder.to(dtype)
        # The scheduler works on fp32 latents: the UNet takes them down to `dtype` and gives fp32 back.
        model.unet.register_forward_pre_hook(_cast_inputs_hook(dtype), with_kwargs=True)
        model.unet.register_forward_hook(_fp32_output_hook, with_kwargs=True)
    if concrete == "compile":
        model.vae.decoder.forward = torch.compile(model.vae.decoder.forward, **compile_options(device))
        done["compiled"] = ["unet", "vae.decoder"]
    model.optimization = done
    return done


def limit_compiled_shapes(model, max_shapes: int) -> None:
    """Keep compiled models for at most ``max_shapes`` input shapes (batch × size) per compiled part of ``model``:
    OpenVINO's runners release their least recently used ones; for ``compile``, dynamo's ``recompile_limit`` (a
    process-wide setting) makes shapes past it run eagerly instead of compiling and keeping another graph."""
    from modelzoo.openvino_backend import runners

    for runner in runners(model).values():
        runner.resize(max_shapes)
    if "compiled" in (getattr(model, "optimization", None) or {}):
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max_shapes


def compiled_shapes(model) -> dict[str, tuple[int, int]]:
    """Compiled shapes held per part, and the bound: {"openvino_unet": (entries, max_shapes), …} (for /metrics)."""
    from modelzoo.openvino_backend import runners

    return {f"openvino_{part}": (len(runner.compiled), runner.max_shapes) for part, runner in runners(model).items()}
