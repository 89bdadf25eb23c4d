"""Writing in the Margins' tables (arXiv 2408.14906) from the WiM job's `metrics.json` (WiM, full-context and
retrieval-only scores per task and document length) and its log lines, and the lookup probe's logs."""

from __future__ import annotations

import json
import os
import re

from lwjax.results.markdown import bold, read_json

TASKS = {"retrieval": "retrieval", "multihop": "multi-hop", "aggregation": "aggregation (F1)"}
METHODS = ("wim", "full", "retrieval")
# job.py's line per task and length, for reads that crashed before writing metrics.json.
_LOG_LINE = re.compile(r"\] (\w+), (\d+) segments: WiM ([\d.]+), full context ([\d.]+), retrieval-only ([\d.]+) "
                       r"\(margins exact ([\d.]+), relevance ([\d.]+); prefill tokens (\d+) / (\d+) / (\d+)\)")


def _results(paths) -> dict[str, dict[str, dict]]:
  """{task: {segments: {method: scores}}} merged over `metrics.json` files and job logs (a later file wins)."""
  merged: dict[str, dict[str, dict]] = {}
  for path in paths:
    if str(path).endswith(".json"):
      for task, by_length in read_json(path)["results"].items():
        merged.setdefault(task, {}).update(by_length)
      continue
    with open(path) as f:
      for match in _LOG_LINE.finditer(f.read()):
        task, length, wim, full, ret, exact, relevance, *prefill = match.groups()
        scores = [float(wim), float(full), float(ret)]
        merged.setdefault(task, {})[length] = {
            method: {"score": score, "prefill_tokens": float(tokens)}
            for method, score, tokens in zip(METHODS, scores, prefill, strict=True)}
        merged[task][length]["wim"].update(margin_exact=float(exact), relevance_accuracy=float(relevance))
  return {task: dict(sorted(merged[task].items(), key=lambda kv: int(kv[0]))) for task in TASKS if task in merged}


def _best(scores: list[float]) -> int | None:
  """Index of the unique best score at the digits shown, else None."""
  shown = [round(s, 2) for s in scores]
  top = max(shown)
  return shown.index(top) if shown.count(top) == 1 else None


def by_length(paths, trained_up_to: int, margins_at: int | None = None) -> str:
  """A row per task, a column per length: WiM / full context / retrieval-only. Bold: lengths past the
  reader's training documents, and there the unique best method."""
  results = _results(paths)
  lengths = list(next(iter(results.values())))
  head = [bold(n, int(n) > trained_up_to) for n in lengths]
  head += [f"margins exact at {margins_at}"] if margins_at else []
  lines = ["| task: WiM / full / retrieval-only | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
  for task, by_len in results.items():
    cells = []
    for n, r in by_len.items():
      scores = [r[method]["score"] for method in METHODS]
      best = _best(scores) if int(n) > trained_up_to else None
      cells.append(" / ".join(bold(f"{s:.2f}", i == best) for i, s in enumerate(scores)))
    if margins_at:
      cells.append(f"{by_len[str(margins_at)]['wim']['margin_exact']:.2f}")
    lines.append(f"| {TASKS[task]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _score(r: dict) -> str:
  se = r.get("se", 0.0)
  return f"{r['score']:.2f} ± {se:.2f}" if se else f"{r['score']:.2f}"


def by_task(paths, trained_up_to: int, lengths: tuple[int, ...] | None = None) -> str:
  """A row per task and length: each method's score (± the standard error over documents, where recorded),
  WiM's margins exact and relevance right, prefill tokens per document; the first task's rows give the length in
  words too (a segment is a `section` marker and `segment_words` words). Bold as in `by_length`."""
  segment_words = next(read_json(p)["segment_words"] for p in paths if str(p).endswith(".json"))
  lines = ["| task | segments (words) | WiM | full context | retrieval-only | margins exact | relevance "
           "| prefill tokens (WiM / full / retrieval) |", "|---|---|---|---|---|---|---|---|"]
  for t, (task, by_len) in enumerate(_results(paths).items()):
    for n, r in by_len.items():
      if lengths and int(n) not in lengths:
        continue
      past = int(n) > trained_up_to
      best = _best([r[method]["score"] for method in METHODS]) if past else None
      scores = [bold(_score(r[method]), i == best) for i, method in enumerate(METHODS)]
      prefill = " / ".join(f"{r[method]['prefill_tokens']:.0f}" for method in METHODS)
      words = f" ({int(n) * (segment_words + 1)})" if t == 0 else ""
      lines.append(f"| {TASKS[task]} | {bold(n, past)}{words} | " + " | ".join(scores)
                   + f" | {r['wim']['margin_exact']:.2f} | {r['wim']['relevance_accuracy']:.2f} | {prefill} |")
  return "\n".join(lines)


def _probe_log(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def probe_curves(first_column: str, labels: dict[str, str], floor: bool = False):
  """The lookup probe's held-out accuracy at each evaluation, a row per log (`labels`: {log file name: row
  label}), a column per step of the first log's evaluations; an evaluation at another step goes in its
  column by order, its step named. With `floor`: the elimination floor last, and a 1.00 in bold."""
  def render(paths) -> str:
    logs = {os.path.basename(p): _probe_log(p) for p in paths}
    steps = [point["step"] for point in logs[next(iter(labels))]]
    head = ([f"step {s:,}" for s in steps] + ["elimination floor"] if floor
            else [f"step {steps[0]:,}"] + [f"{s:,}" for s in steps[1:]])
    lines = [f"| {first_column} | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, label in labels.items():
      cells = []
      for step, point in zip(steps, logs[name], strict=False):
        accuracy = f"{point['accuracy']:.2f}"
        cells.append(bold(accuracy, floor and accuracy == "1.00")
                     + (f" (step {point['step']:,})" if point["step"] != step else ""))
      cells += [""] * (len(steps) - len(cells))
      if floor:
        cells.append(f"{logs[name][0]['elimination']:.2f}")
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
  return render
