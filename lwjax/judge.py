"""An LLM judge of step correctness over any OpenAI-compatible chat endpoint: is every step of a candidate
solution right, given the problem and its reference solution?

What Smaller, Weaker, Yet Better (arXiv 2408.16737, §3.1) measures with a strong model (and humans) on 50
solutions to estimate the false-positive rate of answer-filtered data where no step checker exists; GenRM
(arXiv 2408.15240, §4) likewise grades candidates against the reference with an LLM. Any endpoint that speaks
`POST <base_url>/chat/completions` serves: a hosted API, vLLM, or lwjax's own server (`lwjax.serving.server`).

- The prompt is a template with `{question}`, `{reference}` and `{candidate}` (filled by plain replacement, so
  LaTeX braces elsewhere are safe); `DEFAULT_PROMPT` asks for Yes or No, the reference given for guidance.
- Requests go at temperature 0 with `max_tokens`, `workers` at a time; connection errors, timeouts, 429 and 5xx
  are retried with exponential backoff; other HTTP errors (a wrong model name, a missing key) raise at once.
- Every answer is appended to a jsonl cache keyed by a hash of (prompt, model), written as it arrives, so a run
  stopped half way asks only what it has not asked yet. `ask(..., samples=k, temperature=t)` draws k answers
  per prompt (GenRM's rationales), each cached under (prompt, model, t, its index) and sent with `seed` = its index
  for the endpoints that honour one. The raw answer is cached and parsed on reading, so a
  better parser needs no new requests.
- `parse_verdict` reads Yes/No robustly (case, punctuation, markdown, a reasoning that ends in "Answer: No");
  an answer it cannot read is None, counted by `summary` and never guessed.

Library code talks HTTP with the standard library (`urllib`): the `openai` SDK is a test dependency only.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import NamedTuple

from lwjax.config import ConfigError

DEFAULT_PROMPT = (
    "You are checking a student's solution to a math problem.\n\n"
    "Problem:\n{question}\n\n"
    "Reference solution (correct; use it for guidance, the student may reason differently):\n{reference}\n\n"
    "Student's solution:\n{candidate}\n\n"
    "Is every step of the student's solution correct, not only its final answer? Answer Yes or No.")
PLACEHOLDERS = ("{question}", "{reference}", "{candidate}")
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
  """The endpoint refused a request (not retried) or stayed unreachable after every retry."""


class Judgement(NamedTuple):
  verdict: bool | None  # True: every step right; None: the answer could not be read
  text: str  # the judge's raw answer


def fill(template: str, question: str, reference: str, candidate: str) -> str:
  """The prompt: `template` with its placeholders replaced (no str.format: the texts and template may hold
  LaTeX braces)."""
  return (template.replace("{question}", question).replace("{reference}", reference)
          .replace("{candidate}", candidate))


def parse_verdict(text: str) -> bool | None:
  """Yes -> True, No -> False, else None. The first word decides when it is yes or no ("**Yes.**", "no,
  because ..."); otherwise the last yes/no after the last "answer" or "verdict" ("... Final answer: No"); otherwise
  the one kind of yes/no the text holds; both kinds without such a marker, or neither, is None."""
  words = re.findall(r"[a-z]+", text.lower())
  if not words:
    return None
  if words[0] in ("yes", "no"):
    return words[0] == "yes"
  marker = max((i for i, w in enumerate(words) if w in ("answer", "verdict")), default=-1)
  after = [w for w in words[marker + 1:] if w in ("yes", "no")] if marker >= 0 else []
  if after:
    return after[0] == "yes"
  kinds = {w for w in words if w in ("yes", "no")}
  return (kinds.pop() == "yes") if len(kinds) == 1 else None


def cache_key(prompt: str, model: str, *drawn) -> str:
  """The cache's key of an answer: (prompt, model), and (temperature, sample index) for a drawn one."""
  return hashlib.sha256(json.dumps([prompt, model, *drawn]).encode("utf-8")).hexdigest()


class Judge:
  """Asks `model` at `base_url` (e.g. http://localhost:8000/v1) whether candidate solutions are right step by
  step; answers cached in `cache_path` (a jsonl file; '' for none)."""

  def __init__(self, base_url: str, model: str, *, prompt: str = DEFAULT_PROMPT, max_tokens: int = 256,
               api_key: str | None = None, workers: int = 4, retries: int = 4, backoff_s: float = 1.0,
               timeout_s: float = 120.0, cache_path: str = "", group: str = "judge"):
    missing = [p for p in PLACEHOLDERS if p not in prompt]
    if "{candidate}" in missing:
      raise ConfigError(f"{group}.prompt", "has no {candidate}: the judge would not see the solution",
                        "a template with {question}, {reference} and {candidate}")
    if missing:
      logging.warning("judge prompt without %s: the judge will not see it", ", ".join(missing))
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model, self.prompt, self.max_tokens, self.api_key = model, prompt, max_tokens, api_key
    self.workers, self.retries, self.backoff_s, self.timeout_s = workers, retries, backoff_s, timeout_s
    self.cache_path, self._lock, self.requests = cache_path, threading.Lock(), 0
    self._cache: dict[str, str] = {}
    if cache_path and os.path.isfile(cache_path):
      with open(cache_path) as f:
        for line in f:
          try:
            entry = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a stopped run: asked again
            continue
          self._cache[entry["key"]] = entry["text"]

  @classmethod
  def from_config(cls, section, *, cache_path: str = "", group: str = "judge") -> Judge:
    """The judge of a config group (base_url, model, prompt, max_tokens, api_key_env, workers); errors name
    `group` (e.g. `judge.api_key_env`)."""
    api_key = None
    if section.api_key_env:
      api_key = os.environ.get(section.api_key_env)
      if not api_key:
        raise ConfigError(f"{group}.api_key_env", f"the environment variable {section.api_key_env} is not set",
                          "the name of a set variable holding the key, or '' for an endpoint without one")
    return cls(section.base_url, section.model, prompt=section.prompt, max_tokens=section.max_tokens,
               api_key=api_key, workers=section.workers, cache_path=cache_path, group=group)

  def _post(self, prompt: str, temperature: float = 0.0, seed: int | None = None) -> str:
    request = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
               "max_tokens": self.max_tokens, **({"seed": seed} if seed is not None else {})}
    body = json.dumps(request).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    for attempt in range(self.retries + 1):
      try:
        with urllib.request.urlopen(urllib.request.Request(self.url, body, headers),
                                    timeout=self.timeout_s) as response:
          raw = response.read()
        with self._lock:
          self.requests += 1
        try:
          return json.loads(raw)["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
          raise JudgeError(f"{self.url} answered what is not a chat completion: {raw[:300]!r}") from e
      except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:500]
        if e.code not in RETRIED_STATUS:
          raise JudgeError(f"{self.url} answered {e.code}: {detail}") from e
        error = f"{e.code}: {detail}"
      except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
        error = str(e)
      if attempt < self.retries:
        logging.warning("judge request failed (%s); retry %d of %d", error, attempt + 1, self.retries)
        time.sleep(self.backoff_s * 2 ** attempt)
    raise JudgeError(f"{self.url}: no answer after {self.retries + 1} tries (last: {error})")

  def _answer(self, prompt: str, temperature: float = 0.0, sample: int = 0) -> str:
    drawn = temperature > 0 or sample > 0
    key = cache_key(prompt, self.model, temperature, sample) if drawn else cache_key(prompt, self.model)
    with self._lock:
      if key in self._cache:
        return self._cache[key]
    text = self._post(prompt, temperature, sample if drawn else None)
    with self._lock:
      self._cache[key] = text
      if self.cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
        with open(self.cache_path, "a") as f:
          f.write(json.dumps({"key": key, "model": self.model, "text": text}) + "\n")
    return text

  def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
    """The judgement of every (question, reference, candidate), in order; identical prompts asked once."""
    answers = self.ask([fill(self.prompt, *item) for item in items])
    return [Judgement(parse_verdict(text), text) for (text,) in answers]

  def ask(self, prompts: Sequence[str], *, samples: int = 1, temperature: float = 0.0) -> list[list[str]]:
    """`samples` raw answers to each prompt (already filled), in order; at temperature 0 a second sample would
    repeat the first, so samples > 1 needs temperature > 0."""
    if samples > 1 and temperature <= 0:
      raise ValueError(f"{samples} samples per prompt at temperature {temperature}: they would all be the same")
    jobs = [(p, i) for p in dict.fromkeys(prompts) for i in range(samples)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
      answers = dict(zip(jobs, pool.map(lambda job: self._answer(job[0], temperature, job[1]), jobs), strict=True))
    return [[answers[(p, i)] for i in range(samples)] for p in prompts]


def summary(judgements: Sequence[Judgement], exact: Sequence[bool] | None = None) -> dict:
  """The judged false-positive rate of right-answer candidates: the share judged wrong (No) among those whose
  verdict was read, with its binomial standard error and n, and the unread count. With `exact` (the step
  checker's verdicts on the same candidates) the agreement: the share whose verdict equals the checker's, an
  unread verdict counted as a disagreement."""
  read = [j.verdict for j in judgements if j.verdict is not None]
  n = len(read)
  rate = sum(not v for v in read) / n if n else float("nan")
  out = {"false_positive_rate": rate, "false_positive_rate_se": math.sqrt(rate * (1 - rate) / n) if n else
         float("nan"), "n": n, "unparsed": len(judgements) - n, "judged": len(judgements)}
  if exact is not None:
    if len(exact) != len(judgements):
      raise ValueError(f"{len(exact)} exact verdicts for {len(judgements)} judgements")
    out["exact_false_positive_rate"] = sum(not e for e in exact) / len(exact) if exact else float("nan")
    out["agreement"] = (sum(j.verdict == e for j, e in zip(judgements, exact, strict=True)) / len(exact)
                        if exact else float("nan"))
  return out
