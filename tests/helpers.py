"""What several test modules share: servers, command lines, readers of outputs. Test modules import this, never
each other; fixtures live in conftest.py."""

import base64
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tutorial commands of this project's seed README (EasyNLP's, with ./finetuned_model and output_schema=text).
SEED_TRAIN = ["--mode=train", "--worker_gpu=1", "--tables=T2I_train.tsv,T2I_val.tsv",
              "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
              "--second_sequence=imgbase64", "--checkpoint_dir=./finetuned_model", "--learning_rate=4e-5",
              "--epoch_num=3", "--random_seed=42", "--logging_steps=100", "--save_checkpoint_steps=1000",
              "--sequence_length=288", "--micro_batch_size=16", "--app_name=latent_diffusion",
              "--user_defined_parameters=\npretrain_model_name_or_path=alibaba-pai/pai-diffusion-general-large-zh\n"
              "reset_model_state_flag=True\n"]
SEED_PREDICT = ["--mode=predict", "--worker_gpu=1", "--tables=T2I_test.tsv", "--input_schema=idx:str:1,text:str:1",
                "--output_schema=text", "--outputs=./output.tsv", "--first_sequence=text",
                "--checkpoint_dir=./finetuned_model", "--random_seed=42", "--logging_steps=100",
                "--save_checkpoint_steps=500", "--sequence_length=32", "--micro_batch_size=16",
                "--app_name=latent_diffusion",
                "--user_defined_parameters=\nn_samples=2\nwrite_image=True\nimage_prefix=./output/\n"]


def shell_words(command: str) -> list[str]:
    """A shell command's words after the program (line continuations joined, quotes removed), as bash passes them."""
    return shlex.split(command.replace("\\\n", " "))[1:]


