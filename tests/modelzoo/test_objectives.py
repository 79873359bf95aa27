"""modelzoo/objectives.py: the objective follows the model's prediction type; anything else is an error, not epsilon."""

import pytest
import torch

from easynlp_ldm.errors import UserError
from modelzoo.families import sd
from modelzoo.objectives import DiffusionObjective


def test_target_follows_prediction_type_and_unknown_is_an_error(tiny_model_dir):
    model = sd.load(tiny_model_dir)
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
    model = sd.load(tiny_model_dir)
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


def test_x0_weights_turn_the_epsilon_error_into_the_clean_latents_error(tiny_model_dir):
    """high_noise_loss=x0: a sample's weighted loss is the squared error of the clean latents its prediction implies,
    and the noisiest samples and the others are averaged separately, then mixed as high_share : 1 - high_share."""
    model = sd.load(tiny_model_dir)
    objective = DiffusionObjective(model, snr_gamma=5.0, high_noise_loss="x0")
    g = torch.Generator().manual_seed(0)
    side = 32 // model.vae_scale_factor
    latents, noise = torch.randn((4, model.latent_channels, side, side), generator=g), torch.randn(
        (4, model.latent_channels, side, side), generator=g)
    t = torch.tensor([950, 990, 100, 500])
    embeds = model.encode_prompts(["红色圆形", "蓝色", "", "左上角"])
    with torch.no_grad():
        per_sample = objective.per_sample_loss(latents, noise, t, embeds, min_snr=False)
        noisy = objective.scheduler.add_noise(latents, noise, t)
        eps = model.unet(noisy, t, encoder_hidden_states=embeds).sample
        a = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        x0_error = ((x0 - latents) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(per_sample * objective.x0_weights(t), x0_error, rtol=1e-4, atol=1e-6)

        high = torch.tensor([True, True, False, False])
        w_high, w_low = objective.x0_weights(t)[:2], objective.min_snr_weights(t)[2:]
        expected = 0.25 * (
            (per_sample[:2] * w_high).sum() / w_high.sum()) + 0.75 * (per_sample[2:] * w_low).sum() / w_low.sum()
        torch.testing.assert_close(objective.loss(latents, noise, t, embeds, high=high, high_share=0.25), expected)
        # without high samples (or with the usual loss) it is the plain Min-SNR mean, as before the option existed
        plain = objective.per_sample_loss(latents, noise, t, embeds).mean()
        torch.testing.assert_close(objective.loss(latents, noise, t, embeds, high=~torch.ones(4, dtype=torch.bool),
                                                  high_share=0.25), plain)
        torch.testing.assert_close(DiffusionObjective(model, 5.0).loss(latents, noise, t, embeds, high=high,
                                                                       high_share=0.25), plain)
    with pytest.raises(UserError, match="high_noise_loss='v': choose one of epsilon, x0"):
        DiffusionObjective(model, high_noise_loss="v")
