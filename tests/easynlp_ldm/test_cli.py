import base64
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from appzoo import registry
from easynlp_ldm import cli
from tests.helpers import (
    EASYNLP_README_PREDICT,
    EASYNLP_README_TRAIN,
    EASYNLP_SH_PREDICT,
    EASYNLP_SH_TRAIN,
    SEED_PREDICT,
    SEED_TRAIN,
)

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
    assert any(note.startswith("user-defined parameter reset_model_state_flag is accepted and has no effect here")
               for note in train.notes)  # EasyNLP's key-prefix flag: checkpoints here always load
    assert train.params["overwrite_checkpoint_dir"] is False
    predict = cli.parse_command(SEED_PREDICT)
    assert "--save_checkpoint_steps has no effect in --mode=predict" in predict.notes


def test_user_mistake_exits_2_with_one_line(capsys):
    assert cli.main(["--mode=predict", "--user_defined_parameters=n_sampels=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("easynlp: error: --user_defined_parameters: unknown key")
    assert cli.main(["--app_name=text_classify"]) == 2
    assert "available: latent_diffusion" in capsys.readouterr().err


def test_no_registered_app_is_one_line(monkeypatch, capsys):
    from easynlp_ldm import apps

    monkeypatch.setattr(apps, "_registrations", lambda: ())  # as when the package is not installed
    assert cli.main(["--mode=predict"]) == 2
    err = capsys.readouterr().err
    assert err == "easynlp: error: no app is registered (entry-point group easynlp_ldm.apps): install the toolkit " \
                  "with pip install -e <its folder>\n"


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


@pytest.mark.parametrize("train,predict,out", [(EASYNLP_SH_TRAIN, EASYNLP_SH_PREDICT, "."),
                                               (EASYNLP_README_TRAIN, EASYNLP_README_PREDICT, "tmp")],
                         ids=["run_latent_diffusion_appzoo_cli_local.sh", "README.md"])
def test_easynlp_tutorial_commands_verbatim(train, predict, out, tiny_model_dir, shapes_data, tmp_path, monkeypatch,
                                            caplog):
    """EasyNLP's own tutorial commands, word for word, in a folder holding the tables it downloads (small ones) and
    alibaba-pai/pai-diffusion-general-large-zh: the tiny model, or for the README's size=256 a tiny one with SD's
    f=8 VAE (64² native), since the f=2 one would attend over 128² latents: minutes on a CPU."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modelzoo.tiny import make_tiny_diffusers_model

    monkeypatch.setenv("EASYNLP_PROGRESS", "0")
    for name, rows in (("T2I_train.tsv", 2), ("T2I_val.tsv", 1), ("T2I_test.tsv", 2)):
        lines = open(os.path.join(shapes_data, name), encoding="utf-8").readlines()[:rows]
        (tmp_path / name).write_text("".join(lines), encoding="utf-8")
    readme = "size=256" in train[-1]
    if readme:
        make_tiny_diffusers_model(str(tmp_path / "alibaba-pai" / "pai-diffusion-general-large-zh"), image_size=64,
                                  vae_factor=8)
    else:
        os.symlink(os.path.dirname(tiny_model_dir), tmp_path / "alibaba-pai")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        assert cli.main(train) == 0
    log = caplog.text
    assert "user-defined parameter reset_model_state_flag is accepted and has no effect here" in log
    model = tmp_path / out / "finetune_model"
    for name in ("config.json", "pytorch_model.bin", "vocab.txt"):
        assert (model / name).is_file()
    events = EventAccumulator(str(model / "log"))
    events.Reload()
    image = events.Images(events.Tags()["images"][0])[0]  # validation's sample images, at the training size
    if readme:  # EasyNLP's text-to-image keys: size is the training size, text_len the text length
        assert (image.width, image.height) == (256, 256)
        assert "text_len=32 is used instead of --sequence_length=288" in log
        assert "user-defined parameter img_len is accepted and has no effect here" in log
    else:
        assert (image.width, image.height) == (32, 32)  # the model's native size
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cli.main(predict) == 0
    assert "--save_checkpoint_steps has no effect in --mode=predict" in caplog.text
    rows = [line.split("\t") for line in (tmp_path / out / "T2I_outputs.tsv").read_text().splitlines()]
    prompts = [line.split("\t") for line in (tmp_path / "T2I_test.tsv").read_text(encoding="utf-8").splitlines()]
    assert [row[:2] for row in rows] == [p for p in prompts for _ in range(2)]  # idx,text,gen_imgbase64; n_samples=2
    assert all(len(row) == 3 for row in rows)
    size = Image.open(io.BytesIO(base64.b64decode(rows[0][2]))).size
    assert size == ((256, 256) if readme else (32, 32))  # a model fine-tuned at size=256 generates at 256
    for idx, _ in prompts:
        assert sorted(os.listdir(tmp_path / "output" / idx)) == ["0000.png", "0001.png", "line.txt", "prompt.txt"]


def test_log_lines_go_through_tqdm_write_above_a_live_bar(recording_app, monkeypatch, caplog):
    """In-process: while a mode runs, a console handler's records are printed by tqdm.write (same stream, same
    format); afterwards the original handler is back."""
    import logging

    from tqdm import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append((s, file))))
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    console = logging.StreamHandler(stream)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [*root.handlers, console])
    caplog.set_level("INFO")

    def logs(self, mode):
        logging.getLogger("easynlp.test").info("halfway there")
        return 0

    monkeypatch.setattr(recording_app, "run", logs)
    assert cli.main([a.replace("latent_diffusion", "recorder") for a in SEED_PREDICT]) == 0
    assert ("INFO easynlp.test: halfway there", stream) in written
    assert "halfway there" not in stream.getvalue()  # not written past tqdm
    assert console in root.handlers and not any(isinstance(h, cli._TqdmWriteHandler) for h in root.handlers)


def test_console_log_line_lands_above_the_bar_not_on_it(tmp_path):
    """The real command's logging (basicConfig on stderr, EASYNLP_LOG_LEVEL's level, the usual format): a record
    logged while a bar is drawn starts its own line of stderr, and the bar is redrawn after it."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from tqdm import tqdm\n"
        "from appzoo import registry\n"
        "from easynlp_ldm import cli\n"
        "class App:\n"
        "    def __init__(self, flags, params):\n"
        "        pass\n"
        "    def run(self, mode):\n"
        "        import logging\n"
        "        bar = tqdm(total=4, unit='prompt', file=sys.stderr, mininterval=0, miniters=1)\n"
        "        bar.update(1)\n"
        "        logging.getLogger('easynlp.predict').info('halfway there')\n"
        "        logging.getLogger('easynlp.predict').debug('a debug line')\n"
        "        bar.update(3)\n"
        "        bar.close()\n"
        "        return 0\n"
        "sys.modules['recorder_app'] = sys.modules[__name__]\n"
        "registry.APPS['recorder'] = registry.AppEntry(params='appzoo.latent_diffusion.params:PARAMS',\n"
        "                                              app='recorder_app:App')\n"
        "sys.exit(cli.main(sys.argv[1:]))\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_LOG_LEVEL="INFO")
    argv = [a.replace("latent_diffusion", "recorder") for a in SEED_PREDICT]
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.replace("\r", "\n").split("\n")
    logged = [line for line in lines if "halfway there" in line]
    assert len(logged) == 1 and logged[0].endswith(" INFO easynlp.predict: halfway there")
    assert "prompt" not in logged[0]  # the bar's text is not in front of it
    assert "a debug line" not in out.stderr  # EASYNLP_LOG_LEVEL still decides
    assert " 4/4 " in out.stderr.split("halfway there")[1]  # the bar goes on below it
