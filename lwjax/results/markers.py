"""The recomputed blocks of a Markdown document: the text between `<!-- results:NAME -->` and
`<!-- /results:NAME -->` lines (HTML comments, invisible once rendered), read and rewritten in place."""

from __future__ import annotations

import re

_OPEN = re.compile(r"^<!-- results:([\w.-]+) -->$")
_CLOSE = re.compile(r"^<!-- /results:([\w.-]+) -->$")
_ANY = re.compile(r"^<!-- /?results:")


class MarkerError(ValueError):
  """A marker without its pair, nested, repeated or malformed; the message names the line."""


def _spans(text: str) -> dict[str, tuple[int, int]]:
  """{name: (index of the first body line, index of the closing marker line)} over `text.split("\\n")`."""
  spans, name, start = {}, None, 0
  for i, line in enumerate(text.split("\n")):
    opened, closed = _OPEN.match(line), _CLOSE.match(line)
    if opened:
      if name is not None:
        raise MarkerError(f"line {i + 1}: results:{opened[1]} opens inside results:{name} (line {start})")
      if opened[1] in spans:
        raise MarkerError(f"line {i + 1}: results:{opened[1]} appears twice")
      name, start = opened[1], i + 1
    elif closed:
      if closed[1] != name:
        raise MarkerError(f"line {i + 1}: /results:{closed[1]} closes "
                          + (f"results:{name} (line {start})" if name else "nothing"))
      spans[name], name = (start, i), None
    elif _ANY.match(line):
      raise MarkerError(f"line {i + 1}: malformed marker {line!r} (expected `<!-- results:NAME -->`)")
  if name is not None:
    raise MarkerError(f"line {start}: results:{name} is never closed")
  return spans


def blocks(text: str) -> dict[str, str]:
  """{name: the block's text between its two marker lines}, in the document's order."""
  lines = text.split("\n")
  return {name: "\n".join(lines[start:end]) for name, (start, end) in _spans(text).items()}


def rewrite(text: str, bodies: dict[str, str]) -> str:
  """`text` with the body of each block named in `bodies` replaced by it; other blocks and text untouched."""
  lines = text.split("\n")
  for start, end, name in sorted(((s, e, n) for n, (s, e) in _spans(text).items() if n in bodies), reverse=True):
    lines[start:end] = bodies[name].split("\n")
  return "\n".join(lines)
