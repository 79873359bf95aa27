"""samplers.py: a short name (or an alias) → the diffusers scheduler, built from the model's own config."""

import re

import diffusers
import pytest

from modelzoo.samplers import SAMPLERS, canonical_name, make_scheduler, sampler_names

CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "prediction_type": "v_prediction"}


def scipy_missing() -> bool:
    try:
        import scipy  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_name_builds_its_scheduler_keeping_the_noise_schedule(name):
    if name == "lms" and scipy_missing():  # diffusers' LMS needs scipy: a clear error instead of a traceback
        with pytest.raises(ValueError, match="sampler 'lms' cannot be used here: LMSDiscreteScheduler requires the "
                                             "scipy library"):
            make_scheduler(name, CONFIG, "DPMSolverMultistepScheduler")
        return
    scheduler = make_scheduler(name, CONFIG, "DPMSolverMultistepScheduler")
    assert type(scheduler).__name__ == SAMPLERS[name][0]
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "scaled_linear"
    if "prediction_type" in scheduler.config:
        assert scheduler.config.prediction_type == "v_prediction"


def test_aliases_default_and_unknown_names():
    assert canonical_name("Euler_A") == "euler-ancestral" and canonical_name("DPM++") == "dpm-solver++"
    assert type(make_scheduler("k_euler", CONFIG, "PNDMScheduler")).__name__ == "EulerDiscreteScheduler"
    assert isinstance(make_scheduler("", CONFIG, "PNDMScheduler"), diffusers.PNDMScheduler)  # the model's own
    assert make_scheduler("dpm-solver++", CONFIG, "").config.algorithm_type == "dpmsolver++"
    expected = "unknown sampler 'magic'; choose one of " + ", ".join(sampler_names())
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_scheduler("magic", CONFIG, "")


@pytest.mark.parametrize("name", [n for n in sorted(SAMPLERS) if n != "lms"] + [""])
def test_a_zero_terminal_snr_schedule_is_kept_by_every_sampler(name):
    """The shipped model's schedule ends at zero SNR (rescale_betas_zero_snr). Schedulers without that flag would drop
    it silently and sample with another schedule; they get the same schedule as explicit betas instead."""
    config = {**CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    reference = diffusers.DPMSolverMultistepScheduler.from_config(config).alphas_cumprod
    scheduler = make_scheduler(name, config, "PNDMScheduler")
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # the last step is (almost) pure noise, as trained
    assert float((scheduler.alphas_cumprod - reference).abs().max()) < 1e-6
    assert float((scheduler.alphas_cumprod[:-1] - reference[:-1]).abs().max()) < 1e-6
