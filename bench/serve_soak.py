"""Soak test of the service: many clients, random requests and a few hostile ones, for minutes; memory must stay flat.

    python bench/serve_soak.py [--clients 8] [--minutes 10] [--model NAME_OR_DIR] [--udp "key=value ..."]
        [--hostile 0.05] [--max_steps 25] [--max_images 4] [--seed 0] [--port 0] [--log FILE]

Starts a real ``easynlp --mode=serve`` process (the embedded default model unless --model; the service's default
parameters, e.g. optimize=auto, plus --udp), waits until /health says ready, then runs --clients client threads for
--minutes. Each client sends one request at a time, chosen at random: text-to-image (about 70 %), img2img (15 %) and
inpainting (10 %) at random sizes within the service's limits (/info: max_size, size_multiple, max_request_work),
steps (1..--max_steps), guidance (0-9 in halves, so some requests share a batch), image counts (1..--max_images),
with a negative prompt or a seed now and then; input images are PNGs and JPEGs of 48² to 2048², masks of their size.
A share --hostile of the requests are refusals the service must answer 4xx, never 5xx: a 14000×14000 PNG (0.8 MB of
base64: a decompression bomb), an image past max_image_pixels, a 5 M-character negative_prompt, texts past
max_text_chars, lone UTF-16 surrogates, malformed JSON, wrong types, unknown fields.

Another process asks GET /health every 50 ms throughout (its own process, so the clients' work does not delay it).
Each minute: images/s, p50/p95 latency of the answered generation requests, status counts, the server process's
resident memory at the minute's end and its range within the minute (sampled every 5 s) and threads (/proc), and
/health's slowest and p99 answer. At the end, the totals and the checks of
issue 30: after minute 2 the resident memory stays within 15 % of its value at minute 2, no 5xx, /health under 100 ms
throughout, every well-formed request answered 200 (or 450 when the queue is full), every hostile one 4xx. Exit status
1 when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.serve_batching import percentile, wait_ready  # noqa: E402
from easynlp_ldm.memory import process_figures  # noqa: E402

PROMPTS = ["白色背景上有一个红色的圆形", "一个蓝色的正方形，背景是黑色", "灰色背景上的黄色三角形", "请画一个绿色的圆形",
           "大的紫色正方形", "左上角有一个小的橙色圆形", "黑色背景上的白色三角形"]
NEGATIVES = ["模糊", "低质量", "红色"]
HEALTH_EVERY_S = 0.05
RSS_EVERY_S = 5


# ------------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "easynlp_ldm.cli", "--mode=serve", "--app_name=latent_diffusion",
            "--host=127.0.0.1", f"--port={port}"]
    if args.model:
        argv.append(f"--checkpoint_dir={args.model}")
    if args.udp:
        argv.append(f"--user_defined_parameters={args.udp}")
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------ /health, apart
def poll_health(url: str, stop, results) -> None:
    """In its own process: GET /health every HEALTH_EVERY_S on one keep-alive connection; every 10 s, and at the
    end, sends the latencies (seconds; inf for a failure) measured since the last send."""
    import httpx

    latencies, sent = [], time.monotonic()
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                ok = client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.monotonic() - start if ok else math.inf)
            if time.monotonic() - sent >= 10:
                results.put(latencies)
                latencies, sent = [], time.monotonic()
            stop.wait(HEALTH_EVERY_S)
    results.put(latencies)


# ------------------------------------------------------------------------------------------------ requests
def encode(image, image_format: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_images(rng: random.Random) -> list[tuple[str, str]]:
    """(image, mask) pairs, base64: smooth pictures with a shape (PNG, JPEG from 512²), masks of their size."""
    from PIL import Image, ImageDraw

    pairs = []
    for width, height in ((48, 48), (64, 64), (160, 96), (300, 200), (512, 512), (1024, 768), (2048, 2048)):
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        draw = ImageDraw.Draw(image)
        box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        pairs.append((encode(image, "JPEG" if width >= 512 else "PNG"), encode(mask, "PNG")))
    return pairs


def hostile_bodies(limits: dict) -> list[tuple[str, bytes]]:
    """(what, raw body) for requests the service must refuse with a 4xx."""
    from PIL import Image

    bomb = encode(Image.new("1", (14000, 14000)), "PNG")  # 196 M pixels, 0.8 MB of base64
    side = math.isqrt(limits.get("max_image_pixels", 4096 * 4096)) + 16  # (older services: no such limit)
    over = encode(Image.new("1", (side, side)), "PNG")
    chars = limits["max_text_chars"]

    def body(**fields) -> bytes:
        return json.dumps({"num_inference_steps": 2, **fields}).encode("ascii")

    return [("bomb image", body(text=PROMPTS[0], image=bomb)),
            ("bomb mask", body(text=PROMPTS[0], image=encode(Image.new("RGB", (14000, 1)), "PNG"), mask=bomb)),
            ("image past max_image_pixels", body(text=PROMPTS[1], image=over)),
            ("5 M-character negative_prompt", body(text=PROMPTS[2], negative_prompt="x" * 5_000_000)),
            ("text past max_text_chars", body(text="红" * (chars + 1))),
            ("sampler past max_text_chars", body(text=PROMPTS[0], sampler="y" * (chars + 1))),
            ("lone surrogate in text", body(text="\ud800 red")),
            ("lone surrogate in negative_prompt", body(text=PROMPTS[3], negative_prompt="\udfff")),
            ("lone surrogate as a field name", body(text=PROMPTS[3], **{"\ud800": 1})),
            ("malformed JSON", b'{"text": "red", "num_images": 1'),
            ("not an object", b'["text"]'),
            ("num_images as a string", body(text=PROMPTS[0], num_images="2")),
            ("width not an integer", body(text=PROMPTS[0], width=3.5)),
            ("text a number", body(text=5)),
            ("unknown field", body(text=PROMPTS[0], num_imgs=2))]


def well_formed(rng: random.Random, limits: dict, images: list[tuple[str, str]], args) -> dict:
    factor, native = limits["size_multiple"], limits["image_size"]
    sizes = range(factor, limits["max_size"] + 1, factor)
    while True:
        width, height = rng.choice(sizes), rng.choice(sizes)
        steps = rng.randint(1, min(args.max_steps, limits["max_steps"]))
        count = rng.randint(1, min(args.max_images, limits["max_num_images"]))
        if count * steps * width * height / native ** 2 <= limits["max_request_work"]:
            break
    body = {"text": rng.choice(PROMPTS), "num_inference_steps": steps, "num_images": count, "width": width,
            "height": height, "guidance_scale": rng.randrange(0, 19) / 2}
    if rng.random() < 0.2:
        body["negative_prompt"] = rng.choice(NEGATIVES)
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1000)
    kind = rng.random()
    if kind < 0.25:  # img2img (15 %) and inpainting (10 %)
        image, mask = rng.choice(images)
        body["image"] = image
        if kind < 0.1:
            body["mask"] = mask
        else:
            body["strength"] = rng.choice((0.5, 0.7, 0.9))
        strength = body.get("strength", 1.0)
        body["num_inference_steps"] = max(steps, math.ceil(1 / strength) + 1)  # at least one step redrawn
    return body


# ------------------------------------------------------------------------------------------------- the run
class Record:
    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[float, str, int | str, float, int]] = []  # (time, kind, status, latency, images)

    def add(self, kind: str, status, latency: float, images: int) -> None:
        with self.lock:
            self.rows.append((time.monotonic(), kind, status, latency, images))

    def since(self, start: float, end: float) -> list:
        with self.lock:
            return [row for row in self.rows if start <= row[0] < end]


def client(url: str, limits: dict, images, hostile, args, seed: int, deadline: float, record: Record) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < deadline:
            if rng.random() < args.hostile:
                kind, raw = rng.choice(hostile)
                kind = "hostile: " + kind
            else:
                kind, raw = "well-formed", json.dumps(well_formed(rng, limits, images, args)).encode("ascii")
            start = time.monotonic()
            try:
                response = http.post(url + "/", content=raw, headers={"Content-Type": "application/json"})
                status = response.status_code
                count = len(response.json().get("images_base64", [])) if status == 200 else 0
            except httpx.HTTPError as err:
                status, count = f"client error {type(err).__name__}", 0
            record.add(kind, status, time.monotonic() - start, count)
            if status == 450:
                time.sleep(float(response.headers.get("Retry-After", 1)))


def describe_statuses(rows) -> str:
    counts = collections.Counter(str(status) for _, _, status, _, _ in rows)
    return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())) or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--model", default="", help="model folder or name (default: the embedded default model)")
    parser.add_argument("--udp", default="", help="extra --user_defined_parameters of the server")
    parser.add_argument("--hostile", type=float, default=0.05, help="share of hostile requests")
    parser.add_argument("--max_steps", type=int, default=25, help="largest num_inference_steps sent")
    parser.add_argument("--max_images", type=int, default=4, help="largest num_images sent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--log", default="", help="the server's log file (default: a temporary file)")
    args = parser.parse_args()
    import httpx

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.log or os.path.join(tempfile.mkdtemp(prefix="serve-soak-"), "server.log")
    with open(log_path, "wb") as log:
        process = start_server(args, port, log)
        try:
            return soak(args, url, process, log_path, httpx)
        finally:
            stop_server(process)


def soak(args, url: str, process: subprocess.Popen, log_path: str, httpx) -> int:
    started = time.monotonic()
    wait_ready(url, process)
    info = httpx.get(url + "/info", timeout=30).json()
    limits = {**info["limits"], "image_size": info["image_size"]}
    print(f"server pid {process.pid} ready after {time.monotonic() - started:.0f} s (log: {log_path}); model "
          f"{info['model'] or 'embedded default'}, native {info['image_size']}², sizes up to {limits['max_size']} in "
          f"steps of {limits['size_multiple']}; {args.clients} clients for {args.minutes:g} min, "
          f"{args.hostile:.0%} hostile", flush=True)
    rng = random.Random(args.seed)
    images, hostile = input_images(rng), hostile_bodies(limits)

    context = multiprocessing.get_context("spawn")
    stop, health_queue = context.Event(), context.Queue()
    poller = context.Process(target=poll_health, args=(url, stop, health_queue), daemon=True)
    poller.start()
    record = Record()
    begin = time.monotonic()
    deadline = begin + args.minutes * 60
    threads = [threading.Thread(target=client, args=(url, limits, images, hostile, args, args.seed * 1000 + i,
                                                     deadline, record), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    health: list[float] = []
    minutes: list[dict] = []
    print(f"{'min':>4} {'answers':>8} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'RSS MB':>8} {'(range)':>11} "
          f"{'threads':>8} {'health max ms':>14} {'p99 ms':>7}  statuses", flush=True)
    minute = 1
    while minute * 60 <= args.minutes * 60 + 1e-6:
        samples = []  # the server's RSS every RSS_EVERY_S within the minute, and at its end
        while True:
            figures = process_figures(process.pid)
            samples.append(figures.get("rss_bytes", 0))
            left = begin + minute * 60 - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(RSS_EVERY_S, left))
        window = record.since(begin + (minute - 1) * 60, begin + minute * 60)
        latest: list[float] = []
        while not health_queue.empty():
            latest += health_queue.get()
        health += latest
        ok = [row for row in window if row[2] == 200 and row[1] == "well-formed"]
        latencies = [row[3] for row in ok]
        row = {"minute": minute, "rss": samples[-1], "samples": samples, "threads": figures.get("threads", 0),
               "health_max": max(latest, default=0.0)}
        minutes.append(row)
        print(f"{minute:>4} {len(window):>8} {sum(r[4] for r in ok) / 60:>9.2f} "
              f"{percentile(latencies, 50) if latencies else math.nan:>7.2f} "
              f"{percentile(latencies, 95) if latencies else math.nan:>7.2f} {row['rss'] / 2**20:>8.0f} "
              f"{f'{min(samples) / 2**20:.0f}-{max(samples) / 2**20:.0f}':>11} "
              f"{row['threads']:>8} {row['health_max'] * 1000:>14.1f} "
              f"{percentile(latest, 99) * 1000 if latest else math.nan:>7.1f}  {describe_statuses(window)}",
              flush=True)
        minute += 1
    for thread in threads:
        thread.join()
    stop.set()
    poller.join(30)
    while not health_queue.empty():
        health += health_queue.get()
    wall = time.monotonic() - begin
    rows = record.since(begin, math.inf)
    return report(args, rows, health, minutes, wall, url, httpx)


def report(args, rows, health, minutes, wall, url, httpx) -> int:
    ok = [row for row in rows if row[2] == 200]
    latencies = [row[3] for row in ok if row[1] == "well-formed"]
    print(f"\ntotal: {len(rows)} requests in {wall:.0f} s; {sum(r[4] for r in ok) / wall:.2f} images/s; latency of "
          f"answered well-formed requests p50 {statistics.median(latencies) if latencies else math.nan:.2f} s, p95 "
          f"{percentile(latencies, 95) if latencies else math.nan:.2f} s, max {max(latencies, default=math.nan):.2f} s")
    print(f"statuses: {describe_statuses(rows)}")
    kinds = collections.defaultdict(list)
    for _, kind, status, _, _ in rows:
        kinds[kind].append(status)
    for kind, statuses in sorted(kinds.items()):
        print(f"  {kind}: {describe_statuses([(0, kind, s, 0, 0) for s in statuses])}")
    finite = [h for h in health if math.isfinite(h)]
    print(f"/health: {len(health)} answers, max {max(health, default=0) * 1000:.1f} ms, p99 "
          f"{percentile(finite, 99) * 1000 if finite else math.nan:.1f} ms, {len(health) - len(finite)} failed")
    try:
        cache_lines = [line for line in httpx.get(url + "/metrics", timeout=30).text.splitlines()
                       if line.startswith(("easynlp_cache_", "process_resident", "easynlp_process_threads"))]
        print("/metrics:", *cache_lines, sep="\n  ")
    except httpx.HTTPError as err:
        print(f"/metrics: {err}")

    checks = []
    if len(minutes) >= 2:
        base = minutes[1]["rss"]
        later = [rss for m in minutes[2:] for rss in m["samples"]] or [base]
        drift = max(abs(r - base) for r in later) / base
        checks.append((f"RSS after minute 2 (every {RSS_EVERY_S} s) within 15 % of minute 2's {base / 2**20:.0f} MB "
                       f"(largest drift {drift:.1%}, range {min(later) / 2**20:.0f}-{max(later) / 2**20:.0f} MB)",
                       drift <= 0.15))
    else:
        checks.append(("RSS after minute 2: the run is shorter than 2 minutes", False))
    fivexx = [r for r in rows if isinstance(r[2], int) and r[2] >= 500]
    checks.append((f"no 5xx ({len(fivexx)})", not fivexx))
    checks.append((f"/health under 100 ms throughout (max {max(health, default=0) * 1000:.1f} ms)",
                   bool(health) and max(health) < 0.1))
    wrong = [r for r in rows if (r[1] == "well-formed" and r[2] not in (200, 450))
             or (r[1] != "well-formed" and not (isinstance(r[2], int) and 400 <= r[2] < 500))]
    checks.append((f"well-formed requests 200 (or 450), hostile ones 4xx ({len(wrong)} otherwise)", not wrong))
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
