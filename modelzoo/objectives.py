"""Training objectives of the model families (``ModelFamily.objective``), shared by train (its loss and validation
loss) and evaluate (the denoising loss of a table with images; its latents come from the app's ``LatentCache``).

An objective has ``num_timesteps`` (the task draws integer timesteps below it), ``per_sample_loss(latents, noise,
timesteps, embeds, min_snr=True, residuals=None)`` and ``loss(latents, noise, timesteps, embeds, high=None,
high_share=0.0, residuals=None)``; ``residuals(noisy, timesteps, embeds)`` gives extra inputs of the denoiser (a
ControlNet's).

* ``DiffusionObjective``: noise → noisy latents → the target the model's scheduler config says the UNet predicts
  (``epsilon`` or ``v_prediction``; anything else is an error, never silently treated as epsilon), MSE, optional
  Min-SNR weighting.
* ``FlowMatchingObjective``: rectified flow as diffusers' DreamBooth-LoRA scripts for Z-Image and Qwen-Image
  compute it (timestep density and loss weighting from ``diffusers.training_utils``, the scheduler's shift); the
  families' transformers are called through ``predict_flow``. ``fixed_noise_flow_loss`` is its validation loss.
* ``fixed_noise_loss``: the plain objective of the model's family with latent means, fixed noise and evenly spread
  timesteps — comparable across steps, runs and machines' batch sizes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from easynlp_ldm.errors import UserError
from modelzoo.families import family_of
from modelzoo.ldm import LatentDiffusion

VALIDATION_SEED = 20240601  # fixed noise and timesteps: validation losses compare across steps and runs
PREDICTION_TYPES = ("epsilon", "v_prediction")
HIGH_NOISE_LOSSES = ("epsilon", "x0")
X0_WEIGHT_MAX = 1000.0  # caps 1/SNR (the x0 error's weight on the epsilon error) where the SNR is near zero


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, scaling: float) -> torch.Tensor:
    """A draw from the VAE posterior with the given noise, scaled for the diffusion model."""
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return (mean + std * eps.to(mean.device)) * scaling


class DiffusionObjective:
    """What the UNet is trained to predict under ``model``'s noise schedule, and the loss against it."""

    def __init__(self, model: LatentDiffusion, snr_gamma: float = 0.0, high_noise_loss: str = "epsilon"):
        self.model, self.snr_gamma = model, snr_gamma
        if high_noise_loss not in HIGH_NOISE_LOSSES:
            raise UserError(f"high_noise_loss={high_noise_loss!r}: choose one of {', '.join(HIGH_NOISE_LOSSES)}")
        self.high_noise_loss = high_noise_loss
        self.scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"the model's scheduler config has prediction_type={self.prediction_type!r}; training "
                            f"and evaluation support {' and '.join(PREDICTION_TYPES)}")
        if float(self.scheduler.alphas_cumprod[-1]) == 0.0:  # rescale_betas_zero_snr: the last step is pure noise
            if self.prediction_type != "v_prediction":
                raise UserError("the model's scheduler config has rescale_betas_zero_snr=True with prediction_type="
                                f"{self.prediction_type!r}: at zero SNR the noise is the whole input and nothing can "
                                "be learnt from it; set prediction_type=v_prediction in the model's scheduler config")
            if snr_gamma:
                logging.getLogger("easynlp.train").warning(
                    "snr_gamma=%g with a zero-terminal-SNR schedule: Min-SNR weighting gives the noisiest timesteps "
                    "(where the layout is decided) almost no weight; snr_gamma=0 trains them", snr_gamma)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def per_sample_loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                        embeds: torch.Tensor, min_snr: bool = True, residuals=None) -> torch.Tensor:
        """``residuals(noisy, timesteps, embeds)``: extra UNet inputs (a ControlNet's down and mid residuals)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        extra = residuals(noisy, timesteps, embeds) if residuals is not None else {}
        dtype = self.model.unet.dtype
        if noisy.dtype != dtype:  # a bf16 UNet (base_precision=bf16): its inputs in bf16, as diffusers' scripts cast
            noisy, embeds = noisy.to(dtype), embeds.to(dtype)
        prediction = self.model.unet(noisy, timesteps, encoder_hidden_states=embeds, **extra).sample
        target = self.target(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma and min_snr:
            loss = loss * self.min_snr_weights(timesteps)
        return loss

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.stack([snr, self.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        return weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr

    def x0_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weights that turn the squared error of the UNet's target into that of the clean latents it
        implies (epsilon: 1/SNR, capped at X0_WEIGHT_MAX; v: 1/(SNR+1))."""
        snr = compute_snr(self.scheduler, timesteps)
        if self.prediction_type == "v_prediction":
            return 1 / (snr + 1)
        return (1 / snr).clamp(max=X0_WEIGHT_MAX)

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
             high: torch.Tensor | None = None, high_share: float = 0.0, residuals=None) -> torch.Tensor:
        """The batch's training loss. ``high``: which samples were drawn from the noisiest timesteps (the
        ``high_noise_share`` option). With ``high_noise_loss="x0"`` those are weighted by the error of the clean
        latents they imply (where the layout is decided) and the two groups are averaged separately, each over its
        own weights, and mixed as ``high_share`` : 1 - ``high_share``, so that the x0 errors' large weights do not
        drown the other samples; otherwise every sample has the usual weight (Min-SNR with ``snr_gamma``)."""
        if high is None or self.high_noise_loss != "x0" or not bool(high.any()):
            return self.per_sample_loss(latents, noise, timesteps, embeds, residuals=residuals).mean()
        per_sample = self.per_sample_loss(latents, noise, timesteps, embeds, min_snr=False, residuals=residuals)
        usual = self.min_snr_weights(timesteps) if self.snr_gamma else torch.ones_like(per_sample)
        x0 = self.x0_weights(timesteps)
        high = high.to(per_sample.device)
        high_part = (per_sample * x0)[high].sum() / x0[high].sum()
        if bool(high.all()):
            return high_part
        low_part = (per_sample * usual)[~high].sum() / usual[~high].sum()
        return high_share * high_part + (1 - high_share) * low_part


