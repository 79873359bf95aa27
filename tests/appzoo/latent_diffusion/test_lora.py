"""LoRA: trained with train_target=lora, read by diffusers as it is, applied (stacked, scaled, merged) everywhere a
model is loaded, and kohya-ss files read too."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from appzoo.latent_diffusion.generation import Generator, build_pipeline
from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.settings import GenerationSettings
from easynlp_ldm import cli
from modelzoo.families import sd
from modelzoo.lora import LORA_FILE, load_adapters, parse_specs, select_adapters
from tests.helpers import (
    PROMPTS,
    decode,
    interrupt_after_first_checkpoint,
    predict_argv,
    random_adapter,
    read_rows,
    train_argv,
)

STEPS, GUIDANCE = 4, 5.0


def make_adapter(model_dir, folder, seed, rank=4, alpha=8):
    """A LoRA of the tiny model with random (non-zero) up-projections, saved as train_target=lora saves one."""
    from modelzoo.families.sd import ATTENTION_TARGETS, FEED_FORWARD_TARGETS

    return random_adapter(sd.load(model_dir), folder, ATTENTION_TARGETS + FEED_FORWARD_TARGETS, seed, rank, alpha,
                          scale=0.3)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, str(tmp_path_factory.mktemp("lora") / "a"), seed=1)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, shapes_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "run")
    argv = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=2",
                      "--learning_rate=2e-2", "--warmup_proportion=0", "--save_checkpoint_steps=4",
                      udp="train_target=lora lora_rank=4 lora_alpha=8 caption_dropout=0")
    os.environ["EASYNLP_PROGRESS"] = "0"
    assert cli.main(argv) == 0
    return out


def diffusers_pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompt, seed):
    image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, height=32, width=32).images[0]
    return np.asarray(image, dtype=np.int16)


def ours(model, prompt, seed):
    image = Generator(model, GenerationSettings(steps=STEPS, guidance_scale=GUIDANCE))([prompt], [seed])[0]
    return np.asarray(image, dtype=np.int16)


def test_training_writes_a_small_adapter_that_diffusers_loads(trained, tiny_model_dir):
    files = sorted(os.listdir(trained))
    assert LORA_FILE in files and "pytorch_model.bin" not in files and "config.json" not in files
    assert os.path.isfile(os.path.join(trained, "last", LORA_FILE))
    with safe_open(os.path.join(trained, LORA_FILE), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    assert {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in keys} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    state = load_file(os.path.join(trained, LORA_FILE))
    assert max(float(v.abs().max()) for k, v in state.items() if ".lora.up." in k) > 0  # it learned something
    config = json.loads(metadata["lora_adapter_metadata"])  # the adapter's config, which diffusers reads back
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8
    unet_bytes = sum(os.path.getsize(os.path.join(tiny_model_dir, "unet", f))
                     for f in os.listdir(os.path.join(tiny_model_dir, "unet")))
    assert os.path.getsize(os.path.join(trained, LORA_FILE)) < unet_bytes / 4
    pipe = diffusers_pipe(tiny_model_dir)
    before = reference(pipe, PROMPTS[0], 0)
    pipe.load_lora_weights(trained)
    assert np.abs(reference(pipe, PROMPTS[0], 0) - before).max() > 0


def test_a_text_encoder_lora_trains_and_loads_as_diffusers_loads_it(tiny_model_dir, shapes_data, tmp_path):
    """lora_text_encoder=True with transformers 5 and the peft on PyPI (< 0.22, which transformers' add_adapter
    refuses): the text encoder's adapter is trained, saved in diffusers' format, and encodes a prompt here as it
    does in diffusers after pipe.load_lora_weights."""
    out = str(tmp_path / "run")
    argv = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1",
                      "--learning_rate=2e-2", "--warmup_proportion=0",
                      udp="train_target=lora lora_text_encoder=True caption_dropout=0")
    assert cli.main(argv) == 0
    state = load_file(os.path.join(out, LORA_FILE))
    text = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
    assert text and max(float(v.abs().max()) for k, v in text.items() if ".up." in k) > 0
    pipe = diffusers_pipe(tiny_model_dir)
    ids = pipe.tokenizer([PROMPTS[0]], padding="max_length", max_length=16, return_tensors="pt").input_ids
    before = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(out)
    theirs = pipe.text_encoder(ids)[0]
    assert (theirs - before).abs().max() > 1e-4  # the adapter changes the encoding: the comparison means something
    mine = load_model(tiny_model_dir, device="cpu", lora=out).text_encoder(ids)[0]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_the_same_adapter_has_the_same_metadata_in_every_process(tiny_model_dir, tmp_path):
    """The file's metadata holds the adapter's config, whose target modules are a set in peft: written sorted, not in
    the order of the process's string hashing. (The file's bytes may still differ: safetensors orders its metadata
    keys by a hash map of its own.)"""
    import subprocess
    import sys

    from tests.helpers import ROOT

    written = []
    for hash_seed in ("1", "2"):
        folder = str(tmp_path / hash_seed)
        code = (f"import torch; torch.manual_seed(0); from tests.appzoo.latent_diffusion.test_lora import "
                f"make_adapter; make_adapter({tiny_model_dir!r}, {folder!r}, seed=1)")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        with safe_open(os.path.join(folder, LORA_FILE), "pt") as handle:
            written.append((handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}))
    (metadata, tensors), (other_metadata, other_tensors) = written
    assert metadata == other_metadata
    assert tensors.keys() == other_tensors.keys() and all(torch.equal(v, other_tensors[k]) for k, v in tensors.items())


def test_predict_with_lora_matches_diffusers_load_lora_weights(adapter, tiny_model_dir, prompts_table, tmp_path):
    out = str(tmp_path / "o.tsv")
    argv = predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=text,seed,gen_imgbase64",
                        udp=f"n_samples=1 ddim_steps={STEPS} scale={GUIDANCE} optimize=none lora={adapter}")
    assert cli.main(argv) == 0
    pipe = diffusers_pipe(tiny_model_dir)
    rows = read_rows(out)[:2]
    without = [reference(pipe, prompt, int(seed)) for prompt, seed, _ in rows]
    pipe.load_lora_weights(adapter)
    for (prompt, seed, cell), plain in zip(rows, without):
        with_lora = reference(pipe, prompt, int(seed))
        assert np.abs(decode(cell) - with_lora).max() <= 3
        assert np.abs(with_lora - plain).max() > 10  # the adapter changes the image: the comparison means something


def second_adapter(adapter, folder):
    """Another adapter: the trained one with its up-projections permuted and rescaled, same metadata."""
    path = os.path.join(adapter, LORA_FILE)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    state = {k: (v.flip(0) * -1.5 if ".lora.up." in k else v) for k, v in load_file(path).items()}
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "other.safetensors"), metadata=metadata)
    return os.path.join(folder, "other.safetensors")


def test_two_stacked_adapters_with_scales_match_diffusers_set_adapters(adapter, tiny_model_dir, tmp_path):
    other = second_adapter(adapter, str(tmp_path))
    model = load_model(tiny_model_dir, optimize="none", lora=f"{adapter}:0.7,{other}:0.4")
    pipe = diffusers_pipe(tiny_model_dir)
    pipe.load_lora_weights(adapter, adapter_name="a")
    pipe.load_lora_weights(str(tmp_path), weight_name="other.safetensors", adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    for seed, prompt in enumerate(PROMPTS[:2]):
        assert np.abs(ours(model, prompt, seed) - reference(pipe, prompt, seed)).max() <= 3


def test_a_merged_export_equals_the_adapter_applied_at_scale_1(adapter, tiny_model_dir, tmp_path):
    merged_dir = str(tmp_path / "merged")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={merged_dir}",
                     f"--user_defined_parameters=export_format=diffusers lora={adapter}"]) == 0
    merged = load_model(merged_dir, optimize="none")
    live = load_model(tiny_model_dir, optimize="none")
    load_adapters(live, parse_specs(adapter), fuse=False, names=["a"])  # the adapter layers kept, run at call time
    select_adapters(build_pipeline(live), (("a", 1.0),))
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 20])
    embeds = live.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        difference = (merged.unet(latents, t, embeds).sample - live.unet(latents, t, embeds).sample).abs().max()
    assert difference <= 1e-5


def test_a_kohya_format_file_loads(adapter, tiny_model_dir, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    diffusers_format = load_file(os.path.join(adapter, LORA_FILE))
    peft = {"unet." + k: v for k, v in convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in diffusers_format.items()}).items()}
    kohya = convert_state_dict_to_kohya(peft)
    for key in [k for k in kohya if k.endswith("lora_down.weight")]:  # alpha 8 at rank 4, as trained
        kohya[key.replace("lora_down.weight", "alpha")] = torch.tensor(8.0)
    assert all(k.startswith("lora_unet_") for k in kohya)
    path = str(tmp_path / "kohya_style.safetensors")
    save_file(kohya, path)
    from_kohya = load_model(tiny_model_dir, optimize="none", lora=path)
    from_diffusers = load_model(tiny_model_dir, optimize="none", lora=adapter)
    assert np.abs(ours(from_kohya, PROMPTS[0], 3) - ours(from_diffusers, PROMPTS[0], 3)).max() <= 1


@pytest.mark.parametrize("spec,message", [("missing.safetensors", "does not exist"), ("{adapter}:big", "scale"),
                                          ("{model}", "has no pytorch_lora_weights.safetensors")])
def test_bad_lora_specs_are_one_line_errors(adapter, tiny_model_dir, prompts_table, tmp_path, capsys, spec, message):
    spec = spec.format(adapter=adapter, model=tiny_model_dir)
    argv = predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp=f"lora={spec}")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_service_switches_adapters_per_request_without_reloading(adapter, tiny_model_dir, tmp_path):
    import httpx

    from tests.helpers import InProcessServer, png

    other = second_adapter(adapter, str(tmp_path))
    model = load_model(tiny_model_dir, optimize="auto", precision="fp32", lora_library=f"a={adapter},b={other}")
    server = InProcessServer(tiny_model_dir, model=model)
    try:
        def image(**fields):
            body = {"text": PROMPTS[0], "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "seed": 5, **fields}
            response = httpx.post(server.url + "/", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return np.asarray(png(response.json()["images_base64"][0]), dtype=np.int16)

        with_a, plain, stacked, with_a_again = image(lora={"a": 1}), image(), image(lora={"a": 0.7, "b": 0.4}), \
            image(lora={"a": 1.0})
        assert np.abs(with_a - with_a_again).max() <= 1
        for got, spec in ((with_a, adapter), (plain, ""), (stacked, f"{adapter}:0.7,{other}:0.4")):
            assert np.abs(got - ours(load_model(tiny_model_dir, optimize="none", lora=spec), PROMPTS[0], 5)).max() <= 3
        assert np.abs(with_a - plain).max() > 10
        bad = httpx.post(server.url + "/", json={"text": "x", "lora": {"zzz": 1}}, timeout=30)
        assert bad.status_code == 400 and bad.json()["field"] == "lora" and "a, b" in bad.json()["error"]
        assert httpx.get(server.url + "/info", timeout=10).json()["lora_adapters"] == ["a", "b"]
        assert model.optimization["fused_qkv"] != True  # noqa: E712 — switchable adapters keep projections unfused
    finally:
        server.stop()


def test_lora_training_resumes_to_the_same_adapter(tiny_model_dir, shapes_data, tmp_path, monkeypatch):
    """A run killed after its first checkpoint and resumed ends with the adapter of a run never stopped (the EMA and
    optimiser state of the LoRA parameters are in the training state)."""
    common = ["--micro_batch_size=8", "--learning_rate=1e-2", "--warmup_proportion=0", "--save_checkpoint_steps=3",
              "--epoch_num=2"]
    udp = "train_target=lora lora_rank=2 caption_dropout=0.2 ema_decay=0.9"
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert cli.main(train_argv(shapes_data, straight, tiny_model_dir, *common, udp=udp)) == 0
    interrupt_after_first_checkpoint(monkeypatch, train_argv(shapes_data, resumed, tiny_model_dir, *common, udp=udp))
    assert cli.main(train_argv(shapes_data, resumed, tiny_model_dir, *common, f"--resume_from_checkpoint={resumed}",
                               udp=udp)) == 0
    a, b = (load_file(os.path.join(run, "last", LORA_FILE)) for run in (straight, resumed))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_lora_on_an_easynlp_format_model(tmp_path):
    """EasyNLP's own latent_diffusion checkpoint (Wukong text encoder, CompVis UNet): an adapter of its UNet saves
    and applies as on any other model."""
    from tests.helpers import easynlp_checkpoint

    model_dir = easynlp_checkpoint(str(tmp_path / "easynlp"))
    folder = make_adapter(model_dir, str(tmp_path / "lora"), seed=2)
    plain = ours(load_model(model_dir, optimize="none"), PROMPTS[0], 1)
    assert np.abs(ours(load_model(model_dir, optimize="none", lora=folder), PROMPTS[0], 1) - plain).max() > 10


def test_lora_in_two_processes_trains_like_one(tiny_model_dir, shapes_data, tmp_path):
    """torch.distributed (gloo, two processes of 4) gives the adapter one process of 8 gives."""
    from tests.helpers import easynlp_process, finished_output, free_port

    common = ["--epoch_num=2", "--learning_rate=1e-2", "--warmup_proportion=0", "--save_checkpoint_steps=3"]
    udp = "train_target=lora lora_rank=2 caption_dropout=0 use_ema=False"
    runs = {"one": ["--micro_batch_size=8"], "two": ["--micro_batch_size=4", "--worker_gpu=2",
                                                     f"--master_port={free_port()}"]}
    started = [easynlp_process(train_argv(shapes_data, str(tmp_path / name), tiny_model_dir, *extra, *common,
                                          udp=udp)) for name, extra in runs.items()]
    for process in started:
        finished_output(process)
    a, b = (load_file(os.path.join(tmp_path, name, "last", LORA_FILE)) for name in runs)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
