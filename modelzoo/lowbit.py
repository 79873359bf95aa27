"""Low-bit frozen weights of a LoRA run (``base_precision=int8|fp8|nf4``): the denoiser's linear weights quantised
weight-only with torchao (int8 per output channel, fp8 e4m3 per output channel, NF4 in blocks of 64) after the model is
loaded in bf16 and before the adapters are added, so that peft wraps each quantised layer (its ``TorchaoLoraLinear``
for int8 and fp8, its plain ``Linear`` over an ``NF4Tensor``); each layer dequantises its weight to bf16 for the
matmul, the LoRA branch computes in fp32. A UNet's convolutions (torchao quantises linear layers only) are held as
int8 or fp8 codes per output channel (``ChannelCodes``). Norms, biases, the VAE and the text encoder stay bf16.

torchao was chosen over bitsandbytes by measurement on a CPU (docs/training.md, "Low-bit frozen weights"): one
3 MB wheel without dependencies covers the three precisions on CPU and GPU, where bitsandbytes (43 MB) has no fp8.
It is optional: a run that asks for a low-bit precision without it gets a ``UserError`` naming the pip command."""

from __future__ import annotations

import math

import torch

from easynlp_ldm.errors import UserError

LOW_BIT = ("int8", "fp8", "nf4")
# bytes of a quantised linear weight as torchao stores it: per weight (NF4's with its int8 scale per block of 64 and
# fp32 scale per 256 blocks), and per output channel (int8: an fp32 scale and an int8 zero point; fp8: an fp32 scale)
WEIGHT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
CHANNEL_BYTES = {"int8": 5, "fp8": 4, "nf4": 0}
CONVOLUTION_BYTES, CONVOLUTION_CHANNEL_BYTES = 1, 2  # ChannelCodes: an int8 or fp8 code, a bf16 scale per channel
BASE_BYTES = 2  # what is not quantised stays in the compute dtype, bf16
TORCHAO_INSTALL = "pip install --no-deps torchao==0.18.0"
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256

def _torchao():
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise UserError(f"base_precision=int8, fp8 and nf4 quantise the frozen weights with torchao, which is not "
                        f"installed: {TORCHAO_INSTALL}") from None
    return quantization


def check_supported(precision: str, device: torch.device) -> None:
    """A one-line ``UserError`` where ``precision`` cannot run on ``device``: fp8 weights on a GPU before Ada
    (compute capability 8.9) have no float8 kernels; on CPU torchao dequantises them."""
    _torchao()
    if precision == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"base_precision=fp8 needs a GPU of compute capability 8.9 or later (this one is "
                        f"{major}.{minor}); use int8 or nf4 here")


def _nf4_scaler_block(weight: torch.Tensor) -> int:
    """The scaler block of NF4 for ``weight`` (torchao's 256 where it divides the number of blocks, else the largest
    power of two that does); 0 where the weight is not whole blocks of 64."""
    if weight.numel() % NF4_BLOCK:
        return 0
    return math.gcd(NF4_SCALER_BLOCK, weight.numel() // NF4_BLOCK)


def quantisable_linears(module: torch.nn.Module, precision: str) -> list[torch.nn.Linear]:
    """The linear layers of ``module`` whose weights ``precision`` quantises (NF4: those of whole blocks of 64)."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if precision == "nf4":
        return [m for m in linears if _nf4_scaler_block(m.weight)]
    return linears


class ChannelCodes(torch.nn.Module):
    """A convolution's weight held as codes (int8, or fp8 e4m3) and a scale per output channel in the compute dtype: a
    parametrization (``torch.nn.utils.parametrize``) that dequantises the weight at each forward pass."""

    def __init__(self, codes_dtype: torch.dtype):
        super().__init__()
        self.codes_dtype = codes_dtype

    def forward(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.to(scale.dtype) * scale

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = weight.detach().float()
        top = 127.0 if self.codes_dtype == torch.int8 else torch.finfo(self.codes_dtype).max
        scale = (full.abs().amax(dim=tuple(range(1, full.dim())), keepdim=True) / top).clamp_min(1e-12)
        codes = full / scale
        codes = codes.round().to(torch.int8) if self.codes_dtype == torch.int8 else codes.to(self.codes_dtype)
        return codes, scale.to(weight.dtype)


def quantisable_convolutions(module: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def quantise_frozen(module: torch.nn.Module, precision: str) -> int:
    """Quantise the frozen weights of ``module`` in place: its linear layers' with torchao, its convolutions' per
    output channel (fp8 codes for fp8, int8 for int8 and nf4: NF4 is a format for linear layers); returns how many
    weights were quantised."""
    from torch.nn.utils import parametrize

    convolutions = quantisable_convolutions(module)
    codes = torch.float8_e4m3fn if precision == "fp8" else torch.int8
    for convolution in convolutions:
        parametrize.register_parametrization(convolution, "weight", ChannelCodes(codes), unsafe=True)
    return _quantise_linears(module, precision) + sum(m.weight.numel() for m in convolutions)


def _quantise_linears(module: torch.nn.Module, precision: str) -> int:
    quantization = _torchao()
    linears = quantisable_linears(module, precision)
    chosen = {id(m) for m in linears}
    if precision == "nf4":
        for linear in linears:
            weight = linear.weight.detach()
            linear.weight = torch.nn.Parameter(quantization.to_nf4(weight, NF4_BLOCK, _nf4_scaler_block(weight)),
                                               requires_grad=False)
    else:
        config = quantization.Int8WeightOnlyConfig() if precision == "int8" else quantization.Float8WeightOnlyConfig()
        quantization.quantize_(module, config, filter_fn=lambda m, _: id(m) in chosen)
    return sum(m.weight.numel() for m in linears)


def quantised_parameters(module: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The parameters of ``module`` that ``quantise_frozen`` made: torchao's quantised linear weights and the codes and
    scales of its convolutions."""
    quantised = set()
    for name, param in module.named_parameters():
        if hasattr(param, "__tensor_flatten__") or ".parametrizations.weight.original" in f".{name}":
            quantised.add(param)
    return quantised


def quantised_count(module: torch.nn.Module, precision: str) -> int:
    """How many of ``module``'s weights ``quantise_frozen`` quantises at ``precision`` (those sharding=fsdp leaves
    whole in every process)."""
    layers = (*quantisable_linears(module, precision), *quantisable_convolutions(module))
    return sum(m.weight.numel() for m in layers)


def frozen_param_bytes(module: torch.nn.Module, frozen_count: int, precision: str) -> float:
    """Bytes per frozen parameter, on average, of a run whose ``frozen_count`` frozen parameters are bf16 but for
    ``module``'s linear and convolution weights in ``precision``: what the memory plan counts
    (``ModelFootprint.frozen_param_bytes``) before anything is quantised."""
    linears, convolutions = quantisable_linears(module, precision), quantisable_convolutions(module)
    quantised = quantised_count(module, precision)
    held = sum(m.weight.numel() * WEIGHT_BYTES[precision] + m.out_features * CHANNEL_BYTES[precision] for m in linears)
    held += sum(m.weight.numel() * CONVOLUTION_BYTES + m.out_channels * CONVOLUTION_CHANNEL_BYTES for m in convolutions)
    return (held + (frozen_count - quantised) * BASE_BYTES) / max(frozen_count, 1)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, a quantised tensor counted by the tensors it holds (its data and
    scales)."""

    def size(tensor: torch.Tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            return sum(size(inner) for inner in (getattr(tensor, n) for n in names) if isinstance(inner, torch.Tensor))
        return tensor.numel() * tensor.element_size()

    return sum(size(t) for t in (*module.parameters(), *module.buffers()))
