"""Playing a neural game engine in real time, in a browser or headless (GameNGen, arXiv 2408.14837).

The paper's claim (abstract, sec. 1) is that a diffusion model can be a game engine playable in real time, at
20 FPS on one TPU, running the game loop of sec. 1: the player's keys become an action, the engine generates
the next frame from past frames and actions, and the frame is shown. This is that loop around any
`FrameEngine` (the diffusion sampler, or a fake in tests).

Held keys press ViZDoom buttons (the page sends `KeyboardEvent.code`s; `keyboard_to_action` also takes
"W", ",", " ", "Ctrl", any case):

| keys               | button        | does            |
|--------------------|---------------|-----------------|
| W, ArrowUp         | MOVE_FORWARD  | move forward    |
| S, ArrowDown       | MOVE_BACKWARD | move back       |
| A, ArrowLeft       | TURN_LEFT     | turn left       |
| D, ArrowRight      | TURN_RIGHT    | turn right      |
| Q, Comma (,)       | MOVE_LEFT     | strafe left     |
| E, Period (.)      | MOVE_RIGHT    | strafe right    |
| Space, Ctrl        | ATTACK        | fire            |
| F                  | USE           | doors, switches |

The held buttons become one of the agent's actions (`env.ACTIONS`, the only ones the model was trained on):
opposite buttons cancel (W+S, A+D, Q+E press neither); then the action all of whose buttons are held and
that has the most of them wins, ties going to the lower id (so movement beats turning beats attack beats
use). Nothing held, or only other keys: noop (id 0). Ctrl+W is the browser's close-tab, which a page cannot
stop: attack with Space while moving.

| keys held      | action                  |
|----------------|-------------------------|
| (none)         | 0 noop                  |
| W              | 1 forward               |
| S              | 2 backward              |
| Q              | 3 strafe_left           |
| E              | 4 strafe_right          |
| A              | 5 turn_left             |
| D              | 6 turn_right            |
| Space          | 7 attack                |
| F              | 8 use                   |
| W + A          | 9 forward_turn_left     |
| W + D          | 10 forward_turn_right   |
| W + Space      | 11 forward_attack       |
| A + Space      | 12 turn_left_attack     |
| D + Ctrl       | 13 turn_right_attack    |
| W + Q          | 14 forward_strafe_left  |
| W + E          | 15 forward_strafe_right |
| W + F          | 16 forward_use          |
| W + S          | 0 noop                  |
| A + D          | 0 noop                  |
| Q + E          | 0 noop                  |
| S + A          | 2 backward              |
| W + A + Space  | 9 forward_turn_left     |
| W + S + D      | 6 turn_right            |
| Space + F      | 7 attack                |

Streaming is plain HTTP, one request per frame: the page POSTs its held keys to `/frame`, the server steps
the engine once with the matching action and answers with the frame as JPEG (timings in headers), and the
page asks for the next frame when it has drawn this one. This needs no WebSocket implementation (uvicorn has
none installed here), each frame carries exactly the keys it was made from, and a slow engine or network
only lowers the frame rate: no frames queue up, none are skipped. JPEG (Pillow, quality 90) makes an E1M1
frame about 25 kB, a tenth of the raw 230 kB. A lock serialises engine access. There is one game at a time:
`/reset` starts it and gives the page a session id; a later `/reset` (a second page, a reload) takes the game
over, and the older page's next `/frame` gets 409 with a message saying so. `/health` reports the state,
`/actions` the key table. The page shows its frame rate and the median input-to-frame latency (a key event to
the drawing of the first frame requested after it) and returns every sample from `window.playStats()`
(play_browser.py drives it in headless Chromium; benchmarks/gamengen_browser.py measures a world model so).

Headless, `play_headless` plays a scripted action list and writes play.gif, frames.npy and play.json (frame
count, ms per frame mean/p50/p99, FPS). `run(engine, config)` is the job's entry for both.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Protocol

import fastapi
import numpy as np
import pydantic
import uvicorn
from fastapi.responses import HTMLResponse, Response
from PIL import Image

from lwjax.config import ConfigError, Field, validate as validate_schema
from lwjax.projects.gamengen.env import ACTION_NAMES, ACTIONS, NUM_ACTIONS


class FrameEngine(Protocol):
  """A game engine that makes frames: the GameNGen sampler, or a fake in tests."""
  frame_shape: tuple[int, int, int]  # [height, width, RGB], env.FRAME_SHAPE for DOOM

  def reset(self, seed: int) -> np.ndarray:
    """Starts a game; the first frame, uint8 [H, W, 3]."""

  def step(self, action: int) -> np.ndarray:
    """The next frame, uint8 [H, W, 3], after holding `action` (an id of env.ACTIONS)."""


KEYS = (  # (label, KeyboardEvent.code values, button, what it does): the table of the module docstring
    ("W, ArrowUp", ("KeyW", "ArrowUp"), "MOVE_FORWARD", "move forward"),
    ("S, ArrowDown", ("KeyS", "ArrowDown"), "MOVE_BACKWARD", "move back"),
    ("A, ArrowLeft", ("KeyA", "ArrowLeft"), "TURN_LEFT", "turn left"),
    ("D, ArrowRight", ("KeyD", "ArrowRight"), "TURN_RIGHT", "turn right"),
    ("Q, Comma (,)", ("KeyQ", "Comma"), "MOVE_LEFT", "strafe left"),
    ("E, Period (.)", ("KeyE", "Period"), "MOVE_RIGHT", "strafe right"),
    ("Space, Ctrl", ("Space", "ControlLeft", "ControlRight"), "ATTACK", "fire"),
    ("F", ("KeyF",), "USE", "doors, switches"),
)
OPPOSITES = (("MOVE_FORWARD", "MOVE_BACKWARD"), ("MOVE_LEFT", "MOVE_RIGHT"), ("TURN_LEFT", "TURN_RIGHT"))
_BUTTON_OF_CODE = {code.lower(): button for _, codes, button, _ in KEYS for code in codes}
_CODE_ALIASES = {",": "comma", ".": "period", " ": "space", "ctrl": "controlleft", "control": "controlleft"}


def _button(key: str) -> str | None:
  key = key.lower()
  key = _CODE_ALIASES.get(key, "key" + key if len(key) == 1 and key.isalpha() else key)
  return _BUTTON_OF_CODE.get(key)


def keyboard_to_action(keys: Iterable[str]) -> int:
  """The env.ACTIONS id for a set of held keys (the rule and tables are in the module docstring)."""
  held = {b for b in map(_button, keys) if b is not None}
  for a, b in OPPOSITES:
    if a in held and b in held:
      held -= {a, b}
  fitting = [i for i, (_, buttons) in enumerate(ACTIONS) if set(buttons) <= held]  # noop always fits
  return max(fitting, key=lambda i: (len(ACTIONS[i][1]), -i))


def key_table() -> dict:
  """What `/actions` serves: the keys, the actions and how held keys combine."""
  return {"keys": [{"keys": label, "codes": list(codes), "button": button, "does": does}
                   for label, codes, button, does in KEYS],
          "actions": [{"id": i, "name": name, "buttons": list(buttons)} for i, (name, buttons) in enumerate(ACTIONS)],
          "rule": "opposite keys cancel; the action with the most held buttons wins, ties to the lower id; "
                  "nothing held = noop. Ctrl+W closes the tab: attack with Space while moving."}


def checked_frame(frame, shape: Sequence[int]) -> np.ndarray:
  """`frame` as a uint8 [H, W, 3] array of the engine's frame_shape; ValueError naming what is wrong."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.shape != tuple(shape):
    raise ValueError(f"engine frame is {frame.dtype} {frame.shape}; expected uint8 {tuple(shape)}")
  return frame


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


