"""modelzoo/formats/easynlp.py: EasyNLP's latent_diffusion checkpoints read (matching EasyNLP's own code's outputs
in tests/data/easynlp/reference.safetensors, made by scripts/make_easynlp_reference.py) and written back losslessly."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelzoo import text_encoder as te
from modelzoo.families import sd
from modelzoo.formats import easynlp
from tests.helpers import EASYNLP_DATA, easynlp_checkpoint

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    path = os.path.join(EASYNLP_DATA, "reference.safetensors")
    with safe_open(path, "pt") as handle:
        prompts = json.loads(handle.metadata()["prompts"])
    return prompts, load_file(path)


def source_state():
    return torch.load(os.path.join(EASYNLP_DATA, "pytorch_model.bin"), weights_only=True)


def outputs(model, prompts, ref):
    with torch.no_grad():
        ids = model.tokenize(prompts)
        cond = model.encode_tokens(ids)
        context = ref["cond"][:len(ref["latents"])]
        eps = model.unet(ref["latents"], ref["timesteps"], encoder_hidden_states=context).sample
        decoded = model.vae.decode(ref["latents"] / model.vae_scaling_factor).sample
    return ids, cond, eps, decoded


def max_diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("prefixed", [False, True], ids=["reset_model_state_flag", "model-prefix"])
def test_matches_easynlp_with_ema(tmp_path, reference, prefixed):
    prompts, ref = reference
    model = sd.load(easynlp_checkpoint(tmp_path, prefixed=prefixed))
    assert isinstance(model.text_encoder, te.WukongTextEncoder) and model.extra["easynlp"]["ema"]
    assert model.extra["esrgan_channel_order"] == "bgr" and model.image_size == 32 and model.text_max_length == 16
    ids, cond, eps, decoded = outputs(model, prompts, ref)
    # EasyNLP's tokenisation: [CLS] … [SEP], truncation, zero padding, "[SEP]" in a prompt is text, 200-character words
    assert torch.equal(ids, ref["prompt_ids"])
    assert cond.shape == (len(prompts), 2, 16)  # pooled [SEP] output repeated n_repeat=2 times
    assert max_diff(cond, ref["cond"]) < TOLERANCE
    assert max_diff(eps, ref["eps"]) < TOLERANCE  # the EMA UNet, as EasyNLP's predictor (ema_scope)
    assert max_diff(eps, ref["eps_live"]) > 0.1
    assert max_diff(decoded, ref["decoded"]) < TOLERANCE
    images = ((decoded + 1) / 2).clamp(0, 1)
    assert max_diff(images, ref["images"]) < TOLERANCE


def test_noise_schedule_matches(reference):
    from diffusers import PNDMScheduler

    _, ref = reference
    model = sd.load(EASYNLP_DATA)
    scheduler = PNDMScheduler.from_config(model.scheduler_config)
    assert model.scheduler_class == "PNDMScheduler"  # EasyNLP samples with PLMS
    assert max_diff(scheduler.alphas_cumprod, ref["alphas_cumprod"]) < 1e-6
    noisy = scheduler.add_noise(ref["latents"], ref["noise"], ref["timesteps"])
    assert max_diff(noisy, ref["noisy"]) < TOLERANCE
    buffers = easynlp.schedule_buffers(json.load(open(os.path.join(EASYNLP_DATA, "config.json")))["model"]["params"])
    state = source_state()
    assert all(torch.equal(buffers[name], state[name]) for name in easynlp.SCHEDULE_BUFFERS)


@pytest.mark.parametrize("how", ["no-ema-weights", "use_ema-false"])
def test_live_weights_without_ema(tmp_path, reference, how):
    prompts, ref = reference
    folder = easynlp_checkpoint(tmp_path, drop_ema=how == "no-ema-weights", use_ema=how != "use_ema-false")
    model = sd.load(folder)
    assert not model.extra["easynlp"]["ema"]
    _, _, eps, _ = outputs(model, prompts, ref)
    assert max_diff(eps, ref["eps_live"]) < TOLERANCE


def assert_same_state(written, expected):
    assert list(written) == list(expected)
    for key, value in expected.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


@pytest.mark.parametrize("prefixed", [False, True])
def test_round_trip_is_lossless(tmp_path, prefixed):
    model = sd.load(easynlp_checkpoint(tmp_path / "in", prefixed=prefixed))
    files = sd.save(model, str(tmp_path / "out"))
    assert sorted(os.path.basename(f) for f in files) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    # Written without the extra prefix: what EasyNLP's LatentDiffusion loads.
    assert_same_state(torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True), source_state())
    for name in ("config.json", "vocab.txt"):
        assert (tmp_path / "out" / name).read_bytes() == open(os.path.join(EASYNLP_DATA, name), "rb").read()


def test_changed_unet_is_written_as_live_and_ema_weights(tmp_path):
    model = sd.load(EASYNLP_DATA)
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)
    sd.save(model, str(tmp_path))
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(state[key], model.unet.conv_in.weight) and torch.equal(state[easynlp.ema_name(key)], state[key])
    other = "model.diffusion_model.out.2.weight"
    assert torch.equal(state[easynlp.ema_name(other)], state[other])  # no stale live weights beside new EMA ones
    assert torch.equal(state["model_ema.num_updates"], source_state()["model_ema.num_updates"])
    again = sd.load(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_own_format_keeps_the_wukong_encoder_and_writes_back(tmp_path, reference):
    prompts, ref = reference
    model = sd.load(EASYNLP_DATA)
    sd.save(model, str(tmp_path / "own"), format="easynlp-ldm")
    own = sd.load(str(tmp_path / "own"))
    assert json.load(open(tmp_path / "own" / "config.json"))["format"] == "easynlp-ldm"
    assert isinstance(own.text_encoder, te.WukongTextEncoder) and own.text_encoder.settings["n_repeat"] == 2
    assert torch.equal(own.tokenize(prompts), ref["prompt_ids"])  # EasyNLP's tokenizer settings kept
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), model.state_dict().values()))
    # Without the source's config (a model never read from EasyNLP's format), a config is built from the modules.
    own.extra.pop("easynlp")
    sd.save(own, str(tmp_path / "built"), format="easynlp")
    params = json.load(open(tmp_path / "built" / "config.json"))["model"]["params"]
    assert params["use_ema"] is False and params["cond_stage_config"]["params"]["n_repeat"] == 2
    back = sd.load(str(tmp_path / "built"))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_unet_and_vae_names_come_from_diffusers_converters():
    model = sd.load(EASYNLP_DATA)
    state = source_state()
    unet_names = set(easynlp.unet_key_map(model.unet))
    vae_map = easynlp.vae_key_map(model.vae)
    assert unet_names == {k for k in state if k.startswith(easynlp.UNET_PREFIX)}
    assert set(vae_map) == {k for k in state if k.startswith(easynlp.VAE_PREFIX)}
    squeezed = sorted(k for k, (_, flag) in vae_map.items() if flag)  # the VAE's 1×1 attention convolutions
    assert squeezed and all(".mid.attn_1." in k and k.endswith(".weight") for k in squeezed)


def test_per_token_text_encoders_cannot_be_written(tiny_model_dir, tmp_path):
    model = sd.load(tiny_model_dir)
    with pytest.raises(easynlp.NotExpressible, match="Wukong text transformer"):
        sd.save(model, str(tmp_path), format="easynlp")


def test_other_conditioning_is_refused_clearly(tmp_path):
    folder = easynlp_checkpoint(tmp_path)
    config = json.load(open(os.path.join(folder, "config.json")))
    config["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match="FrozenWukongCLIPTextEmbedder"):
        sd.load(folder)
