"""Two models compared on the same prompts and seeds: each metric's difference (second − first) and, for the
per-image scores, a 95 % confidence interval by the paired bootstrap over prompts.

The prompts are resampled with replacement, the same indices for both models (each prompt's pair of images stays
together), and the interval is the 2.5th and 97.5th percentiles of the resampled mean differences. A prompt where
either model has no score (NaN: e.g. a judge attribute the prompt does not state) takes no part.

FID and KID get their difference without an interval: they are statistics of the whole set of images (a mean and a
2048 × 2048 covariance, a kernel over all pairs), not means of per-prompt values; a resample with repeated prompts
repeats images, which pulls a set statistic towards lower values (FID is biased by the sample size), and each of the
thousands of resamples would need its own matrix square root. ``SET_METRIC_NOTE`` says so in the summary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
SET_METRIC_NOTE = ("the confidence intervals are for the per-image scores only: FID and KID are statistics of the "
                   "whole image set (resampling prompts would repeat images and bias them), so only their difference "
                   "is given")


def paired_bootstrap(first: Sequence[float], second: Sequence[float], resamples: int = 2000,
                     seed: int = 0) -> dict:
    """``{"first", "second", "difference", "ci95", "n"}``: the means of each model's scores over the prompts both
    score, the mean difference (second − first) and its 95 % percentile interval over ``resamples`` paired resamples
    of those prompts, drawn from ``seed`` (so the same inputs give the same interval)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one per prompt for each model, got {a.shape} and {b.shape}")
    both = np.isfinite(a) & np.isfinite(b)
    differences = b[both] - a[both]
    n = len(differences)
    if not n:
        return {"first": None, "second": None, "difference": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"first": float(a[both].mean()), "second": float(b[both].mean()),
            "difference": float(differences.mean()), "ci95": [float(low), float(high)], "n": n}


def compare(first_scores: dict[str, list[float]], second_scores: dict[str, list[float]],
            first_sets: dict[str, float], second_sets: dict[str, float], resamples: int, seed: int) -> dict:
    """Every metric both models have: per-image scores (name → one value per prompt, in the same prompt order) with
    their bootstrap interval; set metrics (FID, KID: name → value) with their difference alone."""
    out: dict = {name: paired_bootstrap(first_scores[name], second_scores[name], resamples, seed)
                 for name in first_scores if name in second_scores}
    for name in first_sets:
        if name in second_sets:
            out[name] = {"first": first_sets[name], "second": second_sets[name],
                         "difference": second_sets[name] - first_sets[name], "ci95": None}
    return out
