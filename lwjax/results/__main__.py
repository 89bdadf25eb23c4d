"""`python -m lwjax.results [--check DOC | --write DOC]`: print, check or rewrite the recomputed tables."""

from __future__ import annotations

import argparse
import sys

from lwjax.results import TABLES, drift, markers, render


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--check", metavar="DOC", help="exit 1 listing each marked table that differs from its data")
  group.add_argument("--write", metavar="DOC", help="rewrite the document's marked tables from their data")
  args = parser.parse_args(argv)
  tables = {name: render(name) for name in TABLES}
  if not (args.check or args.write):
    for name, table in tables.items():
      print(f"{name} (results/{', results/'.join(TABLES[name].files)}):\n{table}\n")
    return 0
  path = args.check or args.write
  with open(path) as f:
    text = f.read()
  if args.write:
    found = markers.blocks(text)
    changed = [name for name in tables if name in found and found[name].strip("\n") != tables[name]]
    text = markers.rewrite(text, {name: tables[name] for name in found if name in tables})
    with open(path, "w") as f:
      f.write(text)
    print(f"{path}: rewrote {', '.join(changed) if changed else 'nothing (every table matches its data)'}")
  messages = drift(text, tables)
  for message in messages:
    print(message, file=sys.stderr)
  if args.check and not messages:
    print(f"{path}: all {len(tables)} tables match their data")
  return 1 if messages else 0


if __name__ == "__main__":
  sys.exit(main())
