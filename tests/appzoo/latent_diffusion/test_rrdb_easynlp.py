"""Issue 30 §5: train_target=rrdb on an EasyNLP-format model without RRDB_ESRGAN_x4.pth built a 32/3/16 net trained
on RGB, which EasyNLP's ESRGAN (RRDBNet 64/23/32, strict load, fed BGR) refuses or feeds the wrong colours. Now it
trains EasyNLP's architecture on BGR by default; rrdb_nf/nb/gc still override, with a warning that the file will not
load in EasyNLP; other models keep the small RGB net, said to be for this toolkit only."""

import logging
import os
import shutil

import pytest
import torch

from appzoo.latent_diffusion.data import TrainingData
from appzoo.latent_diffusion.params import default_params
from appzoo.latent_diffusion.settings import TrainingSettings
from appzoo.latent_diffusion.train_tasks import RRDBTrainTask
from easynlp_ldm import cli
from modelzoo.esrgan import RRDBNet
from modelzoo.families import sd
from tests.helpers import easynlp_checkpoint, train_argv


def task_for(model, caplog, **params):
    with caplog.at_level(logging.INFO):
        settings = TrainingSettings.from_params(default_params(train_target="rrdb", sr_patch=16, **params))
        return RRDBTrainTask(model, settings, TrainingData(train=None), seed=0)


def channels_seen(task) -> torch.Tensor:
    """The mean of each channel the net's first convolution receives for a pure red training pair."""
    seen = []
    handle = task.net.conv_first.register_forward_hook(lambda module, args, out: seen.append(args[0].mean((0, 2, 3))))
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    loss = task.loss({"lr": red[:, :, :4, :4], "hr": red})
    handle.remove()
    loss.backward()  # one training step's gradients: the net trains on what it is fed
    return seen[0].detach()


def test_an_easynlp_model_gets_easynlps_net_trained_on_bgr(tmp_path, caplog):
    model = sd.load(easynlp_checkpoint(tmp_path / "easynlp"))
    task = task_for(model, caplog)
    assert task.net.architecture() == {"in_nc": 3, "out_nc": 3, "nf": 64, "nb": 23, "gc": 32}
    assert "EasyNLP's ESRGAN architecture and channel order, so EasyNLP loads RRDB_ESRGAN_x4.pth" in caplog.text
    assert torch.equal(channels_seen(task), torch.tensor([0.0, 0.0, 1.0]))  # red arrives as BGR's third channel
    out = str(tmp_path / "run")
    task.save_model(out, {"rrdb." + key: value for key, value in task.net.state_dict().items()})
    # EasyNLP builds RRDBNet(3, 3, 64, 23, gc=32) and loads the file strictly: the same names and shapes.
    reference = RRDBNet(in_nc=3, out_nc=3, nf=64, nb=23, gc=32)
    reference.load_state_dict(torch.load(os.path.join(out, "RRDB_ESRGAN_x4.pth"), weights_only=True), strict=True)
    saved = sd.load(out)  # saved in EasyNLP's format, whose ESRGAN is fed BGR
    assert saved.extra["source_format"] == "easynlp" and saved.extra["esrgan_channel_order"] == "bgr"


def test_explicit_sizes_override_and_warn_that_easynlp_will_not_load_the_file(tmp_path, caplog):
    model = sd.load(easynlp_checkpoint(tmp_path / "easynlp"))
    task = task_for(model, caplog, rrdb_nf=8, rrdb_nb=1, rrdb_gc=4)
    assert task.net.architecture()["nf"] == 8 and task.net.architecture()["nb"] == 1
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "super-resolution net" in r.message]
    assert "RRDB_ESRGAN_x4.pth will NOT load in EasyNLP, whose ESRGAN is RRDBNet(nf=64, nb=23, gc=32) loaded " \
           "strictly" in warning[0].message
    assert torch.equal(channels_seen(task), torch.tensor([0.0, 0.0, 1.0]))  # still the order this model feeds it


def test_other_models_keep_the_small_rgb_net_for_this_toolkit(tiny_model_dir, caplog):
    task = task_for(sd.load(tiny_model_dir), caplog)
    assert task.net.architecture() == {"in_nc": 3, "out_nc": 3, "nf": 32, "nb": 3, "gc": 16}
    assert "on RGB images: RRDB_ESRGAN_x4.pth is for this toolkit's do_sr only" in caplog.text
    assert torch.equal(channels_seen(task), torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("model", ["easynlp", "tiny"])
def test_end_of_training_advice_says_what_train_target_rrdb_builds(tmp_path, shapes_data, tiny_model_dir, caplog,
                                                                    model):
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("T2I_train.tsv", 2), ("T2I_val.tsv", 1)):  # one optimiser step
        lines = open(os.path.join(shapes_data, name), encoding="utf-8").readlines()[:rows]
        (data / name).write_text("".join(lines), encoding="utf-8")
    folder = easynlp_checkpoint(tmp_path / "easynlp") if model == "easynlp" else tiny_model_dir
    with caplog.at_level(logging.INFO):
        assert cli.main(train_argv(str(data), str(tmp_path / "run"), folder, "--micro_batch_size=2",
                                   "--epoch_num=1", udp="sample_images=0")) == 0
    advice = ("train them with train_target=rrdb, which for this EasyNLP-format model trains EasyNLP's RRDBNet (nf 64, "
              "nb 23, gc 32) on BGR images: the file EasyNLP's ESRGAN loads" if model == "easynlp" else
              "train them with train_target=rrdb: a smaller net (nf 32, nb 3, gc 16, RGB) for this toolkit's do_sr, "
              "which EasyNLP's ESRGAN does not load")
    assert advice in caplog.text
    shutil.rmtree(tmp_path / "run")
