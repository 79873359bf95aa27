"""Service load benchmarks: dynamic batching, and well-behaved clients beside clients that disconnect.

    python bench/serve_batching.py [--scenario batching|disconnects|both] [--requests 32] [--clients 8] [--steps 20]
        [--max_batch_size 8] [--model NAME_OR_DIR] [--optimize none|auto|max] [--well_behaved 4]
        [--requests_per_client 6] [--disconnecting 2] [--heavy_images 4] [--heavy_steps 100] [--abandon_after 0.5]
        [--abandons 3] [--abandon_pause 0.5] [--repeat 1]

Starts the real server (uvicorn, loopback, free port) on the embedded model (or --model) once and runs the chosen
scenarios in one process (both: batching first).

batching: --requests requests of 1 image at --steps, sent one at a time, then by --clients concurrent clients;
images/s of each and their ratio (what dynamic batching buys).

disconnects: a pair of runs of the same well-behaved load — --well_behaved threads, each sending
--requests_per_client requests of 1 image at --steps (fixed seeds) one after the other and waiting for the answer.
The baseline runs that load alone; the second run adds --disconnecting threads that each send a heavy request
(--heavy_images images at --heavy_steps steps; the service allows at most 8 and 100), give up after --abandon_after s
(httpx timeout: the client closes the connection), wait --abandon_pause s and send the next, up to --abandons times
each (0: no limit) and never after the well-behaved load is done. Per run: useful images/s = images delivered to
the well-behaved clients / wall time of the well-behaved load; p50 and p95 of their request latencies (send to answer,
including retries after a 429); abandoned requests sent. After the disconnect run the abandoned work still queued is
counted and the benchmark waits until the service is idle again (drain time: work done for nobody), so the next pair
starts clean. Ratios: with disconnects / without, for useful images/s (1.0 = abandoned work costs nothing, lower is
worse) and for p95 (higher is worse); --repeat N runs N pairs and prints min and median of the ratios. Last, the
easynlp_dropped_images_total and easynlp_requests_total lines of GET /metrics (the service's own count of the work it
dropped: queued, running, unclaimed, shared; status 499: clients that went away).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["白色背景上有一个红色的圆形", "一个蓝色的正方形，背景是黑色", "灰色背景上的黄色三角形", "请画一个绿色的圆形"]


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 600) -> None:
    """Until the server at ``url`` answers /health 200; ``process``: the server's, which must not exit first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} before it was ready (see its log)")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 100])."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_batching(args, url: str) -> tuple[float, float]:
    import httpx

    def one(i: int) -> None:
        response = httpx.post(url + "/", json={"text": PROMPTS[i % len(PROMPTS)], "num_inference_steps": args.steps,
                                               "num_images": 1, "seed": i}, timeout=600)
        assert response.status_code == 200, response.text

    start = time.perf_counter()
    for i in range(args.requests):
        one(i)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.requests)))
    concurrent = time.perf_counter() - start
    return sequential, concurrent


def print_batching(args, model, sequential: float, concurrent: float) -> None:
    seq_ips, conc_ips = args.requests / sequential, args.requests / concurrent
    print(f"optimize={args.optimize}; model {model.source_path}; {args.requests} requests of 1 image, "
          f"{args.steps} steps, max_batch_size "
          f"{args.max_batch_size}")
    print(f"sequential (1 client): {seq_ips:.2f} images/s")
    print(f"{args.clients} concurrent clients: {conc_ips:.2f} images/s")
    print(f"ratio: {conc_ips / seq_ips:.2f}x")


def queue_depth(url: str) -> int:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("easynlp_queue_depth "):
            return int(float(line.split()[1]))
    return 0


