"""The paper's reward terms on synthetic game-variable sequences (those hard to trigger in a real game too)."""

import pytest

from lwjax.projects.gamengen.reward import GAME_VARIABLES, REWARD_TERMS, NewAreaGrid, PaperReward, step_terms

START = {v: 0.0 for v in GAME_VARIABLES} | {"HEALTH": 100.0, "AMMO2": 50.0, "WEAPON1": 1.0, "WEAPON2": 1.0}


def terms_after(**changes):
  return step_terms(START, START | changes, None)


def nonzero(terms):
  return {k: v for k, v in terms.items() if v}


@pytest.mark.parametrize("changes, expected", [
    (dict(HITS_TAKEN=2.0), {"player_hit": -200.0}),
    (dict(DEAD=1.0), {"death": -5000.0}),
    (dict(HITCOUNT=3.0), {"enemy_hit": 900.0}),
    (dict(KILLCOUNT=1.0), {"kill": 1000.0}),
    (dict(ITEMCOUNT=2.0), {"pickup": 200.0}),
    (dict(WEAPON3=1.0), {"pickup": 100.0}),
    (dict(SECRETCOUNT=1.0), {"secret": 500.0}),
    (dict(HEALTH=125.0), {"health": 250.0}),
    (dict(HEALTH=90.0), {"health": -100.0}),
    (dict(ARMOR=100.0), {"armor": 1000.0}),
    (dict(AMMO2=47.0), {"ammo": -3.0}),  # three pistol shots: min(0, d)
    (dict(AMMO2=60.0), {"ammo": 100.0}),  # a clip picked up: 10 * max(0, d)
    (dict(AMMO2=49.0, AMMO3=58.0), {"ammo": 10 * 58.0 - 1.0}),  # per ammo type: a pickup is not netted out
])
def test_each_term(changes, expected):
  terms = terms_after(**changes)
  assert set(terms) == set(REWARD_TERMS)
  assert nonzero(terms) == expected


def test_no_change_no_reward_and_no_negative_zero():
  terms = terms_after()
  assert all(v == 0.0 and str(v) == "0.0" for v in terms.values())


def test_death_counts_once_and_overkill_health_is_clamped():
  dead = START | {"DEAD": 1.0, "HEALTH": -999900.0, "HITS_TAKEN": 1.0}
  assert nonzero(step_terms(START, dead, None)) == {"death": -5000.0, "health": -1000.0, "player_hit": -100.0}
  assert nonzero(step_terms(dead, dead, None)) == {}


def test_new_area_rule():
  grid = NewAreaGrid(cell_size=64.0)
  grid.reset(10.0, 10.0)  # start cell (0, 0) is visited
  assert grid.visit(60.0, 5.0) is None  # same cell
  assert grid.visit(70.0, 5.0) == 1.0  # neighbour (1, 0)
  assert grid.visit(70.0, 5.0) is None  # now visited
  assert grid.visit(-1.0, 5.0) == 1.0  # (-1, 0): floor, not truncation
  assert grid.visit(64.0 * 4 + 1, 64.0 * 3 + 1) == 6.0  # (4, 3): nearest visited is (1, 0), 3 + 3 cells away
  assert len(grid) == 4
  assert 20.0 * (1 + 0.5 * 5.0) == step_terms(START, START, 5.0)["new_area"] == 70.0


def test_paper_reward_episode():
  reward = PaperReward(cell_size=64.0)
  reward.reset(START)
  turning = [reward.step(START) for _ in range(5)]
  assert all(t["new_area"] == 0.0 for t in turning)
  moved = reward.step(START | {"POSITION_X": 100.0})
  assert moved["new_area"] == 30.0
  dead_and_pushed = reward.step(START | {"POSITION_X": 300.0, "DEAD": 1.0})
  assert dead_and_pushed["new_area"] == 0.0 and dead_and_pushed["death"] == -5000.0
  reward.reset(START)  # a new episode forgets the grid
  assert reward.step(START | {"POSITION_X": 100.0})["new_area"] == 30.0
