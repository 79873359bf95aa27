"""Multi-process training throughput: ``easynlp --mode=train --worker_gpu=N`` on the shapes data set, for one or
several source trees side by side (e.g. before and after a change: ``git worktree add /tmp/before REV``).

    python bench/train_distributed.py --tree before=/tmp/before --tree after=. [--repeats 3] [--rows 512]
        [--micro_batch_size 16] [--epoch_num 2] [--worker_gpu 2] [--model shapes-ldm-zh]

The runs alternate between the trees (before, after, before, after, …), so that a machine whose load drifts treats
them alike. Each run is the whole command, in a fresh output folder. Its training throughput: the images of the
trainer's logged windows (one log line every --logging_steps steps, "… N images/s"), the first (warm-up) window
left out, over their time. Prints every run, then min/median per tree; the wall time of the whole command too
(model loading, latent caching and the final checkpoint included).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPEED = re.compile(r"step \d+/\d+ epoch \d+: .* ([0-9.]+) images/s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(data: str, out: str, args) -> list[str]:
    return [sys.executable, "-m", "easynlp_ldm.cli", "--mode=train", f"--worker_gpu={args.worker_gpu}",
            f"--master_port={free_port()}", f"--tables={os.path.join(data, 'T2I_train.tsv')}",
            "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
            "--second_sequence=imgbase64", f"--checkpoint_dir={out}", f"--micro_batch_size={args.micro_batch_size}",
            f"--epoch_num={args.epoch_num}", "--learning_rate=1e-4", f"--logging_steps={args.logging_steps}",
            f"--user_defined_parameters=pretrain_model_name_or_path={args.model}"]


def run(tree: str, data: str, out: str, args) -> tuple[float, float]:
    """(training images/s after the first logged window, wall seconds of the whole command)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), EASYNLP_PROGRESS="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.perf_counter()
    done = subprocess.run(command(data, out, args), env=env, cwd=os.path.dirname(out), capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{tree}: exit status {done.returncode}\n{done.stderr[-3000:]}")
    speeds = [float(m.group(1)) for m in SPEED.finditer(done.stderr + done.stdout)][1:]
    if not speeds:
        raise SystemExit(f"{tree}: fewer than two logged windows; raise --epoch_num or lower --logging_steps")
    return len(speeds) / sum(1 / s for s in speeds), wall  # equal windows: images / time = harmonic mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to run (its easynlp_ldm, appzoo, modelzoo); give several")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--epoch_num", type=float, default=2)
    parser.add_argument("--logging_steps", type=int, default=4)
    parser.add_argument("--worker_gpu", type=int, default=2)
    parser.add_argument("--model", default="shapes-ldm-zh")
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    from shapes_data import generate_dataset

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        generate_dataset(data, seed=0, num_train=args.rows, num_val=0, num_test=0, num_heldout=0,
                         image_size=args.image_size)
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                speed, wall = run(tree, data, os.path.join(tmp, f"out-{name}-{repeat}"), args)
                results[name].append((speed, wall))
                print(f"run {repeat + 1} {name}: {speed:.1f} images/s training, {wall:.1f} s whole command",
                      flush=True)
    print(f"{args.worker_gpu} processes, micro-batch {args.micro_batch_size} each, {args.rows} images × "
          f"{args.epoch_num:g} epochs, model {args.model}, {args.repeats} runs per tree, alternating")
    for name, runs in results.items():
        speeds, walls = [s for s, _ in runs], [w for _, w in runs]
        print(f"{name}: images/s min {min(speeds):.1f} median {statistics.median(speeds):.1f} max {max(speeds):.1f}; "
              f"whole command median {statistics.median(walls):.1f} s")


if __name__ == "__main__":
    main()
