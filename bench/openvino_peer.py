"""The CPU peer of bench/cpu_speed.py: optimum-intel's OVStableDiffusionPipeline (OpenVINO) as its guides give it to CPU
users — exported to OpenVINO IR, reshaped to static shapes, bf16 inference where the CPU has it — on the same diffusers
folder, prompts, steps, guidance, batch and starting noise. Runs in its own venv (bash bench/setup_openvino_peer.sh)
and imports nothing from this project.

    .bench_venvs/optimum/bin/python bench/openvino_peer.py --model DIFFUSERS_DIR --prompts TSV --out DIR
        [--latents NPY] [--batch 16] [--steps 20] [--guidance 5] [--precision auto|f32|bf16] [--threads 0]
        [--ir_cache DIR] [--json FILE]

Prints one JSON line: import_s, export_s (diffusers → IR; 0 when the IR cache has it), load_s, compile_s (static
reshape + compile), batch_s, steady_s_per_image (batches after the first), total_s (process start → last PNG).
A last batch smaller than --batch is padded to the static size (repeated prompt and noise) and the extra images
dropped.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--latents", default="")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--precision", default="auto", choices=("auto", "f32", "bf16"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--ir_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "openvino_peer"))
    parser.add_argument("--json", default="")
    args = parser.parse_args()

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
    stamp = f"{os.path.abspath(args.model)}:{os.path.getmtime(os.path.join(args.model, 'unet'))}"
    ir_dir = os.path.join(args.ir_cache, hashlib.sha256(stamp.encode()).hexdigest()[:16])
    export_s = 0.0
    if not os.path.isfile(os.path.join(ir_dir, "model_index.json")):
        start = time.perf_counter()
        exported = OVStableDiffusionPipeline.from_pretrained(args.model, export=True, compile=False)
        exported.save_pretrained(ir_dir)
        del exported
        export_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(ir_dir, compile=False, ov_config=ov_config)
    loaded = time.perf_counter() - start
    with open(os.path.join(args.model, "unet", "config.json"), encoding="utf-8") as handle:
        sample = json.load(handle)["sample_size"]
    size = sample * pipe.vae_scale_factor
    start = time.perf_counter()
    pipe.reshape(batch_size=args.batch, height=size, width=size, num_images_per_prompt=1)
    # optimum-intel 2.2 reshapes the VAE decoder to a batch of num_images_per_prompt (one prompt per call, as its
    # guides use it); a batch of different prompts decodes all of them at once, so the decoder gets the batch size
    pipe.vae_decoder.model = pipe._reshape_vae_decoder(pipe.vae_decoder.model, size, size, args.batch)
    pipe.compile()
    compiled = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)

    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [line.rstrip("\n").split("\t")[1] for line in handle if line.strip()]
    noise = np.load(args.latents) if args.latents else None
    os.makedirs(args.out, exist_ok=True)
    batch_s = []
    for first in range(0, len(prompts), args.batch):
        chunk = prompts[first:first + args.batch]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (args.batch - real)
        kwargs = {}
        if noise is not None:
            part = noise[first:first + real]
            part = np.concatenate([part] + [part[-1:]] * (args.batch - real))
            kwargs["latents"] = torch.from_numpy(part)
        start = time.perf_counter()
        images = pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                      output_type="pil", **kwargs).images
        for i, image in enumerate(images[:real]):
            image.save(os.path.join(args.out, f"{first + i:04d}.png"))
        batch_s.append(time.perf_counter() - start)
    steady = [t / args.batch for t in batch_s[1:]] or [batch_s[0] / args.batch]
    report = {"import_s": imported - START, "export_s": export_s, "load_s": loaded, "compile_s": compiled,
              "batch_s": batch_s, "steady_s_per_image": statistics.mean(steady),
              "total_s": time.perf_counter() - START, "precision": precision,
              "versions": {name: version(name) for name in ("optimum-intel", "openvino", "diffusers", "transformers",
                                                            "torch")}}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main()
