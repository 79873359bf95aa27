"""ESRGAN x4 super-resolution (RRDBNet), self-contained.

Architecture (Wang et al., "ESRGAN", 2018) as in the original ``xinntao/ESRGAN`` repository::

    conv_first -> RRDB_trunk (nb x RRDB) -> trunk_conv -> (+ conv_first output)
    -> nearest x2 -> upconv1 -> LeakyReLU(0.2)
    -> nearest x2 -> upconv2 -> LeakyReLU(0.2)
    -> HRconv -> LeakyReLU(0.2) -> conv_last

Each RRDB holds three ResidualDenseBlocks (5 convs with dense connections and growth ``gc``;
conv1..conv4 followed by LeakyReLU(0.2)); both the dense block and the RRDB add their
output back scaled by 0.2.

Parameter names follow the ORIGINAL layout (``RRDB_ESRGAN_x4.pth``)::

    conv_first, RRDB_trunk.{i}.RDB{1,2,3}.conv{1..5}, trunk_conv, upconv1, upconv2, HRconv, conv_last

:func:`convert_state_dict` also accepts the basicsr / Real-ESRGAN layout (``body.{i}.rdb{j}.conv{k}``,
``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``; optionally wrapped in ``{"params_ema": ...}`` or
``{"params": ...}``), the very old ESRGAN "old_arch" layout (``model.0``, ``model.1.sub.{i}.RDB{j}.conv{k}.0``,
...), and a ``module.`` (DataParallel) prefix.

Channel order
-------------
The network itself is channel-order agnostic; what matters is the order it was *trained* on. The original
ESRGAN test script (``test.py``) reads images with OpenCV (BGR) and converts them to RGB before the network,
so the released ``RRDB_ESRGAN_x4.pth`` / Real-ESRGAN weights expect RGB: use ``channel_order="rgb"``
(the default). EasyNLP's pipeline swapped RGB->BGR around the network; ``channel_order="bgr"`` reproduces
that behaviour (flip channels before the network, flip back after). This is an explicit setting, never
guessed from the weights.

A new net (:func:`plan_new_net`, ``train_target=rrdb`` on a model without one) is trained in the channel order the
model will feed it. For an EasyNLP-format model that is EasyNLP's own: ``RRDBNet(nf=64, nb=23, gc=32)`` (EasyNLP
builds exactly that and loads the file strictly) on BGR; other models get a smaller net (32/3/16) on RGB, a file for
this toolkit's ``do_sr`` only.

Loading never unpickles arbitrary objects: ``.pth`` files go through ``torch.load(weights_only=True)`` and
``.safetensors`` files through ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from easynlp_ldm.files import WEIGHT_WRAPPERS, atomic_open, load_state_dict_file

__all__ = [
    "SCALE",
    "ResidualDenseBlock",
    "RRDB",
    "RRDBNet",
    "convert_state_dict",
    "forward_in_order",
    "infer_architecture",
    "load_rrdbnet",
    "plan_new_net",
    "save_rrdbnet",
    "upscale",
    "upscale_tensor",
]

#: Upscaling factor of the network (two nearest-neighbour x2 stages).
SCALE = 4

_CHANNEL_ORDERS = ("rgb", "bgr")

#: EasyNLP's ESRGAN: ``RRDBNet(3, 3, 64, 23, gc=32)``, loaded with a strict ``load_state_dict``, fed BGR.
EASYNLP_ARCHITECTURE = {"nf": 64, "nb": 23, "gc": 32}
EASYNLP_CHANNEL_ORDER = "bgr"
#: A new net for a model in another format: small and quick to train, for this toolkit's ``do_sr``.
TOOLKIT_ARCHITECTURE = {"nf": 32, "nb": 3, "gc": 16}

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------------------


def _scaled_kaiming_(modules: list[nn.Conv2d], scale: float) -> None:
    """ESRGAN's initialisation for the dense-block convs: kaiming normal (fan_in) scaled down, zero bias."""
    for m in modules:
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        m.weight.data.mul_(scale)
        if m.bias is not None:
            m.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Residual dense block with 5 convolutions (``ResidualDenseBlock_5C`` in ESRGAN)."""

    def __init__(self, nf: int = 64, gc: int = 32, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1, bias=bias)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1, bias=bias)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1, bias=bias)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1, bias=bias)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1, bias=bias)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        _scaled_kaiming_([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaling 0.2."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.RDB3(self.RDB2(self.RDB1(x)))
        return out * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator, x4. Parameter names use the original ESRGAN layout.

    ``forward`` returns the raw network output (not clamped, like the reference implementation);
    :func:`upscale_tensor` / :func:`upscale` clamp to [0, 1].
    """

    scale = SCALE

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32):
        super().__init__()
        for name, value, minimum in (
            ("in_nc", in_nc, 1),
            ("out_nc", out_nc, 1),
            ("nf", nf, 1),
            ("nb", nb, 0),
            ("gc", gc, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"RRDBNet: {name} must be an int >= {minimum}, got {value!r}")
        self.in_nc, self.out_nc, self.nf, self.nb, self.gc = in_nc, out_nc, nf, nb, gc

        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1, bias=True)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1, bias=True)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def architecture(self) -> dict[str, int]:
        return {"in_nc": self.in_nc, "out_nc": self.out_nc, "nf": self.nf, "nb": self.nb, "gc": self.gc}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        trunk = self.trunk_conv(self.RRDB_trunk(fea))
        fea = fea + trunk
        fea = self.lrelu(self.upconv1(F.interpolate(fea, scale_factor=2, mode="nearest")))
        fea = self.lrelu(self.upconv2(F.interpolate(fea, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.HRconv(fea)))


@dataclass(frozen=True)
class NewNetPlan:
    """What ``train_target=rrdb`` builds for a model without a super-resolution net, and what the log says of it."""

    architecture: dict[str, int]
    channel_order: str
    easynlp_format: bool

    @property
    def easynlp_loads(self) -> bool:
        """Whether EasyNLP's ESRGAN loads the file and feeds it the colours it was trained on."""
        return self.architecture == EASYNLP_ARCHITECTURE and self.channel_order == EASYNLP_CHANNEL_ORDER

    def describe(self) -> str:
        arch = ", ".join(f"{key}={value}" for key, value in self.architecture.items())
        what = f"a new super-resolution net ({arch}) on {self.channel_order.upper()} images"
        if self.easynlp_loads:
            return f"{what}: EasyNLP's ESRGAN architecture and channel order, so EasyNLP loads RRDB_ESRGAN_x4.pth"
        if self.easynlp_format:
            return (f"{what}: RRDB_ESRGAN_x4.pth will NOT load in EasyNLP, whose ESRGAN is RRDBNet(nf=64, nb=23, "
                    f"gc=32) loaded strictly; it is for this toolkit's do_sr only (leave rrdb_nf, rrdb_nb and rrdb_gc "
                    f"at 0 for EasyNLP's)")
        return (f"{what}: RRDB_ESRGAN_x4.pth is for this toolkit's do_sr only (EasyNLP's ESRGAN loads RRDBNet(nf=64, "
                f"nb=23, gc=32) fed BGR, beside an EasyNLP-format model)")


def plan_new_net(easynlp_format: bool, channel_order: str, nf: int = 0, nb: int = 0, gc: int = 0) -> NewNetPlan:
    """The architecture (``nf``/``nb``/``gc`` when given, else EasyNLP's for an EasyNLP-format model and
    ``TOOLKIT_ARCHITECTURE`` otherwise) and channel order (the model's) of a new net."""
    defaults = EASYNLP_ARCHITECTURE if easynlp_format else TOOLKIT_ARCHITECTURE
    given = {"nf": nf, "nb": nb, "gc": gc}
    return NewNetPlan({key: int(given[key] or defaults[key]) for key in defaults},
                      _check_channel_order(channel_order), bool(easynlp_format))


def training_advice(easynlp_format: bool) -> str:
    """The end of training's advice for a model without ``RRDB_ESRGAN_x4.pth``."""
    if easynlp_format:
        return ("train them with train_target=rrdb, which for this EasyNLP-format model trains EasyNLP's RRDBNet "
                "(nf 64, nb 23, gc 32) on BGR images: the file EasyNLP's ESRGAN loads")
    return ("train them with train_target=rrdb: a smaller net (nf 32, nb 3, gc 16, RGB) for this toolkit's do_sr, "
            "which EasyNLP's ESRGAN does not load")


# --------------------------------------------------------------------------------------------------------------------
# State-dict conversion
# --------------------------------------------------------------------------------------------------------------------

_SIMPLE_ORIGINAL = ("conv_first", "trunk_conv", "upconv1", "upconv2", "HRconv", "conv_last")
_BASICSR_RENAMES = {
    "conv_first": "conv_first",
    "conv_body": "trunk_conv",
    "conv_up1": "upconv1",
    "conv_up2": "upconv2",
    "conv_hr": "HRconv",
    "conv_last": "conv_last",
}
_OLD_ARCH_RENAMES = {
    "model.0": "conv_first",
    "model.3": "upconv1",
    "model.6": "upconv2",
    "model.8": "HRconv",
    "model.10": "conv_last",
}
_RE_ORIGINAL_TRUNK = re.compile(r"^RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)$")
_RE_BASICSR_TRUNK = re.compile(r"^body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$")
_RE_OLD_TRUNK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_RE_OLD_TRUNK_CONV = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_RE_SIMPLE = re.compile(r"^(.+)\.(weight|bias)$")


def _unwrap(state_dict: Any) -> Mapping:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (mapping of name -> tensor), got {type(state_dict).__name__}")
    # basicsr / Real-ESRGAN wrap the weights; prefer the EMA weights like their inference code does.
    for wrapper in WEIGHT_WRAPPERS:
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    return state_dict


def _strip_module_prefix(sd: Mapping) -> dict:
    keys = list(sd.keys())
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _expected_keys(nb: int) -> list[str]:
    names = ["conv_first"]
    names += [f"RRDB_trunk.{i}.RDB{j}.conv{k}" for i in range(nb) for j in (1, 2, 3) for k in range(1, 6)]
    names += ["trunk_conv", "upconv1", "upconv2", "HRconv", "conv_last"]
    return [f"{n}.{s}" for n in names for s in ("weight", "bias")]


def convert_state_dict(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Return an ORIGINAL-layout RRDBNet state dict from any supported layout.

    Accepts the original ESRGAN layout, the basicsr / Real-ESRGAN layout, the ESRGAN "old_arch" layout,
    ``{"params_ema": ...}`` / ``{"params": ...}`` / ``{"state_dict": ...}`` wrappers and a ``module.`` prefix.
    Tensors are not copied. Raises ``ValueError`` naming the first unexpected or missing key.
    """
    sd = _strip_module_prefix(_unwrap(state_dict))
    if not sd:
        raise ValueError("empty state dict: no ESRGAN weights found")

    # The old-arch layout names trunk_conv by its position after the last RRDB: model.1.sub.{nb}.
    old_trunk_conv_idx = None
    if any(isinstance(k, str) and _RE_OLD_TRUNK.match(k) for k in sd):
        idx = [int(m.group(1)) for k in sd if isinstance(k, str) and (m := _RE_OLD_TRUNK_CONV.match(k))]
        if idx:
            old_trunk_conv_idx = max(idx)

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise ValueError(f"unexpected non-string key in state dict: {key!r}")
        new_key = None
        if m := _RE_ORIGINAL_TRUNK.match(key):
            new_key = key
        elif m := _RE_BASICSR_TRUNK.match(key):
            new_key = f"RRDB_trunk.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif m := _RE_OLD_TRUNK.match(key):
            new_key = f"RRDB_trunk.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif (m := _RE_OLD_TRUNK_CONV.match(key)) and int(m.group(1)) == old_trunk_conv_idx:
            new_key = f"trunk_conv.{m.group(2)}"
        elif m := _RE_SIMPLE.match(key):
            base, suffix = m.group(1), m.group(2)
            if base in _SIMPLE_ORIGINAL:
                new_key = key
            elif base in _BASICSR_RENAMES:
                new_key = f"{_BASICSR_RENAMES[base]}.{suffix}"
            elif base in _OLD_ARCH_RENAMES:
                new_key = f"{_OLD_ARCH_RENAMES[base]}.{suffix}"
        if new_key is None:
            raise ValueError(
                f"unexpected key in ESRGAN state dict: {key!r} (not an RRDBNet parameter in the "
                "original, basicsr or old-arch layout)"
            )
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"value for key {key!r} is a {type(value).__name__}, not a tensor")
        if new_key in out:
            raise ValueError(f"duplicate parameter {new_key!r} (key {key!r}); mixed layouts in one state dict?")
        out[new_key] = value

    trunk_ids = sorted({int(m.group(1)) for k in out if (m := _RE_ORIGINAL_TRUNK.match(k))})
    nb = trunk_ids[-1] + 1 if trunk_ids else 0
    expected = _expected_keys(nb)
    missing = [k for k in expected if k not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing key in ESRGAN state dict: {missing[0]!r}{more}")
    extra = set(out) - set(expected)
    if extra:  # cannot happen with the patterns above, kept as a safety net
        raise ValueError(f"unexpected key in ESRGAN state dict: {sorted(extra)[0]!r}")
    return {k: out[k] for k in expected}


def infer_architecture(state_dict: Mapping) -> dict[str, int]:
    """Infer ``dict(in_nc, out_nc, nf, nb, gc)`` from tensor shapes and the number of trunk blocks.

    Accepts any layout :func:`convert_state_dict` accepts.
    """
    sd = convert_state_dict(state_dict)
    first = sd["conv_first.weight"]
    last = sd["conv_last.weight"]
    if first.ndim != 4 or last.ndim != 4:
        raise ValueError("conv_first.weight / conv_last.weight must be 4-D conv kernels")
    nf, in_nc = int(first.shape[0]), int(first.shape[1])
    out_nc = int(last.shape[0])
    nb = len({k.split(".")[1] for k in sd if k.startswith("RRDB_trunk.")})
    gc = int(sd["RRDB_trunk.0.RDB1.conv1.weight"].shape[0]) if nb else 32
    if in_nc != out_nc and in_nc in (out_nc * 4, out_nc * 16):
        raise ValueError(
            f"conv_first takes {in_nc} channels for {out_nc} output channels: this looks like a "
            "basicsr x2/x1 model with pixel-unshuffle input, which this x4 RRDBNet does not support"
        )
    return {"in_nc": in_nc, "out_nc": out_nc, "nf": nf, "nb": nb, "gc": gc}


# --------------------------------------------------------------------------------------------------------------------
# Loading / saving
# --------------------------------------------------------------------------------------------------------------------


def load_rrdbnet(path_or_state_dict: PathLike | Mapping) -> RRDBNet:
    """Build an :class:`RRDBNet` from a ``.pth``/``.safetensors`` file or an in-memory state dict.

    The layout is converted, the architecture inferred, and the weights loaded strictly. The returned
    model is on CPU, float32, in eval mode. A file is read by ``easynlp_ldm.files.load_state_dict_file`` (missing,
    unreadable or unsafe files raise its ``WeightsError``, a ``ValueError`` naming the file, as for every other weight
    file); mismatching weights raise ``ValueError`` with the path.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "state dict", path_or_state_dict
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        raw = load_state_dict_file(source)
    else:
        raise TypeError(f"load_rrdbnet expects a path or a state dict, got {type(path_or_state_dict).__name__}")
    try:
        sd = convert_state_dict(raw)
        arch = infer_architecture(sd)
        model = RRDBNet(**arch)
        model.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError) as e:
        where = source if source == "state dict" else repr(source)
        raise ValueError(f"invalid ESRGAN weights in {where}: {e}") from e
    return model.eval()


def save_rrdbnet(model: RRDBNet, path: PathLike) -> None:
    """Save the ORIGINAL-layout state dict atomically (``easynlp_ldm.files.atomic_open``).

    A path ending in ``.safetensors`` is written with safetensors; anything else with ``torch.save``
    of a plain ``dict`` of CPU tensors (loadable with ``weights_only=True``).
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as handle:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import save

            handle.write(save(sd))
        else:
            torch.save(sd, handle)


# --------------------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------------------


def _check_channel_order(channel_order: str) -> str:
    order = str(channel_order).lower()
    if order not in _CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {channel_order!r}")
    return order


def _compute_context(model: nn.Module, dtype: torch.dtype | None):
    """Return (input dtype for the net, context manager) for the requested compute dtype."""
    param = next(model.parameters())
    pdtype, device = param.dtype, param.device
    if dtype is None or dtype == pdtype:
        return pdtype, nullcontext()
    if pdtype == torch.float32 and dtype in (torch.bfloat16, torch.float16):
        return pdtype, torch.autocast(device_type=device.type, dtype=dtype)
    raise ValueError(f"cannot compute in {dtype} with a {pdtype} model; convert the model with .to({dtype}) instead")


def forward_in_order(model: nn.Module, x: torch.Tensor, channel_order: str) -> torch.Tensor:
    """``model`` on RGB ``x`` (B, C, H, W) when it expects ``channel_order``: "bgr" flips the channels before the net
    and its output back after, so the result is RGB either way (training and inference share this)."""
    if _check_channel_order(channel_order) == "bgr":
        return model(x.flip(1)).flip(1)
    return model(x)


def upscale_tensor(
    model: nn.Module,
    x: torch.Tensor,
    tile: int | None = 256,
    overlap: int = 16,
    channel_order: str = "rgb",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Upscale a float tensor ``(B, C, H, W)`` (or ``(C, H, W)``) in [0, 1] by 4.

    ``x`` is in RGB order; ``channel_order`` says what the network expects ("rgb": pass through,
    "bgr": flip channels before the net and back after). The image is processed in tiles of ``tile``
    input pixels, each with ``overlap`` pixels of context on every side that are cropped from the x4
    output before pasting; ``tile=0``/``None`` (or a tile covering the image) means one pass. The result
    equals the untiled one up to the influence of pixels further than ``overlap`` away.
    ``dtype`` (e.g. ``torch.bfloat16``) selects the compute precision (autocast for a float32 model).
    Returns float32 in [0, 1] on ``x``'s device; tiles are run on the model's device.
    """
    order = _check_channel_order(channel_order)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("upscale_tensor expects a floating-point torch.Tensor")
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) or (C, H, W) tensor, got shape {tuple(x.shape)}")
    in_nc = getattr(model, "in_nc", None)
    if in_nc is not None and x.shape[1] != in_nc:
        raise ValueError(f"model expects {in_nc} input channels, got {x.shape[1]}")
    tile = int(tile or 0)
    overlap = int(overlap)
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile and overlap must be >= 0, got tile={tile}, overlap={overlap}")

    b, _, h, w = x.shape
    if h == 0 or w == 0:
        raise ValueError(f"cannot upscale an empty image of shape {tuple(x.shape)}")
    param = next(model.parameters())
    in_dtype, ctx = _compute_context(model, dtype)
    s = SCALE
    out_nc = getattr(model, "out_nc", None)

    def run(patch: torch.Tensor) -> torch.Tensor:
        with ctx:
            y = forward_in_order(model, patch.to(device=param.device, dtype=in_dtype), order)
        return y.float()

    with torch.inference_mode():
        if tile == 0 or (tile >= h and tile >= w):
            out = run(x).clamp_(0.0, 1.0).to(x.device)
        else:
            out = None
            for y0 in range(0, h, tile):
                y1 = min(y0 + tile, h)
                py0, py1 = max(0, y0 - overlap), min(h, y1 + overlap)
                for x0 in range(0, w, tile):
                    x1 = min(x0 + tile, w)
                    px0, px1 = max(0, x0 - overlap), min(w, x1 + overlap)
                    y = run(x[:, :, py0:py1, px0:px1])
                    if out is None:
                        out = torch.empty((b, out_nc or y.shape[1], h * s, w * s), dtype=torch.float32, device=x.device)
                    oy, ox = (y0 - py0) * s, (x0 - px0) * s
                    crop = y[:, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
                    out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = crop.clamp_(0.0, 1.0).to(x.device)
    return out.squeeze(0) if squeeze else out


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _tensor_to_pil(t: torch.Tensor) -> Image.Image:
    arr = t.squeeze(0).permute(1, 2, 0).mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


def upscale(
    model: nn.Module,
    image: Image.Image | np.ndarray,
    *,
    tile: int | None = 256,
    overlap: int = 16,
    channel_order: str = "rgb",
    dtype: torch.dtype | None = None,
) -> Image.Image:
    """Upscale a PIL image (or an HxWx3 uint8 RGB array) by 4 and return a PIL image.

    Colour goes through the network (see :func:`upscale_tensor` for ``tile``/``overlap``/``channel_order``/
    ``dtype``); an alpha channel, if any, is resized bicubically and re-attached (RGBA out).
    Grayscale/palette images are converted to RGB.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"numpy input must be an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"upscale expects a PIL.Image or numpy array, got {type(image).__name__}")
    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        image = rgba
    x = _pil_to_tensor(image)
    y = upscale_tensor(model, x, tile, overlap, channel_order, dtype)
    out = _tensor_to_pil(y)
    if alpha is not None:
        out.putalpha(alpha.resize(out.size, Image.BICUBIC))
    return out