# EasyNLP's own tutorial, copied verbatim: examples/latent_diffusion/run_latent_diffusion_appzoo_cli_local.sh (train
# and predict through the easynlp command) and examples/latent_diffusion/README.md (the same flags to its main.py
# under torch.distributed.launch, with the text-to-image keys size, text_len, img_len). Relative paths: run them in a
# folder that holds the tables and alibaba-pai/pai-diffusion-general-large-zh.
EASYNLP_SH_TRAIN = shell_words(r"""easynlp \
    --mode=train \
    --worker_gpu=1 \
    --tables=T2I_train.tsv,T2I_val.tsv \
    --input_schema=idx:str:1,text:str:1,imgbase64:str:1 \
    --first_sequence=text \
    --second_sequence=imgbase64 \
    --checkpoint_dir=./finetune_model \
    --learning_rate=4e-5 \
    --epoch_num=3 \
    --random_seed=42 \
    --logging_steps=100 \
    --save_checkpoint_steps=1000 \
    --sequence_length=288 \
    --micro_batch_size=16 \
    --app_name=latent_diffusion \
    --user_defined_parameters='
        pretrain_model_name_or_path=alibaba-pai/pai-diffusion-general-large-zh
        reset_model_state_flag=True
      '
""")
EASYNLP_SH_PREDICT = shell_words(r"""easynlp \
      --mode=predict \
      --worker_gpu=1 \
      --tables=T2I_test.tsv \
      --input_schema=idx:str:1,text:str:1 \
      --output_schema=idx,text,gen_imgbase64 \
      --outputs=./T2I_outputs.tsv \
      --first_sequence=text \
      --checkpoint_dir=./finetune_model \
      --random_seed=42 \
      --logging_steps=100 \
      --save_checkpoint_steps=500 \
      --sequence_length=32 \
      --micro_batch_size=16 \
      --app_name=latent_diffusion \
      --user_defined_parameters="n_samples=2 write_image=True image_prefix=./output/"
""")
EASYNLP_README_TRAIN = shell_words(r"""./main.py \
    --mode=train \
    --worker_gpu=1 \
    --tables=T2I_train.tsv,T2I_val.tsv \
    --input_schema=idx:str:1,text:str:1,imgbase64:str:1 \
    --first_sequence=text \
    --second_sequence=imgbase64 \
    --checkpoint_dir=./tmp/finetune_model \
    --learning_rate=4e-5 \
    --epoch_num=3 \
    --random_seed=42 \
    --logging_steps=100 \
    --save_checkpoint_steps=1000 \
    --sequence_length=288 \
    --micro_batch_size=16 \
    --app_name=latent_diffusion \
    --user_defined_parameters='
        pretrain_model_name_or_path=alibaba-pai/pai-diffusion-general-large-zh
        size=256
        text_len=32
        img_len=256
        reset_model_state_flag=True
      '
""")
EASYNLP_README_PREDICT = shell_words(r"""./main.py \
      --mode=predict \
      --worker_gpu=1 \
      --tables=T2I_test.tsv \
      --input_schema=idx:str:1,text:str:1 \
      --output_schema=idx,text,gen_imgbase64 \
      --outputs=./tmp/T2I_outputs.tsv \
      --first_sequence=text \
      --checkpoint_dir=./tmp/finetune_model \
      --random_seed=42 \
      --logging_steps=100 \
      --save_checkpoint_steps=500 \
      --sequence_length=32 \
      --micro_batch_size=2 \
      --app_name=latent_diffusion \
      --user_defined_parameters="n_samples=2 write_image=True image_prefix=./output/"
""")
PROMPTS = ["红色的圆形", "蓝色正方形在白色背景上", "一个黄色的三角形", "请画一个绿色的圆形", "灰色背景上的紫色正方形"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, timeout=120, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(process.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


class InProcessServer:
    """The service as ``--mode=serve`` runs it (the same settings, the hardened uvicorn server), in a thread."""

    def __init__(self, model_dir, **params):
        from appzoo.latent_diffusion.loading import load_model
        from appzoo.latent_diffusion.params import PARAMS
        from appzoo.latent_diffusion.serve import LatentDiffusionService, service_settings
        from appzoo.latent_diffusion.settings import InferenceSettings
        from easynlp_ldm.serving.server import build_server

        values = {p.name: p.default for p in PARAMS}
        values.update(ddim_steps=2, max_steps=40, max_num_images=4)
        token = params.pop("api_token", None)
        model = params.pop("model", None) or load_model(model_dir)
        values.update(params)
        settings = InferenceSettings.from_params(values)
        self.service = LatentDiffusionService(model, settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(self.service, service_settings(settings, token), "127.0.0.1", self.port, "warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.url)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def png(b64):
    data = base64.b64decode(b64, validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def predict_argv(table, out, model, *extra, udp="ddim_steps=4"):
    return ["--mode=predict", f"--tables={table}", "--input_schema=idx:str:1,text:str:1", f"--outputs={out}",
            "--first_sequence=text", f"--checkpoint_dir={model}", "--random_seed=7", "--micro_batch_size=2",
            "--app_name=latent_diffusion", *extra, f"--user_defined_parameters={udp}"]


def read_rows(path):
    return [line.split("\t") for line in open(path, encoding="utf-8").read().splitlines()]


def decode(cell):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(cell))).convert("RGB"), dtype=np.int16)


def train_argv(data, out, model, *extra, udp=""):
    return ["--mode=train", f"--tables={os.path.join(data, 'T2I_train.tsv')},{os.path.join(data, 'T2I_val.tsv')}",
            "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
            "--second_sequence=imgbase64", f"--checkpoint_dir={out}", "--random_seed=42", "--logging_steps=1",
            "--app_name=latent_diffusion", *extra,
            f"--user_defined_parameters=pretrain_model_name_or_path={model} {udp}"]


def saved_weights(folder):
    return torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)


EASYNLP_DATA = os.path.join(ROOT, "tests", "data", "easynlp")


def easynlp_checkpoint(folder, prefixed=False, drop_ema=False, use_ema=True):
    """A copy of the committed tiny EasyNLP checkpoint in ``folder``: keys ``model.``-prefixed as EasyNLP's trainer
    writes them without ``reset_model_state_flag``, without its ``model_ema.*`` weights, or with ``use_ema`` off."""
    import json
    import shutil

    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", "vocab.txt"):
        shutil.copy(os.path.join(EASYNLP_DATA, name), os.path.join(folder, name))
    state = torch.load(os.path.join(EASYNLP_DATA, "pytorch_model.bin"), weights_only=True)
    if drop_ema:
        state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    if prefixed:
        state = {"model." + k: v for k, v in state.items()}
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    if not use_ema:
        path = os.path.join(folder, "config.json")
        config = json.load(open(path, encoding="utf-8"))
        config["model"]["params"]["use_ema"] = False
        json.dump(config, open(path, "w", encoding="utf-8"))
    return str(folder)


def mixed_aspect_data(data, folder, sizes=((96, 32), (40, 64), (32, 32))):
    """``data``'s training table with its images re-cut to the given (width, height)s in turn (wide, tall, square
    by default: a resize of the original stretched to the size), and its validation table as it is."""
    os.makedirs(folder, exist_ok=True)
    rows = read_rows(os.path.join(data, "T2I_train.tsv"))
    with open(os.path.join(folder, "T2I_train.tsv"), "w", encoding="utf-8") as out:
        for i, (idx, text, cell) in enumerate(rows):
            image = Image.open(io.BytesIO(base64.b64decode(cell))).convert("RGB").resize(sizes[i % len(sizes)])
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.write(f"{idx}\t{text}\t{base64.b64encode(buffer.getvalue()).decode()}\n")
    shutil.copy(os.path.join(data, "T2I_val.tsv"), folder)
    return folder


def photo(seed, size=(32, 32)):
    """A plain-coloured image with an ellipse of another colour, both drawn from ``seed``."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = rng.integers(0, 255, 3)
    image = Image.fromarray(array)
    ImageDraw.Draw(image).ellipse((6, 6, 24, 20), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def mask(size=(32, 32)):
    """An inpainting mask: a white (repaint) square on black (keep)."""
    from PIL import ImageDraw

    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill=255)
    return image


def make_test_controlnet(model_dir, folder):
    """A ControlNet from the tiny model's UNet (as diffusers' train_controlnet.py initialises it), its zero
    convolutions given random weights so that it changes the images; saved to ``folder``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "zero_conv" in name or "mid_block" in name or "conv_out" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    net.save_pretrained(folder)
    return folder


