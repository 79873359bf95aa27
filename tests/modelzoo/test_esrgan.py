"""Tests for modelzoo.esrgan on tiny random RRDBNets (no pretrained weights, CPU only)."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from easynlp_ldm.files import WeightsError
from modelzoo.esrgan import (
    RRDBNet,
    convert_state_dict,
    infer_architecture,
    load_rrdbnet,
    save_rrdbnet,
    upscale,
    upscale_tensor,
)

TINY = {"in_nc": 3, "out_nc": 3, "nf": 8, "nb": 2, "gc": 4}


def _tiny_net(seed=0, **overrides):
    torch.manual_seed(seed)
    arch = {**TINY, **overrides}
    model = RRDBNet(**arch).eval()
    with torch.no_grad():
        # Random init gives outputs near 0; widen them so clamping and colour handling are actually exercised.
        model.conv_last.weight.mul_(40.0)
        model.conv_last.bias.copy_(torch.tensor([0.5, 0.3, 0.7][: arch["out_nc"]] + [0.5] * (arch["out_nc"] - 3)))
    return model


def _rand_image(h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g)


_BASICSR_SIMPLE = {
    "trunk_conv": "conv_body",
    "upconv1": "conv_up1",
    "upconv2": "conv_up2",
    "HRconv": "conv_hr",
}


def _to_basicsr(sd):
    out = {}
    for k, v in sd.items():
        m = re.match(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.(conv\d\.(?:weight|bias))$", k)
        if m:
            out[f"body.{m.group(1)}.rdb{m.group(2)}.{m.group(3)}"] = v
            continue
        base, suffix = k.rsplit(".", 1)
        out[f"{_BASICSR_SIMPLE.get(base, base)}.{suffix}"] = v
    return out


def _to_old_arch(sd, nb):
    simple = {
        "conv_first": "model.0",
        "trunk_conv": f"model.1.sub.{nb}",
        "upconv1": "model.3",
        "upconv2": "model.6",
        "HRconv": "model.8",
        "conv_last": "model.10",
    }
    out = {}
    for k, v in sd.items():
        m = re.match(r"^RRDB_trunk\.(\d+)\.(RDB\d\.conv\d)\.(weight|bias)$", k)
        if m:
            out[f"model.1.sub.{m.group(1)}.{m.group(2)}.0.{m.group(3)}"] = v
            continue
        base, suffix = k.rsplit(".", 1)
        out[f"{simple[base]}.{suffix}"] = v
    return out


_UNPICKLED = []


def _mark_unpickled():
    _UNPICKLED.append(True)
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_output_is_4x_and_clamped():
    model = _tiny_net()
    x = _rand_image(12, 20)
    with torch.inference_mode():
        raw = model(x)
    assert raw.shape == (1, 3, 48, 80)
    assert raw.min() < 0 or raw.max() > 1  # the raw net output leaves [0, 1] ...
    y = upscale_tensor(model, x, tile=0)
    assert y.shape == (1, 3, 48, 80) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1  # ... the upscaled result does not
    torch.testing.assert_close(y, raw.clamp(0, 1), rtol=0, atol=0)

    # (C, H, W) input keeps its rank.
    assert upscale_tensor(model, x[0], tile=0).shape == (3, 48, 80)

    img = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    out = upscale(model, img, tile=0)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (80, 48)
    expected = (y[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(np.asarray(out, dtype=np.float32) - expected).max() <= 1


def test_rgba_keeps_alpha_and_bf16_runs():
    model = _tiny_net()
    img = Image.new("RGBA", (6, 5), (200, 30, 90, 128))
    out = upscale(model, img, tile=0)
    assert out.mode == "RGBA" and out.size == (24, 20)
    assert np.all(np.asarray(out)[..., 3] == 128)

    x = _rand_image(6, 6)
    y32 = upscale_tensor(model, x, tile=0)
    y16 = upscale_tensor(model, x, tile=0, dtype=torch.bfloat16)
    assert y16.dtype == torch.float32 and y16.min() >= 0 and y16.max() <= 1
    assert (y16 - y32).abs().max() < 0.1


def test_original_and_basicsr_layouts_load_identically(tmp_path):
    model = _tiny_net()
    orig_path = tmp_path / "RRDB_ESRGAN_x4.pth"
    save_rrdbnet(model, orig_path)
    assert not os.path.exists(str(orig_path) + ".tmp")
    saved = torch.load(orig_path, map_location="cpu", weights_only=True)
    assert type(saved) is dict and set(saved) == set(model.state_dict())
    assert "RRDB_trunk.1.RDB3.conv5.weight" in saved and "HRconv.bias" in saved

    basicsr = _to_basicsr(saved)
    assert "body.1.rdb3.conv5.weight" in basicsr and "conv_hr.bias" in basicsr and "conv_body.weight" in basicsr
    torch.save(basicsr, tmp_path / "basicsr.pth")
    torch.save({"params_ema": basicsr}, tmp_path / "basicsr_ema.pth")
    torch.save({"params": {f"module.{k}": v for k, v in basicsr.items()}}, tmp_path / "basicsr_params.pth")
    from safetensors.torch import save_file

    save_file(basicsr, str(tmp_path / "basicsr.safetensors"))

    x = _rand_image(10, 14)
    ref = upscale_tensor(model, x, tile=0)
    for name in ("RRDB_ESRGAN_x4.pth", "basicsr.pth", "basicsr_ema.pth", "basicsr_params.pth", "basicsr.safetensors"):
        loaded = load_rrdbnet(tmp_path / name)
        assert isinstance(loaded, RRDBNet) and not loaded.training
        assert loaded.architecture() == TINY
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (name, k)
        assert torch.equal(upscale_tensor(loaded, x, tile=0), ref), name

    # In-memory state dicts work too, and conversion is idempotent on the original layout.
    assert torch.equal(upscale_tensor(load_rrdbnet({"params_ema": basicsr}), x, tile=0), ref)
    assert list(convert_state_dict(saved)) == list(model.state_dict())
    assert list(convert_state_dict(_to_old_arch(saved, TINY["nb"]))) == list(model.state_dict())


@pytest.mark.parametrize(
    "arch",
    [
        dict(TINY),
        {"in_nc": 3, "out_nc": 3, "nf": 12, "nb": 3, "gc": 6},
        {"in_nc": 1, "out_nc": 1, "nf": 4, "nb": 1, "gc": 2},
    ],
)
def test_infer_architecture(arch):
    sd = RRDBNet(**arch).state_dict()
    assert infer_architecture(sd) == arch
    assert infer_architecture(_to_basicsr(sd)) == arch
    assert infer_architecture({"params_ema": _to_basicsr(sd)}) == arch
    assert infer_architecture(_to_old_arch(sd, arch["nb"])) == arch


def test_pixel_unshuffle_models_are_rejected():
    sd = RRDBNet(in_nc=12, out_nc=3, nf=4, nb=1, gc=2).state_dict()  # Real-ESRGAN x2plus-style conv_first
    with pytest.raises(ValueError, match="pixel-unshuffle"):
        infer_architecture(sd)


def test_tiled_equals_untiled():
    model = _tiny_net()
    x = _rand_image(28, 40)  # not a multiple of the tile
    full = upscale_tensor(model, x, tile=0)
    assert full.shape == (1, 3, 112, 160)
    tiled = upscale_tensor(model, x, tile=16, overlap=8)
    assert tiled.shape == full.shape
    assert (tiled - full).abs().max().item() <= 1 / 255
    # A tile covering the whole image is a single pass.
    assert torch.equal(upscale_tensor(model, x, tile=64, overlap=8), full)

    img = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    a = np.asarray(upscale(model, img, tile=0), dtype=np.int16)
    b = np.asarray(upscale(model, img, tile=16, overlap=8), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_channel_order_bgr_flips_around_the_net():
    model = _tiny_net()
    x = _rand_image(8, 12)
    with torch.inference_mode():
        manual_bgr = model(x.flip(1)).flip(1).clamp(0, 1)
        manual_rgb = model(x).clamp(0, 1)
    bgr = upscale_tensor(model, x, tile=0, channel_order="bgr")
    rgb = upscale_tensor(model, x, tile=0, channel_order="rgb")
    torch.testing.assert_close(bgr, manual_bgr, rtol=0, atol=0)
    torch.testing.assert_close(rgb, manual_rgb, rtol=0, atol=0)
    assert not torch.allclose(bgr, rgb)
    with pytest.raises(ValueError, match="channel_order"):
        upscale_tensor(model, x, tile=0, channel_order="grb")


def test_corrupt_files_raise_value_error(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_rrdbnet(bad)

    model = _tiny_net()
    good = tmp_path / "good.pth"
    save_rrdbnet(model, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_rrdbnet(truncated)

    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_rrdbnet(bad_st)

    with pytest.raises(WeightsError, match="missing.pth: file not found"):  # as every weight loader says it
        load_rrdbnet(tmp_path / "missing.pth")


def test_missing_or_unexpected_keys_raise_value_error(tmp_path):
    sd = dict(_tiny_net().state_dict())
    del sd["RRDB_trunk.1.RDB2.conv3.bias"]
    with pytest.raises(ValueError, match=r"missing key.*RRDB_trunk\.1\.RDB2\.conv3\.bias"):
        convert_state_dict(sd)
    path = tmp_path / "missing_key.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing_key\.pth.*RRDB_trunk\.1\.RDB2\.conv3\.bias"):
        load_rrdbnet(path)

    sd = dict(_tiny_net().state_dict())
    sd["discriminator.conv0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key.*discriminator\.conv0\.weight"):
        load_rrdbnet(sd)

    sd = dict(_tiny_net().state_dict())
    sd["upconv1.weight"] = torch.zeros(8, 8, 1, 1)  # wrong shape -> strict load fails
    with pytest.raises(ValueError, match="upconv1.weight"):
        load_rrdbnet(sd)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    sd = dict(_tiny_net().state_dict())
    sd["extra"] = _Evil()
    torch.save(sd, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_rrdbnet(path)
    assert _UNPICKLED == []  # the object's reduce hook never ran
