import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from appzoo import registry
from easynlp_ldm import cli
from tests.helpers import SEED_PREDICT, SEED_TRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

class RecordingApp:
    calls = []

    def __init__(self, flags, params):
        self.flags, self.params = flags, params

    def run(self, mode):
        RecordingApp.calls.append((mode, self.flags, self.params))
        return 0


@pytest.fixture
def recording_app(monkeypatch):
    """Route latent_diffusion's declared params to a recording app: proves the registry, not the CLI, picks it."""
    RecordingApp.calls = []
    monkeypatch.setitem(registry.APPS, "recorder", registry.AppEntry(
        params="appzoo.latent_diffusion.params:PARAMS", app=f"{__name__}:RecordingApp"))
    return RecordingApp


def test_seed_train_command_parses_and_reaches_app(recording_app):
    assert cli.main([a.replace("latent_diffusion", "recorder") for a in SEED_TRAIN]) == 0
    mode, flags, params = recording_app.calls[0]
    assert mode == "train" and flags.learning_rate == 4e-5 and flags.micro_batch_size == 16
    assert flags.sequence_length == 288 and flags.tables == "T2I_train.tsv,T2I_val.tsv"
    assert params["pretrain_model_name_or_path"] == "alibaba-pai/pai-diffusion-general-large-zh"
    assert params["reset_model_state_flag"] is True


def test_seed_predict_command_parses_and_reaches_app(recording_app):
    assert cli.main([a.replace("latent_diffusion", "recorder") for a in SEED_PREDICT]) == 0
    mode, flags, params = recording_app.calls[0]
    assert mode == "predict" and flags.output_schema == "text" and flags.first_sequence == "text"
    assert params["n_samples"] == 2 and params["write_image"] is True and params["image_prefix"] == "./output/"


def test_random_seed_seeds_python_numpy_and_torch_as_the_mode_starts(recording_app, monkeypatch):
    def draw(self, mode):
        recording_app.calls.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
        return 0

    monkeypatch.setattr(recording_app, "run", draw)
    argv = [a.replace("latent_diffusion", "recorder") for a in SEED_TRAIN]  # --random_seed=42
    assert cli.main(argv) == 0 and cli.main(argv) == 0  # the second run draws the same again
    assert cli.main([*argv, "--random_seed=43"]) == 0
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert recording_app.calls[:2] == [expected, expected] and recording_app.calls[2] != expected


def test_seed_commands_parse_for_the_real_app():
    train = cli.parse_command(SEED_TRAIN)
    assert train.app_name == "latent_diffusion" and train.params["reset_model_state_flag"] is True
    predict = cli.parse_command(SEED_PREDICT)
    assert "--save_checkpoint_steps has no effect in --mode=predict" in predict.notes


def test_user_mistake_exits_2_with_one_line(capsys):
    assert cli.main(["--mode=predict", "--user_defined_parameters=n_sampels=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("easynlp: error: --user_defined_parameters: unknown key")
    assert cli.main(["--app_name=text_classify"]) == 2
    assert "available: latent_diffusion" in capsys.readouterr().err


def test_console_script_help_lists_app_parameters_and_errors_without_traceback():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "easynlp_ldm.cli", "--app_name=latent_diffusion", "--help"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0
    for text in ("--checkpoint_dir", "--checkpoint_path", "--micro_batch_size", "--train_batch_size",
                 "user_defined_parameters of app latent_diffusion", "n_samples (int, default 4",
                 "scale / guidance_scale", "write_image (bool, default False"):
        assert text in out.stdout
    bad = subprocess.run([sys.executable, "-m", "easynlp_ldm.cli", "--no_such_flag=1"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
