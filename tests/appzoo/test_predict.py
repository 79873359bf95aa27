import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from easynlp_ldm import cli

PROMPTS = ["红色的圆形", "蓝色正方形在白色背景上", "一个黄色的三角形", "请画一个绿色的圆形", "灰色背景上的紫色正方形"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("EASYNLP_PROGRESS", "0")


@pytest.fixture
def prompts_table(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("".join(f"p{i}\t{p}\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    return str(path)


def predict_argv(table, out, model, *extra, udp="ddim_steps=4"):
    return ["--mode=predict", f"--tables={table}", "--input_schema=idx:str:1,text:str:1", f"--outputs={out}",
            "--first_sequence=text", f"--checkpoint_dir={model}", "--random_seed=7", "--micro_batch_size=2",
            "--app_name=latent_diffusion", *extra, f"--user_defined_parameters={udp}"]


def read_rows(path):
    return [line.split("\t") for line in open(path, encoding="utf-8").read().splitlines()]


def decode(cell):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(cell))).convert("RGB"), dtype=np.int16)


def test_seed_predict_command_as_published(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "T2I_test.tsv").write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(PROMPTS[:3])),
                                           encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    os.symlink(tiny_model_dir, tmp_path / "finetuned_model")
    argv = ["--mode=predict", "--worker_gpu=1", "--tables=T2I_test.tsv", "--input_schema=idx:str:1,text:str:1",
            "--output_schema=text", "--outputs=./output.tsv", "--first_sequence=text",
            "--checkpoint_dir=./finetuned_model", "--random_seed=42", "--logging_steps=100",
            "--save_checkpoint_steps=500", "--sequence_length=32", "--micro_batch_size=16",
            "--app_name=latent_diffusion",
            "--user_defined_parameters=\nn_samples=2\nwrite_image=True\nimage_prefix=./output/\nddim_steps=3\n"]
    assert cli.main(argv) == 0
    rows = read_rows(tmp_path / "output.tsv")
    assert [r[0] for r in rows] == [p for p in PROMPTS[:3] for _ in range(2)]
    for i, prompt in enumerate(PROMPTS[:3]):
        folder = tmp_path / "output" / str(i)
        assert sorted(os.listdir(folder)) == ["0000.png", "0001.png", "line.txt", "prompt.txt"]
        assert (folder / "prompt.txt").read_text(encoding="utf-8").strip() == prompt
        assert Image.open(folder / "0000.png").size == (32, 32)


def test_rows_per_prompt_order_schema_and_append_cols(tiny_model_dir, prompts_table, tmp_path):
    out = str(tmp_path / "o.tsv")
    argv = predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=idx,sample_id,seed,gen_imgbase64",
                        "--append_cols=text", udp="n_samples=2 n_iter=2 ddim_steps=2 image_format=jpeg")
    assert cli.main(argv) == 0
    rows = read_rows(out)
    assert len(rows) == len(PROMPTS) * 4
    assert [(r[0], r[1], r[4]) for r in rows] == [(f"p{i}", str(s), p) for i, p in enumerate(PROMPTS)
                                                  for s in range(4)]
    assert len({r[2] for r in rows}) == len(rows)  # a seed per image
    assert base64.b64decode(rows[0][3])[:2] == b"\xff\xd8"  # JPEG, plain base64 (not b'...')


def test_output_schema_and_size_errors(tiny_model_dir, prompts_table, tmp_path, capsys):
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir,
                                 "--output_schema=idx,image")) == 2
    assert "unknown column 'image'" in capsys.readouterr().err
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp="H=34")) == 2
    assert "H=34 must be a multiple of 8" in capsys.readouterr().err
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp="sampler=magic")) == 2
    assert "unknown sampler 'magic'" in capsys.readouterr().err
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp="do_sr=True")) == 2
    assert "no RRDB_ESRGAN_x4.pth" in capsys.readouterr().err


