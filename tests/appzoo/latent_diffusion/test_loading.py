"""loading.py: one path from a name, folder or package to a ready model, with plain arguments."""

import pytest
import torch

from appzoo.latent_diffusion.loading import load_model
from easynlp_ldm import cli
from easynlp_ldm.errors import UserError
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models


def test_folder_package_and_embedded_default_load_the_same_way(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, device="cpu")
    assert model.source_path == tiny_model_dir and not model.training
    package = str(tmp_path / "m.tar.gz")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={package}"]) == 0
    unpacked = load_model(package, device="cpu")  # what --mode=export wrote, as serve and predict take it
    for name, value in model.unet.state_dict().items():
        assert torch.equal(value, unpacked.unet.state_dict()[name])
    assert DEFAULT_MODEL in embedded_models()
    assert load_model("", device="cpu").source_path == embedded_models()[DEFAULT_MODEL]


def test_optimize_level_is_applied_only_when_asked(tiny_model_dir):
    assert getattr(load_model(tiny_model_dir, device="cpu"), "optimization", None) is None
    assert load_model(tiny_model_dir, device="cpu", optimize="none").optimization["level"] == "none"


def test_missing_model_is_one_line_naming_the_setting(tmp_path):
    with pytest.raises(UserError, match="pretrain_model_name_or_path 'nowhere/model' not found") as err:
        load_model("nowhere/model", what="pretrain_model_name_or_path")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a diffusers-layout model"):
        load_model(str(tmp_path / "empty"))
