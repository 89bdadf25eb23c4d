"""GameNGen played in a real browser: the frame rate and the input-to-frame latency of the play page
(lwjax/projects/gamengen/play.py) in headless Chromium, a real `NeuralEngine` behind it (GameNGen, arXiv
2408.14837, sec. 3.3: the diffusion model is the game engine, played in real time).

  python -m benchmarks.gamengen_browser --preset cpu_long,cpu --steps 2,4 --frames 200   # random weights
  python -m benchmarks.gamengen_browser --workdir runs/demo/diffusion --steps 4 --record /tmp/play  # trained
  JAX_PLATFORMS=cpu python -m benchmarks.gamengen_browser --preset smoke --steps 1 --frames 10 --out /tmp/b.json

Sources: `--workdir`, a gamengen_diffusion run's world model started from its held-out windows, as the
gamengen_play job plays it; or `--preset` scales of experiments/gamengen_demo.py (configs/gamengen.py: that
scale's UNet, autoencoder, context, frame geometry and guidance) with random weights (`gamengen_fps.random_params`)
started from a window of random frames: the frames are noise, the speed is that of the trained model (it does not
depend on the weights). For each source and each k of --steps (DDIM steps per frame; one server each), the
engine is compiled and timed alone (`engine alone`: ms per `step`, no HTTP), then a `PlayServer` on a free port
serves it to a new page of one headless Chromium, which plays --frames frames while the script holds keys (forward,
turns, fire; the held set changes every --hold frames, one or two key events a change). The page's
`playStats()` gives what is reported: FPS over the game (first frame drawn to last) and the median of the
frames-in-the-last-second counter read at each change (once the game is a second old), the input-to-frame latency
of every key event (keydown/keyup to the drawing of the first frame generated from a request sent after it: with
one request in flight that is the rest of the current frame plus one whole frame), and the server's and engine's
ms per frame (response headers). The machine's load average before and after each row is kept: on a shared
machine it is the condition the numbers were measured under. --record DIR writes each row's frames (those the
engine made for the page, in order) as a GIF and a PNG strip labelled with the actions. The JSON (--out) holds
every sample. Without /usr/bin/chromium or playwright it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from configs import gamengen
from lwjax.models.autoencoder import Autoencoder, AutoencoderConfig
from lwjax.models.unet_diffusion import UNet, UNetConfig
from lwjax.projects.gamengen import play, play_browser, video, world_model
from lwjax.projects.gamengen.env import ACTION_NAMES, FRAME_SHAPE
from lwjax.projects.gamengen.frames import FrameGeometry
from lwjax.projects.gamengen.jobs.evaluate import held_out_windows

# The keys held in turn (playwright key names), each for --hold frames: forward, turning, firing, none.
SCRIPT = (("w",), ("w", "d"), ("d",), ("d", "Space"), ("Space",), ("w", "Space"), ("w",), ("w", "a"), ("a",), ())
WAIT_MS = 120_000  # for one hold of frames: far above any engine's, so only a broken page times out


class RandomWindows:
  """One start window of random frames and noop actions (a `WindowSource` stand-in for random weights)."""

  def __init__(self, context: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.context = context
    self.window = {"frames": rng.integers(0, 256, (context, *FRAME_SHAPE), np.uint8),
                   "actions": np.zeros(context, np.int32)}

  def __len__(self) -> int:
    return 1

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    return self.window


class RecordingEngine:
  """A `play.FrameEngine` keeping every frame its engine made since the last reset, and the action of each."""

  def __init__(self, engine: play.FrameEngine):
    self.engine, self.frame_shape = engine, engine.frame_shape
    self.frames, self.actions = [], []

  def reset(self, seed: int) -> np.ndarray:
    frame = self.engine.reset(seed)
    self.frames, self.actions = [frame], [0]
    return frame

  def step(self, action: int) -> np.ndarray:
    frame = self.engine.step(action)
    self.frames.append(frame)
    self.actions.append(action)
    return frame


def preset_engine(scale: str, steps: int) -> tuple[world_model.NeuralEngine, dict]:
  """The demo scale's world model with random weights, as a NeuralEngine playing k = `steps` DDIM steps."""
  from benchmarks.gamengen_fps import random_params  # here: it defines absl flags

  diffusion = gamengen.diffusion(scale, [], "")
  ucfg = UNetConfig.from_dict(diffusion.model)
  acfg = AutoencoderConfig.from_dict(gamengen.autoencoder(scale, []).model)
  geometry = FrameGeometry.from_dict(gamengen.geometry(scale))
  unet = nnx.eval_shape(lambda: UNet(ucfg, rngs=nnx.Rngs(0)))
  autoencoder = nnx.eval_shape(lambda: Autoencoder(acfg, rngs=nnx.Rngs(1)))
  settings = world_model.SampleSettings(steps=steps, guidance=diffusion.sample.guidance)
  model = world_model.WorldModel(unet, autoencoder, geometry, settings)
  model.unet_params, model.ae_params = random_params(model.unet_params, 0), random_params(model.ae_params, 1)
  info = {"source": f"{scale} (random weights)", "weights": "random: speed only, the frames are noise"}
  return world_model.NeuralEngine(model, RandomWindows(model.context)), info


