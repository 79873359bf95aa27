"""pipeline.py and ``from easynlp_ldm import pipeline``: the Python API gives predict's images, one record per image."""

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from easynlp_ldm import cli, pipeline
from easynlp_ldm.errors import UserError
from tests.helpers import aigc_fields, decode, predict_argv, read_rows, shows_visible_label


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_records_per_image_equal_predict_rows(tiny_model_dir, prompts_table, tmp_path):
    gen = pipeline("latent_diffusion", tiny_model_dir, pipeline_params={"n_samples": 2}, ddim_steps=3,
                   optimize="none", random_seed=7)
    prompts = [line.split("\t")[1] for line in open(prompts_table, encoding="utf-8").read().splitlines()[:2]]
    records = gen(prompts)
    assert [(r["idx"], r["text"], r["sample_id"]) for r in records] == [
        (0, prompts[0], 0), (0, prompts[0], 1), (1, prompts[1], 0), (1, prompts[1], 1)]
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=text,seed,gen_imgbase64",
                                 udp="n_samples=2 ddim_steps=3 optimize=none")) == 0
    for record, (text, seed, cell) in zip(records, read_rows(out)):
        assert record["text"] == text and record["seed"] == int(seed)
        assert np.abs(pixels(record["image"]) - decode(cell)).max() <= 1
        assert pixels(Image.open(io.BytesIO(base64.b64decode(record["image_base64"])))).tolist() == \
            pixels(record["image"]).tolist()


def test_initial_latents_as_diffusers_takes_them(tiny_model_dir):
    gen = pipeline("latent_diffusion", tiny_model_dir, n_samples=1, ddim_steps=3, optimize="none")
    first = gen("红色的圆形")[0]
    own = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(first["seed"]))
    assert np.abs(pixels(gen("红色的圆形", latents=own)[0]["image"]) - pixels(first["image"])).max() == 0
    assert np.abs(pixels(gen("红色的圆形", latents=own * 0.5)[0]["image"]) - pixels(first["image"])).max() > 3
    with pytest.raises(UserError, match="latents: 2 given for 1 images"):
        gen("红色的圆形", latents=torch.zeros(2, 4, 16, 16))


def test_parameters_are_validated_like_the_command_line(tiny_model_dir):
    with pytest.raises(UserError, match="pipeline\\(\\): unknown key 'n_sample' \\(did you mean n_samples\\?\\)"):
        pipeline("latent_diffusion", tiny_model_dir, n_sample=1)
    with pytest.raises(UserError, match="pipeline\\(\\): ddim_steps='many' is not a valid int"):
        pipeline("latent_diffusion", tiny_model_dir, ddim_steps="many")
    with pytest.raises(UserError, match="pipeline\\(\\): n_samples=1.5 is not a valid int"):
        pipeline("latent_diffusion", tiny_model_dir, n_samples=1.5)
    with pytest.raises(UserError, match="pipeline\\(\\) model 'chinese-ldm-general' not found: no such local folder"):
        pipeline("chinese-ldm-general")  # EasyNLP's task name: its model, looked up by name, never downloaded


# EasyNLP's examples/latent_diffusion/pipeline_example.py, word for word but for the import line, the model name and
# the output folder (and numpy's transpose for einops' rearrange 'c h w -> h w c', which is the user's own library).
EASYNLP_EXAMPLE = """
from easynlp_ldm import pipeline
generator = pipeline(MODEL, pipeline_params={"n_samples":1,"do_sr":False,'not_use_gradient_checkpoint':True,
                                             "ddim_steps": 3, "optimize": "none"})
data = ['绿色外套搭配蓝色牛仔裤']
generator.reset(n_samples=2,sample_steps=4)
result=generator(data)
for one_prompt in result:
    for idx,one_image_tensor_raw in enumerate(one_prompt['image_tensor']):
        one_image_tensor = 255. * rearrange(one_image_tensor_raw.cpu().numpy(), 'c h w -> h w c')
        pil_image=Image.fromarray(one_image_tensor.astype(np.uint8))
        pil_image.save(os.path.join(OUT,one_prompt['text']+f"_{idx:04}.png"))
        b64_image=image_to_base64(pil_image)
"""


