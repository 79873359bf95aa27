"""The flow-matching DiT families (modelzoo/families/dit.py) and their tiny random folders (modelzoo/tiny_dit.py):
folders built offline, the same bytes for the same seed, recognised and loaded by their family with the geometry
the app asks for."""

import filecmp
import os

import pytest

from modelzoo import families
from modelzoo.families.dit import DiTModel
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_tokenizer, make_tiny_zimage_model

MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def _same_tree(left, right):
    comparison = filecmp.dircmp(left, right)
    assert not comparison.left_only and not comparison.right_only and not comparison.funny_files
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    assert not mismatch and not errors, mismatch
    for sub in comparison.common_dirs:
        _same_tree(os.path.join(left, sub), os.path.join(right, sub))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_tiny_folders_are_the_same_bytes_for_the_same_seed(folders, name, tmp_path):
    _same_tree(folders[name], MAKERS[name](str(tmp_path / name)))


def test_tiny_tokenizer_has_qwens_special_tokens_and_chat_template():
    tokenizer = make_tiny_tokenizer()
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) is not None
        assert tokenizer.tokenize(token) == [token]
    assert tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "红色的圆形"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\n红色的圆形<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("一个红色的圆形 on white")["input_ids"]) == "一个红色的圆形 on white"


@pytest.mark.parametrize("name, latent_channels, vae_factor", [("zimage", 16, 2), ("qwenimage", 4, 4)])
def test_folders_load_through_their_family(folders, name, latent_channels, vae_factor):
    assert families.family_for_folder(folders[name]).name == name
    model = families.load(folders[name])
    assert isinstance(model, DiTModel) and model.family == name and families.family_of(model).name == name
    assert (model.image_size, model.latent_channels, model.vae_scale_factor) == (32, latent_channels, vae_factor)
    assert model.text_max_length == 512 and model.clamp_text_length(10_000) == model.text_length_limit
    assert len(model.tokenizer) == model.text_encoder.config.get_text_config().vocab_size
    assert model.source_path == os.path.abspath(folders[name])
    family = families.get(name)
    assert family.train_targets == ("transformer", "lora")
    assert family.export_formats == ("tar", "diffusers") and family.openvino_parts == ()
    assert type(family.pipeline(model)).__name__ == family.pipelines["txt2img", False]


def test_a_sampler_the_family_cannot_honour_is_a_one_line_error(folders):
    model = families.load(folders["zimage"])
    family = families.family_of(model)
    assert family.scheduler(model).__class__.__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown sampler 'ddim' for zimage models; choose one of euler "):
        family.scheduler(model, "ddim")


def test_a_broken_folder_is_a_model_format_error_naming_it(folders, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(folders["zimage"], broken)
    shutil.rmtree(os.path.join(broken, "transformer"))
    with pytest.raises(families.ModelFormatError, match=f"{broken}: cannot load this zimage model") as caught:
        families.load(broken)
    assert "\n" not in str(caught.value)
