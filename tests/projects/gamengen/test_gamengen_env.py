"""DoomEnv: determinism for a seed, the observation layout, each reward term in real games, config errors."""

import dataclasses

import numpy as np
import pytest

from lwjax.config import ConfigError
from lwjax.projects.gamengen.env import (
  ACTION_NAMES,
  AUTOMAP_SHAPE,
  BASIC,
  FRAME_SHAPE,
  NUM_ACTIONS,
  DoomEnv,
  EnvConfig,
  check_config,
  resolve_wad,
  wad_maps,
)
from lwjax.projects.gamengen.reward import REWARD_TERMS

A = {name: i for i, name in enumerate(ACTION_NAMES)}
DEFEND_THE_CENTER = dataclasses.replace(BASIC, scenario_wad="defend_the_center.wad", skill=3, episode_start_tics=1,
                                        max_episode_tics=2100)


def play(env, actions):
  """Steps through `actions` until done; returns the summed terms, the last info and the steps taken."""
  totals, info, steps = dict.fromkeys(REWARD_TERMS, 0.0), None, 0
  for action in actions:
    _, reward, done, info = env.step(action)
    assert reward == pytest.approx(sum(info["terms"].values()))
    for term, points in info["terms"].items():
      totals[term] += points
    steps += 1
    if done:
      break
  return totals, info, steps


@pytest.fixture(scope="module")
def e1m1():
  env = DoomEnv(check_config(EnvConfig(max_episode_tics=200)))
  yield env
  env.close()


def test_same_seed_same_actions_same_frames():
  config = EnvConfig(seed=7, max_episode_tics=400)
  actions = np.random.default_rng(0).integers(0, NUM_ACTIONS, 40)
  runs = []
  for _ in range(2):
    env = DoomEnv(config)
    first = env.reset()
    steps = [env.step(int(a)) for a in actions]
    env.close()
    runs.append((first["frame"], np.stack([s[3]["frames"] for s in steps]), [s[1] for s in steps]))
  (frame_a, frames_a, rewards_a), (frame_b, frames_b, rewards_b) = runs
  np.testing.assert_array_equal(frame_a, frame_b)
  np.testing.assert_array_equal(frames_a, frames_b)
  assert rewards_a == rewards_b
  assert len({f.tobytes() for f in frames_a.reshape(-1, *FRAME_SHAPE)}) > 20  # the frames did change


def test_observation_layout_and_every_tic_frame(e1m1):
  obs = e1m1.reset()
  assert obs["frame"].shape == FRAME_SHAPE and obs["frame"].dtype == np.uint8
  assert obs["automap"].shape == AUTOMAP_SHAPE and obs["automap"].dtype == np.uint8
  e1m1.step(A["forward"])  # from standing, the first tics barely move the view
  previous = e1m1.step(A["forward"])[0]
  obs, _, done, info = e1m1.step(A["forward_turn_left"])
  assert info["frames"].shape == (4, *FRAME_SHAPE) and info["num_frames"] == 4 and not done
  frames = [previous["frame"], *info["frames"]]
  assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:], strict=False))  # a new frame every tic
  np.testing.assert_array_equal(obs["frame"], info["frames"][-1])


def test_time_limit_ends_episode_as_timeout(e1m1):
  e1m1.reset()
  _, info, steps = play(e1m1, [A["turn_left"]] * 100)
  assert info["timeout"] and steps == 50  # 200 tics / 4; the last tic renders no frame
  assert info["num_frames"] == 3
  np.testing.assert_array_equal(info["frames"][3], info["frames"][2])


def test_turning_in_place_explores_nothing_walking_does(e1m1):
  e1m1.reset()
  totals, info, _ = play(e1m1, [A["turn_left"]] * 20)
  assert totals["new_area"] == 0.0 and info["cells"] == 1
  totals, info, _ = play(e1m1, [A["forward"]] * 10)
  assert totals["new_area"] >= 30.0 * (info["cells"] - 1) > 0.0


def test_pickup_weapon_ammo_and_armor_terms(e1m1):
  e1m1.reset()
  e1m1.game.send_game_command("sv_cheats 1")
  e1m1.game.send_game_command("give shotgun")  # a weapon and its shells, as a pickup would give them
  terms = e1m1.step(A["noop"])[3]["terms"]
  assert terms["pickup"] == 100.0 and terms["ammo"] > 0 and terms["ammo"] % 10 == 0
  e1m1.game.send_game_command("give armor")
  assert e1m1.step(A["noop"])[3]["terms"]["armor"] == 2000.0


def test_attack_aimed_at_the_basic_monster_gives_hit_and_kill_terms():
  env = DoomEnv(check_config(BASIC))
  env.game.close()
  env.game.set_objects_info_enabled(True)  # the script aims with the monster's position
  env.game.init()
  env.reset()
  totals, info, _steps = {}, None, 0
  for _steps in range(1, 75):
    objects = env.game.get_state().objects
    player = next(o for o in objects if o.name == "DoomPlayer")
    monster = next(o for o in objects if o.name == "Cacodemon")
    dy = monster.position_y - player.position_y  # the player faces +x; strafe until in line, then fire
    action = A["attack"] if abs(dy) < 16 else A["strafe_left"] if dy > 0 else A["strafe_right"]
    _, _, done, info = env.step(action)
    for term, points in info["terms"].items():
      totals[term] = totals.get(term, 0.0) + points
    if done:
      break
  env.close()
  assert done and not info["timeout"]  # basic ends when the monster dies
  assert totals["enemy_hit"] >= 300.0 and totals["kill"] == 1000.0 and info["kills"] == 1
  assert totals["ammo"] < 0  # each pistol shot costs 1


def test_standing_in_defend_the_center_gets_hit_and_killed():
  env = DoomEnv(check_config(DEFEND_THE_CENTER))
  env.reset()
  totals, info, _ = play(env, [A["noop"]] * 500)
  env.close()
  assert not info["timeout"]
  assert totals["death"] == -5000.0
  assert totals["player_hit"] <= -100.0 and totals["player_hit"] % 100 == 0
  assert totals["health"] == -1000.0  # 100 health down to 0 (clamped)


def test_unknown_map_or_wad_lists_what_the_wheel_ships():
  with pytest.raises(ConfigError) as error:
    check_config(EnvConfig(map="E9M9"), prefix="env.")
  message = str(error.value)
  assert message.startswith("env.map: no map 'E9M9'")
  assert "E1M1" in message and "freedoom2.wad (MAP01-MAP32)" in message and "basic.wad" in message
  with pytest.raises(ConfigError, match=r"wad: no WAD 'doom2\.wad'.*freedoom1\.wad \(E1M1-E4M9\)"):
    check_config(EnvConfig(wad="doom2.wad"))
  with pytest.raises(ConfigError, match=r"scenario_wad: no WAD 'nope\.wad'.*defend_the_center\.wad"):
    check_config(dataclasses.replace(BASIC, scenario_wad="nope.wad"))
  with pytest.raises(ConfigError, match="skill"):
    check_config(EnvConfig(skill=9))


def test_wad_maps():
  maps = wad_maps(resolve_wad("freedoom1.wad", scenario=False))
  assert maps[0] == "E1M1" and len(maps) == 36
  assert wad_maps(resolve_wad("basic.wad", scenario=True)) == ["MAP01"]
