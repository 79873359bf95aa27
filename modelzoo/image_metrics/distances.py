"""FID and KID between two sets of features, computed as torchmetrics 1.9 computes them (float64 throughout).

FID (Heusel et al. 2017): ‖μ₁−μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr √(Σ₁Σ₂), the covariances unbiased (N−1). torchmetrics
sums the square roots of the eigenvalues of Σ₁Σ₂, a general 2048² eigenproblem (50 s on two busy CPU cores) whose
near-zero eigenvalues come out complex when there are fewer images than features. The same trace is the nuclear norm
of X Yᵀ for any factors XᵀX = Σ₁, YᵀY = Σ₂ (the eigenvalues of Σ₁Σ₂ are the squared singular values of X Yᵀ); the
factors are the centred features themselves when there are fewer images than features, else the symmetric square
roots, so the value is torchmetrics' formula evaluated exactly and symmetric throughout.
KID (Bińkowski et al. 2018): the unbiased MMD² with the polynomial kernel (x·y/d + 1)³ over ``subsets`` random
subsets of ``subset_size`` features from each set, mean and (population) standard deviation, as
``torchmetrics.image.kid.KernelInceptionDistance``; subsets are drawn with ``torch.randperm`` from a generator
seeded with ``seed`` (real, then fake, per subset), so ``torch.manual_seed(seed)`` before torchmetrics' ``compute``
draws the same ones.
"""

from __future__ import annotations

import numpy as np
import torch

from easynlp_ldm.errors import UserError


def _as_features(features, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if tensor.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] feature array, got shape {tuple(tensor.shape)}")
    return tensor


def _both(real_features, fake_features) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features of different widths: {real.shape[1]} and {fake.shape[1]}")
    return real, fake


def _mean_and_covariance_factor(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and a factor X with XᵀX = the unbiased covariance, the smaller of [N, D] and [D, D]."""
    mean = features.mean(dim=0)
    centred = (features - mean) / (features.shape[0] - 1) ** 0.5
    if centred.shape[0] <= centred.shape[1]:
        return mean, centred
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    return mean, (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def fid(real_features, fake_features) -> float:
    """Fréchet distance between Gaussians fitted to [N, D] and [M, D] features (N, M ≥ 2)."""
    real, fake = _both(real_features, fake_features)
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images on each side ({real.shape[0]} real, {fake.shape[0]} generated)")
    mean_real, factor_real = _mean_and_covariance_factor(real)
    mean_fake, factor_fake = _mean_and_covariance_factor(fake)
    root_trace = torch.linalg.svdvals(factor_real @ factor_fake.T).sum()  # Tr √(Σ₁Σ₂)
    traces = factor_real.square().sum() + factor_fake.square().sum()  # Tr Σ₁ + Tr Σ₂
    distance = (mean_real - mean_fake).square().sum() + traces - 2 * root_trace
    return float(distance)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef: float) -> torch.Tensor:
    return (x @ y.T * gamma + coef) ** degree


def _unbiased_mmd(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> torch.Tensor:
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m**2


def kid(real_features, fake_features, subsets: int = 100, subset_size: int = 1000, seed: int = 0, *,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> tuple[float, float]:
    """(mean, std) of the polynomial-kernel MMD² over ``subsets`` random subsets; ``subset_size`` is capped at the
    smaller set's size (as clean-fid does; torchmetrics refuses instead), and must leave at least 2 features."""
    real, fake = _both(real_features, fake_features)
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise UserError(f"KID needs at least 2 images on each side ({real.shape[0]} real, {fake.shape[0]} generated)")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=generator)[:size]]
        y = fake[torch.randperm(fake.shape[0], generator=generator)[:size]]
        scores.append(_unbiased_mmd(_polynomial_kernel(x, x, degree, gamma, coef),
                                    _polynomial_kernel(x, y, degree, gamma, coef),
                                    _polynomial_kernel(y, y, degree, gamma, coef)))
    stacked = torch.stack(scores)
    return float(stacked.mean()), float(stacked.std(unbiased=False))
