"""Multi-process training throughput: ``easynlp --mode=train --worker_gpu=N`` on the shapes data set, for one or
several source trees side by side (e.g. before and after a change: ``git worktree add /tmp/before REV``).

    python bench/train_distributed.py --tree before=/tmp/before --tree after=. [--repeats 3] [--rows 512]
        [--micro_batch_size 16] [--epoch_num 2] [--worker_gpu 2] [--model shapes-ldm-zh]

The runs alternate between the trees (before, after, before, after, …), so that a machine whose load drifts treats
them alike. Each run is the whole command, in a fresh output folder. Its training throughput: the images of the
trainer's logged windows (one log line every --logging_steps steps, "… N images/s"), the first (warm-up) window
left out, over their time. Prints every run, then min/median per tree; the wall time of the whole command too
(model loading, latent caching and the final checkpoint included).

Sharded against data-parallel training (issue 35): per-process peak memory and step time of ``sharding=fsdp``
against DDP (``sharding=none``) for the same global batch, on a random model of a preset (an SD architecture,
configs/*.json, or a DiT layout, bench/configs/*.json: bench/train_memory.py builds both), full fine-tuning with the
app's defaults (AdamW, fp32, EMA), a few steps and the final checkpoint:

    python bench/train_distributed.py --sharding none,fsdp --procs 1,2,4 --preset configs/zimage_reduced.json
    python bench/train_distributed.py --sharding none,fsdp --procs 1,2 --preset configs/shapes_ldm_small.json

Each row's processes are started here, not through torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the
master's address in their environment, as torchrun sets them; gloo on a CPU), each one the training command run in a
fresh interpreter by this script's ``--worker`` entry. A process's peak memory is its own ``VmHWM`` (the high-water
mark of its resident memory in /proc/self/status, read by the worker itself as it exits and written to a report
file): not ``ru_maxrss``, which a child started from a large process inherits from it, and which ``wait4`` reports
for the largest of a process's descendants, not for each. The worker also records the memory plan's estimate of the
run (per process: ``easynlp_ldm.memory.check``'s result). Step time: the median of rank 0's logged steps after the
first (--logging_steps=1; images/s counts the global batch). Prints each row and its ratios against the DDP row with
as many processes.

``--device cuda`` runs each process on its own GPU (NCCL, one GPU per process; the app takes ``cuda:LOCAL_RANK``) and
also reports each process's peak GPU memory (``torch.cuda.max_memory_reserved``), the figure the memory plan then
estimates; ``--device cpu`` (the default) hides the GPUs from the workers. No GPU run of it has been made yet.

``--malloc_mmap_threshold BYTES`` runs the workers with glibc's ``MALLOC_MMAP_THRESHOLD_``: every allocation above it
is its own mapping, returned to the kernel when freed. Without it glibc raises its threshold to the size of freed
mappings (up to 32 MiB), so a reduced-width model's per-block all-gather and gradient buffers (tens of MiB) come from
the heap, which keeps what they free: measured on a 145 M-parameter Z-Image layout, the sharded peak RSS was 1.2 GiB
above the live tensors' (a full-size model's blocks, hundreds of MiB each, stay above the threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPEED = re.compile(r"step \d+/\d+ epoch \d+: .* ([0-9.]+) images/s")
GIB = 1024 ** 3


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


# ------------------------------------------------------------------------------------- sharded against DDP
def status_bytes(*names: str) -> list[int]:
    """Fields of /proc/self/status (kB) in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return [int(fields[name].split()[0]) * 1024 for name in names]


def watch_checkpoints(saves: list[dict]) -> None:
    """Record, for each checkpoint's model files (``Trainer._save_model_files``: sharded, every rank gathers the
    weights one tensor at a time and rank 0 writes them), this process's anonymous memory (RssAnon: its own, not the
    page cache's) before it and at its highest while it runs (sampled every 5 ms), its file-backed resident memory
    at its highest (RssFile: the gathered weights' mappings), and the largest whole tensor of the weights saved."""
    import threading

    from easynlp_ldm.trainer import Trainer

    save = Trainer._save_model_files

    def watched(self, *args, **kwargs):
        before = status_bytes("RssAnon")[0]
        peaks = [before, 0]
        done = threading.Event()

        def sample():
            while not done.wait(0.005):
                anon, mapped = status_bytes("RssAnon", "RssFile")
                peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], mapped)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            return save(self, *args, **kwargs)
        finally:
            done.set()
            thread.join()
            largest = max(t.numel() * t.element_size() for t in self.ema_weights().values())
            saves.append({"anon_before": before, "anon_peak": peaks[0], "file_peak": peaks[1], "largest": largest})

    Trainer._save_model_files = watched