def validation_draws(n: int, steps: int, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed noise of ``n`` validation latents (of ``moments``' shape) and their timesteps spread evenly over
    ``steps``."""
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    latent_shape = (moments.shape[1] // 2, *moments.shape[2:])
    noise = torch.randn((n, *latent_shape), generator=g)
    return noise, (torch.arange(n) * steps // n + steps // (2 * n)).clamp(max=steps - 1).long()


@torch.no_grad()
def fixed_noise_loss(model: LatentDiffusion, captions: list[str], moments: torch.Tensor, text_length: int,
                     batch_size: int = 32, residuals=None) -> float:
    """Plain denoising MSE with latent means, fixed noise and timesteps spread evenly over the schedule.
    ``residuals(start, stop)``: the per-chunk extra UNet inputs (see ``per_sample_loss``)."""
    objective = family_of(model).objective(model)
    steps = objective.num_timesteps
    n = len(captions)
    noise, timesteps = validation_draws(n, steps, moments)
    device = model.device
    total = 0.0
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        mean, _ = torch.chunk(moments[start:stop], 2, dim=1)
        latents = (mean * model.vae_scaling_factor).to(device)
        embeds = family_of(model).encode_prompts(model, captions[start:stop], text_length)
        loss = objective.per_sample_loss(latents, noise[start:stop].to(device), timesteps[start:stop].to(device),
                                         embeds, min_snr=False,
                                         residuals=residuals(start, stop) if residuals is not None else None)
        total += float(loss.mean()) * (stop - start)
    return total / n


# ------------------------------------------------------------------------------------------ flow matching
class FlowMatchingObjective:
    """Rectified flow as diffusers' DreamBooth-LoRA scripts for Z-Image and Qwen-Image compute it: a training
    timestep is an index into the scheduler's own schedule (its ``shift`` applied as the folder's scheduler config
    says), drawn by ``compute_density_for_timestep_sampling`` (``weighting_scheme`` with ``logit_mean``,
    ``logit_std``, ``mode_scale``); noisy = (1 - sigma) · latents + sigma · noise; the family's transformer
    (``ModelFamily.predict_flow``) predicts noise - latents; the squared error is weighted by
    ``compute_loss_weighting_for_sd3``. ``texts``: one text embedding per sample (the family's ``encode_texts``)."""

    def __init__(self, model, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model, self.family = model, family_of(model)
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale = mode_scale
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)

    def draw_index(self, generator: torch.Generator) -> int:
        """One sample's index into the schedule, from its own seeded generator."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(weighting_scheme=self.weighting_scheme, batch_size=1,
                                                  logit_mean=self.logit_mean, logit_std=self.logit_std,
                                                  mode_scale=self.mode_scale, generator=generator)
        return min(int(u * self.num_timesteps), self.num_timesteps - 1)

    def per_sample_loss(self, latents: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor, texts,
                        weighted: bool = True) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        indices = indices.cpu()
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        sigmas = self.scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.family.predict_flow(self.model, noisy, timesteps, texts)
        scheme = self.weighting_scheme if weighted else "none"
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        error = weighting.float() * (prediction.float() - (noise - latents).float()) ** 2
        return error.reshape(len(latents), -1).mean(dim=1)

    def loss(self, latents: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor, texts, **unused) -> torch.Tensor:
        return self.per_sample_loss(latents, noise, indices, texts).mean()


@torch.no_grad()
def fixed_noise_flow_loss(model, texts: list[torch.Tensor], moments: torch.Tensor, batch_size: int = 32) -> float:
    """The flow-matching validation loss: latent means, fixed noise, schedule indices spread evenly, unweighted —
    comparable across steps, runs and weighting schemes."""
    family = family_of(model)
    objective = family.objective(model)
    noise, indices = validation_draws(len(texts), objective.num_timesteps, moments)
    n, device = len(texts), model.device
    total = 0.0
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        mean, logvar = torch.chunk(moments[start:stop], 2, dim=1)
        latents = family.training_latents(model, mean.to(device), logvar.to(device), None)
        loss = objective.per_sample_loss(latents, noise[start:stop].to(device), indices[start:stop],
                                         texts[start:stop], weighted=False)
        total += float(loss.mean()) * (stop - start)
    return total / n