@pytest.mark.parametrize("sampler,guidance", [("", 5.0), ("euler-ancestral", 7.5), ("ddim", 3.0)])
def test_parity_with_diffusers_pipeline(tiny_model_dir, prompts_table, tmp_path, sampler, guidance):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    out = str(tmp_path / "o.tsv")
    argv = predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=text,seed,gen_imgbase64",
                        udp=f"n_samples=1 ddim_steps=6 scale={guidance} optimize=none"
                        + (f" sampler={sampler}" if sampler else ""))
    assert cli.main(argv) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    swap = {"euler-ancestral": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler}.get(sampler)
    if swap:  # the pipeline's constructor applies its scheduler fixes (e.g. DDIM's clip_sample=False for latents)
        pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": swap.from_config(pipe.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed, cell in read_rows(out)[:2]:
        reference = pipe(prompt, generator=torch.Generator("cpu").manual_seed(int(seed)), num_inference_steps=6,
                         guidance_scale=guidance, height=32, width=32).images[0]
        difference = np.abs(decode(cell) - np.asarray(reference, dtype=np.int16)).max()
        assert difference <= 3, difference


def test_image_depends_on_seed_not_batch(tiny_model_dir):
    from appzoo.latent_diffusion.generation import GenerationSettings, Generator
    from modelzoo.ldm import LatentDiffusion

    model = LatentDiffusion.from_pretrained(tiny_model_dir)
    generate = Generator(model, GenerationSettings(steps=4))
    alone = np.asarray(generate([PROMPTS[1]], [1234])[0], dtype=np.int16)
    crowd = generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [99, 1234, 5])
    assert np.abs(np.asarray(crowd[1], dtype=np.int16) - alone).max() <= 1
    assert np.abs(np.asarray(crowd[0], dtype=np.int16) - alone).max() > 10


def test_micro_batch_size_does_not_change_images(tiny_model_dir, prompts_table, tmp_path):
    a, b = str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")
    assert cli.main(predict_argv(prompts_table, a, tiny_model_dir, "--micro_batch_size=1")) == 0
    assert cli.main(predict_argv(prompts_table, b, tiny_model_dir, "--micro_batch_size=3")) == 0
    for row_a, row_b in zip(read_rows(a), read_rows(b)):
        assert np.abs(decode(row_a[2]) - decode(row_b[2])).max() <= 1


def test_idx_with_dot_dot_cannot_escape_image_prefix(tiny_model_dir, tmp_path):
    table = tmp_path / "evil.tsv"
    table.write_text("../../x\t红色的圆形\n/etc/passwd\t蓝色\n..\t黄色\n", encoding="utf-8")
    prefix = tmp_path / "images"
    assert cli.main(predict_argv(str(table), str(tmp_path / "o.tsv"), tiny_model_dir, "--output_schema=image_path",
                                 udp=f"n_samples=1 ddim_steps=2 write_image=True image_prefix={prefix}")) == 0
    paths = [r[0] for r in read_rows(tmp_path / "o.tsv")]
    assert len(paths) == 3
    for path in paths:
        assert os.path.commonpath([str(prefix), os.path.abspath(path)]) == str(prefix) and os.path.isfile(path)
    assert not (tmp_path.parent / "x").exists()


def test_interrupted_predict_resumes_writing_each_row_once(tiny_model_dir, prompts_table, tmp_path, monkeypatch,
                                                           caplog):
    from appzoo.latent_diffusion import predict

    full, out = str(tmp_path / "full.tsv"), str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, full, tiny_model_dir, udp="n_samples=2 ddim_steps=2")) == 0
    original, calls = predict.Generator.__call__, {"n": 0}

    def dies_on_third_batch(self, prompts, seeds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, prompts, seeds)

    monkeypatch.setattr(predict.Generator, "__call__", dies_on_third_batch)
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="n_samples=2 ddim_steps=2")) == 130
    assert len(read_rows(out)) == 8  # two batches of two prompts
    with open(out, "a", encoding="utf-8") as handle:
        handle.write("p4\thalf a row")  # a write cut short by the crash
    monkeypatch.setattr(predict.Generator, "__call__", original)
    caplog.set_level("INFO")
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="n_samples=2 ddim_steps=2")) == 0
    assert "resuming" in caplog.text and "after input line 4" in caplog.text
    assert read_rows(out) == read_rows(full)
    caplog.clear()
    # Other settings: the output is replaced, and the log says so.
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="n_samples=1 ddim_steps=2")) == 0
    assert "replacing" in caplog.text and len(read_rows(out)) == len(PROMPTS)