def workdir_engine(workdir: str, steps: int) -> tuple[world_model.NeuralEngine, dict]:
  """A gamengen_diffusion run's world model from its held-out windows, as the gamengen_play job builds it."""
  model, run_config = world_model.load(workdir, world_model.SampleSettings(steps=steps))
  info = {"source": workdir, "weights": "trained (latest checkpoint)"}
  return world_model.NeuralEngine(model, held_out_windows(run_config, model.context)), info


def describe(engine: world_model.NeuralEngine, info: dict) -> dict:
  model = engine.model
  return {**info, "unet_channels": list(model.cfg.block_out_channels),
          "unet_params": sum(int(x.size) for x in jax.tree.leaves(model.unet_params)),
          "autoencoder_params": sum(int(x.size) for x in jax.tree.leaves(model.ae_params)),
          "context": model.context, "frame_shape": list(model.geometry.frame_shape),
          "image_shape": list(model.geometry.image_shape), "guidance": model.settings.guidance,
          "steps": model.settings.steps}


def engine_alone_ms(engine: play.FrameEngine, frames: int = 20) -> list[float]:
  """ms of each of `frames` steps called directly (after the compiling ones): the speed without HTTP or page."""
  engine.reset(0)
  for _ in range(3):
    engine.step(0)
  ms = []
  for i in range(frames):
    start = time.perf_counter()
    engine.step(i % len(ACTION_NAMES))
    ms.append(1000 * (time.perf_counter() - start))
  return ms


def hold(page, keys: tuple[str, ...], held: set[str]) -> None:
  """Releases what `keys` does not hold, then presses what it adds (each a key event the page times)."""
  for key in sorted(held - set(keys)):
    page.keyboard.up(key)
  for key in keys:
    if key not in held:
      page.keyboard.down(key)
  held.clear()
  held.update(keys)


def wait_frames(page, n: int) -> None:
  try:
    page.wait_for_function(f"playStats().frames >= {n}", timeout=WAIT_MS)
  except Exception as e:
    raise RuntimeError(f"the page did not reach {n} frames: {page.text_content('#message')!r}") from e


def play_in_browser(browser, engine: play.FrameEngine, frames: int, hold_frames: int) -> dict:
  """Serves `engine` to a new page and plays `frames` frames under SCRIPT; playStats() plus window FPS samples."""
  fps_window = []
  with play.PlayServer(engine, port=0) as server:
    page = browser.new_page()
    try:
      page.goto(server.url)
      held = set()
      for i, n in enumerate(range(1, frames, hold_frames)):
        wait_frames(page, n)
        stats = play_browser.play_stats(page)
        if stats["session_ms"] >= 1000:  # a younger game's last second is not a full one
          fps_window.append(stats["fps_window"])
        hold(page, SCRIPT[i % len(SCRIPT)], held)
      wait_frames(page, frames)
      stats = play_browser.play_stats(page)
      stats["user_agent"] = page.evaluate("navigator.userAgent")
    finally:
      page.close()
  return {**stats, "fps_window_samples": fps_window}


def _p(values, q) -> float | None:
  return float(np.percentile(values, q)) if len(values) else None


def summarise(stats: dict, alone_ms: list[float]) -> dict:
  return {"frames": stats["frames"], "fps_session": stats["fps_session"],
          "fps_window_p50": _p(stats["fps_window_samples"], 50),
          "latency_ms_p50": _p(stats["latency_ms"], 50), "latency_ms_p90": _p(stats["latency_ms"], 90),
          "latency_events": len(stats["latency_ms"]), "server_ms_p50": _p(stats["server_ms"], 50),
          "engine_ms_p50": _p(stats["engine_ms"], 50), "engine_alone_ms_p50": _p(alone_ms, 50)}


def write_recording(directory: str, name: str, engine: RecordingEngine, fps: float) -> dict:
  os.makedirs(directory, exist_ok=True)
  frames = np.stack(engine.frames)
  gif, strip = os.path.join(directory, f"{name}.gif"), os.path.join(directory, f"{name}_strip.png")
  video.write_gif(gif, frames, fps=max(fps, 1.0))
  picks = np.unique(np.linspace(0, len(frames) - 1, min(10, len(frames))).round().astype(int))
  captions = [f"{i} {ACTION_NAMES[engine.actions[i]]}" for i in picks]
  video.write_png(strip, video.labelled_strip({name: frames[picks]}, captions))
  return {"gif": gif, "strip": strip, "frames": len(frames)}


