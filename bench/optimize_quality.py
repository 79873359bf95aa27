"""Quality guard for the speed levels: prompt-following accuracy (the issue-5 metric) of the embedded model with
optimize=none, torch and auto (OpenVINO on CPU) on the same prompts and seeds, and each level's PSNR against none,
image by image.

    python bench/optimize_quality.py --table DATA/T2I_test.tsv [--rows 200] [--levels none,torch,auto] [--steps 20]

A level may carry parameter overrides after '+', e.g. ``--levels none,auto,auto+guidance_cutoff=0.5``. Without
--table a fresh shapes test split (seed 0, the data set's generator) is written to a temporary folder.
Prints accuracy per level, the difference from none in points, and PSNR (mean and minimum over images).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", default="", help="a shapes split with its .truth.jsonl sidecar")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--levels", default="none,torch,auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--model", default="")
    args = parser.parse_args()
    import numpy as np

    from appzoo.latent_diffusion.generation import Generator, image_seed
    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.params import default_params
    from appzoo.latent_diffusion.settings import GenerationSettings
    from shapes_data import generate_dataset, judge
    from shapes_data.scoring import load_truth_by_idx, truth_path_for

    with tempfile.TemporaryDirectory() as tmp:
        table = args.table
        if not table:
            generate_dataset(tmp, seed=0, num_train=0, num_val=0, num_test=args.rows, num_heldout=0)
            table = os.path.join(tmp, "T2I_test.tsv")
        truth = load_truth_by_idx(truth_path_for(table, ""))
        with open(table, encoding="utf-8") as handle:
            rows = [line.rstrip("\n").split("\t")[:2] for line in handle][:args.rows]
    prompts = [text for _, text in rows]
    seeds = [image_seed(0, number, 0) for number in range(1, len(rows) + 1)]
    levels = args.levels.split(",")
    results, reference = {}, None
    defaults = default_params()
    for level in levels:
        name, *extra = level.split("+")
        overrides = {}
        for item in extra:
            key, _, value = item.partition("=")
            kind = type(defaults[key])
            overrides[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
        params = default_params(optimize=name, ddim_steps=args.steps, **overrides)
        model = load_model(args.model, optimize=params["optimize"], precision=params["precision"])
        generate = Generator(model, GenerationSettings.from_params(params))
        start = time.perf_counter()
        images = []
        for i in range(0, len(prompts), args.batch):
            images += [np.asarray(im) for im in generate(prompts[i:i + args.batch], seeds[i:i + args.batch])]
        seconds = time.perf_counter() - start
        colour = shape = both = 0
        for (idx, _), image in zip(rows, images):
            verdict, record = judge(image), truth[idx]
            colour += verdict.colour == record["colour"]
            shape += verdict.shape == record["shape"]
            both += verdict.colour == record["colour"] and verdict.shape == record["shape"]
        n = len(images)
        results[level] = (100 * colour / n, 100 * shape / n, 100 * both / n)
        label = f"optimize={name}" + "".join(f" {k}={v}" for k, v in overrides.items())
        line = (f"{label}: colour {results[level][0]:.1f} %, shape {results[level][1]:.1f} %, both "
                f"{results[level][2]:.1f} % ({n} prompts, {seconds / n:.3f} s/image incl. warm-up)")
        if reference is None:
            reference = images
        else:
            values = [psnr(a, b) for a, b in zip(images, reference)]
            finite = [v for v in values if v != float("inf")]
            delta = results[level][2] - results[levels[0]][2]
            line += (f"; both {delta:+.1f} points vs {levels[0]}; PSNR vs it: mean "
                     f"{np.mean(finite) if finite else float('inf'):.1f} dB, min {min(values):.1f} dB, "
                     f"{len(values) - len(finite)} identical")
        print(line, flush=True)


if __name__ == "__main__":
    main()