def test_bad_prompt_rows_stop_or_skip(tiny_model_dir, tmp_path, capsys):
    table = tmp_path / "t.tsv"
    table.write_bytes("a\t红色\nb\t多\t一列\n".encode() + b"c\t\xff\n" + "d\t绿色\n".encode())
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(str(table), out, tiny_model_dir, udp="n_samples=1 ddim_steps=2")) == 2
    assert f"{table}, line 2: wrong column count" in capsys.readouterr().err
    assert cli.main(predict_argv(str(table), out, tiny_model_dir,
                                 udp="n_samples=1 ddim_steps=2 skip_bad_rows=True")) == 0
    assert [r[0] for r in read_rows(out)] == ["a", "d"]


def test_super_resolution_with_model_rrdb(tmp_path, prompts_table):
    from modelzoo.esrgan import RRDBNet
    from modelzoo.tiny import make_tiny_diffusers_model

    torch.manual_seed(0)
    rrdb = RRDBNet(nf=8, nb=1, gc=4).state_dict()
    model = make_tiny_diffusers_model(str(tmp_path / "m"), esrgan_state=rrdb)
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, out, model, udp="n_samples=1 ddim_steps=2 do_sr=True sr_tile=8")) == 0
    assert decode(read_rows(out)[0][2]).shape == (128, 128, 3)


def test_trained_folder_predicts_alone_and_evaluate_reports_loss(tiny_model_dir, shapes_data, tmp_path, capsys):
    from tests.appzoo.conftest import train_argv

    out = str(tmp_path / "run")
    assert cli.main(train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=1")) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("config.json", "pytorch_model.bin", "vocab.txt"):
        os.link(os.path.join(out, name), alone / name)
    assert cli.main(predict_argv(os.path.join(shapes_data, "T2I_test.tsv"), str(tmp_path / "o.tsv"), str(alone),
                                 udp="n_samples=1 ddim_steps=2")) == 0
    assert len(read_rows(tmp_path / "o.tsv")) == 6
    capsys.readouterr()
    assert cli.main(["--mode=evaluate", f"--tables={os.path.join(shapes_data, 'T2I_val.tsv')}",
                     f"--checkpoint_dir={alone}", f"--outputs={tmp_path / 'metrics.json'}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"] == 8 and 0 < printed["val_loss"] < 5
    assert json.load(open(tmp_path / "metrics.json")) == printed


def test_guidance_cutoff_matches_diffusers_callback_and_halves_late_steps(tiny_model_dir, prompts_table, tmp_path):
    """guidance_cutoff=0.75 of 4 steps: 3 guided UNet calls on 2×batch, then 1 on the batch alone — what diffusers'
    SDCFGCutoffCallback(cutoff_step_ratio=0.5) does for a single prompt; and batches of several prompts work."""
    from diffusers import StableDiffusionPipeline
    from diffusers.callbacks import SDCFGCutoffCallback

    from appzoo.latent_diffusion.generation import GenerationSettings, Generator
    from modelzoo.ldm import LatentDiffusion

    settings = GenerationSettings(steps=4, guidance_cutoff=0.75)
    model = LatentDiffusion.from_pretrained(tiny_model_dir)
    batch_sizes = []
    model.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    generate = Generator(model, settings)
    images = generate(PROMPTS[:3], [7, 8, 9])
    assert batch_sizes == [6, 6, 6, 3]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed, image in zip(PROMPTS[:3], [7, 8, 9], images):
        reference = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=4,
                         guidance_scale=5.0, height=32, width=32,
                         callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images[0]
        assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16)).max() <= 3
    batch_sizes.clear()
    Generator(model, GenerationSettings(steps=4))([PROMPTS[0]], [7])
    assert batch_sizes == [2, 2, 2, 2]  # the default guides every step, as diffusers does