def _fmt(value, spec: str) -> str:
  return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def print_table(rows: list[dict]) -> None:
  print(f"{'source':<30} {'k':>2} {'frames':>6} {'FPS':>6} {'FPS 1s':>6} {'lat p50':>8} {'lat p90':>8} "
        f"{'events':>6} {'server':>7} {'engine':>7} {'alone':>7}  load 1m before -> after")
  for r in rows:
    print(f"{r['source']:<30} {r['steps']:>2} {r['frames']:>6} {r['fps_session']:>6.1f} "
          f"{_fmt(r['fps_window_p50'], '6.1f')} {_fmt(r['latency_ms_p50'], '8.1f')} "
          f"{_fmt(r['latency_ms_p90'], '8.1f')} {r['latency_events']:>6} {_fmt(r['server_ms_p50'], '7.2f')} "
          f"{_fmt(r['engine_ms_p50'], '7.2f')} "
          f"{_fmt(r['engine_alone_ms_p50'], '7.2f')}  {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}")
  print("FPS: frames drawn per second over the game; FPS 1s: median of the frames-in-the-last-second counter; "
        "lat: key event to its first frame drawn, ms; server, engine: ms per frame (headers), alone: engine.step "
        "called directly")


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
  except OSError:
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--preset", default="cpu_long",
                      help="comma-separated scales of experiments/gamengen_demo.py (smoke, cpu, cpu_long), random "
                           "weights")
  source.add_argument("--workdir", help="a gamengen_diffusion run's workdir: its trained world model")
  parser.add_argument("--steps", default="2,4", help="comma-separated DDIM steps per frame, one row (server) each")
  parser.add_argument("--frames", type=int, default=200, help="frames the browser plays per row")
  parser.add_argument("--hold", type=int, default=10, help="frames between changes of the held keys")
  parser.add_argument("--record", default="", help="write each row's frames here as a GIF and a PNG strip")
  parser.add_argument("--out", default="", help="the JSON (default results/gamengen_browser_<date>.json)")
  args = parser.parse_args(argv)
  scales = [s for s in args.preset.split(",") if s]
  bad = [s for s in scales if s not in gamengen.SCALES]
  if bad or not scales:
    parser.error(f"--preset {args.preset!r}: expected comma-separated scales of {', '.join(gamengen.SCALES)}")
  try:
    args.steps = [int(k) for k in args.steps.split(",")]
  except ValueError:
    parser.error(f"--steps {args.steps!r}: expected comma-separated integers")
  if min(args.steps) < 1 or args.frames < 2 or args.hold < 1:
    parser.error("--steps must be >= 1, --frames >= 2, --hold >= 1")
  args.sources = [("workdir", args.workdir)] if args.workdir else [("preset", s) for s in scales]
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  why = play_browser.unavailable()
  if why:
    print(f"benchmarks.gamengen_browser: skipped: {why}")
    return 0
  date = time.strftime("%Y-%m-%d")
  out = args.out or os.path.join("results", f"gamengen_browser_{date}.json")
  results = {"command": "python -m benchmarks.gamengen_browser " + " ".join(sys.argv[1:] if argv is None else argv),
             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
             "cores_usable": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
             "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
             "uptime_before": _uptime(), "frames": args.frames, "hold": args.hold, "script": SCRIPT, "rows": []}
  print(f"uptime before: {results['uptime_before']}", flush=True)
  with play_browser.chromium() as browser:
    for kind, name in args.sources:
      for k in args.steps:
        engine, info = preset_engine(name, k) if kind == "preset" else workdir_engine(name, k)
        row = describe(engine, info)
        if kind == "preset":
          print(f"{row['source']}: the weights are random; the speed does not depend on them (the frames are noise)")
        alone = engine_alone_ms(engine)
        recording = RecordingEngine(engine)
        row["loadavg_before"] = os.getloadavg()
        stats = play_in_browser(browser, recording, args.frames, args.hold)
        row["loadavg_after"] = os.getloadavg()
        results.setdefault("user_agent", stats.pop("user_agent"))
        row.update(summarise(stats, alone), samples={**stats, "engine_alone_ms": alone})
        if args.record:
          label = f"{os.path.basename(os.path.normpath(name))}_k{k}"
          row["recording"] = write_recording(args.record, label, recording, stats["fps_session"])
        results["rows"].append(row)
        print(f"{row['source']} k={k}: {row['frames']} frames, {row['fps_session']:.1f} FPS, latency p50 "
              f"{_fmt(row['latency_ms_p50'], '.1f')} ms ({row['latency_events']} key events)", flush=True)
  results["uptime_after"] = _uptime()
  print_table(results["rows"])
  print(f"uptime after: {results['uptime_after']}")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
