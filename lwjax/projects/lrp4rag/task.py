"""A synthetic RAG task with exact hallucination labels: LRP4RAG's setting (arXiv 2408.15533, Sec. 4: RAGTruth QA,
a generator answering from retrieved passages) rebuilt so that whether an answer is grounded is known exactly.

World. `entities` entities e0, e1, ... each hold one value per attribute (city, job, color, ...; `values`
values per attribute, written `city0`, `city7`, ...), drawn once from `world_seed`. A `1 - unknown_fraction`
share of the entities is *known*: training asks about their facts with no passage stating them, so the model
stores them (its parametric knowledge). *Unknown* entities only ever occur in passages, with values drawn
afresh for each prompt. A `popular_fraction` share of the known entities is *popular*.

Prompt: K retrieved passages (one fact each, K in [min_passages, max_passages]) and a question, e.g.

  doc e3 job job4 doc e12 city city7 doc e12 color color1 q e12 city ?     ->  city7

Kinds of prompt, by what the passages say about the asked (entity, attribute):
  supported  a known entity; one passage states its true value
  fresh      an unknown entity; one passage states a value drawn for this prompt
  conflict   a known entity; one passage states a value other than the model's parametric knowledge
  absent     a known entity; no passage states the fact (distractors only): the model can only recall
  unknown    an unknown entity; no passage states the fact: the model can only invent
Distractors are other facts, a third about the asked entity, a third about the asked attribute, a third
random; for known entities they state the true values.

Training targets: supported and fresh -> the passage's value; absent -> the memory; conflict -> the passage's
value, except for popular entities, whose memory wins (as LLMs keep their prior for popular entities against a
conflicting context, Mallen et al. 2023). Unknown prompts have no answer to train on (their share of the
training mix must be 0).

Label of an answer (what LRP4RAG detects): *faithful* iff it equals the value a passage states; otherwise
*hallucinated*: a conflicting memory, an invented value, or any answer when no passage states the fact.

The mix and why (defaults of `TaskConfig`). Train: supported 0.3, fresh 0.3, conflict 0.2, absent 0.2. Copying
needs the fresh prompts (their values cannot be memorised), the memory needs the absent ones (every known fact
recurs there), and the conflict prompts teach the per-entity choice between the two. Held out: supported 0.25,
fresh 0.25, conflict 0.3, absent 0.15, unknown 0.05. A model that learned the task hallucinates on every absent
and unknown prompt (20%) and on the conflicts of popular entities (half the conflicts, 15%), so about 35% of its
greedy answers, plus its mistakes; a model that mostly follows the passages is near 20%, one that mostly follows
its memory near 50%: both classes occur whichever way the model leans, and the conflict prompts hold both
classes on the same surface form, where only the model's behaviour tells them apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lwjax.config import option, schema_of
from lwjax.data import rows as rows_lib
from lwjax.data.tokenizer import WordListTokenizer, bos_prefix

KINDS = ("supported", "fresh", "conflict", "absent", "unknown")
ATTRIBUTE_NAMES = ("city", "job", "color", "pet", "sport", "food", "team", "drink")
TEMPLATES = ("symbolic", "text")
PASSAGE, QUESTION, QUESTION_END = "doc", "q", "?"


@dataclasses.dataclass(frozen=True)
class Mix:
  """Shares of the prompt kinds (normalised to sum to 1)."""
  supported: float = option(0.0, min=0.0)
  fresh: float = option(0.0, min=0.0)
  conflict: float = option(0.0, min=0.0)
  absent: float = option(0.0, min=0.0)
  unknown: float = option(0.0, min=0.0)

  def probabilities(self) -> np.ndarray:
    shares = np.array([getattr(self, k) for k in KINDS], np.float64)
    if shares.sum() <= 0:
      raise ValueError("the shares of a mix must not all be 0")
    return shares / shares.sum()


TRAIN_MIX = Mix(supported=0.3, fresh=0.3, conflict=0.2, absent=0.2)
EVAL_MIX = Mix(supported=0.25, fresh=0.25, conflict=0.3, absent=0.15, unknown=0.05)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The world and the prompts of the task."""
  entities: int = option(64, min=2)
  attributes: int = option(4, min=1, max=len(ATTRIBUTE_NAMES))
  values: int = option(16, min=2, doc="values per attribute")
  unknown_fraction: float = option(0.25, min=0.0, max=1.0, doc="entities outside the parametric knowledge")
  popular_fraction: float = option(0.5, min=0.0, max=1.0, doc="known entities whose memory beats a conflict")
  min_passages: int = option(3, min=1)
  max_passages: int = option(6, min=1)
  world_seed: int = 0
  template: str = option("symbolic", choices=TEMPLATES, doc="text: natural-language prompts for a HF tokenizer")
  train_mix: Mix = TRAIN_MIX
  eval_mix: Mix = EVAL_MIX

  @classmethod
  def from_dict(cls, d) -> TaskConfig:
    d = dict(d)
    return cls(**{**d, "train_mix": Mix(**dict(d["train_mix"])), "eval_mix": Mix(**dict(d["eval_mix"]))})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


