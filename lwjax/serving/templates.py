"""Prompt templates of the serving API with named placeholders, checked once when a request arrives (Writing in the
Margins, arXiv 2408.14906, §3: the extraction, classification and answer prompts a client may replace).

A template is `str.format` syntax restricted to plain placeholders: `{query}`, `{margin}`... with no positional
fields, attribute or index access, conversion or format spec (so a client's template can neither fail when the
engine formats it nor reach past the values it is given). Text fields are substituted as text; token fields (a
margin the model wrote) are spliced in as the token ids the model produced: the prompt's length is then known
before any margin exists (what the server checks against the context length), and a margin is never re-tokenized.
The literal text between token fields is encoded piece by piece.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence


class TemplateError(ValueError):
  """A template the API refuses: `field` names the request field, the message what is wrong and what is valid."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field, self.message = field, message


class PromptTemplate:
  """A parsed template: `render` gives token ids, `length` their count for token fields of given lengths."""

  def __init__(self, template: str, field: str, *, text_fields: Sequence[str] = (), token_fields: Sequence[str] = (),
               required: Sequence[str] = ()):
    allowed = tuple(text_fields) + tuple(token_fields)
    valid = ", ".join("{" + name + "}" for name in allowed)
    self.field, self.token_fields = field, frozenset(token_fields)
    self._parts: list[tuple[str, str | None]] = []  # (literal text, placeholder after it or None)
    try:
      parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # unbalanced braces
      raise TemplateError(field, f"{e} (write a literal brace as {{{{ or }}}}; placeholders: {valid})") from None
    for literal, name, spec, conversion in parsed:
      if name is not None:
        if name not in allowed:
          shown = "{" + name + "}" if name else "{}"
          raise TemplateError(field, f"unknown placeholder {shown} (valid: {valid})")
        if spec or conversion:
          raise TemplateError(field, f"placeholder {{{name}}} takes no conversion or format spec (valid: {valid})")
      self._parts.append((literal, name))
    used = {name for _, name in self._parts if name}
    for name in required:
      if name not in used:
        raise TemplateError(field, f"must contain the placeholder {{{name}}}")

  def render(self, encode: Callable[[str], list[int]], text: Mapping[str, str],
             tokens: Mapping[str, Sequence[int]] | None = None) -> list[int]:
    """Token ids: runs of literal text and text fields encoded, token fields spliced in as they are."""
    ids: list[int] = []
    pending = ""
    for literal, name in self._parts:
      pending += literal
      if name is None:
        continue
      if name in self.token_fields:
        if pending:
          ids += encode(pending)
        pending = ""
        ids += list((tokens or {})[name])
      else:
        pending += text[name]
    if pending:
      ids += encode(pending)
    return ids

  def length(self, encode: Callable[[str], list[int]], text: Mapping[str, str],
             token_lengths: Mapping[str, int] | None = None) -> int:
    """len(render(...)) for token fields of the given lengths (whatever their ids), counted, not built (a length
    may be anything a client sends)."""
    lengths = token_lengths or {}
    spliced = sum(lengths.get(name, 0) for _, name in self._parts if name in self.token_fields)
    return len(self.render(encode, text, {name: [] for name in self.token_fields})) + spliced
