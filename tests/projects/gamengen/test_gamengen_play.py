"""GameNGen play loop: the key mapping (every documented key and combination), headless play and its timing,
the config at the door, the HTTP endpoints, and a real headless Chromium holding keys on the page and
measuring its frame rate and input-to-frame latency."""

import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lwjax.config import ConfigError
from lwjax.projects.gamengen import play, play_browser
from lwjax.projects.gamengen.env import ACTION_NAMES, ACTIONS, FRAME_SHAPE, NUM_ACTIONS


class FakeEngine:
  """Frames that show the step count (red level, a moving white bar) and the action (green level)."""
  frame_shape = FRAME_SHAPE

  def __init__(self, step_s: float = 0.0):
    self.step_s, self.t = step_s, 0
    self.actions: list[int] = []
    self.seeds: list[int] = []
    self.lock = threading.Lock()

  def frame(self, action: int) -> np.ndarray:
    f = np.zeros(FRAME_SHAPE, np.uint8)
    f[..., 0] = (16 * self.t) % 256
    f[..., 1] = 15 * action
    bar = (8 * self.t) % FRAME_SHAPE[1]
    f[:, bar:bar + 8] = 255
    return f

  def reset(self, seed: int) -> np.ndarray:
    self.seeds.append(seed)
    self.t = 0
    return self.frame(0)

  def step(self, action: int) -> np.ndarray:
    assert self.lock.acquire(blocking=False), "engine stepped concurrently"
    try:
      time.sleep(self.step_s)
      self.t += 1
      self.actions.append(action)
      return self.frame(action)
    finally:
      self.lock.release()


def _doc_rows(pattern: str) -> list[tuple[str, ...]]:
  return [m.groups() for m in re.finditer(pattern, play.__doc__, re.M)]


COMBINATIONS = _doc_rows(r"^\| ([^|]+?) +\| (\d+) (\w+) +\|$")


def _keys(cell: str) -> set[str]:
  return set() if cell == "(none)" else set(cell.split(" + "))


@pytest.mark.parametrize("cell,action_id,name", COMBINATIONS)
def test_every_documented_combination(cell, action_id, name):
  assert ACTION_NAMES[int(action_id)] == name
  assert play.keyboard_to_action(_keys(cell)) == int(action_id)
  assert play.keyboard_to_action(sorted(_keys(cell))) == int(action_id)  # any sequence of keys works


def test_combination_table_reaches_every_action():
  assert len(COMBINATIONS) >= NUM_ACTIONS
  assert {int(a) for _, a, _ in COMBINATIONS} == set(range(NUM_ACTIONS))


def test_key_table_matches_docstring_and_every_key_presses_its_button():
  documented = _doc_rows(r"^\| ([^|]+?) +\| ([A-Z_]+) +\| ([^|]+?) +\|$")
  assert documented == [(label, button, does) for label, _, button, does in play.KEYS]
  single = {buttons[0]: i for i, (_, buttons) in enumerate(ACTIONS) if len(buttons) == 1}
  for _, codes, button, _ in play.KEYS:
    for code in codes:
      assert play.keyboard_to_action({code}) == single[button], code
      assert play.keyboard_to_action({code.lower()}) == single[button], code
  aliases = {"w": "MOVE_FORWARD", "W": "MOVE_FORWARD", "s": "MOVE_BACKWARD", "a": "TURN_LEFT", "d": "TURN_RIGHT",
             "q": "MOVE_LEFT", "e": "MOVE_RIGHT", ",": "MOVE_LEFT", ".": "MOVE_RIGHT", " ": "ATTACK",
             "Space": "ATTACK", "Ctrl": "ATTACK", "Control": "ATTACK", "f": "USE", "arrowleft": "TURN_LEFT"}
  for key, button in aliases.items():
    assert play.keyboard_to_action({key}) == single[button], key


