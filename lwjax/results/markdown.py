"""What the table renderers share: reading a committed result file, and Markdown emphasis."""

from __future__ import annotations

import json


def read_json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def bold(text: str, on: bool) -> str:
  return f"**{text}**" if on else text
