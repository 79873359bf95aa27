"""CPU seconds per image of the embedded models side by side in one run: ``shapes-ldm-zh`` (the UNet default) and
``shapes-dit-zh`` (the Z-Image-layout DiT), each with its own default sampler, steps and guidance (the UNet: 20 steps
of DPM-Solver++ with guidance 5, so two UNet passes a step; the DiT: 20 flow-matching Euler steps, unguided), on the
first ``--images`` prompts of the shapes test split, ``easynlp --mode=predict`` at ``--optimize`` (default auto),
batch ``--batch``. Each contender is a fresh process; the models alternate ``--repeats`` times so that a change in the
machine's load hits both. "total" is the whole job (import, load, conversion included), "steady" the s/image of the
batches after the first, from predict's own log; the ratio is DiT / UNet within a repeat, then min and median.
Accuracy (each stated attribute, judged from pixels against the split's truth) is printed too, so a faster model that
draws the wrong thing shows.

    python bench/embedded_speed.py [--images 64] [--batch 16] [--repeats 3] [--optimize auto] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.cpu_speed import write_inputs  # noqa: E402

MODELS = ("shapes-ldm-zh", "shapes-dit-zh")


def run_predict(model: str, table: str, out: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "EASYNLP_PROGRESS": "0", "EASYNLP_LOG_LEVEL": "INFO"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    udp = f"n_samples=1 optimize={args.optimize} write_image=True image_prefix={out}/"
    command = [sys.executable, "-m", "easynlp_ldm.cli", "--mode=predict", f"--tables={table}",
               "--input_schema=idx:str:1,text:str:1", "--first_sequence=text", f"--outputs={out}.tsv",
               "--output_schema=idx", f"--micro_batch_size={args.batch}", "--random_seed=42",
               f"--checkpoint_dir={model}", f"--user_defined_parameters={udp}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{model}: predict failed ({done.returncode})\n{done.stderr[-3000:]}")
    log = done.stdout + done.stderr
    found = re.search(r"then ([0-9.]+) s/image \(steady\)", log)
    return {"total": total, "steady": float(found.group(1)) if found else float("nan"), "out": out}


def accuracy(table: str, out: str, truth_path: str) -> dict:
    """Share right per stated attribute (judged from pixels, as --mode=evaluate does) of one run's images."""
    import numpy as np
    from PIL import Image

    from shapes_data import judge
    from shapes_data.scoring import STATED_ATTRIBUTES, judge_prompt, load_truth_by_idx, stated_attributes

    truth = load_truth_by_idx(truth_path)
    right = {a: [] for a in STATED_ATTRIBUTES}
    with open(table, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t")[:2] for line in handle]
    for idx, text in rows:
        verdict = judge(np.asarray(Image.open(os.path.join(out, idx, "0000.png")).convert("RGB")))
        ok = judge_prompt(verdict, stated_attributes(text, truth[idx], f"{table}: {idx}"))
        for attribute in STATED_ATTRIBUTES:
            if ok[attribute] is not None:
                right[attribute].append(ok[attribute])
    return {a: sum(v) / len(v) for a, v in right.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimize", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: leave as is)")
    args = parser.parse_args()
    from shapes_data.scoring import truth_path_for

    with tempfile.TemporaryDirectory() as tmp:
        table, _ = write_inputs(tmp, args.images)
        truth_path = truth_path_for(os.path.join(tmp, "data", "T2I_test.tsv"), "")
        runs = {m: [] for m in MODELS}
        for repeat in range(args.repeats):
            for model in MODELS:
                result = run_predict(model, table, os.path.join(tmp, f"{model}_{repeat}"), args)
                runs[model].append(result)
                print(f"repeat {repeat + 1}: {model:15s} total {result['total']:6.1f} s, "
                      f"steady {result['steady']:.3f} s/image", flush=True)
        print(f"\n{args.images} prompts, batch {args.batch}, optimize={args.optimize}, "
              f"threads={args.threads or os.cpu_count()}; min / median of {args.repeats}")
        for model in MODELS:
            totals = [r["total"] for r in runs[model]]
            steadies = [r["steady"] for r in runs[model]]
            acc = accuracy(table, runs[model][-1]["out"], truth_path)
            print(f"  {model:15s} total {min(totals):6.1f} / {statistics.median(totals):6.1f} s   steady "
                  f"{min(steadies):.3f} / {statistics.median(steadies):.3f} s/image   "
                  + " ".join(f"{a} {v:.0%}" for a, v in acc.items()))
        for key in ("steady", "total"):
            ratios = [d[key] / u[key] for u, d in zip(runs[MODELS[0]], runs[MODELS[1]])]
            print(f"  DiT / UNet {key:6s}: min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
