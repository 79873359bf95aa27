"""The CPU peer of bench/cpu_speed.py: optimum-intel's OVStableDiffusionPipeline (OpenVINO) as its guides give it to CPU
users — exported to OpenVINO IR, reshaped to static shapes, bf16 inference where the CPU has it — on the same diffusers
folder, prompts, steps, guidance, batch and starting noise. Runs in its own venv (bash bench/setup_openvino_peer.sh)
and imports nothing from this project.

    .bench_venvs/optimum/bin/python bench/openvino_peer.py --model DIFFUSERS_DIR --prompts TSV --out DIR
        [--latents NPY] [--batch 16] [--steps 20] [--guidance 5] [--height H --width W]
        [--precision auto|f32|bf16] [--threads 0] [--ir_cache DIR] [--json FILE]

Prints one JSON line (also written to --json): import_s (process start → optimum.intel imported), export_s (diffusers
→ IR, 0 when the IR cache has it), load_s, compile_s (static reshape + compile), batch_s, steady_s_per_image (median
of the batches after the first, per image of a full batch), total_s (process start → last PNG), precision (asked
for), unet_precision and threads (what the compiled UNet runs with), height, width, versions.

* The export runs in a child process (same interpreter), as ``optimum-cli export openvino`` would: tracing leaves
  torch's OpenMP workers behind, and in the same process they slowed every later OpenVINO batch about 2.5× on two
  cores. export_s is the child's wall time (its imports included).
* The IR cache is keyed by the model folder's path and the newest mtime of its files, and is filled atomically.
* Static shapes: a last batch smaller than --batch is padded to the static size (its last prompt and noise
  repeated) and the extra images dropped.
* optimum-intel reshapes the VAE decoder to num_images_per_prompt (one prompt per call, as in its guides); a batch of
  different prompts decodes them all at once, so the decoder gets the batch size.
* The tokenizer is whatever the folder's model_index.json names (a BertTokenizer here): diffusers' pipeline only
  calls it, and the text encoder's static sequence length is the tokenizer's model_max_length, clamped to the text
  encoder's max_position_embeddings.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

EXPORT_CHILD = r"""
import sys
from optimum.intel import OVStableDiffusionPipeline
model, destination = sys.argv[1:3]
pipe = OVStableDiffusionPipeline.from_pretrained(model, export=True, compile=False)
pipe.save_pretrained(destination)
"""
PACKAGES = ("optimum-intel", "openvino", "diffusers", "transformers", "torch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers StableDiffusionPipeline folder")
    parser.add_argument("--prompts", required=True, help="TSV of idx<TAB>text lines")
    parser.add_argument("--out", required=True, help="folder for the PNGs ({i:04d}.png)")
    parser.add_argument("--latents", default="", help=".npy float32 [N, 4, H/8, W/8]: starting noise per prompt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=0, help="0: unet sample_size × vae scale factor")
    parser.add_argument("--width", type=int, default=0, help="0: unet sample_size × vae scale factor")
    parser.add_argument("--precision", default="auto", choices=("auto", "f32", "bf16"))
    parser.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS; 0: OpenVINO's default")
    parser.add_argument("--ir_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "openvino_peer"))
    parser.add_argument("--json", default="")
    return parser.parse_args()


def ir_folder(model: str, cache: str) -> str:
    """The IR cache entry of ``model``: its absolute path and the newest mtime of its files."""
    newest = max(os.path.getmtime(os.path.join(folder, name))
                 for folder, _, names in os.walk(model) for name in names)
    stamp = f"{os.path.abspath(model)}:{newest}"
    return os.path.join(cache, hashlib.sha256(stamp.encode()).hexdigest()[:16])


def export(model: str, destination: str) -> float:
    """Convert ``model`` to OpenVINO IR in a child process; the seconds it took (0 when cached)."""
    if os.path.isfile(os.path.join(destination, "model_index.json")):
        return 0.0
    start = time.perf_counter()
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(destination))
    try:
        subprocess.run([sys.executable, "-c", EXPORT_CHILD, model, staging], check=True)
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    from importlib.metadata import version

    import numpy as np
    import openvino as ov
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    imported = time.perf_counter()
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    ov_config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if args.threads:
        ov_config["INFERENCE_NUM_THREADS"] = args.threads

    ir_dir = ir_folder(args.model, args.ir_cache)
    export_s = export(args.model, ir_dir)

    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(ir_dir, compile=False, ov_config=ov_config)
    load_s = time.perf_counter() - start

    with open(os.path.join(args.model, "unet", "config.json"), encoding="utf-8") as handle:
        sample = json.load(handle)["sample_size"]
    height = args.height or sample * pipe.vae_scale_factor
    width = args.width or sample * pipe.vae_scale_factor
    with open(os.path.join(args.model, "text_encoder", "config.json"), encoding="utf-8") as handle:
        positions = json.load(handle).get("max_position_embeddings")
    if positions and pipe.tokenizer.model_max_length > positions:
        pipe.tokenizer.model_max_length = positions

    start = time.perf_counter()
    pipe.reshape(batch_size=args.batch, height=height, width=width, num_images_per_prompt=1)
    pipe.vae_decoder.model = pipe._reshape_vae_decoder(pipe.vae_decoder.model, height, width, args.batch)
    pipe.compile()
    compile_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    compiled = pipe.unet.request  # what OpenVINO made of the hints: bf16 falls back to f32 on a CPU without it
    effective = {"unet_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
                 "threads": compiled.get_property("INFERENCE_NUM_THREADS")}

    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [line.rstrip("\n").split("\t")[1] for line in handle if line.strip()]
    noise = None
    if args.latents:
        noise = np.load(args.latents).astype(np.float32)
        wanted = (4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        if noise.shape[0] < len(prompts) or tuple(noise.shape[1:]) != wanted:
            raise SystemExit(f"--latents has shape {noise.shape}; wanted ({len(prompts)}, *{wanted})")

    os.makedirs(args.out, exist_ok=True)
    batch_s = []
    for first in range(0, len(prompts), args.batch):
        chunk = prompts[first:first + args.batch]
        real = len(chunk)
        chunk += [chunk[-1]] * (args.batch - real)
        kwargs = {}
        if noise is not None:
            part = noise[first:first + real]
            kwargs["latents"] = torch.from_numpy(np.concatenate([part] + [part[-1:]] * (args.batch - real)))
        start = time.perf_counter()
        images = pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance, height=height,
                      width=width, output_type="pil", **kwargs).images
        for i, image in enumerate(images[:real]):
            image.save(os.path.join(args.out, f"{first + i:04d}.png"))
        batch_s.append(time.perf_counter() - start)

    steady = statistics.median(batch_s[1:] or batch_s) / args.batch
    report = {"import_s": imported - START, "export_s": export_s, "load_s": load_s, "compile_s": compile_s,
              "batch_s": batch_s, "steady_s_per_image": steady, "total_s": time.perf_counter() - START,
              "precision": precision, **effective, "height": height, "width": width,
              "versions": {name: version(name) for name in PACKAGES}}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main()