class FrameRequest(pydantic.BaseModel):
  session: str
  keys: list[str] = pydantic.Field(default_factory=list, max_length=64)


class ResetRequest(pydantic.BaseModel):
  seed: int | None = pydantic.Field(None, ge=0)


class Game:
  """The one game being played: the engine behind a lock, the session id of the page that holds it."""

  def __init__(self, engine: FrameEngine, seed: int):
    self.engine, self.seed = engine, seed
    self.lock = threading.Lock()
    self.session: str | None = None
    self.steps = 0
    self.accepting = True

  def reset(self, seed: int | None) -> Response:
    with self.lock:
      self._check_accepting()
      start = time.perf_counter()
      frame = checked_frame(self.engine.reset(self.seed if seed is None else seed), self.engine.frame_shape)
      self.session, self.steps = uuid.uuid4().hex, 0
      return self._response(frame, start, action=0, session=self.session, steps=0)

  def frame(self, session: str, keys: Sequence[str]) -> Response:
    action = keyboard_to_action(keys)
    with self.lock:
      self._check_accepting()
      if session != self.session:
        raise fastapi.HTTPException(409, "another page (or a /reset) took this game over; reset to play here")
      start = time.perf_counter()
      frame = checked_frame(self.engine.step(action), self.engine.frame_shape)
      self.steps += 1
      return self._response(frame, start, action=action, session=session, steps=self.steps)

  def _check_accepting(self) -> None:
    if not self.accepting:
      raise fastapi.HTTPException(503, "server is shutting down")

  @staticmethod
  def _response(frame: np.ndarray, start: float, *, action: int, session: str, steps: int) -> Response:
    engine_ms = 1000 * (time.perf_counter() - start)
    jpeg = encode_jpeg(frame)
    headers = {"X-Session": session, "X-Step": str(steps), "X-Action": str(action),
               "X-Action-Name": ACTION_NAMES[action], "X-Engine-Ms": f"{engine_ms:.2f}",
               "X-Server-Ms": f"{1000 * (time.perf_counter() - start):.2f}", "Cache-Control": "no-store"}
    return Response(jpeg, media_type="image/jpeg", headers=headers)

  def close(self) -> None:
    """Refuses new frames and waits for the one being made, so the engine is never torn down mid-step."""
    with self.lock:
      self.accepting = False


