"""--mode=export of Z-Image and Qwen-Image (issue 32): the default, export_format=tar, packs the family's diffusers
folder (lora= merged) into a .tar.gz that --checkpoint_dir loads as it loads an SD-1.x package, predicting the lora=
image; a package that does not load back leaves nothing; export_format=easynlp is a one-line refusal saying why."""

import os
import tarfile

import numpy as np
import pytest
from diffusers import DiffusionPipeline

from easynlp_ldm import cli
from modelzoo import families
from modelzoo.families.dit import ATTENTION_TARGETS, COMPONENTS, DiTFamily
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model
from tests.helpers import decode, predict_argv, random_adapter, read_rows

MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}
GUIDANCE = {"zimage": "scale=0", "qwenimage": "true_cfg_scale=1"}  # off: one transformer call per step


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def _predicted(tmp_path, checkpoint, udp):
    table, out = tmp_path / "prompts.tsv", tmp_path / "out.tsv"
    table.write_text("0\t一个红色的圆形\n", encoding="utf-8")
    assert cli.main(predict_argv(table, out, checkpoint, udp=f"ddim_steps=2 n_samples=1 optimize=none {udp}")) == 0
    [(_, _, image)] = read_rows(out)
    return decode(image)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_default_export_is_a_package_of_the_diffusers_folder_that_predicts_the_lora_image(folders, tmp_path,
                                                                                              name):
    adapter = random_adapter(families.load(folders[name]), str(tmp_path / "lora"), ATTENTION_TARGETS, seed=1)
    package = str(tmp_path / "model.tar.gz")
    assert cli.main(["--mode=export", f"--checkpoint_dir={folders[name]}", f"--outputs={package}",
                     f"--user_defined_parameters=lora={adapter}"]) == 0
    with tarfile.open(package, "r:gz") as archive:
        members = archive.getnames()
        archive.extractall(tmp_path / "unpacked", filter="data")
    assert sorted({member.split("/")[0] for member in members}) == sorted(COMPONENTS + ("model_index.json",))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "unpacked"), local_files_only=True)
    assert type(pipe).__name__ == {"zimage": "ZImagePipeline", "qwenimage": "QwenImagePipeline"}[name]
    assert not any("lora" in key for key in pipe.transformer.state_dict())  # merged, no adapter layers left

    adapted = _predicted(tmp_path, folders[name], f"{GUIDANCE[name]} lora={adapter}")
    plain = _predicted(tmp_path, folders[name], GUIDANCE[name])
    from_package = _predicted(tmp_path, package, GUIDANCE[name])
    assert np.abs(adapted - plain).max() > 10  # the adapter moves pixels
    assert np.abs(from_package - adapted).max() <= 1


def test_a_package_that_does_not_load_back_fails_and_leaves_nothing(folders, tmp_path, monkeypatch, capsys):
    """A writer fault (here one transformer weight shifted as it is saved) is caught by diffusers' pipeline reading
    the unpacked package: an error naming the format, and nothing is left at --outputs."""
    saved = DiTFamily.save

    def faulty_save(self, model, folder, **options):
        name, weight = next(iter(model.transformer.state_dict().items()))
        return saved(self, model, folder, overrides={f"transformer.{name}": weight + 1})

    monkeypatch.setattr(DiTFamily, "save", faulty_save)
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["--mode=export", f"--checkpoint_dir={folders['zimage']}",
                     f"--outputs={out / 'model.tar.gz'}"]) == 2
    err = capsys.readouterr().err
    assert "export_format=tar: the export does not load as it should (ZImagePipeline.from_pretrained: transformer." \
           in err and "Traceback" not in err, err
    assert os.listdir(out) == []  # neither the package nor a temporary file is left


def test_export_format_easynlp_is_refused_in_one_line_saying_why(folders, tmp_path, capsys):
    assert cli.main(["--mode=export", f"--checkpoint_dir={folders['qwenimage']}", f"--outputs={tmp_path / 'out'}",
                     "--user_defined_parameters=export_format=easynlp"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("easynlp: error:")]
    assert lines == ["easynlp: error: export_format=easynlp is not available for qwenimage models (EasyNLP's "
                     "latent_diffusion format holds SD-1.x models only; they export as tar, diffusers)"]
    assert not os.path.exists(tmp_path / "out")