def wait_idle(url: str, steps: int) -> float:
    """Seconds until the queue is empty and a 1-image probe (which waits for the batch in flight) is answered."""
    import httpx

    start = time.perf_counter()
    while queue_depth(url) > 0:
        time.sleep(0.2)
    while True:
        response = httpx.post(url + "/", json={"text": PROMPTS[0], "num_inference_steps": steps, "num_images": 1,
                                               "seed": 0}, timeout=3600)
        if response.status_code != 429:
            break
        time.sleep(float(response.headers.get("Retry-After", 1)))
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def run_mixed(args, url: str, disconnecting: int) -> dict:
    """One run of the well-behaved load, beside ``disconnecting`` clients that abandon heavy requests."""
    import httpx

    done = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"images": 0, "rejected": 0, "abandoned": 0, "heavy_answered": 0, "heavy_rejected": 0}

    def well_behaved(client: int) -> None:
        for r in range(args.requests_per_client):
            seed = client * args.requests_per_client + r
            body = {"text": PROMPTS[seed % len(PROMPTS)], "num_inference_steps": args.steps, "num_images": 1,
                    "seed": seed}
            start = time.perf_counter()
            while True:
                response = httpx.post(url + "/", json=body, timeout=3600)
                if response.status_code != 429:
                    break
                with lock:
                    counts["rejected"] += 1
                time.sleep(float(response.headers.get("Retry-After", 1)))
            latency = time.perf_counter() - start
            assert response.status_code == 200, response.text
            with lock:
                latencies.append(latency)
                counts["images"] += len(response.json()["images_base64"])

    def abandoning(client: int) -> None:
        sent = 0
        while not done.is_set() and (args.abandons <= 0 or sent < args.abandons):
            body = {"text": PROMPTS[client % len(PROMPTS)], "num_inference_steps": args.heavy_steps,
                    "num_images": args.heavy_images, "seed": 10_000 + 100 * client + sent}
            sent += 1
            try:
                response = httpx.post(url + "/", json=body, timeout=args.abandon_after)
            except httpx.TimeoutException:
                with lock:
                    counts["abandoned"] += 1
                done.wait(args.abandon_pause)
                continue
            with lock:  # answered in time (or refused): nothing was abandoned
                counts["heavy_rejected" if response.status_code == 429 else "heavy_answered"] += 1
            done.wait(float(response.headers.get("Retry-After", 1)) if response.status_code == 429 else
                      args.abandon_pause)

    heavy = [threading.Thread(target=abandoning, args=(c,), daemon=True) for c in range(disconnecting)]
    for thread in heavy:
        thread.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.well_behaved) as pool:
        list(pool.map(well_behaved, range(args.well_behaved)))
    wall = time.perf_counter() - start
    done.set()
    for thread in heavy:
        thread.join()
    result = dict(counts, wall=wall, ips=counts["images"] / wall, p50=percentile(latencies, 50),
                  p95=percentile(latencies, 95), left_queued=0, drain=0.0)
    if disconnecting:
        result["left_queued"] = queue_depth(url)
        result["drain"] = wait_idle(url, args.steps)
    return result


def describe_run(result: dict) -> str:
    text = (f"{result['ips']:.2f} useful images/s ({result['images']} images in {result['wall']:.1f} s), "
            f"p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s, {result['abandoned']} abandoned requests sent")
    extra = []
    if result["rejected"]:
        extra.append(f"{result['rejected']} well-behaved requests refused with 429 and retried")
    if result["heavy_answered"] or result["heavy_rejected"]:
        extra.append(f"heavy requests answered in time {result['heavy_answered']}, refused {result['heavy_rejected']}")
    if result["abandoned"]:
        extra.append(f"{result['left_queued']} requests still queued when the load ended, service idle again "
                     f"{result['drain']:.1f} s later")
    return text + "".join(f"; {e}" for e in extra)