def kill_after_first_checkpoint(process, run_dir, timeout=120):
    """SIGKILL a training ``process`` as soon as it has saved its first training state in ``run_dir`` (the workers it
    launched die with it); returns the step that state holds, once they have all ended."""
    meta = os.path.join(run_dir, "training_state", "trainer_meta.json")
    deadline = time.time() + timeout
    while not os.path.exists(meta) and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # until its output ends: the workers hold it open while they live
    with open(meta, encoding="utf-8") as handle:
        return json.load(handle)["step"]


def random_adapter(model, folder, targets, seed, rank=4, alpha=8, scale=1.0):
    """A LoRA of ``model``'s denoiser (its family's) on ``targets``, its up-projections random (× ``scale``) so that it
    changes images, saved as train_target=lora saves one; returns ``folder``."""
    from modelzoo.families import family_of
    from modelzoo.lora import add_training_adapters, save_adapters

    add_training_adapters(model, rank, alpha, 0.0, targets, text_encoder=False)
    denoiser = family_of(model).denoiser
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in getattr(model, denoiser).named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * scale
        if param.requires_grad:
            weights[f"{denoiser}.{name}"] = param.detach()
    save_adapters(folder, model, weights)
    return folder


def interrupt_after_first_checkpoint(monkeypatch, argv):
    """Run the training command ``argv`` in this process, stopped as by Ctrl-C once it has saved its first training
    state (exit status 130); the training state is saved as usual again afterwards."""
    from easynlp_ldm import cli
    from easynlp_ldm.trainer import Trainer

    save = Trainer.save_training_state

    def killed_after_saving(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Trainer, "save_training_state", killed_after_saving)
    assert cli.main(argv) == 130
    monkeypatch.setattr(Trainer, "save_training_state", save)


def predicted_image(folder, workdir, udp, seed, steps):
    """predict's one image of "一个红色的圆形" with ``folder`` at ``steps`` steps and ``udp``: (pixels, its seed)."""
    from easynlp_ldm import cli

    table = os.path.join(workdir, "prompts.tsv")
    with open(table, "w", encoding="utf-8") as handle:
        handle.write("0\t一个红色的圆形\n")
    out = os.path.join(workdir, f"out{len(os.listdir(workdir))}.tsv")
    argv = predict_argv(table, out, folder, "--output_schema=idx,text,gen_imgbase64,sample_id,seed",
                        f"--random_seed={seed}", udp=f"ddim_steps={steps} n_samples=1 optimize=none {udp}")
    assert cli.main(argv) == 0
    [(_, _, image, _, image_seed)] = read_rows(out)
    return decode(image), int(image_seed)


# sampler= of the flow-matching DiTs → (scheduler class, config overrides) as a diffusers user swaps it in
FLOW_SAMPLERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {}),
                 "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"})}


def swap_flow_sampler(pipe, sampler):
    """``pipe`` (a Z-Image / Qwen-Image pipeline) with ``sampler``'s scheduler swapped in from its own config, as a
    diffusers user does (UniPC on flow sigmas shifted by the folder's ``shift``)."""
    import diffusers

    class_name, overrides = FLOW_SAMPLERS[sampler]
    config = dict(pipe.scheduler.config, **overrides)
    if overrides:
        config["flow_shift"] = pipe.scheduler.config["shift"]
    pipe.scheduler = getattr(diffusers, class_name).from_config(config)
    return pipe