def test_easynlp_pipeline_example_runs_with_only_the_import_changed(tiny_model_dir, tmp_path, monkeypatch):
    zoo = tmp_path / "easynlp" / "modelzoo"
    zoo.mkdir(parents=True)
    os.symlink(tiny_model_dir, zoo / "chinese-ldm-general")  # where EasyNLP unpacks the model of its task name
    monkeypatch.setenv("EASYNLP_CACHE_ROOT", str(tmp_path / "easynlp"))

    def image_to_base64(img):
        buffer = io.BytesIO()
        img.save(buffer, format="png")
        return str(base64.b64encode(buffer.getvalue()), "utf-8")

    namespace = {"MODEL": "chinese-ldm-general", "OUT": str(tmp_path), "Image": Image, "np": np, "os": os,
                 "image_to_base64": image_to_base64, "rearrange": lambda array, _: np.transpose(array, (1, 2, 0))}
    exec(EASYNLP_EXAMPLE, namespace)
    result = namespace["result"]
    assert [(r["idx"], r["sample_id"]) for r in result] == [(0, 0), (0, 1)]  # reset(n_samples=2) applied
    same = pipeline("latent_diffusion", tiny_model_dir, n_samples=2, ddim_steps=4, optimize="none")(
        "绿色外套搭配蓝色牛仔裤")
    for record, twin in zip(result, same):  # reset(sample_steps=4) applied: predict's images for 4 steps
        assert pixels(record["image"]).tolist() == pixels(twin["image"]).tolist()
        assert record["image_tensor"] is result[0]["image_tensor"]  # EasyNLP: each record holds its prompt's batch
        assert record["gen_imgbase64"] == record["image_base64"].encode("ascii")
    for k in range(2):
        saved = pixels(Image.open(tmp_path / f"绿色外套搭配蓝色牛仔裤_{k:04}.png"))
        assert saved.tolist() == pixels(result[k]["image"]).tolist()


def test_model_name_first_and_easynlp_task_names(tiny_model_dir, caplog):
    by_path = pipeline(tiny_model_dir, n_samples=1, ddim_steps=2, optimize="none")("红色的圆形")[0]
    by_task = pipeline("chinese-ldm-general", tiny_model_dir, n_samples=1, ddim_steps=2, optimize="none")(
        "红色的圆形")[0]
    assert pixels(by_path["image"]).tolist() == pixels(by_task["image"]).tolist()
    with caplog.at_level("WARNING", logger="easynlp"):
        pipeline(tiny_model_dir, "/elsewhere", n_samples=1, optimize="none")
    assert "model_path is ignored (as in EasyNLP)" in caplog.text


def test_reset_checks_what_it_changes(tiny_model_dir, tmp_path):
    gen = pipeline("latent_diffusion", tiny_model_dir, n_samples=1, ddim_steps=2, optimize="none")
    with pytest.raises(UserError, match="reset\\(\\): n_samples=0"):
        gen.reset(n_samples=0)
    with pytest.raises(UserError, match="reset\\(\\): lora is decided when the model loads"):
        gen.reset(lora="x.safetensors")
    gen.reset(n_samples=3)
    assert len(gen("红色的圆形")) == 3 and gen.settings.ddim_steps == 2  # the rest kept


def test_write_image_writes_easynlp_style_folders(tiny_model_dir, tmp_path):
    prefix = tmp_path / "images"
    gen = pipeline("latent_diffusion", tiny_model_dir, n_samples=2, ddim_steps=2, optimize="none",
                   write_image=True, image_prefix=str(prefix))
    first = gen(["红色的圆形", "蓝色的方形"])
    second = gen("绿色的三角形")  # a second call numbers on: nothing of the first is overwritten
    assert sorted(os.listdir(prefix)) == ["0", "1", "2"]
    assert (prefix / "1" / "prompt.txt").read_text(encoding="utf-8") == "蓝色的方形\n"
    for record in first[2:] + second:
        assert pixels(Image.open(record["path"])).tolist() == pixels(record["image"]).tolist()


def test_encoded_images_and_files_carry_the_aigc_label(tiny_model_dir, tmp_path):
    gen = pipeline("latent_diffusion", tiny_model_dir, n_samples=2, ddim_steps=2, optimize="none", write_image=True,
                   image_prefix=str(tmp_path / "images"), aigc_propagator="平台")
    records = gen(["红色的圆形", "蓝色的正方形"])
    assert len({r["aigc_produce_id"] for r in records}) == 4
    for record in records:
        data = base64.b64decode(record["image_base64"])
        with open(record["path"], "rb") as handle:
            assert handle.read() == data
        fields = aigc_fields(data)
        assert fields["ProduceID"] == record["aigc_produce_id"] and fields["ContentPropagator"] == "平台"
        assert pixels(Image.open(io.BytesIO(data))).tolist() == pixels(record["image"]).tolist()
    gen.reset(aigc_visible_label=True)
    shown = gen("红色的圆形")[0]
    assert shows_visible_label(Image.open(io.BytesIO(base64.b64decode(shown["image_base64"]))))
    assert not shows_visible_label(shown["image"])  # the generated pixels; the encoded image is what is offered