def run_disconnects(args, url: str, model) -> None:
    import httpx

    print(f"disconnects: optimize={args.optimize}; model {model.source_path}; max_batch_size {args.max_batch_size}; "
          f"well-behaved: {args.well_behaved} clients x {args.requests_per_client} requests of 1 image, "
          f"{args.steps} steps; disconnecting: {args.disconnecting} clients, {args.heavy_images} images x "
          f"{args.heavy_steps} steps, abandoned after {args.abandon_after:g} s, "
          f"{'until the load is done' if args.abandons <= 0 else f'up to {args.abandons} times'} each, "
          f"{args.abandon_pause:g} s apart", flush=True)
    ips_ratios, p95_ratios = [], []
    for n in range(args.repeat):
        baseline = run_mixed(args, url, 0)
        print(f"pair {n + 1}/{args.repeat}\n  without disconnects: {describe_run(baseline)}", flush=True)
        mixed = run_mixed(args, url, args.disconnecting)
        print(f"  with disconnects:    {describe_run(mixed)}", flush=True)
        ips_ratios.append(mixed["ips"] / baseline["ips"])
        p95_ratios.append(mixed["p95"] / baseline["p95"])
        print(f"  ratio (with / without): useful images/s {ips_ratios[-1]:.2f}x, p95 latency {p95_ratios[-1]:.2f}x",
              flush=True)
    print(f"ratios over {args.repeat} pair(s): useful images/s min {min(ips_ratios):.2f}x median "
          f"{statistics.median(ips_ratios):.2f}x; p95 latency min {min(p95_ratios):.2f}x median "
          f"{statistics.median(p95_ratios):.2f}x")
    lines = [line for line in httpx.get(url + "/metrics", timeout=10).text.splitlines()
             if line.startswith(("easynlp_dropped_images_total{", "easynlp_requests_total{"))]
    print("/metrics:", *(lines or ["(no cancellation metrics)"]), sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="both", choices=("batching", "disconnects", "both"))
    parser.add_argument("--requests", type=int, default=32, help="batching: requests per run")
    parser.add_argument("--clients", type=int, default=8, help="batching: concurrent clients")
    parser.add_argument("--steps", type=int, default=20, help="steps of the 1-image requests (both scenarios)")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--model", default="")
    parser.add_argument("--optimize", default="auto", choices=("none", "auto", "max", "openvino", "torch", "compile"))
    parser.add_argument("--well_behaved", type=int, default=4, help="disconnects: well-behaved client threads")
    parser.add_argument("--requests_per_client", type=int, default=6, help="disconnects: requests per well-behaved "
                        "client, one after the other")
    parser.add_argument("--disconnecting", type=int, default=2, help="disconnects: client threads that abandon")
    parser.add_argument("--heavy_images", type=int, default=4, help="disconnects: num_images of an abandoned request")
    parser.add_argument("--heavy_steps", type=int, default=100, help="disconnects: steps of an abandoned request")
    parser.add_argument("--abandon_after", type=float, default=0.5, help="disconnects: client timeout, seconds")
    parser.add_argument("--abandons", type=int, default=3, help="disconnects: abandoned requests per disconnecting "
                        "client at most (0: until the well-behaved load is done)")
    parser.add_argument("--abandon_pause", type=float, default=0.5, help="disconnects: seconds between giving up "
                        "and the next heavy request")
    parser.add_argument("--repeat", type=int, default=1, help="disconnects: pairs of runs (baseline, disconnects)")
    args = parser.parse_args()

    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.params import default_params
    from appzoo.latent_diffusion.serve import LatentDiffusionService, service_settings
    from appzoo.latent_diffusion.settings import InferenceSettings
    from easynlp_ldm.serving.server import build_server

    settings = InferenceSettings.from_params(default_params(optimize=args.optimize, max_batch_size=args.max_batch_size,
                                                            max_wait_ms=50.0))
    if args.scenario != "batching":
        if not 1 <= args.heavy_images <= settings.max_num_images:
            parser.error(f"--heavy_images must be within 1..{settings.max_num_images} (the service's max_num_images)")
        if not 1 <= args.heavy_steps <= settings.max_steps:
            parser.error(f"--heavy_steps must be within 1..{settings.max_steps} (the service's max_steps)")
        if args.repeat < 1 or args.well_behaved < 1 or args.requests_per_client < 1:
            parser.error("--repeat, --well_behaved and --requests_per_client must be positive")
    model = load_model(args.model, optimize=args.optimize)
    service = LatentDiffusionService(model, settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The service exactly as --mode=serve runs it with these parameters (limits, cancellation, hardened server).
    server = build_server(service, service_settings(settings, None), "127.0.0.1", port, "warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)

    if args.scenario in ("batching", "both"):
        timings = run_batching(args, url)
        if args.scenario == "batching":
            server.should_exit = True
            thread.join(30)
        print_batching(args, model, *timings)
    if args.scenario in ("disconnects", "both"):
        run_disconnects(args, url, model)
        server.should_exit = True
        thread.join(30)


if __name__ == "__main__":
    main()
