"""Exact tokenizers of iGSM text (Physics of LMs 2.1, Sec. 2 data): `IGSMTokenizer`, word level with byte
fallback, for the English formats; `CompactTokenizer` (`lwjax.data.igsm.compact`) for the compact one;
`for_format(fmt)` picks one.

In the English tokenizer whole names are single tokens ("Kingsbridge University", "Medical Library"), as are
"'s", template words, numbers 0-99, the solution variables and "[BACK]", each with or without its leading
space, so an iGSM problem plus solution takes ~4x fewer tokens than bytes. Any other text falls back to
bytes, so every string round-trips exactly: `decode(encode(s)) == s`. The vocabulary is fixed by the
generator's name lists (`lwjax.data.igsm.names`), not learnt from data. Special ids as in `lwjax.data.tokenizer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lwjax.data.igsm import names
from lwjax.data.igsm.compact import CompactTokenizer
from lwjax.data.igsm.problem import FORMATS
from lwjax.data.igsm.retry import BACK
from lwjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

_TEMPLATE_WORDS = ("The", "number", "of", "each", "equals", "more", "than", "times", "as", "much", "the", "sum",
                   "difference", "and", "How", "many", "does", "have", "Define", "so", "Answer", "'s", BACK)
_PUNCTUATION = tuple(".,;:?=+-*")
_BYTE_OFFSET = 4  # ids 0-3: pad, bos, eos, unk (unused)


class IGSMTokenizer:
  """Word-level ids for the iGSM vocabulary, then 256 byte ids for anything else."""
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self):
    entity_names = {name for world in names.WORLDS for category, items in world for name in (category, *items)}
    words = (*sorted(entity_names), *_TEMPLATE_WORDS, *names.SYMBOLS, *map(str, range(100)), *_PUNCTUATION)
    pieces = [p for w in dict.fromkeys(words) for p in (w, " " + w)]
    self.pieces = pieces
    self._ids = {p: _BYTE_OFFSET + 256 + i for i, p in enumerate(pieces)}
    self._strings = {i: p.encode("utf-8") for p, i in self._ids.items()}
    self._strings.update({_BYTE_OFFSET + b: bytes([b]) for b in range(256)})
    # Longest alternatives first, then a whole word or number so that "Ab" never splits into "A", "b".
    alternatives = sorted((re.escape(w) for w in dict.fromkeys(words)), key=len, reverse=True)
    self._pattern = re.compile(" ?(?:(?:" + "|".join(alternatives) + r")(?![A-Za-z0-9])|[A-Za-z]+|\d+|\S)|\s")
    self.vocab_size = _BYTE_OFFSET + 256 + len(pieces)

  def encode(self, text: str) -> list[int]:
    return self.encode_with_ends(text)[0]

  def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
    """(ids, end): `end[i]` is the character offset just past the piece that token i belongs to."""
    ids, ends = [], []
    for match in self._pattern.finditer(text):
      piece = match.group()
      new = [self._ids[piece]] if piece in self._ids else [_BYTE_OFFSET + b for b in piece.encode("utf-8")]
      ids += new
      ends += [match.end()] * len(new)
    return ids, ends

  def decode(self, ids: Iterable[int]) -> str:
    return b"".join(self._strings.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")


def for_format(fmt: str) -> IGSMTokenizer | CompactTokenizer:
  """The exact tokenizer of problems written in `fmt` (one of `lwjax.data.igsm.problem.FORMATS`)."""
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
  return CompactTokenizer() if fmt == "compact" else IGSMTokenizer()