def worker(report: str, argv: list[str]) -> int:
    """One training process: the easynlp command run in this interpreter; as it exits, its peak resident memory
    (VmHWM), the memory plan's estimate and its checkpoints' memory (``watch_checkpoints``) written to ``report`` as
    JSON."""
    from easynlp_ldm import cli, memory

    plans, saves = [], []
    check = memory.check

    def recording_check(*args, **kwargs):
        plans.append(check(*args, **kwargs))
        return plans[-1]

    memory.check = recording_check  # before the app imports it
    watch_checkpoints(saves)
    code = 1
    try:
        code = cli.main(argv)
    finally:
        import torch

        gpu = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
        with open(report, "w", encoding="utf-8") as handle:
            json.dump({"rc": code, "peak": status_bytes("VmHWM")[0], "gpu_peak": gpu, "saves": saves,
                       "estimate": plans[0].peak if plans else None,
                       "estimate_phase": plans[0].phase() if plans else None}, handle)
    return code


def sharded_command(data: str, model: str, out: str, family: str, micro_batch: int, sharding: str,
                    args) -> list[str]:
    target = "transformer" if family else "unet"
    return ["--mode=train", f"--tables={os.path.join(data, 'T2I_train.tsv')}",
            "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
            "--second_sequence=imgbase64", f"--checkpoint_dir={out}", f"--micro_batch_size={micro_batch}",
            "--epoch_num=1", "--learning_rate=1e-5", "--logging_steps=1", "--random_seed=0",
            *(["--sequence_length=32"] if family else []),
            f"--user_defined_parameters=pretrain_model_name_or_path={model} resolution={args.resolution} "
            f"train_target={target} sample_images=0 memory_check=False"
            + (f" sharding={sharding}" if sharding != "none" else "")]


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def sharded_row(data: str, model: str, out: str, family: str, processes: int, sharding: str, args) -> dict:
    """Run the command in ``processes`` workers; their peaks, the estimate, s/step and the exit status."""
    port = free_port()
    base = {key: value for key, value in os.environ.items()
            if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    argv = sharded_command(data, model, out, family, args.global_batch // processes, sharding, args)
    workers, reports, logs = [], [], []
    start = time.perf_counter()
    for rank in range(processes):
        name = os.path.join(os.path.dirname(out), f"{sharding}-{processes}-{rank}")
        reports.append(name + ".json")
        logs.append(name + ".log")
        if args.malloc_mmap_threshold:
            base["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        env = dict(base, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0", RANK=str(rank), WORLD_SIZE=str(processes),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        if args.device == "cpu":  # the app takes a GPU it sees
            env["CUDA_VISIBLE_DEVICES"] = ""
        with open(logs[-1], "w", encoding="utf-8") as log:
            workers.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", reports[-1],
                                             "--", *argv], env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [w.wait() for w in workers]
    wall = time.perf_counter() - start
    output = "".join(read(log) for log in logs)
    found = [json.loads(read(r)) for r in reports if os.path.isfile(r)]
    speeds = [float(m.group(1)) for m in SPEED.finditer(output)][1:]
    return {"sharding": sharding, "processes": processes, "rc": max(codes, key=abs),
            "peaks": [r["peak"] for r in found], "saves": found[0]["saves"] if found else [],
            "gpu_peaks": [r["gpu_peak"] for r in found if r.get("gpu_peak") is not None],
            "estimate": found[0]["estimate"] if found else None,
            "phase": found[0]["estimate_phase"] if found else None, "wall": wall,
            "s_step": statistics.median(args.global_batch / s for s in speeds) if speeds else None,
            "tail": output[-3000:]}


def format_sharded_row(row: dict, ddp: dict | None) -> str:
    text = f"{row['sharding']:<5} {row['processes']} processes  exit {row['rc']:>3}"
    if not row["peaks"]:
        return text + "  no report"
    if row["gpu_peaks"]:  # on GPUs (--device cuda) the GPU's memory decides; RSS follows
        gpu = max(row["gpu_peaks"])
        text += f"  peak GPU memory per process {gpu / GIB:5.2f} GiB (reserved)"
    peak = max(row["peaks"])
    text += f"  peak RSS per process {peak / GIB:5.2f} GiB (ranks: {', '.join(f'{p / GIB:.2f}' for p in row['peaks'])})"
    if row["estimate"]:
        decisive = max(row["gpu_peaks"]) if row["gpu_peaks"] else peak
        text += (f"  plan {row['estimate'] / GIB:5.2f} GiB at the {row['phase']} "
                 f"({row['estimate'] / decisive:.2f}×)")
    text += f"  {row['s_step']:.2f} s/step" if row["s_step"] else "  s/step n/a"
    text += f"  wall {row['wall']:.0f} s"
    if row["saves"]:  # rank 0's last checkpoint
        save = row["saves"][-1]
        text += (f"  checkpoint on rank 0: own memory +{(save['anon_peak'] - save['anon_before']) / 2**20:.0f} MiB "
                 f"(largest tensor {save['largest'] / 2**20:.0f} MiB), mapped files up to "
                 f"{save['file_peak'] / 2**20:.0f} MiB")
    if ddp and ddp is not row and ddp["peaks"] and row["rc"] == 0:
        if row["gpu_peaks"] and ddp["gpu_peaks"]:
            text += f"  vs DDP: GPU peak {max(row['gpu_peaks']) / max(ddp['gpu_peaks']):.2f}×,"
        text += f"  vs DDP: peak {peak / max(ddp['peaks']):.2f}×"
        if row["s_step"] and ddp["s_step"]:
            text += f", s/step {row['s_step'] / ddp['s_step']:.2f}×"
    return text


def sharded_bench(args) -> None:
    from bench.train_memory import build_model_folder, resolve_preset
    from shapes_data import generate_dataset

    preset_path = resolve_preset(args.preset)
    with open(preset_path, encoding="utf-8") as handle:
        preset = json.load(handle)
    for key, value in (item.split("=", 1) for item in args.set):  # e.g. transformer.n_layers=8
        part, _, name = key.rpartition(".")
        (preset[part] if part else preset)[name] = json.loads(value)
    args.resolution = args.resolution or int(preset.get("image_size", 256))
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(int(n) for n in args.procs.split(",")):
            raise SystemExit(f"--device cuda: {torch.cuda.device_count()} GPU(s) visible, --procs {args.procs} "
                             f"needs one per process")
    with tempfile.TemporaryDirectory(prefix="train-sharded-") as tmp:
        edited = os.path.join(tmp, "preset.json")
        with open(edited, "w", encoding="utf-8") as handle:
            json.dump(preset, handle)
        data, model = os.path.join(tmp, "data"), os.path.join(tmp, "model")
        generate_dataset(data, seed=0, num_train=args.global_batch * args.steps, num_val=0, num_test=0,
                         num_heldout=0, image_size=args.resolution)
        size = build_model_folder(edited, model, args.resolution)
        print(f"preset {os.path.relpath(preset_path, ROOT)} {' '.join(args.set)}: weights {size / GIB:.2f} GiB, "
              f"{args.resolution}², global batch {args.global_batch}, {args.steps} steps + the checkpoint, full "
              f"fine-tuning (AdamW, fp32, EMA) on {args.device}; MALLOC_MMAP_THRESHOLD_ "
              f"{args.malloc_mmap_threshold or 'unset'}",
              flush=True)
        for processes in (int(n) for n in args.procs.split(",")):
            if args.global_batch % processes:
                raise SystemExit(f"--global_batch {args.global_batch} is not a multiple of {processes} processes")
            ddp = None
            for sharding in args.sharding.split(","):
                out = os.path.join(tmp, f"out-{sharding}-{processes}")
                row = sharded_row(data, model, out, preset.get("family", ""), processes, sharding, args)
                shutil.rmtree(out, ignore_errors=True)
                ddp = row if sharding == "none" else ddp
                print(format_sharded_row(row, ddp), flush=True)
                if row["rc"]:
                    print(row["tail"], flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # bench/train_distributed.py --worker REPORT -- easynlp's arguments
        raise SystemExit(worker(sys.argv[2], sys.argv[4:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", metavar="NAME=PATH",
                        help="a source tree to run (its easynlp_ldm, appzoo, modelzoo); give several")
    parser.add_argument("--sharding", default="", help="sharded against DDP instead: comma-separated none,fsdp")
    parser.add_argument("--procs", default="1,2", help="with --sharding: comma-separated process counts")
    parser.add_argument("--preset", default="configs/shapes_ldm_small.json",
                        help="with --sharding: an SD architecture or a DiT layout (bench/train_memory.py's presets)")
    parser.add_argument("--set", action="append", default=[], metavar="PART.KEY=JSON",
                        help="with --sharding: change the preset, e.g. transformer.n_layers=8 (repeatable)")
    parser.add_argument("--resolution", type=int, default=0, help="with --sharding: 0 is the preset's image_size")
    parser.add_argument("--global_batch", type=int, default=4, help="with --sharding: images per step, all processes")
    parser.add_argument("--steps", type=int, default=3, help="with --sharding")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="with --sharding: cuda runs each process on its own GPU (NCCL) and reports the GPUs' "
                             "peak (torch.cuda.max_memory_reserved) beside RSS")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=0,
                        help="with --sharding: glibc's MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's own)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--epoch_num", type=float, default=2)
    parser.add_argument("--logging_steps", type=int, default=4)
    parser.add_argument("--worker_gpu", type=int, default=2)
    parser.add_argument("--model", default="shapes-ldm-zh")
    args = parser.parse_args()
    if args.sharding:
        sharded_bench(args)
        return
    if not args.tree:
        parser.error("give --tree NAME=PATH (several) or --sharding")
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
