"""losses.py: the objective follows the model's prediction type; anything else is an error, not epsilon."""

import pytest
import torch

from appzoo.latent_diffusion.losses import DiffusionObjective
from easynlp_ldm.errors import UserError
from modelzoo.ldm import LatentDiffusion


def test_target_follows_prediction_type_and_unknown_is_an_error(tiny_model_dir):
    model = LatentDiffusion.from_pretrained(tiny_model_dir)
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert torch.equal(DiffusionObjective(model).target(latents, noise, t), noise)
    model.scheduler_config["prediction_type"] = "v_prediction"
    objective = DiffusionObjective(model)
    alpha = objective.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - objective.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.target(latents, noise, t), alpha * noise - sigma * latents)
    model.scheduler_config["prediction_type"] = "sample"
    with pytest.raises(UserError, match="prediction_type='sample'; training and evaluation support epsilon and "
                                        "v_prediction"):
        DiffusionObjective(model)
