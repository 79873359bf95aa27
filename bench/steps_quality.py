"""Prompt-following accuracy against sampler steps, for choosing defaults: dpm-solver++, unipc, ddim, plms at
10/15/20/30/50 steps on the embedded model (the issue-5 metric), plus seconds per image.

    python bench/steps_quality.py --table DATA/T2I_test.tsv [--rows 200] [--samplers ...] [--steps 10,15,20,30,50]

Prints a Markdown table (both-correct accuracy %, colour/shape in brackets).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", required=True, help="a shapes split with its .truth.jsonl sidecar")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--samplers", default="dpm-solver++,unipc,ddim,plms")
    parser.add_argument("--steps", default="10,15,20,30,50")
    parser.add_argument("--optimize", default="auto")
    parser.add_argument("--model", default="")
    args = parser.parse_args()
    from appzoo.latent_diffusion.evaluate import prompt_following
    from appzoo.latent_diffusion.inputs import PROMPT_SCHEMA, InputTables
    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.settings import GenerationSettings
    from easynlp_ldm.tables import BadRowPolicy, parse_schema
    from shapes_data.scoring import load_truth_by_idx, truth_path_for

    model = load_model(args.model, optimize=args.optimize)
    truth = load_truth_by_idx(truth_path_for(args.table, ""))
    inputs = InputTables([args.table], parse_schema(PROMPT_SCHEMA), "text", None, False)
    steps_list = [int(s) for s in args.steps.split(",")]
    print(f"model {model.source_path}, optimize={args.optimize}, first {args.rows} rows of {args.table}")
    print("| sampler | " + " | ".join(f"{s} steps" for s in steps_list) + " |")
    print("|---|" + "---|" * len(steps_list))
    for sampler in args.samplers.split(","):
        cells = []
        for steps in steps_list:
            settings = GenerationSettings(sampler=sampler, steps=steps)
            start = time.perf_counter()
            acc = prompt_following(model, inputs, truth, settings, 0, 50, model.text_max_length, BadRowPolicy(),
                                   max_rows=args.rows)["all"]
            per_image = (time.perf_counter() - start) / acc["n"]
            cells.append(f"{100 * acc['both_acc']:.1f} ({100 * acc['colour_acc']:.0f}/{100 * acc['shape_acc']:.0f}) "
                         f"{per_image:.2f}s")
        print(f"| {sampler} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