def easynlp_process(argv):
    """The `easynlp` command in a process of its own (one thread: the same sums in every run), outside any torchrun."""
    env = {**os.environ, "PYTHONPATH": ROOT, "EASYNLP_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "easynlp_ldm.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def one_thread_run(argv):
    """The `easynlp` command run in this process on one thread (``--worker_cpu=1``): the sums of an
    ``easynlp_process`` without starting one; the thread count and ``OMP_NUM_THREADS`` as they were afterwards.
    Returns its exit status."""
    from easynlp_ldm import cli

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        return cli.main([*argv, "--worker_cpu=1"])
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def finished_output(process):
    """The output of an ``easynlp_process`` that ends with status 0."""
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    return output


def largest_difference(a, b):
    """The largest absolute difference between two state dicts of the same names."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def dit_makers():
    """The tiny DiT folder builders by family name, and the flags that keep their training runs short."""
    from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model

    return {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}


DIT_FAST_FLAGS = ["--micro_batch_size=8", "--warmup_proportion=0", "--max_grad_norm=0"]


def aigc_fields(data: bytes) -> dict | None:
    """The GB 45438 AIGC fields of an image file as a third-party reader sees them: exiftool's XMP-TC260:Aigc (and,
    for a PNG, the same JSON in its AIGC text chunk); None when the file has none. Skips without exiftool."""
    import pytest

    if not shutil.which("exiftool"):
        pytest.skip("exiftool missing (Debian: libimage-exiftool-perl; scripts/test.sh installs it)")
    read = subprocess.run(["exiftool", "-j", "-G1", "-XMP-TC260:all", "-PNG:AIGC", "-"], input=data,
                          capture_output=True, check=True)
    tags = json.loads(read.stdout)[0]
    if "XMP-TC260:Aigc" not in tags:
        assert "PNG:AIGC" not in tags
        return None
    fields = json.loads(tags["XMP-TC260:Aigc"])
    if data[:4] == b"\x89PNG":
        assert json.loads(tags["PNG:AIGC"]) == fields
    return fields


def cell_pixels(cell: str) -> tuple:
    """An output cell's image as (size, mode, pixel bytes): what two runs must agree on when their files' AIGC
    metadata (a ProduceID from each run's own fingerprint) differs."""
    from easynlp_ldm.tables import decode_image_base64

    image = decode_image_base64(cell)
    return image.size, image.mode, image.tobytes()


def shows_visible_label(image) -> bool:
    """Whether the visible AIGC label is in the image's corner: the pixels there follow the scaled "AI生成" mask,
    light glyphs on a darker plate."""
    from easynlp_ldm.aigc import visible_label_box, visible_mask

    box, size, pad = visible_label_box(*image.size)
    region = np.asarray(image.convert("RGB").crop(box), dtype=np.float64).mean(axis=2)
    ink = np.zeros(region.shape)
    ink[pad:pad + size[1], pad:pad + size[0]] = np.asarray(visible_mask().resize(size, Image.Resampling.LANCZOS))
    # The glyphs follow the mask's ink (light where it is, at any scale: a 32-pixel image's label is 6 pixels tall)
    follows = np.corrcoef(region.ravel(), ink.ravel())[0, 1]
    return bool(follows > 0.6 and region[ink > 64].mean() - region[ink == 0].mean() > 40)


def logged_images(out):
    """TensorBoard's sample images: tag → (step, width, height) of each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "log"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def with_control_column(data, folder):
    """``data``'s train and validation tables with a conditioning-image column ``control`` (each image inverted)."""
    from PIL import ImageOps

    os.makedirs(folder, exist_ok=True)
    for name in ("T2I_train.tsv", "T2I_val.tsv"):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as out:
            for idx, text, cell in read_rows(os.path.join(data, name)):
                image = ImageOps.invert(Image.open(io.BytesIO(base64.b64decode(cell))).convert("RGB"))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                out.write(f"{idx}\t{text}\t{cell}\t{base64.b64encode(buffer.getvalue()).decode()}\n")
    return folder


def controlnet_argv(data, out, model, *extra, udp=""):
    argv = train_argv(data, out, model, "--micro_batch_size=8", "--learning_rate=1e-3", *extra,
                      udp=f"train_target=controlnet {udp}")
    return [a if not a.startswith("--input_schema") else
            "--input_schema=idx:str:1,text:str:1,imgbase64:str:1,control:str:1" for a in argv]
