"""The optimized HLO text of a compiled XLA program, read: computations, instructions, arrays' laid-out bytes and
the trip counts of while loops. `lwjax.launch.hlo_cost` accounts FLOPs and bytes from it.

Written against TPU programs (`compiled.as_text()` of libtpu 0.0.42): layouts carry tiles, `{1,0:T(8,128)(2,1)}`,
and memory spaces, `S(1)` for the memory XLA's memory-space assignment prefetches into (VMEM; CMEM on v4), and
a while loop carries no `known_trip_count` in its backend_config, so `trip_count` reads it off the loop.
"""

from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")  # dtype, dims, layout


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shape: str  # the result type: "bf16[8,128]{1,0:T(8,128)(2,1)}" or a tuple "(f32[2]{0}, s32[])"
  args: str  # the text between the opcode's parentheses
  attrs: str  # everything after them
  root: bool

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.args)


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, list[Instruction]]
  instructions: dict[str, Instruction]  # HLO names are unique in a module
  entry: str
  num_partitions: int
  sources: dict[int, str] = dataclasses.field(default_factory=dict)  # stack_frame_id -> "file:line (function)"


def _tables(text: str) -> dict[str, dict[int, str]]:
  """The module's source tables (FileNames, FunctionNames, FileLocations, StackFrames): {table: {id: entry}}."""
  tables, current = {}, None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and (row := re.match(r"(\d+) (.*)$", line)):
      current[int(row.group(1))] = row.group(2)
    elif current is not None and line.strip():
      current = None
  return tables


def _source_frames(text: str, keep: str) -> dict[int, str]:
  """stack_frame_id -> "file:line (function)" of the innermost frame on that stack whose file path holds `keep`
  (the project's own code, not jax's or flax's), and " < " the next such frame out (its caller: which `dense`
  call a matmul is), from the module's source tables; {} without them."""
  t = _tables(text)
  files = {i: v.strip('"') for i, v in t.get("FileNames", {}).items()}
  functions = {i: v.strip('"') for i, v in t.get("FunctionNames", {}).items()}
  locations, frames = {}, {}
  for i, v in t.get("FileLocations", {}).items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    locations[i] = (files.get(int(f.get("file_name_id", 0)), "?"), int(f.get("line", 0)),
                    functions.get(int(f.get("function_name_id", 0)), "?"))
  for i, v in t.get("StackFrames", {}).items():
    f = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[i] = (int(f.get("file_location_id", 0)), int(f.get("parent_frame_id", 0)))

  def innermost(frame_id: int) -> str:
    seen, found = set(), []
    while frame_id in frames and frame_id not in seen and len(found) < 2:
      seen.add(frame_id)
      location, parent = frames[frame_id]
      path, line, function = locations.get(location, ("?", 0, "?"))
      if keep in path and (not found or found[0][1] != function):  # the caller: another function
        found.append((f"{path[path.rindex(keep):]}:{line} ({function})", function))
      frame_id = parent
    return " < ".join(text for text, _ in found) or "?"
  return {i: innermost(i) for i in frames}


def source(module: Module, ins: Instruction) -> str:
  """Where in the project's code `ins` comes from ("lwjax/models/gpt.py:210 (Block.__call__)"), or "?"."""
  frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
  return module.sources.get(int(frame.group(1)), "?") if frame else "?"


def _closing(text: str, start: int) -> int:
  """The index after the parenthesis that closes the one at `text[start]`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced parentheses in {text[:200]!r}")


def _parse_instruction(line: str) -> Instruction | None:
  m = re.match(r"\s+(ROOT )?%([\w.\-]+) = ", line)
  if not m:
    return None
  rest = line[m.end():]
  type_end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:type_end], rest[type_end:].lstrip()
  op = re.match(r"([a-z][\w\-]*)\(", rest)
  if not op:
    return None
  args_end = _closing(rest, op.end() - 1)
  return Instruction(m.group(2), op.group(1), shape, rest[op.end():args_end - 1], rest[args_end:], bool(m.group(1)))


def parse_module(text: str) -> Module:
  """The computations of an HLO module's text, instructions in order."""
  computations, instructions, entry, current = {}, {}, None, None
  for line in text.splitlines():
    if header := re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line):
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (instruction := _parse_instruction(line)):
      current.append(instruction)
      instructions[instruction.name] = instruction
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  partitions = re.search(r"num_partitions=(\d+)", text[:5000])
  return Module(computations, instructions, entry, int(partitions.group(1)) if partitions else 1,
                _source_frames(text, "lwjax/"))


def dims(shape: str) -> list[list[int]]:
  """The dimensions of each array of a type."""
  return [[int(d) for d in ds.split(",") if d] for _, ds, _ in ARRAY.findall(shape)]


