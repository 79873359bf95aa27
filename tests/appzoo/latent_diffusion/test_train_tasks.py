import json
import os

import torch

from easynlp_ldm import cli
from modelzoo.families import sd
from tests.helpers import controlnet_argv, kill_after_first_checkpoint, logged_images, train_argv, with_control_column


def train_vae(target, model_dir, data, out, udp=""):
    """Two epochs of ``train_target=TARGET`` from ``model_dir``; (source model, trained model)."""
    assert cli.main(train_argv(data, out, model_dir, "--micro_batch_size=16", "--epoch_num=2",
                               "--learning_rate=1e-3", udp=f"train_target={target} {udp}")) == 0
    return sd.load(model_dir), sd.load(out)


def test_train_vae_changes_only_the_vae_and_sets_latent_scaling(tiny_model_dir, shapes_data, tmp_path):
    out = str(tmp_path / "vae")
    source, trained = train_vae("vae", tiny_model_dir, shapes_data, out, udp="sample_images=3")
    # 3 reconstructions (original | reconstruction side by side) at the one checkpoint, the end (step 4)
    assert logged_images(out) == {f"samples/{i}": [(4, 64, 32)] for i in range(3)}
    assert any(not torch.equal(a, b) for a, b in zip(source.vae.state_dict().values(),
                                                     trained.vae.state_dict().values()))
    for a, b in zip(source.unet.state_dict().values(), trained.unet.state_dict().values()):
        assert torch.equal(a, b)
    scaling = json.load(open(os.path.join(out, "config.json")))["vae"]["config"]["scaling_factor"]
    assert scaling != source.vae.config.scaling_factor and scaling > 0


def test_train_vae_decoder_keeps_the_latent_space(tiny_model_dir, shapes_data, tmp_path):
    out = str(tmp_path / "decoder")
    source, trained = train_vae("vae_decoder", tiny_model_dir, shapes_data, out, udp="sample_images=0")
    assert logged_images(out) == {}
    before, after = source.vae.state_dict(), trained.vae.state_dict()
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # same latents for the same image
    assert sum(not torch.equal(before[k], after[k]) for k in decoder) > len(decoder) // 2
    for a, b in zip(source.unet.state_dict().values(), trained.unet.state_dict().values()):
        assert torch.equal(a, b)
    # the diffusion model was trained on latents scaled by this factor: it must not move
    assert trained.vae.config.scaling_factor == source.vae.config.scaling_factor


def test_train_rrdb_adds_super_resolution_that_predict_uses(tiny_model_dir, shapes_data, tmp_path):
    out = str(tmp_path / "sr")
    assert cli.main(train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1",
                               udp="train_target=rrdb sr_patch=16 rrdb_nf=8 rrdb_nb=1 rrdb_gc=4 "
                                   "sample_images=1")) == 0
    assert logged_images(out) == {"samples/0": [(4, 32, 32)]}  # one ×4 upscale of a 32 px image's 8 px reduction
    assert os.path.isfile(os.path.join(out, "RRDB_ESRGAN_x4.pth"))
    assert os.path.isfile(os.path.join(out, "last", "RRDB_ESRGAN_x4.pth"))
    table = tmp_path / "p.tsv"
    table.write_text("a\t红色的圆形\n", encoding="utf-8")
    assert cli.main(["--mode=predict", f"--tables={table}", f"--outputs={tmp_path / 'o.tsv'}",
                     f"--checkpoint_dir={out}", "--output_schema=image_path",
                     f"--user_defined_parameters=n_samples=1 ddim_steps=2 do_sr=True write_image=True "
                     f"image_prefix={tmp_path / 'img'}"]) == 0
    from PIL import Image

    path = open(tmp_path / "o.tsv", encoding="utf-8").read().strip()
    assert Image.open(path).size == (128, 128)


def test_rrdb_patch_larger_than_images_is_a_clear_error(tiny_model_dir, shapes_data, tmp_path, capsys):
    assert cli.main(train_argv(shapes_data, str(tmp_path / "sr"), tiny_model_dir, "--micro_batch_size=8",
                               "--epoch_num=1", udp="train_target=rrdb sr_patch=64")) == 2
    assert "sr_patch=64 is larger than an image" in capsys.readouterr().err


def test_train_controlnet_from_the_unet_then_generate_with_it(tiny_model_dir, shapes_data, tmp_path, capsys):
    from diffusers import ControlNetModel

    data = with_control_column(shapes_data, str(tmp_path / "data"))
    out = str(tmp_path / "controlnet")
    assert cli.main(controlnet_argv(data, out, tiny_model_dir, "--epoch_num=1", udp="sample_images=1")) == 0
    net = ControlNetModel.from_pretrained(out)  # a diffusers ControlNet folder
    zero_convs = [p for n, p in net.named_parameters() if "zero_conv" in n or "controlnet_mid_block" in n]
    assert zero_convs and all(float(p.detach().abs().max()) > 0 for p in zero_convs)  # left diffusers' zero init
    assert logged_images(out)  # TensorBoard samples, generated with their conditioning images
    # predict with it, from the table's control column
    table = str(tmp_path / "prompts.tsv")
    with open(os.path.join(data, "T2I_val.tsv"), encoding="utf-8") as source, open(table, "w") as target:
        for line in source.read().splitlines()[:2]:
            idx, text, _, control = line.split("\t")
            target.write(f"{idx}\t{text}\t{control}\n")
    assert cli.main(["--mode=predict", f"--tables={table}", "--input_schema=idx:str:1,text:str:1,control:str:1",
                     f"--outputs={tmp_path / 'o.tsv'}", f"--checkpoint_dir={tiny_model_dir}",
                     f"--user_defined_parameters=controlnet={out} n_samples=1 ddim_steps=2"]) == 0
    # a table without the conditioning column: a clear error
    assert cli.main(train_argv(shapes_data, str(tmp_path / "x"), tiny_model_dir, udp="train_target=controlnet")) == 2
    assert "needs a conditioning-image column named 'control'" in capsys.readouterr().err


def test_controlnet_training_resumes_exactly_after_sigkill(tiny_model_dir, shapes_data, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    data = with_control_column(shapes_data, str(tmp_path / "data"))
    common = ("--epoch_num=4", "--save_checkpoint_steps=3", "--micro_batch_size=4")
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0", OMP_NUM_THREADS="1")

    def run(out):
        return subprocess.Popen([sys.executable, "-m", "easynlp_ldm.cli", *controlnet_argv(data, out, tiny_model_dir,
                                                                                             *common)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    uninterrupted = run(full)
    process = run(killed)
    step = kill_after_first_checkpoint(process, killed, timeout=120)
    uninterrupted.communicate()
    assert uninterrupted.returncode == 0
    assert step < 32, "the run finished before it could be killed"
    resumed = run(killed)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0 and f"from its last checkpoint (step {step})" in output, output
    from safetensors.torch import load_file

    a = load_file(os.path.join(full, "last", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(killed, "last", "diffusion_pytorch_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