def create_app(engine: FrameEngine, *, seed: int = 0) -> fastapi.FastAPI:
  """The play app: `/` the page, POST `/reset` and `/frame` (JPEG + timing headers), `/health`, `/actions`."""
  game = Game(engine, seed)
  page = resources.files(__package__).joinpath("play_page.html").read_text(encoding="utf-8")
  app = fastapi.FastAPI(title="lwjax GameNGen play", on_shutdown=[game.close])
  app.state.game = game

  # Plain `def` handlers run in the thread pool: a slow engine step never blocks the event loop.
  @app.get("/", response_class=HTMLResponse)
  def index():
    return page

  @app.post("/reset")
  def reset(req: ResetRequest | None = None):
    return game.reset(req.seed if req else None)

  @app.post("/frame")
  def frame(req: FrameRequest):
    return game.frame(req.session, req.keys)

  @app.get("/health")
  def health():
    return {"status": "ok" if game.accepting else "shutting_down", "playing": game.session is not None,
            "steps": game.steps, "frame_shape": list(engine.frame_shape)}

  @app.get("/actions")
  def actions():
    return key_table()

  return app


class PlayServer:
  """The play app under uvicorn on a socket bound at construction, so `url` is known before serving (port 0
  picks a free port). `serve_forever()` blocks; `start()`/`stop()` (or `with`) run it in a thread."""

  def __init__(self, engine: FrameEngine, *, host: str = "127.0.0.1", port: int = 0, seed: int = 0):
    self.app = create_app(engine, seed=seed)
    ipv6 = ":" in host
    self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ipv6 else socket.AF_INET)
    self.url = f"http://{f'[{host}]' if ipv6 else host}:{self.socket.getsockname()[1]}/"
    self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
    self._thread: threading.Thread | None = None

  def serve_forever(self) -> None:
    logging.info("GameNGen play: open %s", self.url)
    self.server.run(sockets=[self.socket])

  def start(self, timeout: float = 30.0) -> PlayServer:
    self._thread = threading.Thread(target=self.serve_forever, name="lwjax-play", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"play server did not start on {self.url}")
      time.sleep(0.01)
    return self

  def stop(self) -> None:
    self.server.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout=10)

  def __enter__(self) -> PlayServer:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def load_actions(source: Sequence[int | str] | str | os.PathLike) -> list[int]:
  """Action ids from a list of ids or names, or from a file: JSON (a list of ids or names) or text (one id or
  name a line, optionally followed by a repeat count; `#` starts a comment). ValueError names a bad entry."""
  if not isinstance(source, (str, os.PathLike)):
    return [_action_id(item, f"actions[{i}]") for i, item in enumerate(source)]
  path = os.fspath(source)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    items = json.loads(text)
    if not isinstance(items, list):
      raise ValueError(f"{path}: expected a JSON list of action ids or names, got {type(items).__name__}")
    return [_action_id(item, f"{path}[{i}]") for i, item in enumerate(items)]
  actions = []
  for n, line in enumerate(text.splitlines(), 1):
    fields = line.split("#")[0].split()
    if not fields:
      continue
    if len(fields) > 2 or (len(fields) == 2 and not (fields[1].isdigit() and int(fields[1]) > 0)):
      raise ValueError(f"{path}:{n}: expected '<action id or name> [repeat count > 0]', got {line.strip()!r}")
    actions += [_action_id(fields[0], f"{path}:{n}")] * (int(fields[1]) if len(fields) == 2 else 1)
  return actions


