"""The memory plan under several processes (easynlp_ldm/memory.py): per process, DDP holds everything, FSDP2
(sharding=fsdp) one process's shards of the wrapped module plus its largest block and root unsharded; a run that does
not fit says how many devices, or which lower precision of its frozen weights, would make it fit; the families' block
layouts (modelzoo/families/sd_memory.py, dit_memory.py). No processes are started."""

import dataclasses
import json
import math
import os

import pytest
import torch

from easynlp_ldm import memory
from easynlp_ldm.errors import UserError
from tests.helpers import ROOT

GIB = memory.GIB
SETTINGS = memory.MemorySettings(micro_batch_size=1, resolution=64, gradient_checkpointing=False, use_amp=False,
                                 optimizer="adamw", use_ema=True, ema_device="", save_optimizer=True, device="cuda")
BLOCK, ROOT_PARAMS = 4096 * 4096, 1024 * 1024
# a 16-block model of 1 G trained parameters (+ a 1 M-parameter root), a frozen 64 M-parameter encoder outside it
FOOTPRINT = memory.ModelFootprint(
    trained={"net": [(4096, 4096)] * 64 + [(1024, 1024)]}, frozen={"encoder": 64 << 20},
    shards=memory.ShardLayout(components=("net",), largest_block=BLOCK, root=ROOT_PARAMS))


def estimate(footprint=FOOTPRINT, **changes):
    return memory.estimate(footprint, dataclasses.replace(SETTINGS, **changes))


def test_one_process_is_todays_estimate_and_ddp_adds_its_buckets():
    today = estimate()
    one = estimate(sharding="fsdp", processes=1)
    assert (one.parts, one.device, one.host) == (today.parts, today.device, today.host)
    assert today.parts["gathered"] == today.parts["buckets"] == 0 and "sharded" not in today.describe()
    # DDP: every process holds everything, and a flat copy of the gradients to all-reduce
    ddp = estimate(sharding="none", processes=4)
    buckets = FOOTPRINT.trained_count * 4
    assert {**ddp.parts, "buckets": 0} == today.parts and ddp.parts["buckets"] == buckets
    assert ddp.device["step"] == today.device["step"] + buckets and ddp.device["save"] == today.device["save"] + buckets
    unshardable = estimate(dataclasses.replace(FOOTPRINT, shards=None), sharding="fsdp", processes=4)
    assert unshardable.parts == {**today.parts, "buckets": buckets}


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_sharded_state_scales_as_one_over_n_plus_one_block(processes):
    one, sharded = estimate(), estimate(sharding="fsdp", processes=processes)
    trained, frozen = FOOTPRINT.trained_count, FOOTPRINT.frozen_count
    assert sharded.parts["weights"] == trained * 4 // processes + frozen * 4  # the encoder stays whole
    for part in ("gradients", "optimizer", "ema", "overhead"):
        assert sharded.parts[part] == pytest.approx(one.parts[part] / processes, rel=1e-6), part
    assert sharded.parts["gathered"] == (memory.FSDP_BLOCK_COPIES * BLOCK + ROOT_PARAMS) * (4 + 4)
    unsharded = sum(one.parts[p] for p in ("weights", "gradients", "optimizer", "ema", "overhead")) - frozen * 4
    expected = one.device["step"] - unsharded + unsharded / processes + sharded.parts["gathered"]
    assert sharded.device["step"] == pytest.approx(expected, rel=1e-6)
    assert sharded.device["encode"] == one.device["encode"]  # loaded and encoded whole, sharded by the trainer
    assert f"per process of {processes} sharded with FSDP" in sharded.describe()


def test_a_shard_is_the_first_dimension_split_and_padded():
    footprint = dataclasses.replace(FOOTPRINT, trained={"net": [(10, 3), (7,)]}, frozen={})
    assert memory.shard_shape((10, 3), 4) == (3, 3) and memory.shard_shape((7,), 4) == (2,)
    assert estimate(footprint, sharding="fsdp", processes=4).parts["gradients"] == (3 * 3 + 2) * 4


@pytest.fixture
def device_of(monkeypatch):
    """A GPU of ``gib`` GiB (and a RAM that holds anything)."""
    def install(gib):
        monkeypatch.setattr(memory, "available_memory", lambda device: (
            (int(gib * GIB), f"a {gib:g} GiB test GPU") if device != "cpu" else (1 << 50, "RAM")))
    return install


def smallest_fitting(footprint, settings, limit):
    return next(n for n in range(2, memory.MAX_SHARDING_DEVICES)
                if memory.estimate(footprint, dataclasses.replace(settings, sharding="fsdp",
                                                                  processes=n)).peak <= limit)


