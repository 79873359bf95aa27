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


def test_zero_terminal_snr_trains_v_on_pure_noise_and_refuses_epsilon(tiny_model_dir, caplog):
    """The shipped model's schedule: rescale_betas_zero_snr + v-prediction. At the last timestep the input is pure
    noise and the target is -x0 (what the caption says the image is); epsilon there would be the input itself."""
    model = LatentDiffusion.from_pretrained(tiny_model_dir)
    model.scheduler_config.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    objective = DiffusionObjective(model)
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([999, 999])
    assert float(objective.scheduler.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(objective.target(latents, noise, t), -latents)
    with caplog.at_level("WARNING", logger="easynlp.train"):
        DiffusionObjective(model, snr_gamma=5.0)
    assert "snr_gamma=0 trains them" in caplog.text
    model.scheduler_config["prediction_type"] = "epsilon"
    with pytest.raises(UserError, match="rescale_betas_zero_snr=True with prediction_type='epsilon'.*set "
                                        "prediction_type=v_prediction"):
        DiffusionObjective(model)
