"""Where the server's admission control starts refusing (NanoFlow §4 serving front end): the OpenAI-compatible server,
started as users start it (`python main.py --config experiments/serve.py:scale=smoke`, its own process) with
`server.max_queued` = Q, hit by waves of C concurrent clients (C from Q/2 to 8Q), each sending one non-streaming
completion; then SIGTERM, timed until the process exits.

For each wave: how many were accepted (200) and refused (429, each with Retry-After), the latency of each (p50 / p99 /
max), the deepest queue the server reported (`lwjax_requests_outstanding` from /metrics, sampled), and whether any
request hung (no answer within the client timeout: must be 0).

  python -m benchmarks.serve_overload --max_queued 32 --waves 16,32,64,128,256 --out results/serving_cpu/overload.json

The first wave of the shapes compiles before the measured waves (`--waves` starts after it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _percentiles(values: list[float]) -> dict:
  if not values:
    return {"p50": None, "p99": None, "max": None}
  a = np.asarray(values) * 1000
  return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
          "max": round(float(a.max()), 1)}


async def _wave(url: str, clients: int, max_tokens: int, timeout: float) -> dict:
  depth = [0]
  stop = asyncio.Event()

  async def sample_depth(client):
    while not stop.is_set():
      text = (await client.get("/metrics")).text
      for line in text.splitlines():
        if line.startswith("lwjax_requests_outstanding"):
          depth[0] = max(depth[0], int(float(line.split()[-1])))
      await asyncio.sleep(0.01)

  async def one(client, i):
    start = time.perf_counter()
    try:
      r = await client.post("/v1/completions", json={"model": "lwjax", "prompt": f"client {i}",
                                                     "max_tokens": max_tokens, "temperature": 0})
    except httpx.TimeoutException:
      return "hung", time.perf_counter() - start, False
    return r.status_code, time.perf_counter() - start, "retry-after" in r.headers

  async with httpx.AsyncClient(base_url=url, timeout=timeout,
                               limits=httpx.Limits(max_connections=clients + 4)) as client:
    sampler = asyncio.create_task(sample_depth(client))
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, i) for i in range(clients)))
    wall = time.perf_counter() - start
    stop.set()
    await sampler
  ok = [t for s, t, _ in results if s == 200]
  refused = [t for s, t, _ in results if s == 429]
  return {"clients": clients, "accepted": len(ok), "refused_429": len(refused),
          "refused_with_retry_after": sum(1 for s, _, h in results if s == 429 and h),
          "hung": sum(1 for s, _, _ in results if s == "hung"),
          "other": sorted({str(s) for s, _, _ in results} - {"200", "429", "hung"}),
          "max_queue_depth": depth[0], "wall_seconds": round(wall, 2),
          "latency_ms_accepted": _percentiles(ok), "latency_ms_refused": _percentiles(refused)}


def start_server(workdir: str, *overrides: str, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
  """`python main.py --config experiments/serve.py:scale=smoke` with `overrides` (`--config.x=y`), in its own
  process on a free port, once /health answers: (the process, its URL)."""
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "main.py", "--config", "experiments/serve.py:scale=smoke", "--workdir", workdir,
             f"--config.server.port={port}", *overrides]
  server = subprocess.Popen(command, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + timeout
  while time.time() < deadline and server.poll() is None:
    try:
      if httpx.get(f"{url}/health", timeout=1).status_code == 200:
        return server, url
    except httpx.HTTPError:
      time.sleep(0.2)
  server.kill()
  raise RuntimeError(f"the server did not answer /health within {timeout} s: {' '.join(command)}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--max_queued", type=int, default=32)
  parser.add_argument("--waves", default="16,32,64,128,256", help="concurrent clients per wave")
  parser.add_argument("--max_tokens", type=int, default=32)
  parser.add_argument("--drain_seconds", type=float, default=5.0)
  parser.add_argument("--timeout", type=float, default=120.0, help="a client waiting longer counts as hung")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  server, url = start_server("/tmp/lwjax_overload", f"--config.server.max_queued={args.max_queued}",
                             f"--config.server.drain_seconds={args.drain_seconds}")
  command = server.args
  try:
    asyncio.run(_wave(url, args.max_queued, args.max_tokens, args.timeout))  # compile the shapes first
    report = {"command": " ".join(command[1:]), "max_queued": args.max_queued, "max_tokens": args.max_tokens,
              "waves": []}
    print("| clients | accepted | 429 (with Retry-After) | hung | deepest queue | accepted p50 / p99 ms | "
          "429 p50 / p99 ms | wave s |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in [int(c) for c in args.waves.split(",")]:
      wave = asyncio.run(_wave(url, clients, args.max_tokens, args.timeout))
      report["waves"].append(wave)
      a, r = wave["latency_ms_accepted"], wave["latency_ms_refused"]
      print(f"| {clients} | {wave['accepted']} | {wave['refused_429']} ({wave['refused_with_retry_after']}) | "
            f"{wave['hung']} | {wave['max_queue_depth']} | {a['p50']} / {a['p99']} | {r['p50']} / {r['p99']} | "
            f"{wave['wall_seconds']} |", flush=True)
    start = time.monotonic()
    server.send_signal(signal.SIGTERM)
    report["sigterm_exit_seconds"] = round(server.wait(timeout=120) and time.monotonic() - start or
                                           time.monotonic() - start, 2)
    print(f"SIGTERM to exit (idle): {report['sigterm_exit_seconds']} s")
  finally:
    if server.poll() is None:
      server.kill()
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