def test_a_run_too_large_for_one_device_is_told_how_many_would_hold_it(device_of):
    device_of(8)
    with pytest.raises(UserError) as error:
        memory.check(FOOTPRINT, SETTINGS)
    message = str(error.value)
    devices = smallest_fitting(FOOTPRINT, SETTINGS, int(memory.FIT_MARGIN * 8 * GIB))
    assert devices > 2 and f"sharding=fsdp over {devices} GPUs" in message and "\n" not in message
    fitted = estimate(sharding="fsdp", processes=devices)
    assert f"(estimated {fitted.peak / GIB:.1f} GiB per process)" in message
    # a sharded run asks for more devices than it has
    with pytest.raises(UserError, match=f"sharding=fsdp over {devices} GPUs"):
        memory.check(FOOTPRINT, dataclasses.replace(SETTINGS, sharding="fsdp", processes=2))
    # what is not sharded (here: 9 GiB of frozen weights) cannot be sharded away: no number of devices is proposed
    frozen = dataclasses.replace(FOOTPRINT, frozen={"encoder": 9 * GIB // 4})
    with pytest.raises(UserError) as error:
        memory.check(frozen, SETTINGS)
    assert "sharding=fsdp" not in str(error.value)


def test_a_lora_run_is_told_which_base_precision_would_fit(device_of):
    # 4 Gi frozen parameters (16 GiB in fp32) and a small adapter: bf16 (8 GiB) does not fit 7 GiB, int8 does
    lora = memory.ModelFootprint(trained={"lora": [(64, 4096)] * 16}, frozen={"net": 4 << 30},
                                 precision_options=(("base_precision=bf16", 2.0, 0),
                                                    ("base_precision=int8", 1.0, 4 << 30),
                                                    ("base_precision=nf4", 0.5, 4 << 30)))
    device_of(7)
    with pytest.raises(UserError) as error:
        memory.check(lora, dataclasses.replace(SETTINGS, use_ema=False))
    int8 = memory.estimate(dataclasses.replace(lora, frozen_param_bytes=1.0), dataclasses.replace(SETTINGS,
                                                                                                use_ema=False))
    assert f"base_precision=int8 (estimated {int8.peak / GIB:.1f} GiB)" in str(error.value)
    assert "base_precision=bf16" not in str(error.value) and "sharding=fsdp" not in str(error.value)
    # already in int8: only nf4 is lower
    assert memory.precision_to_fit(dataclasses.replace(lora, frozen_param_bytes=1.0), SETTINGS,
                                   int(20 * GIB))[0] == "base_precision=nf4"


def test_a_quantised_base_stays_whole_in_every_process():
    """sharding=fsdp over a low-bit base: the quantised weights (frozen_whole) are held whole by every process, the
    rest of the wrapped component's frozen weights sharded, what is outside it whole as ever."""
    lora = memory.ModelFootprint(trained={"net": [(64, 4096)] * 16}, frozen={"net": 4 << 30, "encoder": 1 << 20},
                                 frozen_param_bytes=1.0, frozen_whole=3 << 30,
                                 shards=memory.ShardLayout(components=("net",), largest_block=1 << 20, root=0))
    for processes in (1, 2, 4):
        weights = estimate(lora, sharding="fsdp", processes=processes).parts["weights"]
        frozen = (3 << 30) + -(-(1 << 30) // processes) + (1 << 20)
        assert weights == frozen + 16 * -(-64 // processes) * 4096 * 4
    # offered while sharded: the option's own whole weights count in its estimate
    bf16 = dataclasses.replace(lora, frozen_param_bytes=2.0, frozen_whole=0,
                               precision_options=(("base_precision=int8", 1.0, 3 << 30),))
    option, fitted = memory.precision_to_fit(bf16, dataclasses.replace(SETTINGS, sharding="fsdp", processes=4),
                                             int(100 * GIB))
    assert option == "base_precision=int8"
    assert fitted.parts["weights"] == estimate(lora, sharding="fsdp", processes=4).parts["weights"]


def test_the_families_wrap_their_blocks(tmp_path):
    from bench.train_memory import meta_zimage_model
    from modelzoo.families import family_of
    from modelzoo.presets import build_from_preset
    from modelzoo.tiny import write_vocab

    with open(os.path.join(ROOT, "bench", "configs", "zimage_turbo.json"), encoding="utf-8") as handle:
        dit = meta_zimage_model(json.load(handle), torch.float32)
    shards = family_of(dit).memory_footprint(dit, train_target="transformer", text_length=32).shards
    layers = [*dit.transformer.noise_refiner, *dit.transformer.context_refiner, *dit.transformer.layers]
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    assert shards.largest_block == max(sizes) and len(sizes) == 34
    assert shards.root == sum(p.numel() for p in dit.transformer.parameters()) - sum(sizes) > 0

    write_vocab(str(tmp_path / "vocab.txt"))
    with torch.device("meta"):
        sd = build_from_preset(os.path.join(ROOT, "configs", "shapes_ldm_small.json"), str(tmp_path / "vocab.txt"))
    unet = sd.unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for target in ("unet", "lora"):
        shards = family_of(sd).memory_footprint(sd, train_target=target).shards
        assert shards.components == ("unet",)
        assert shards.largest_block == max(sum(p.numel() for p in b.parameters()) for b in blocks)
        assert shards.root == sum(p.numel() for p in unet.parameters()) - sum(
            sum(p.numel() for p in b.parameters()) for b in blocks)
    assert family_of(sd).memory_footprint(sd, train_target="vae").shards is None
    # a ControlNet: the copies of the down blocks and the mid block are its units; the whole UNet stays frozen
    controlnet = family_of(sd).memory_footprint(sd, train_target="controlnet")
    encoder = [*unet.down_blocks, unet.mid_block]
    assert controlnet.shards.components == ("controlnet",) == tuple(controlnet.trained)
    assert controlnet.shards.largest_block == max(sum(p.numel() for p in b.parameters()) for b in encoder)
    assert controlnet.frozen["unet"] == sum(p.numel() for p in unet.parameters())
    assert controlnet.trained_count == controlnet.shards.root + sum(sum(p.numel() for p in b.parameters())
                                                                    for b in encoder)
    assert math.isclose(memory.estimate(family_of(sd).memory_footprint(sd), dataclasses.replace(
        SETTINGS, device="cpu", sharding="fsdp", processes=2)).parts["gathered"],
        (memory.FSDP_BLOCK_COPIES * shards.largest_block + shards.root) * 8)
