"""modelzoo/ldm.py: the model's two on-disk formats load, and a weight file never runs code."""

import os

import pytest
import torch

from modelzoo.families import sd


def test_safetensors_layout_and_unsafe_pickle_refused(tmp_path):
    from modelzoo.tiny import make_tiny_diffusers_model

    folder = make_tiny_diffusers_model(str(tmp_path / "m"), weights="safetensors")
    sd.load(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = make_tiny_diffusers_model(str(tmp_path / "bad"))
    torch.save({"x": Evil()}, os.path.join(bad, "unet", "diffusion_pytorch_model.bin"))
    with pytest.raises(ValueError, match="cannot read weights safely"):
        sd.load(bad)
    assert not (tmp_path / "pwned").exists()