def _action_id(item, where: str) -> int:
  if isinstance(item, str) and item.isdigit():
    item = int(item)
  if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < NUM_ACTIONS:
    return item
  if isinstance(item, str) and item in ACTION_NAMES:
    return ACTION_NAMES.index(item)
  raise ValueError(f"{where}: {item!r} is not an action (valid: ids 0..{NUM_ACTIONS - 1} or {', '.join(ACTION_NAMES)})")


def play_headless(engine: FrameEngine, actions: Sequence[int | str] | str | os.PathLike, out_dir: str, *,
                  seed: int = 0, gif_fps: float = 20.0) -> dict:
  """Plays scripted actions from a reset; writes play.gif and frames.npy (uint8 [1 + steps, H, W, 3], the reset
  frame first) and play.json (frames, ms per engine step mean/p50/p99, FPS), which it also returns."""
  actions = load_actions(actions)
  if not actions:
    raise ValueError("no actions to play")
  frames = [checked_frame(engine.reset(seed), engine.frame_shape)]
  step_ms = []
  for action in actions:
    start = time.perf_counter()
    frame = engine.step(action)
    step_ms.append(1000 * (time.perf_counter() - start))
    frames.append(checked_frame(frame, engine.frame_shape))
  os.makedirs(out_dir, exist_ok=True)
  np.save(os.path.join(out_dir, "frames.npy"), np.stack(frames))
  images = [Image.fromarray(f) for f in frames]
  images[0].save(os.path.join(out_dir, "play.gif"), save_all=True, append_images=images[1:],
                 duration=round(1000 / gif_fps), loop=0)
  ms = np.asarray(step_ms)
  summary = {"frames": len(frames), "steps": len(actions), "seed": seed,
             "ms_per_frame": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                              "p99": float(np.percentile(ms, 99))},
             "fps": float(1000 * len(ms) / ms.sum()), "actions": actions}
  with open(os.path.join(out_dir, "play.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  logging.info("played %d steps headless: %.2f ms/frame mean, %.1f FPS -> %s", len(actions),
               summary["ms_per_frame"]["mean"], summary["fps"], out_dir)
  return summary


SCHEMA = {
    "host": Field(str, doc="interface the server binds; 127.0.0.1 keeps the game on this machine"),
    "port": Field(int, min=0, max=65535, doc="0 picks a free port (logged)"),
    "headless": Field(bool, doc="play actions_file into out_dir instead of serving the page"),
    "actions_file": Field(str, doc="headless: text (one action id or name [repeat] a line) or .json list"),
    "out_dir": Field(str, doc="headless: where play.gif, frames.npy and play.json go"),
    "seed": Field(int, min=0),
}


def validate(config) -> None:
  """Checks a play config (ConfigDict or dict) at the door; ConfigError names the key."""
  validate_schema(config, SCHEMA)
  if not config["headless"]:
    return
  if not os.path.isfile(config["actions_file"]):
    raise ConfigError("actions_file", f"{config['actions_file']!r} is not a file", "an action file (headless)")
  try:
    if not load_actions(config["actions_file"]):
      raise ValueError("it holds no actions")
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError("actions_file", str(e), "action ids or names of env.ACTIONS") from None
  if not config["out_dir"]:
    raise ConfigError("out_dir", "must be set when headless", "a directory")


def run(engine: FrameEngine, config) -> dict | None:
  """The play job: headless, plays `actions_file` and returns play.json's summary; else serves the page on
  host:port until interrupted."""
  validate(config)
  if config["headless"]:
    return play_headless(engine, config["actions_file"], config["out_dir"], seed=config["seed"])
  PlayServer(engine, host=config["host"], port=config["port"], seed=config["seed"]).serve_forever()
  return None
