"""Dynamic batching in the service: images/s with 8 concurrent clients vs the same requests sent one at a time.

    python bench/serve_batching.py [--requests 32] [--clients 8] [--steps 20] [--model NAME_OR_DIR]

Starts the real server (uvicorn, loopback, free port) on the embedded model and times both runs in one process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["白色背景上有一个红色的圆形", "一个蓝色的正方形，背景是黑色", "灰色背景上的黄色三角形", "请画一个绿色的圆形"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--model", default="")
    parser.add_argument("--optimize", default="auto", choices=("none", "auto", "max"))
    args = parser.parse_args()
    import httpx
    import uvicorn

    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.params import default_params
    from appzoo.latent_diffusion.serve import LatentDiffusionService
    from easynlp_ldm.serving.server import ServiceSettings, create_app

    params = default_params(optimize=args.optimize)
    model = load_model(args.model, optimize=args.optimize)
    service = LatentDiffusionService(model, params)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(service, ServiceSettings(max_batch_size=args.max_batch_size, max_wait_ms=50))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)

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
    server.should_exit = True
    thread.join(30)
    seq_ips, conc_ips = args.requests / sequential, args.requests / concurrent
    print(f"optimize={args.optimize}; model {model.source_path}; {args.requests} requests of 1 image, "
          f"{args.steps} steps, max_batch_size "
          f"{args.max_batch_size}")
    print(f"sequential (1 client): {seq_ips:.2f} images/s")
    print(f"{args.clients} concurrent clients: {conc_ips:.2f} images/s")
    print(f"ratio: {conc_ips / seq_ips:.2f}x")


if __name__ == "__main__":
    main()