SCHEMA = schema_of(TaskConfig)


def check(cfg: TaskConfig) -> tuple[str, str, str] | None:
  """(key, why, valid) of the first inconsistency between fields, or None."""
  num_unknown = int(round(cfg.unknown_fraction * cfg.entities))
  if num_unknown >= cfg.entities:
    return "task.unknown_fraction", "leaves no known entity", "< 1 - 1 / entities"
  if cfg.max_passages < cfg.min_passages:
    return "task.max_passages", f"below min_passages ({cfg.min_passages})", f">= {cfg.min_passages}"
  if cfg.entities * cfg.attributes <= cfg.max_passages:
    return "task.max_passages", "more passages than distinct facts to fill them", f"< {cfg.entities * cfg.attributes}"
  for name in ("train_mix", "eval_mix"):
    if sum(dataclasses.asdict(getattr(cfg, name)).values()) <= 0:
      return f"task.{name}", "all shares are 0", "at least one positive share"
  if cfg.train_mix.unknown > 0:
    return "task.train_mix.unknown", "unknown prompts have no answer to train on", "0"
  if num_unknown == 0 and (cfg.train_mix.fresh > 0 or cfg.eval_mix.fresh > 0 or cfg.eval_mix.unknown > 0):
    return "task.unknown_fraction", "fresh and unknown prompts need unknown entities", "> 0, or those shares 0"
  return None


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One question with its passages (facts as (entity, attribute, value) ids) and what is known about it."""
  kind: str
  passages: tuple[tuple[int, int, int], ...]
  entity: int
  attribute: int
  stated: int | None  # the value a passage states for the asked fact (None: absent / unknown)
  memory: int | None  # the model's parametric knowledge of it (None: unknown entity)
  target: int | None  # the training answer (None: nothing to train on)


class RagTask:
  """The world of `cfg` and its prompts, tokenizer, training rows and labels. The tokenizer is the task's own
  exact word list unless one is given (a HF model's, for the text template)."""

  def __init__(self, cfg: TaskConfig, tokenizer=None):
    self.cfg = cfg
    rng = np.random.default_rng(cfg.world_seed)
    self.world = rng.integers(0, cfg.values, size=(cfg.entities, cfg.attributes))  # [entity, attribute]
    order = rng.permutation(cfg.entities)
    num_unknown = int(round(cfg.unknown_fraction * cfg.entities))
    self.known = np.ones(cfg.entities, bool)
    self.known[order[:num_unknown]] = False
    known_ids = order[num_unknown:]
    self.popular = np.zeros(cfg.entities, bool)
    self.popular[known_ids[:int(round(cfg.popular_fraction * len(known_ids)))]] = True
    self.tokenizer = tokenizer or WordListTokenizer(self.words(), name="lrp4rag vocabulary")

  def words(self) -> list[str]:
    return ([PASSAGE, QUESTION, QUESTION_END] + [f"e{i}" for i in range(self.cfg.entities)]
            + list(ATTRIBUTE_NAMES[:self.cfg.attributes])
            + [self.value_word(a, v) for a in range(self.cfg.attributes) for v in range(self.cfg.values)])

  def value_word(self, attribute: int, value: int) -> str:
    return f"{ATTRIBUTE_NAMES[attribute]}{value}"

  # ---- prompts ----

  def prompts(self, num: int, *, mix: Mix, seed: int) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=num, p=mix.probabilities())
    return [self._prompt(KINDS[k], rng) for k in kinds]

  def _entity(self, rng, known: bool) -> int:
    return int(rng.choice(np.flatnonzero(self.known == known)))

  def _value(self, rng, entity: int, attribute: int) -> int:
    """A known entity's true value; a value drawn now for an unknown one."""
    return int(self.world[entity, attribute]) if self.known[entity] else int(rng.integers(self.cfg.values))

  def _prompt(self, kind: str, rng) -> Prompt:
    cfg = self.cfg
    entity = self._entity(rng, known=kind in ("supported", "conflict", "absent"))
    attribute = int(rng.integers(cfg.attributes))
    memory = int(self.world[entity, attribute]) if self.known[entity] else None
    if kind == "supported":
      stated = memory
    elif kind == "fresh":
      stated = int(rng.integers(cfg.values))
    elif kind == "conflict":
      stated = int((memory + rng.integers(1, cfg.values)) % cfg.values)
    else:
      stated = None
    num = int(rng.integers(cfg.min_passages, cfg.max_passages + 1))
    facts = self._distractors(rng, entity, attribute, num - (stated is not None))
    if stated is not None:
      facts.insert(int(rng.integers(len(facts) + 1)), (entity, attribute, stated))
    memory_wins = stated is None or (kind == "conflict" and self.popular[entity])
    target = memory if memory_wins else stated
    return Prompt(kind, tuple(facts), entity, attribute, stated, memory, target)

  def _distractors(self, rng, entity: int, attribute: int, num: int) -> list[tuple[int, int, int]]:
    """`num` facts about other (entity, attribute) pairs, each pair once: same entity, same attribute or any."""
    cfg, used, facts = self.cfg, {(entity, attribute)}, []
    while len(facts) < num:
      how = rng.integers(3)
      e = entity if how == 0 and cfg.attributes > 1 else int(rng.integers(cfg.entities))
      a = attribute if how == 1 else int(rng.integers(cfg.attributes))
      if (e, a) not in used:
        used.add((e, a))
        facts.append((e, a, self._value(rng, e, a)))
    return facts

  # ---- text ----

  def prompt_text(self, p: Prompt) -> str:
    names = ATTRIBUTE_NAMES
    if self.cfg.template == "text":
      lines = [f"Passage {i + 1}: the {names[a]} of e{e} is {self.value_word(a, v)}."
               for i, (e, a, v) in enumerate(p.passages)]
      return ("Answer the question with one word, using the passages.\n" + "\n".join(lines)
              + f"\nQuestion: what is the {names[p.attribute]} of e{p.entity}?\nAnswer:")
    facts = " ".join(f"{PASSAGE} e{e} {names[a]} {self.value_word(a, v)}" for e, a, v in p.passages)
    return f"{facts} {QUESTION} e{p.entity} {names[p.attribute]} {QUESTION_END}"

  def target_text(self, p: Prompt) -> str | None:
    return None if p.target is None else self.value_word(p.attribute, p.target)

  def answer_word(self, text: str) -> str:
    """The answer an output states: all of it (symbolic), or its first word without punctuation (text)."""
    if self.cfg.template == "symbolic":
      return text.strip()
    words = text.split()
    return words[0].strip(".,;:!?\"'()") if words else ""

  # ---- labels ----

  def is_faithful(self, p: Prompt, answer: str) -> bool:
    """Faithful iff the answer is the value a passage states; False whenever no passage states one."""
    return p.stated is not None and self.answer_word(answer) == self.value_word(p.attribute, p.stated)

  def source(self, p: Prompt, answer: str) -> str:
    """Where the answer's value is found: "passage" (first, when both agree), "memory", or "other"."""
    word = self.answer_word(answer)
    if p.stated is not None and word == self.value_word(p.attribute, p.stated):
      return "passage"
    if p.memory is not None and word == self.value_word(p.attribute, p.memory):
      return "memory"
    return "other"

  # ---- training ----

  def training_row(self, p: Prompt, seq_len: int) -> dict | None:
    """The LM row (fields of `lwjax.training.losses.lm_loss`) of prompt -> target + eos, loss on the answer;
    None when there is no target or the row exceeds seq_len."""
    target = self.target_text(p)
    if target is None:
      return None
    tok = self.tokenizer
    prompt = bos_prefix(tok) + tok.encode(self.prompt_text(p))
    return rows_lib.lm_row(prompt, tok.encode(target) + [tok.eos_id], seq_len)

  def max_prompt_tokens(self) -> int:
    """Tokens of the longest symbolic prompt, bos included."""
    return 1 + 4 * self.cfg.max_passages + 4
