"""CPU speed, whole jobs side by side in one run: the embedded model on 64 prompts of the shapes test split (batch 16,
DPM-Solver++ 20 steps, guidance 5, the same starting noise for everyone) with

* diffusers' ``StableDiffusionPipeline`` fp32 on the same weights (exported with ``export_format=diffusers``);
* the peer a CPU user would pick: optimum-intel's ``OVStableDiffusionPipeline``, static shapes, bf16 where the CPU
  has it (``bench/openvino_peer.py`` in its own venv, set up by ``bench/setup_openvino_peer.sh``), cold (its export
  to OpenVINO IR included) and warm (IR on disk);
* this project's ``easynlp --mode=predict`` at each level of ``--levels`` (``auto`` = OpenVINO on CPU; ``auto`` and
  ``compile`` run cold — empty OpenVINO / inductor caches — then warm).

Each contender is a fresh process, timed from start to its last PNG (import, load, conversion or compilation
included: what a user waits for); "steady" is the s/image of the batches after the first, from the process's own
timing. Quality: PSNR of every image against diffusers fp32's (same noise), and the pixel judge's colour and shape
accuracy against the split's truth. Then the same job under a competing CPU load (``--load`` single-threaded busy
processes, default 2: another job sharing the cores) for the warm contenders, and the SD-1.5-size UNet per-step table
(``bench/unet_speed.py``, with the GEMM peak measured in that run).

    bash bench/setup_openvino_peer.sh          # once: the peer's venv (.bench_venvs/optimum)
    python bench/cpu_speed.py [--images 64] [--batch 16] [--steps 20] [--levels torch,auto,compile] [--repeats 2]
                              [--load 2] [--no-peer] [--no-unet] [--json FILE]

A contender may carry environment overrides after '@', e.g. ``--loaded auto,auto@OMP_WAIT_POLICY=ACTIVE``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PEER_PYTHON = os.path.join(ROOT, ".bench_venvs", "optimum", "bin", "python")
RANDOM_SEED = 42

DIFFUSERS_SCRIPT = r'''
import json, os, sys, time
import numpy as np, torch
from diffusers import StableDiffusionPipeline
folder, table, latents, out, batch, steps, guidance = sys.argv[1:8]
batch, steps, guidance = int(batch), int(steps), float(guidance)
prompts = [line.rstrip("\n").split("\t")[1] for line in open(table, encoding="utf-8")]
noise = torch.from_numpy(np.load(latents))
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
os.makedirs(out, exist_ok=True)
times = []
for start in range(0, len(prompts), batch):
    t0 = time.perf_counter()
    images = pipe(prompts[start:start + batch], num_inference_steps=steps, guidance_scale=guidance,
                  latents=noise[start:start + batch]).images
    for i, image in enumerate(images):
        image.save(os.path.join(out, f"{start + i:04d}.png"))
    times.append(time.perf_counter() - t0)
print(json.dumps({"batch_s": times}))
'''

LOAD_SCRIPT = r'''
import numpy as np
a = np.random.rand(384, 384)
while True:
    a = np.tanh(a @ a.T / 384.0)
'''


def write_inputs(tmp: str, images: int) -> tuple[str, list[tuple[str, str]]]:
    """The first ``images`` prompts of a fresh shapes test split → (prompts TSV path, [(colour, shape)] truth)."""
    from shapes_data import generate_dataset
    from shapes_data.scoring import load_truth_by_idx, truth_path_for

    generate_dataset(os.path.join(tmp, "data"), seed=0, num_train=0, num_val=0, num_test=images, num_heldout=0)
    source = os.path.join(tmp, "data", "T2I_test.tsv")
    truth = load_truth_by_idx(truth_path_for(source, ""))
    table = os.path.join(tmp, "prompts.tsv")
    wanted = []
    with open(source, encoding="utf-8") as src, open(table, "w", encoding="utf-8") as dst:
        for line in list(src)[:images]:
            idx, text = line.rstrip("\n").split("\t")[:2]
            dst.write(f"{idx}\t{text}\n")
            wanted.append((truth[idx]["colour"], truth[idx]["shape"]))
    return table, wanted


def write_latents(path: str, folder: str, count: int) -> None:
    """The starting noise predict draws for row n (seed ``image_seed(RANDOM_SEED, n, 0)``), for the other pipelines."""
    import numpy as np
    import torch

    from appzoo.latent_diffusion.generation import image_seed

    with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    shape = (1, config["in_channels"], config["sample_size"], config["sample_size"])
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(image_seed(RANDOM_SEED, n, 0)),
                         dtype=torch.float32) for n in range(1, count + 1)]
    np.save(path, torch.cat(noise).numpy())


class Bench:
    def __init__(self, args, tmp: str):
        self.args, self.tmp = args, tmp
        self.table, self.truth = write_inputs(tmp, args.images)
        self.folder = os.path.join(tmp, "diffusers")
        self.run([sys.executable, "-m", "easynlp_ldm.cli", "--mode=export", f"--outputs={self.folder}",
                  "--user_defined_parameters=export_format=diffusers"], {})
        self.latents = os.path.join(tmp, "latents.npy")
        write_latents(self.latents, self.folder, args.images)
        self.caches = {name: os.path.join(tmp, name) for name in ("openvino", "inductor", "peer_ir")}
        self.reference = None
        self.count = 0

    def run(self, command: list[str], env: dict) -> tuple[float, str]:
        full = {**os.environ, "PYTHONPATH": ROOT, "EASYNLP_PROGRESS": "0", "EASYNLP_LOG_LEVEL": "INFO", **env}
        start = time.perf_counter()
        done = subprocess.run(command, env=full, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
        return seconds, done.stdout + done.stderr

    def contender(self, name: str, fresh: bool = False) -> dict:
        """Run one contender's whole job; ``fresh`` empties its caches first. → {total, steady, images dir}."""
        import shutil

        kind, _, overrides = name.partition("@")
        env = dict(item.split("=", 1) for item in overrides.split(",") if item)
        self.count += 1
        out = os.path.join(self.tmp, f"out{self.count}")
        a = self.args
        if kind == "diffusers":
            seconds, log = self.run([sys.executable, "-c", DIFFUSERS_SCRIPT, self.folder, self.table, self.latents,
                                     out, str(a.batch), str(a.steps), str(a.guidance)], env)
            times = json.loads(next(line for line in log.splitlines() if line.startswith('{"batch_s"')))["batch_s"]
            steady = sum(times[1:]) / (a.images - a.batch) if len(times) > 1 else float("nan")
            files = [os.path.join(out, f"{i:04d}.png") for i in range(a.images)]
        elif kind == "peer":
            if fresh:
                shutil.rmtree(self.caches["peer_ir"], ignore_errors=True)
            report = os.path.join(self.tmp, f"peer{self.count}.json")
            seconds, _ = self.run([PEER_PYTHON, os.path.join(ROOT, "bench", "openvino_peer.py"), "--model",
                                   self.folder, "--prompts", self.table, "--latents", self.latents, "--out", out,
                                   "--batch", str(a.batch), "--steps", str(a.steps), "--guidance", str(a.guidance),
                                   "--precision", "auto", "--ir_cache", self.caches["peer_ir"], "--json", report],
                                  {**env, "PYTHONPATH": ""})
            with open(report, encoding="utf-8") as handle:
                steady = json.load(handle)["steady_s_per_image"]
            files = [os.path.join(out, f"{i:04d}.png") for i in range(a.images)]
        else:
            if fresh:
                shutil.rmtree(self.caches["openvino"], ignore_errors=True)
                shutil.rmtree(self.caches["inductor"], ignore_errors=True)
            env = {"EASYNLP_OPENVINO_CACHE": self.caches["openvino"],
                   "TORCHINDUCTOR_CACHE_DIR": self.caches["inductor"], **env}
            udp = (f"n_samples=1 ddim_steps={a.steps} scale={a.guidance} optimize={kind} write_image=True "
                   f"image_prefix={out}/")
            seconds, log = self.run([sys.executable, "-m", "easynlp_ldm.cli", "--mode=predict",
                                     f"--tables={self.table}", "--input_schema=idx:str:1,text:str:1",
                                     "--first_sequence=text", f"--outputs={out}.tsv", "--output_schema=idx",
                                     f"--micro_batch_size={a.batch}", f"--random_seed={RANDOM_SEED}",
                                     f"--user_defined_parameters={udp}"], env)
            found = re.search(r"then ([0-9.]+) s/image \(steady\)", log)
            steady = float(found.group(1)) if found else float("nan")
            ran = re.search(r"ran_as=(\w+).*?dtype=(\w+)", log)
            name += f" (ran as {ran.group(1)}, {ran.group(2)})" if ran else ""
            with open(self.table, encoding="utf-8") as handle:
                idxs = [line.split("\t")[0] for line in handle]
            files = [os.path.join(out, idx, "0000.png") for idx in idxs]
        return {"name": name, "total": seconds, "steady": steady, **self.quality(files)}

    def quality(self, files: list[str]) -> dict:
        import numpy as np
        from PIL import Image

        from shapes_data import judge

        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        verdicts = [judge(image) for image in images]
        right = sum(v.colour == c and v.shape == s for v, (c, s) in zip(verdicts, self.truth))
        result = {"colour_shape": right / len(files)}
        if self.reference is None:
            self.reference = images
        else:
            values = []
            for a, b in zip(images, self.reference):
                mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
                values.append(99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
            result["psnr_mean"], result["psnr_min"] = float(np.mean(values)), float(np.min(values))
        return result


def show(label: str, runs: list[dict], base: float | None) -> str:
    totals, steadies = [r["total"] for r in runs], [r["steady"] for r in runs]
    q = runs[-1]
    spread = (f"{min(totals):.1f} / {statistics.median(totals):.1f}" if len(runs) > 1 else f"{totals[0]:.1f}")
    line = (f"| {label} | {spread} | {min(steadies):.3f} / {statistics.median(steadies):.3f} | "
            f"{base / min(totals):.2f}x |" if base else f"| {label} | {spread} | {min(steadies):.3f} / "
            f"{statistics.median(steadies):.3f} | — |")
    reference = label.startswith("diffusers") or "psnr_mean" not in q
    psnr = "reference" if reference else f"{q['psnr_mean']:.1f} / {q['psnr_min']:.1f}"
    return line + f" {psnr} | {q['colour_shape']:.1%} |"


def gemm_peak_fp32() -> float:
    import torch

    from bench.unet_speed import gemm_peak

    return gemm_peak(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--levels", default="torch,auto,compile")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per contender (min / median printed)")
    parser.add_argument("--load", type=int, default=2, help="competing busy processes (0: skip that table)")
    parser.add_argument("--loaded", default="diffusers,peer,torch,auto",
                        help="contenders run under the competing load (warm)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-unet", action="store_true")
    parser.add_argument("--unet-levels", default="none,torch,openvino")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    import torch

    from modelzoo.optimize import cpu_supports_bf16

    peer = not args.no_peer
    if peer and not os.path.exists(PEER_PYTHON):
        print("the peer's venv is missing: run bash bench/setup_openvino_peer.sh (or pass --no-peer)")
        raise SystemExit(2)
    print(f"CPU: {os.cpu_count()} CPUs visible, torch {torch.get_num_threads()} threads; fp32 GEMM peak (4096² "
          f"matmul) {gemm_peak_fp32() / 1e9:.0f} GFLOP/s; bf16: "
          f"{'native' if cpu_supports_bf16() else 'not supported (fp32 everywhere)'}",
          flush=True)
    report: dict = {"quiet": {}, "loaded": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, tmp)
        print(f"{args.images} prompts of the shapes test split, batch {args.batch}, DPM-Solver++ {args.steps} steps, "
              f"guidance {args.guidance}, the embedded model, the same starting noise for every contender\n",
              flush=True)
        print("| contender | whole job, s (min / median) | steady s/image (min / median) | speed-up vs diffusers "
              "| PSNR vs diffusers, dB (mean / min) | colour+shape right |")
        print("|---|---|---|---|---|---|")
        contenders = ["diffusers"] + (["peer"] if peer else []) + args.levels.split(",")
        base = None
        for name in contenders:
            cold = []
            if name in ("peer", "auto", "max", "openvino", "compile"):
                cold = [bench.contender(name, fresh=True)]
                print(show(f"{cold[0]['name']}, cold", cold, base), flush=True)
            warm = [bench.contender(name) for _ in range(args.repeats)]
            label = warm[0]["name"] + (", warm" if cold else "")
            if name == "diffusers":
                base = min(r["total"] for r in warm)
            print(show(label, warm, base), flush=True)
            report["quiet"][name] = {"cold": cold, "warm": warm}
        if args.load:
            print(f"\nthe same job beside {args.load} busy single-threaded processes (another job on the same cores):")
            print("| contender | whole job, s | steady s/image | × its quiet time |")
            print("|---|---|---|---|")
            loaders = [subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT], env=dict(os.environ, OMP_NUM_THREADS="1"))
                       for _ in range(args.load)]
            try:
                time.sleep(2)
                for name in args.loaded.split(","):
                    if name == "peer" and not peer:
                        continue
                    run = bench.contender(name)
                    quiet = report["quiet"].get(name.split("@")[0], {}).get("warm")
                    ratio = f"{run['total'] / min(r['total'] for r in quiet):.2f}" if quiet else "—"
                    print(f"| {run['name']} | {run['total']:.1f} | {run['steady']:.3f} | {ratio} |", flush=True)
                    report["loaded"][name] = run
            finally:
                for process in loaders:
                    process.kill()
    if not args.no_unet:
        print("\nSD-1.5-size UNet, 256², batch 2 (bench/unet_speed.py):", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "unet_speed.py"), "--steps", "3",
                        "--levels", args.unet_levels], check=True, cwd=ROOT)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
