"""The GameNGen agent's reward (arXiv 2408.14837, appendix A.5), computed from ViZDoom game variables.

The paper's reward is a sum of ten terms; each is computed here from the change of game variables over one
agent step (the `tics_per_action` tics an action is held):

| term       | points                          | from                                                      |
|------------|---------------------------------|-----------------------------------------------------------|
| player_hit | -100 per hit taken              | HITS_TAKEN increase                                       |
| death      | -5000                           | DEAD going 0 -> 1                                         |
| enemy_hit  | +300 per hit                    | HITCOUNT increase                                         |
| kill       | +1000 per kill                  | KILLCOUNT increase                                        |
| pickup     | +100 per item or weapon         | ITEMCOUNT increase + weapon slots WEAPON1..7 going 0 -> 1 |
| secret     | +500 per secret                 | SECRETCOUNT increase                                      |
| new_area   | 20 * (1 + 0.5 * d) per new cell | POSITION_X/Y on the new-area grid (below)                 |
| health     | 10 * delta                      | HEALTH, clamped at 0                                      |
| armor      | 10 * delta                      | ARMOR                                                     |
| ammo       | 10 * max(0, d) + min(0, d)      | per ammo type: AMMO2, AMMO3, AMMO5, AMMO6 (below)         |

Choices where the paper is silent:
- New area: the map is cut into square cells of `cell_size` map units (64 by default: twice a player's
  width, about two agent steps of walking). At the end of each agent step the player's cell is looked up;
  a cell not visited before in the episode earns 20 * (1 + 0.5 * d), d = the L1 distance in cells to the
  nearest cell visited earlier (so d >= 1: 30 points for stepping into a neighbouring cell, more for
  reaching unexplored ground far from anything seen, e.g. through a fast move or a teleporter). The start
  cell counts as visited, so turning or standing in place never earns it.
- Pickups: ITEMCOUNT counts only the "items" of the level statistics (bonuses, power-ups); weapons are not
  in it, so a weapon slot becoming owned counts as a pickup too. Health, armour and ammunition picked up
  are rewarded by their delta terms.
- Health is clamped at 0 before the delta: a killed player's HEALTH can read far below 0 (overkill, or
  -999900 for the `kill` console command), which would otherwise dwarf the fixed death penalty.
- Ammo: the delta rule is applied per ammo type and summed: bullets (AMMO2), shells (AMMO3), rockets
  (AMMO5), cells (AMMO6). AMMOn is the ammo of weapon slot n, and slots 4 and 7 repeat bullets and cells.
  Per type, a pickup of one type is not cancelled by shots of another.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

REWARD_TERMS = ("player_hit", "death", "enemy_hit", "kill", "pickup", "secret", "new_area", "health", "armor",
                "ammo")
AMMO_VARIABLES = ("AMMO2", "AMMO3", "AMMO5", "AMMO6")
WEAPON_VARIABLES = tuple(f"WEAPON{slot}" for slot in range(1, 8))
# The ViZDoom game variables the reward reads, by GameVariable name.
GAME_VARIABLES = ("HITS_TAKEN", "DEAD", "HITCOUNT", "KILLCOUNT", "ITEMCOUNT", "SECRETCOUNT", "HEALTH", "ARMOR",
                  "POSITION_X", "POSITION_Y", *AMMO_VARIABLES, *WEAPON_VARIABLES)


def step_terms(prev: Mapping[str, float], curr: Mapping[str, float], new_area_distance: float | None) -> dict:
  """The reward terms of one agent step, from the game variables before and after it.

  `new_area_distance` is d of the new-area rule when the step ended in a cell not visited before, else
  None. Returns {term: points} with every name of REWARD_TERMS.
  """
  def delta(name: str) -> float:
    return float(curr[name]) - float(prev[name])

  weapons_gained = sum(float(curr[w]) > 0 and float(prev[w]) <= 0 for w in WEAPON_VARIABLES)
  ammo_deltas = [delta(a) for a in AMMO_VARIABLES]
  return {
      "player_hit": 0.0 - 100.0 * max(0.0, delta("HITS_TAKEN")),  # 0.0 - x: no -0.0 in the logs
      "death": 0.0 - 5000.0 * float(float(curr["DEAD"]) > 0 and float(prev["DEAD"]) <= 0),
      "enemy_hit": 300.0 * max(0.0, delta("HITCOUNT")),
      "kill": 1000.0 * max(0.0, delta("KILLCOUNT")),
      "pickup": 100.0 * (max(0.0, delta("ITEMCOUNT")) + weapons_gained),
      "secret": 500.0 * max(0.0, delta("SECRETCOUNT")),
      "new_area": 0.0 if new_area_distance is None else 20.0 * (1.0 + 0.5 * new_area_distance),
      "health": 10.0 * (max(0.0, float(curr["HEALTH"])) - max(0.0, float(prev["HEALTH"]))),
      "armor": 10.0 * delta("ARMOR"),
      "ammo": sum(10.0 * max(0.0, d) + min(0.0, d) for d in ammo_deltas),
  }


class NewAreaGrid:
  """The cells of side `cell_size` map units visited in one episode (`reset` with the start position first);
  `visit` applies the new-area rule."""

  def __init__(self, cell_size: float):
    self.cell_size = cell_size
    self.cells_k2 = np.zeros((0, 2), np.int64)  # visited cells, in visiting order

  def reset(self, x: float, y: float) -> None:
    self.cells_k2 = np.asarray([self.cell(x, y)], np.int64)

  def cell(self, x: float, y: float) -> tuple[int, int]:
    return int(np.floor(x / self.cell_size)), int(np.floor(y / self.cell_size))

  def visit(self, x: float, y: float) -> float | None:
    """Marks the cell at (x, y) visited; returns the L1 cell distance to the nearest earlier one if new."""
    cell = np.asarray(self.cell(x, y), np.int64)
    nearest = int(np.abs(self.cells_k2 - cell).sum(axis=1).min())
    if nearest == 0:
      return None
    self.cells_k2 = np.concatenate([self.cells_k2, cell[None]])
    return float(nearest)

  def __len__(self) -> int:
    return len(self.cells_k2)


class PaperReward:
  """Per-episode reward state: the last game variables and the new-area grid."""

  def __init__(self, cell_size: float):
    self.grid = NewAreaGrid(cell_size)
    self.prev: dict[str, float] = {}

  def reset(self, variables: Mapping[str, float]) -> None:
    self.prev = dict(variables)
    self.grid.reset(variables["POSITION_X"], variables["POSITION_Y"])

  def step(self, variables: Mapping[str, float]) -> dict:
    """The terms of the step that ended with `variables` ({term: points}, see `step_terms`)."""
    # A dead player's body can still slide; the death step itself earns no exploration.
    alive = float(variables["DEAD"]) <= 0
    distance = self.grid.visit(variables["POSITION_X"], variables["POSITION_Y"]) if alive else None
    terms = step_terms(self.prev, variables, distance)
    self.prev = dict(variables)
    return terms
