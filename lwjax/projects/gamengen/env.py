"""The ViZDoom game GameNGen's agent plays (arXiv 2408.14837, sec. 3.1, 4.1, appendix A.5): Freedoom E1M1, headless.

One `DoomEnv` runs one game in this process; `lwjax.projects.gamengen.vector_env.VectorDoomEnv` runs N of
them in worker processes. Frames are 320x240 RGB (uint8 HWC, the status bar included, as in the paper);
the agent also sees the automap, average-pooled 2x2 to 160x120. Each agent action is held
`tics_per_action` tics (4 in the paper) and the frame of every tic is returned, so a recorder can keep
them all. The reward is the paper's (see `reward.py`), returned per term as well as summed.

Actions are the combinations of key presses in `ACTIONS` (index = action id):

| id | name                 | keys held                  |
|----|----------------------|----------------------------|
|  0 | noop                 | -                          |
|  1 | forward              | MOVE_FORWARD               |
|  2 | backward             | MOVE_BACKWARD              |
|  3 | strafe_left          | MOVE_LEFT                  |
|  4 | strafe_right         | MOVE_RIGHT                 |
|  5 | turn_left            | TURN_LEFT                  |
|  6 | turn_right           | TURN_RIGHT                 |
|  7 | attack               | ATTACK                     |
|  8 | use                  | USE (doors, switches)      |
|  9 | forward_turn_left    | MOVE_FORWARD + TURN_LEFT   |
| 10 | forward_turn_right   | MOVE_FORWARD + TURN_RIGHT  |
| 11 | forward_attack       | MOVE_FORWARD + ATTACK      |
| 12 | turn_left_attack     | TURN_LEFT + ATTACK         |
| 13 | turn_right_attack    | TURN_RIGHT + ATTACK        |
| 14 | forward_strafe_left  | MOVE_FORWARD + MOVE_LEFT   |
| 15 | forward_strafe_right | MOVE_FORWARD + MOVE_RIGHT  |
| 16 | forward_use          | MOVE_FORWARD + USE         |

The game is configured by `EnvConfig`; `check_config` validates it at the door and names the WADs and maps
the vizdoom wheel ships when a WAD or map is unknown (ViZDoom itself would fail obscurely or hang).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import vizdoom as vzd

from lwjax.config import ConfigError, option, schema_of, validate as validate_schema
from lwjax.projects.gamengen.reward import GAME_VARIABLES, REWARD_TERMS, PaperReward

ACTIONS = (
    ("noop", ()),
    ("forward", ("MOVE_FORWARD",)),
    ("backward", ("MOVE_BACKWARD",)),
    ("strafe_left", ("MOVE_LEFT",)),
    ("strafe_right", ("MOVE_RIGHT",)),
    ("turn_left", ("TURN_LEFT",)),
    ("turn_right", ("TURN_RIGHT",)),
    ("attack", ("ATTACK",)),
    ("use", ("USE",)),
    ("forward_turn_left", ("MOVE_FORWARD", "TURN_LEFT")),
    ("forward_turn_right", ("MOVE_FORWARD", "TURN_RIGHT")),
    ("forward_attack", ("MOVE_FORWARD", "ATTACK")),
    ("turn_left_attack", ("TURN_LEFT", "ATTACK")),
    ("turn_right_attack", ("TURN_RIGHT", "ATTACK")),
    ("forward_strafe_left", ("MOVE_FORWARD", "MOVE_LEFT")),
    ("forward_strafe_right", ("MOVE_FORWARD", "MOVE_RIGHT")),
    ("forward_use", ("MOVE_FORWARD", "USE")),
)
ACTION_NAMES = tuple(name for name, _ in ACTIONS)
NUM_ACTIONS = len(ACTIONS)
BUTTONS = ("MOVE_FORWARD", "MOVE_BACKWARD", "MOVE_LEFT", "MOVE_RIGHT", "TURN_LEFT", "TURN_RIGHT", "ATTACK", "USE")
# [NUM_ACTIONS, len(BUTTONS)]: the button vector ViZDoom gets for each action.
ACTION_BUTTONS = np.asarray([[float(b in keys) for b in BUTTONS] for _, keys in ACTIONS], np.float64)

FRAME_SHAPE = (240, 320, 3)  # [height, width, RGB], ViZDoom RES_320X240
AUTOMAP_SHAPE = (120, 160, 3)  # the agent's automap, 2x2-pooled from the screen-sized buffer
VIZDOOM_DIR = os.path.dirname(vzd.__file__)
AUTOMAP_MODES = ("NORMAL", "WHOLE", "OBJECTS", "OBJECTS_WITH_SIZE")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  """One game's settings. The defaults are the paper's: Freedoom E1M1, actions held 4 tics."""
  wad: str = option("freedoom1.wad", doc="IWAD shipped with vizdoom or a path")
  scenario_wad: str = option("", doc="PWAD shipped with vizdoom's scenarios (e.g. basic.wad), a path, or empty")
  map: str = option("E1M1", doc="a map of the WADs, e.g. E1M1 or MAP01")
  skill: int = option(3, min=1, max=5)
  episode_start_tics: int = option(1, min=1, doc="tics played (no-op) before the first observation")
  max_episode_tics: int = option(4200, min=1, doc="the episode time limit in tics (35 per second)")
  tics_per_action: int = option(4, min=1)
  new_area_cell: float = option(64.0, min=1.0, doc="side of a cell of the new-area grid, map units")
  automap_mode: str = option("NORMAL", choices=AUTOMAP_MODES)
  render_hud: bool = True
  seed: int = option(0, min=0, doc="game i of a VectorDoomEnv uses seed + i")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> EnvConfig:
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The basic.cfg scenario of the wheel (a monster across a room; left, right, attack) with its settings.
BASIC = EnvConfig(wad="freedoom2.wad", scenario_wad="basic.wad", map="MAP01", skill=5, episode_start_tics=14,
                  max_episode_tics=300)

SCHEMA = schema_of(EnvConfig)


def shipped_wads() -> str:
  """What the installed vizdoom wheel ships, one line: its IWADs and scenario WADs with their maps."""
  def listing(folder: str) -> str:
    items = []
    for path in sorted(glob.glob(os.path.join(folder, "*.wad"))):
      maps = wad_maps(path)
      span = f"{maps[0]}-{maps[-1]}" if len(maps) > 1 else "".join(maps)
      items.append(f"{os.path.basename(path)} ({span})")
    return ", ".join(items)
  return (f"IWADs {listing(VIZDOOM_DIR)}; scenario WADs {listing(os.path.join(VIZDOOM_DIR, 'scenarios'))} "
          f"(in {VIZDOOM_DIR})")


def wad_maps(path: str) -> list[str]:
  """The maps of a WAD: the marker lumps (E1M1, MAP01, ...) followed by THINGS or TEXTMAP."""
  with open(path, "rb") as f:
    magic, num_lumps, directory_offset = struct.unpack("<4sii", f.read(12))
    if magic not in (b"IWAD", b"PWAD"):
      raise ValueError(f"{path} is not a WAD file (magic {magic!r})")
    f.seek(directory_offset)
    directory = f.read(16 * num_lumps)
  names = [directory[16 * i + 8:16 * i + 16].rstrip(b"\0").decode("ascii", "replace").upper()
           for i in range(num_lumps)]
  return [name for name, following in zip(names, names[1:], strict=False) if following in ("THINGS", "TEXTMAP")]


def resolve_wad(name: str, *, scenario: bool) -> str:
  """The path of a WAD given as a path or as a file name the wheel ships; ValueError listing them if none."""
  folder = os.path.join(VIZDOOM_DIR, "scenarios") if scenario else VIZDOOM_DIR
  for path in (name, os.path.join(folder, name)):
    if os.path.isfile(path):
      return path
  raise ValueError(f"no WAD {name!r}; the vizdoom wheel ships {shipped_wads()}")


def check_config(config: EnvConfig | Mapping[str, Any], prefix: str = "") -> EnvConfig:
  """Validates an env config (dict or EnvConfig) and its WAD and map; raises ConfigError naming the key."""
  d = config.to_dict() if isinstance(config, EnvConfig) else dict(config)
  validate_schema(d, SCHEMA, prefix)
  paths = {}
  for key, scenario in (("wad", False), ("scenario_wad", True)):
    if d[key]:
      try:
        paths[key] = resolve_wad(d[key], scenario=scenario)
      except ValueError as e:
        raise ConfigError(prefix + key, str(e)) from None
  maps = {key: wad_maps(path) for key, path in paths.items()}
  if not any(d["map"].upper() in m for m in maps.values()):
    listing = "; ".join(f"{os.path.basename(paths[k])}: {', '.join(m) or 'none'}" for k, m in maps.items())
    raise ConfigError(prefix + "map", f"no map {d['map']!r} in the WADs given",
                      f"{listing}. The vizdoom wheel ships {shipped_wads()}")
  return EnvConfig.from_dict(d)


def make_game(config: EnvConfig, seed: int) -> vzd.DoomGame:
  """A headless DoomGame for `config` (not yet initialised): RGB 320x240, automap, the action buttons."""
  game = vzd.DoomGame()
  game.set_doom_game_path(resolve_wad(config.wad, scenario=False))
  if config.scenario_wad:
    game.set_doom_scenario_path(resolve_wad(config.scenario_wad, scenario=True))
  game.set_doom_map(config.map)
  game.set_doom_skill(config.skill)
  game.set_episode_start_time(config.episode_start_tics)
  game.set_episode_timeout(config.max_episode_tics)
  game.set_screen_resolution(vzd.ScreenResolution.RES_320X240)
  game.set_screen_format(vzd.ScreenFormat.RGB24)
  game.set_window_visible(False)
  game.set_sound_enabled(False)
  game.set_render_hud(config.render_hud)
  game.set_automap_buffer_enabled(True)
  game.set_automap_mode(getattr(vzd.AutomapMode, config.automap_mode))
  game.set_automap_render_textures(False)  # wall lines only: what the agent needs for coverage
  game.set_available_buttons([getattr(vzd.Button, b) for b in BUTTONS])
  game.set_available_game_variables([getattr(vzd.GameVariable, v) for v in GAME_VARIABLES])
  game.set_mode(vzd.Mode.PLAYER)
  game.set_seed(seed)
  return game


def pool_automap(automap_hwc: np.ndarray) -> np.ndarray:
  """[240, 320, 3] -> [120, 160, 3] uint8 by a rounded 2x2 mean (1-pixel wall lines survive, dimmed)."""
  a = automap_hwc.astype(np.uint16)
  pooled = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4
  return pooled.astype(np.uint8)


class DoomEnv:
  """One ViZDoom game in this process, with the paper's reward, seeded `seed` (default `config.seed`).

  `reset()` before the first `step`.
  """

  def __init__(self, config: EnvConfig, seed: int | None = None):
    self.config = config = check_config(config)
    self.game = make_game(config, config.seed if seed is None else seed)
    self.game.init()
    self.reward = PaperReward(config.new_area_cell)
    self.frame_hwc = np.zeros(FRAME_SHAPE, np.uint8)
    self.automap_hwc = np.zeros(AUTOMAP_SHAPE, np.uint8)

  def reset(self) -> dict[str, np.ndarray]:
    """Starts an episode; returns its first observation {"frame": [240,320,3], "automap": [120,160,3]}."""
    self.game.new_episode()
    self._observe(self.game.get_state())
    self.reward.reset(self.variables())
    return self.observation()

  def observation(self) -> dict[str, np.ndarray]:
    return {"frame": self.frame_hwc.copy(), "automap": self.automap_hwc.copy()}

  def variables(self) -> dict[str, float]:
    """The game variables the reward reads; valid after the episode ended too (get_state() is None then)."""
    return {v: self.game.get_game_variable(getattr(vzd.GameVariable, v)) for v in GAME_VARIABLES}

  def step(self, action: int, frames_out: np.ndarray | None = None) -> tuple[dict, float, bool, dict]:
    """Holds `action` for `tics_per_action` tics. Returns (observation, reward, done, info).

    info: "frames" uint8 [tics_per_action, 240, 320, 3], the frame after each tic (written into
    `frames_out` when given); "num_frames", how many tics rendered a frame before the episode ended (the
    rows past it repeat the last frame); "terms" {term: points}, summing to the reward; "timeout", whether
    the episode ended at the time limit (a truncation, not a terminal state); "kills"; "cells", new-area
    cells visited so far in the episode.
    """
    if not 0 <= action < NUM_ACTIONS:
      raise ValueError(f"action {action} outside [0, {NUM_ACTIONS})")
    tics = self.config.tics_per_action
    frames_thwc = np.empty((tics, *FRAME_SHAPE), np.uint8) if frames_out is None else frames_out
    self.game.set_action(ACTION_BUTTONS[action].tolist())
    num_frames, state = 0, None
    while num_frames < tics:
      self.game.advance_action(1)
      if self.game.is_episode_finished():
        break
      state = self.game.get_state()
      frames_thwc[num_frames] = state.screen_buffer
      num_frames += 1
    if state is not None:
      self._observe(state)
    frames_thwc[num_frames:] = self.frame_hwc  # the episode ended mid-action: repeat its last frame
    variables = self.variables()
    terms = self.reward.step(variables)
    done = self.game.is_episode_finished()
    info = {"frames": frames_thwc, "num_frames": num_frames, "terms": terms,
            "timeout": done and self.game.is_episode_timeout_reached(),
            "kills": variables["KILLCOUNT"], "cells": len(self.reward.grid)}
    return self.observation(), float(sum(terms[t] for t in REWARD_TERMS)), done, info

  def _observe(self, state) -> None:
    self.frame_hwc[...] = state.screen_buffer
    self.automap_hwc[...] = pool_automap(state.automap_buffer)

  def close(self) -> None:
    self.game.close()