def elements(shape: str) -> int:
  return sum(math.prod(ds) for ds in dims(shape))


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of a type's arrays as laid out (the minor dims padded to the layout's tile); `hbm_only`: only arrays in
  the default memory space, HBM."""
  total = 0.0
  for dtype, ds, layout in ARRAY.findall(shape):
    ds = [int(d) for d in ds.split(",") if d]
    minor_to_major, _, tiling = (layout or "").partition(":")
    if hbm_only and re.search(r"S\([1-9]", tiling):
      continue
    if (tile := re.match(r"T\(([\d,]+)\)", tiling)) and ds:
      ds = [ds[int(d)] for d in minor_to_major.split(",")]  # minor first
      for i, size in enumerate(int(t) for t in reversed(tile.group(1).split(","))):
        if i < len(ds):
          ds[i] = -(-ds[i] // size) * size
    total += math.prod(ds) * (1 if dtype.startswith("f8") else _BYTES.get(dtype, 0))
  return total


def int_list(ins: Instruction, key: str) -> list[int]:
  """An attribute such as `lhs_contracting_dims={1,2}`."""
  m = re.search(rf"\b{key}=\{{([\d,]*)\}}", ins.attrs)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def called(ins: Instruction, key: str) -> list[str]:
  """The computations an attribute names: `calls=%f`, `body=%b`, `branch_computations={%a, %b}`."""
  m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", ins.attrs)
  return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def root(computation: list[Instruction]) -> Instruction:
  return next(ins for ins in computation if ins.root)


def _scalar_source(module: Module, name: str, fusion_operands: list[str] | None = None):
  """Where a scalar comes from: ("const", value), ("element", i) of its computation's tuple parameter, or None."""
  ins = module.instructions[name]
  while ins.opcode in ("copy", "bitcast", "convert", "reshape"):
    ins = module.instructions[ins.operands[0]]
  if ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.args):
    return "const", int(ins.args)
  if ins.opcode == "get-tuple-element" and module.instructions[ins.operands[0]].opcode == "parameter":
    return "element", int(re.search(r"index=(\d+)", ins.attrs).group(1))
  if ins.opcode == "parameter" and fusion_operands is not None:
    return _scalar_source(module, fusion_operands[int(ins.args)])
  return None


def trip_count(module: Module, loop: Instruction) -> int | None:
  """How many times a `while` runs its body: `known_trip_count` from its backend_config, else read off the loop,
  `i = c0; while i < n: i += s` (the condition compares a tuple element with a constant, or with an invariant
  element whose initial value is one; the body adds a constant to the element); None for any other loop."""
  if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs):
    return int(known.group(1))
  init = module.instructions[loop.operands[0]]
  cond, body = (module.computations[called(loop, key)[0]] for key in ("condition", "body"))
  compare, fusion_operands, body_root = root(cond), None, root(body)
  if compare.opcode == "fusion":
    compare, fusion_operands = root(module.computations[called(compare, "calls")[0]]), compare.operands
  if compare.opcode != "compare" or init.opcode != "tuple" or body_root.opcode != "tuple":
    return None

  def step(source):  # what the body adds to a tuple element each iteration (0: invariant; None: not a constant)
    if not source or source[0] != "element":
      return None
    update = module.instructions[body_root.operands[source[1]]]
    if _scalar_source(module, update.name) == source:
      return 0
    if update.opcode not in ("add", "subtract"):
      return None
    a, b = (_scalar_source(module, o) for o in update.operands)
    if a == source and b and b[0] == "const":
      return b[1] if update.opcode == "add" else -b[1]
    return a[1] if b == source and a and a[0] == "const" and update.opcode == "add" else None

  def start(source):  # an element's initial value, if a constant
    value = _scalar_source(module, init.operands[source[1]]) if source and source[0] == "element" else source
    return value[1] if value and value[0] == "const" else None
  sides = [_scalar_source(module, o, fusion_operands) for o in compare.operands]
  direction = re.search(r"direction=(\w+)", compare.attrs).group(1)
  if not step(sides[0]):  # the induction variable on the right: mirror the comparison
    sides.reverse()
    direction = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, direction)
  stride, first, bound = step(sides[0]), start(sides[0]), start(sides[1])
  if not stride or first is None or bound is None or (sides[1][0] == "element" and step(sides[1]) != 0):
    return None
  span = bound - first
  if direction in ("GT", "GE"):
    span, stride, direction = -span, -stride, {"GT": "LT", "GE": "LE"}[direction]
  if stride < 0:
    return None
  if direction in ("LT", "LE"):
    return max(0, -(-span // stride) if direction == "LT" else span // stride + 1)
  return span // stride if direction == "NE" and span % stride == 0 and span >= 0 else None