def test_unknown_keys_are_ignored():
  assert play.keyboard_to_action(set()) == 0
  assert play.keyboard_to_action({"KeyX", "Escape", "", "ShiftLeft", "Digit1"}) == 0
  assert play.keyboard_to_action({"KeyW", "KeyX"}) == ACTION_NAMES.index("forward")
  assert play.keyboard_to_action({"ArrowUp", "ArrowRight"}) == ACTION_NAMES.index("forward_turn_right")


def test_load_actions_from_lists_and_files(tmp_path):
  assert play.load_actions([1, "turn_left", "0"]) == [1, 5, 0]
  text = tmp_path / "actions.txt"
  text.write_text("# warm up\nforward 3\n\n6  # turn right\nattack 2\n")
  assert play.load_actions(text) == [1, 1, 1, 6, 7, 7]
  js = tmp_path / "actions.json"
  js.write_text(json.dumps(["use", 2, 16]))
  assert play.load_actions(str(js)) == [8, 2, 16]
  for bad, where in ((["jump"], "actions[0]"), ([17], "actions[0]"), ([True], "actions[0]")):
    with pytest.raises(ValueError, match=re.escape(where) + ".*forward_use"):
      play.load_actions(bad)
  text.write_text("forward\nforward 0\n")
  with pytest.raises(ValueError, match=r"actions.txt:2: expected"):
    play.load_actions(text)
  js.write_text('{"a": 1}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    play.load_actions(js)


def test_headless_writes_frames_gif_and_timing(tmp_path):
  engine = FakeEngine(step_s=0.002)
  actions = [1, 1, 6, 0, 10, 7]
  summary = play.play_headless(engine, actions, str(tmp_path / "out"), seed=3)
  assert engine.seeds == [3] and engine.actions == actions
  frames = np.load(tmp_path / "out" / "frames.npy")
  assert frames.shape == (len(actions) + 1, *FRAME_SHAPE) and frames.dtype == np.uint8
  reference = FakeEngine()
  expected = [reference.reset(3)] + [reference.step(a) for a in actions]
  np.testing.assert_array_equal(frames, np.stack(expected))
  with Image.open(tmp_path / "out" / "play.gif") as gif:
    assert gif.n_frames == len(actions) + 1 and gif.size == (FRAME_SHAPE[1], FRAME_SHAPE[0])
  saved = json.loads((tmp_path / "out" / "play.json").read_text())
  assert saved == summary
  assert summary["frames"] == len(actions) + 1 and summary["steps"] == len(actions)
  ms = summary["ms_per_frame"]
  assert 2.0 <= ms["p50"] <= ms["p99"] and ms["mean"] >= 2.0  # each step sleeps 2 ms
  assert 0 < summary["fps"] <= 500
  with pytest.raises(ValueError, match="no actions"):
    play.play_headless(engine, [], str(tmp_path / "empty"))


def test_bad_engine_frames_are_named():
  with pytest.raises(ValueError, match=r"float32 \(240, 320, 3\); expected uint8 \(240, 320, 3\)"):
    play.checked_frame(np.zeros(FRAME_SHAPE, np.float32), FRAME_SHAPE)
  with pytest.raises(ValueError, match=r"uint8 \(120, 160, 3\); expected"):
    play.checked_frame(np.zeros((120, 160, 3), np.uint8), FRAME_SHAPE)


def _config(**overrides):
  return {"host": "127.0.0.1", "port": 0, "headless": True, "actions_file": "", "out_dir": "", "seed": 0,
          **overrides}


def test_run_validates_config_and_plays_headless(tmp_path):
  actions = tmp_path / "a.txt"
  actions.write_text("forward 4\nturn_left\n")
  bad = [({"port": 70000}, "port: 70000 is above the maximum"), ({"port": "80"}, "port: expected int"),
         ({"headless": 1}, "headless: expected bool"), ({"seed": -1}, "seed: -1 is below"),
         ({"actions_file": str(tmp_path / "missing.txt")}, "actions_file: .* is not a file"),
         ({"actions_file": str(actions)}, "out_dir: must be set when headless")]
  for overrides, message in bad:
    with pytest.raises(ConfigError, match=message):
      play.validate(_config(**overrides))
  with pytest.raises(ConfigError, match="fps: unknown key"):
    play.validate({**_config(), "fps": 20})
  with pytest.raises(ConfigError, match="seed: missing"):
    play.validate({k: v for k, v in _config().items() if k != "seed"})
  (tmp_path / "bad.txt").write_text("forward\nfly\n")
  with pytest.raises(ConfigError, match=r"actions_file: .*bad.txt:2: 'fly' is not an action"):
    play.validate(_config(actions_file=str(tmp_path / "bad.txt"), out_dir=str(tmp_path)))
  play.validate(_config(headless=False))  # serving needs no action file
  engine = FakeEngine()
  summary = play.run(engine, _config(actions_file=str(actions), out_dir=str(tmp_path / "out"), seed=5))
  assert summary["frames"] == 6 and engine.actions == [1, 1, 1, 1, 5] and engine.seeds == [5]


def _jpeg(response) -> np.ndarray:
  assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
  return np.asarray(Image.open(io.BytesIO(response.content)))


def test_http_endpoints():
  engine = FakeEngine()
  with TestClient(play.create_app(engine, seed=7)) as client:
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/frame" in page.text
    assert "src=" not in page.text and "href=" not in page.text  # self-contained: nothing else to load
    table = client.get("/actions").json()
    assert [row["button"] for row in table["keys"]] == [button for _, _, button, _ in play.KEYS]
    assert [a["name"] for a in table["actions"]] == list(ACTION_NAMES) and "noop" in table["rule"]
    assert client.get("/health").json() == {"status": "ok", "playing": False, "steps": 0,
                                            "frame_shape": list(FRAME_SHAPE)}
    assert client.post("/frame", json={"session": "none", "keys": []}).status_code == 409

    first = client.post("/reset")
    assert _jpeg(first).shape == FRAME_SHAPE and engine.seeds == [7]
    session = first.headers["x-session"]
    assert first.headers["x-step"] == "0" and first.headers["cache-control"] == "no-store"
    r = client.post("/frame", json={"session": session, "keys": ["KeyW", "KeyD"]})
    frame = _jpeg(r)
    assert engine.actions == [10] and r.headers["x-action"] == "10"
    assert r.headers["x-action-name"] == "forward_turn_right" and r.headers["x-step"] == "1"
    assert float(r.headers["x-server-ms"]) >= float(r.headers["x-engine-ms"]) >= 0
    assert abs(int(frame[..., 1].mean()) - 15 * 10) <= 8  # the green level shows the action through JPEG
    assert _jpeg(client.post("/frame", json={"session": session})).shape == FRAME_SHAPE
    assert engine.actions == [10, 0]
    assert client.get("/health").json()["steps"] == 2

    second = client.post("/reset", json={"seed": 11})  # another page takes the game over
    assert second.status_code == 200 and engine.seeds == [7, 11]
    stale = client.post("/frame", json={"session": session, "keys": ["KeyW"]})
    assert stale.status_code == 409 and "took this game over" in stale.json()["detail"]
    assert engine.actions == [10, 0]
    assert client.post("/frame", json={"session": second.headers["x-session"], "keys": []}).status_code == 200
    assert client.post("/frame", json={"keys": []}).status_code == 422
    assert client.post("/frame", json={"session": "x", "keys": ["k"] * 65}).status_code == 422
    assert client.post("/reset", json={"seed": -1}).status_code == 422
  game = client.app.state.game
  assert not game.accepting
  with pytest.raises(play.fastapi.HTTPException) as e:
    game.frame(second.headers["x-session"], [])
  assert e.value.status_code == 503


def test_server_on_free_port_serialises_concurrent_frames():
  engine = FakeEngine(step_s=0.002)
  with play.PlayServer(engine, port=0) as server:
    port = int(server.url.rsplit(":", 1)[1].rstrip("/"))
    assert server.url.startswith("http://127.0.0.1:") and port > 0
    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as client:
      assert client.get("health").json()["status"] == "ok"
      session = client.post("reset").headers["x-session"]

      def request(keys):
        assert client.post("frame", json={"session": session, "keys": keys}).status_code == 200
      threads = [threading.Thread(target=request, args=(["KeyA"],)) for _ in range(8)]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    assert engine.actions == [5] * 8  # FakeEngine.step asserts it is never entered twice at once


def _wait_for(condition, what: str, timeout: float = 15.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


@pytest.fixture
def browser():
  """A headless Chromium (play_browser.chromium); the test skips where there is none."""
  why = play_browser.unavailable()
  if why:
    pytest.skip(why)
  with play_browser.chromium() as context:
    yield context


def test_browser_plays_held_keys(browser):
  engine = FakeEngine(step_s=0.01)
  with play.PlayServer(engine, port=0) as server:
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("Number(document.getElementById('fps').textContent) > 0", timeout=15000)
    screens = set()

    def hold_until(action: int):
      _wait_for(lambda: engine.actions[-3:] == [action] * 3, f"3 frames of {ACTION_NAMES[action]}")
      for _ in range(3):
        screens.add(page.evaluate("document.getElementById('screen').toDataURL()"))
        time.sleep(0.05)

    hold_until(0)
    page.keyboard.down("w")
    hold_until(ACTION_NAMES.index("forward"))
    page.keyboard.down("d")
    hold_until(ACTION_NAMES.index("forward_turn_right"))
    page.keyboard.up("w")
    hold_until(ACTION_NAMES.index("turn_right"))
    page.keyboard.down("Space")
    hold_until(ACTION_NAMES.index("turn_right_attack"))
    page.keyboard.up("d")
    page.keyboard.up("Space")
    hold_until(0)
    assert len(screens) >= 8, f"only {len(screens)} distinct frames on the canvas"
    fps = float(page.text_content("#fps"))
    assert fps > 0
    assert float(page.text_content("#ms")) >= 10.0  # the engine sleeps 10 ms a step
    assert page.text_content("#message") == ""
    assert engine.seeds == [0]

    other = browser.new_page()  # a second page takes the game over; the first one says so
    other.goto(server.url)
    page.wait_for_function("document.getElementById('message').textContent.includes('took this game over')",
                           timeout=15000)
    other.wait_for_function("Number(document.getElementById('step').textContent) > 3", timeout=15000)
    assert engine.seeds == [0, 0]


def test_browser_measures_fps_and_input_to_frame_latency(browser):
  step_ms = 30.0
  engine = FakeEngine(step_s=step_ms / 1000)
  with play.PlayServer(engine, port=0) as server:
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("playStats().frames > 3", timeout=15000)
    assert play_browser.play_stats(page)["latency_ms"] == []  # no key changed yet
    page.keyboard.down("w")
    page.keyboard.down("w")  # an auto-repeat: the held keys do not change
    page.wait_for_function("playStats().latency_ms.length >= 1", timeout=15000)
    page.keyboard.up("w")
    page.wait_for_function("playStats().latency_ms.length >= 2 && playStats().session_ms > 1000", timeout=15000)
    stats = play_browser.play_stats(page)
    assert stats["frames"] > 3 and stats["fps_window"] > 0 and stats["fps_session"] > 0
    assert stats["fps_session"] < 1000 / step_ms  # each frame is at least one engine step
    assert len(stats["latency_ms"]) == 2
    # A change waits for the request in flight, then a whole request of its own: at least one engine step.
    assert all(step_ms <= ms < 10_000 for ms in stats["latency_ms"]), stats["latency_ms"]
    assert len(stats["server_ms"]) == len(stats["engine_ms"]) == stats["frames"] - 1  # the reset frame has none
    assert all(s >= e >= step_ms for s, e in zip(stats["server_ms"], stats["engine_ms"], strict=True))
    assert float(page.text_content("#latency")) >= step_ms
    assert float(page.text_content("#fps-session")) > 0
    assert 1 in engine.actions  # the held W reached the engine
