"""Loop-aware FLOP and byte account of a compiled XLA program, per op class, from its optimized HLO text.

`compiled.cost_analysis()` counts a while loop's body once: the micro-batch loop, a scanned layer stack and the
collective-matmul loops XLA makes itself for FSDP matmuls are all under-counted. `analyze(compiled.as_text())`
walks the program from ENTRY and weights what a `while` runs by its trip count (`hlo_text.trip_count`), nested
loops multiplying. A loop whose count cannot be read is counted once and the total flagged `lower_bound`. A
`conditional` counts its most expensive branch (by FLOPs); `call` and async wrappers count their computation.

Per instruction, at top level or once per fusion at its boundary:
  FLOPs: dot 2 x output elements x contracted size; convolution 2 x output batch-features x kernel input
    features x the (output, tap) pairs that read input rather than padding (TPU encodes a dot's batch dims as a
    padded window); elementwise ops (converts too) 1 per output element, reduce 1 per input element; exp, log,
    tanh, rsqrt, ... are transcendentals instead; data movement is free. These are the rules of XLA's
    HloCostAnalysis: on a program without loops the total is XLA's to <1%. A fusion's FLOPs are its body's.
    Pallas (Mosaic) kernels, custom-call `tpu_custom_call`, carry the kernel's `pl.CostEstimate` in their
    backend_config (XLA's analysis uses it too): FLOPs, transcendentals and bytes come from it.
  Bytes: operands + outputs at the boundary, as laid out (minor dims padded to the layout's tiles); a fusion
    parameter read only through slices counts the slices, a buffer a dynamic-update-slice updates in place counts
    the update. `bytes` counts every array; `hbm_bytes` only those in HBM, the default memory space: an `S(1)`
    array sits in the memory XLA's memory-space assignment prefetches into (VMEM), and the async copies and slices
    moving it count their HBM side. parameter, constant, tuple, get-tuple-element, bitcast move nothing.
  Collectives, sync or at their async start: bytes as above, and `ici_bytes`, what one chip sends over the
    interconnect in a ring over its group of n: all-gather output x (n-1)/n, reduce-scatter and all-to-all input
    x (n-1)/n, all-reduce 2 x input x (n-1)/n, collective-permute its input.

Op classes (CLASSES): matmul (dot/convolution and fusions holding one), attention (Pallas flash-attention
kernels), kernel (other Pallas kernels), collective (TPU's async-collective fusions too), elementwise (elementwise
and reduction fusions and ops), copy (copies, transposes, slices, fusions that only move data), other. `count` is
how many times ops of the class run. The forward pass, its remat recompute and the optimizer update share opcodes
and fusions and keep only part of their op_name metadata: they are not told apart.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

from lwjax.launch import hlo_text
from lwjax.launch.hlo_text import Instruction, Module, elements, shape_bytes

CLASSES = {"matmul": "matmul (dot/conv)", "attention": "attention (Pallas)", "kernel": "other Pallas kernels",
           "collective": "collectives", "elementwise": "elementwise & other fusions", "copy": "copies & transposes",
           "other": "other"}
_NO_COST = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
            "replica-id", "opt-barrier", "add-dependency", "domain", "get-dimension-size", "async-update"}
_FREE_CUSTOM_CALLS = {"AllocateBuffer", "ConcatBitcast"}  # an allocation; slices laid out back to back, renamed
_DATA_MOVEMENT = {"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad",
                  "reshape", "broadcast", "reverse", "gather", "iota"}
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "tanh", "sqrt",
                   "rsqrt", "cbrt", "sine", "cosine", "tan", "atan2", "power", "erf"}
_COLLECTIVES = {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                "collective-permute", "collective-broadcast"}
_NO_FLOPS = _NO_COST | _DATA_MOVEMENT | _COLLECTIVES | {"fusion", "custom-call", "while", "call", "conditional",
                                                        "rng-bit-generator", "sort", "scatter", "bitcast-convert",
                                                        "send", "recv", "infeed", "outfeed"}
_HBM = functools.partial(shape_bytes, hbm_only=True)


@dataclasses.dataclass
class ClassCost:
  flops: float = 0.0
  transcendentals: float = 0.0
  bytes: float = 0.0
  hbm_bytes: float = 0.0
  ici_bytes: float = 0.0  # collectives: what one chip sends over the interconnect
  count: float = 0.0

  def add(self, other: ClassCost, times: float = 1.0) -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + times * getattr(other, field.name))


@dataclasses.dataclass(frozen=True)
class Loop:
  name: str  # the while instruction
  trip_count: int | None  # None: not read off the loop, its body counted once
  times: float  # how often the loop itself runs (the product of the enclosing loops' trip counts)
  body_flops: float  # one iteration's FLOPs, nested loops included


@dataclasses.dataclass
class HloCost:
  classes: dict[str, ClassCost]
  loops: list[Loop]
  lower_bound: bool  # some loop's trip count is unknown: its body is counted once
  # "class: file:line (function)" of the project's code each op came from (its metadata's stack frame) -> cost
  sources: dict[str, ClassCost] = dataclasses.field(default_factory=dict)

  def top_sources(self, field: str = "hbm_bytes", n: int = 12) -> list[tuple[str, ClassCost]]:
    """The `n` sources with the most `field` (an op without a stack frame in the project is "?")."""
    return sorted(self.sources.items(), key=lambda kv: -getattr(kv[1], field))[:n]

  def total(self, field: str) -> float:
    return sum(getattr(c, field) for c in self.classes.values())

  @property
  def flops(self) -> float:
    return self.total("flops")

  @property
  def hbm_bytes(self) -> float:
    """HBM bytes of everything but the collectives (whose transfers are timed at the interconnect's bandwidth)."""
    return self.total("hbm_bytes") - self.classes["collective"].hbm_bytes

  def to_dict(self) -> dict:
    return {"classes": {name: dataclasses.asdict(c) for name, c in self.classes.items()},
            "totals": {"flops": self.flops, "transcendentals": self.total("transcendentals"),
                       "bytes": self.total("bytes"), "hbm_bytes_excluding_collectives": self.hbm_bytes,
                       "ici_bytes": self.total("ici_bytes")},
            "lower_bound": self.lower_bound, "loops": [dataclasses.asdict(loop) for loop in self.loops],
            "top_sources_by_hbm": [{"source": name, **dataclasses.asdict(c)} for name, c in self.top_sources()],
            "top_sources_by_flops": [{"source": name, **dataclasses.asdict(c)}
                                     for name, c in self.top_sources("flops")]}


def _valid_taps(size_in: int, size_out: int, window: dict[str, list[int]], d: int) -> int:
  """(output position, kernel tap) pairs of spatial dimension `d` that read an input element, not padding."""
  stride, lhs_dilation = window["stride"][d], window["lhs_dilate"][d]
  last, count = (size_in - 1) * lhs_dilation, 0  # the dilated input's last position
  for k in range(window["size"][d]):
    offset = k * window["rhs_dilate"][d] - window["pad"][d]  # output o reads o * stride + offset
    if lhs_dilation == 1:
      count += max(0, min(size_out - 1, (last - offset) // stride) - max(0, -(offset // stride)) + 1)
    else:  # a transposed convolution: the holes between input elements read nothing
      count += sum(0 <= o * stride + offset <= last and (o * stride + offset) % lhs_dilation == 0
                   for o in range(size_out))
  return count


def _convolution_flops(module: Module, ins: Instruction) -> float:
  lhs, rhs = (hlo_text.dims(module.instructions[o].shape)[0] for o in ins.operands[:2])
  out = hlo_text.dims(ins.shape)[0]
  lhs_labels, rhs_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs).groups()
  spatial = sorted(int(c) for c in out_labels if c.isdigit())
  fields = {"size": "1", "stride": "1", "pad": "0_0", "lhs_dilate": "1", "rhs_dilate": "1"}
  if window := re.search(r"window=\{([^}]*)\}", ins.attrs):
    fields.update(re.findall(r"(\w+)=([\dx_\-]+)", window.group(1)))
  window = {key: [int(v.split("_")[0]) for v in (value.split("x") if "x" in value else [value] * len(spatial))]
            for key, value in fields.items()}  # per spatial dim; "pad": the low side
  pairs = math.prod(_valid_taps(lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))], window, d)
                    for d in spatial)
  batch_features = math.prod(out) / math.prod(out[out_labels.index(str(d))] for d in spatial)
  return 2.0 * batch_features * rhs[rhs_labels.index("i")] * pairs


def _compute(module: Module, ins: Instruction) -> tuple[float, float]:
  """(FLOPs, transcendentals) of one instruction that is not a fusion or a kernel."""
  op = ins.opcode
  if op == "dot":
    lhs = hlo_text.dims(module.instructions[ins.operands[0]].shape)[0]
    contracted = math.prod(lhs[d] for d in hlo_text.int_list(ins, "lhs_contracting_dims"))
    return 2.0 * elements(ins.shape) * contracted, 0.0
  if op == "convolution":
    return _convolution_flops(module, ins), 0.0
  if op in ("reduce", "reduce-window"):
    return float(sum(elements(module.instructions[o].shape) for o in ins.operands[:len(ins.operands) // 2])), 0.0
  if op in _TRANSCENDENTAL:
    return 0.0, float(elements(ins.shape))
  return (0.0 if op in _NO_FLOPS or op.endswith(("-start", "-done")) else float(elements(ins.shape))), 0.0


def _output_bytes(module: Module, ins: Instruction, size) -> float:
  """An op's output; an async start's tuple (operands, result, context) adds only its result and context."""
  output = size(ins.shape)
  if ins.opcode.endswith("-start") and ins.shape.startswith("("):
    output = max(output - sum(size(module.instructions[o].shape) for o in ins.operands), 0.0)
  return output


def _group_size(module: Module, ins: Instruction) -> int:
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", ins.attrs):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=\[([\d,]+)\]<=", ins.attrs):
    return int(m.group(1).split(",")[-1])
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", ins.attrs):
    sizes = {axis: int(n) for axis, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(axis, 1) for axis in re.findall(r"'(\w+)'", m.group(2)))
  return module.num_partitions


def _collective(module: Module, ins: Instruction) -> ClassCost:
  inputs = sum(shape_bytes(module.instructions[o].shape) for o in ins.operands)
  output = _output_bytes(module, ins, shape_bytes)
  hbm = sum(_HBM(module.instructions[o].shape) for o in ins.operands) + _output_bytes(module, ins, _HBM)
  kind, n = ins.opcode.removesuffix("-start"), _group_size(module, ins)
  share = (n - 1) / n if n > 1 else 0.0
  ici = {"all-gather": output * share, "all-reduce": 2 * inputs * share, "collective-permute": inputs,
         "collective-broadcast": inputs}.get(kind, inputs * share)
  return ClassCost(bytes=inputs + output, hbm_bytes=hbm, ici_bytes=ici, count=1)


def _sliced_read(module: Module, body: list[Instruction], param: str) -> float | None:
  """The bytes read from `param` of `body` when every use slices it (directly, or as the operand of a nested
  fusion that only slices it: a scan's stacked residuals, read one layer a trip); None when a use reads it all."""
  reads, total = [b for b in body if param in b.operands], 0.0
  for use in reads:
    if use.opcode in ("slice", "dynamic-slice", "gather") and use.operands[0] == param:
      total += shape_bytes(use.shape)
    elif use.opcode == "fusion" and use.operands.count(param) == 1:
      inner = module.computations[hlo_text.called(use, "calls")[0]]
      index = use.operands.index(param)
      inner_param = next((b.name for b in inner if b.opcode == "parameter" and int(b.args) == index), None)
      nested = _sliced_read(module, inner, inner_param) if inner_param else None
      if nested is None:
        return None
      total += nested
    else:
      return None
  return total if reads else None


def _fusion_bytes(module: Module, ins: Instruction, body: list[Instruction], size) -> float:
  """Operands + outputs of a fusion; parameters read only through slices (or nested fusions that only slice
  them) count the slices, a buffer a root dynamic-update-slice updates in place counts the update."""
  params = {int(p.args): p.name for p in body if p.opcode == "parameter"}
  users = collections.defaultdict(list)
  for b in body:
    for o in b.operands:
      users[o].append(b)
  root = hlo_text.root(body)
  outputs = [module.instructions[o] for o in root.operands] if root.opcode == "tuple" else [root]
  in_place = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice"}
  total = sum(size(o.shape) if o.opcode != "dynamic-update-slice" else
              min(size(o.shape), shape_bytes(module.instructions[o.operands[1]].shape)) for o in outputs)
  for i, operand in enumerate(ins.operands):
    full, param = size(module.instructions[operand].shape), params.get(i)
    reads = users.get(param, [])
    if param in in_place:
      continue
    sliced = _sliced_read(module, body, param) if reads else None
    if sliced is not None:
      full = min(full, sliced)
    total += full
  return total


def _op_bytes(module: Module, ins: Instruction, size) -> float:
  operands = [module.instructions[o].shape for o in ins.operands]
  base = ins.opcode.removesuffix("-start")
  if base in ("slice", "dynamic-slice", "gather"):  # reads the slice, not its operand
    return min(size(operands[0]), _output_bytes(module, ins, shape_bytes)) + _output_bytes(module, ins, size)
  if base == "dynamic-update-slice":  # in place: reads the update, writes it into the buffer
    return size(operands[1]) + min(size(operands[0]), shape_bytes(operands[1]))
  return sum(size(s) for s in operands) + _output_bytes(module, ins, size)


class _Walker:
  """Sums the cost of a computation and what it calls, each op weighted by how often it runs."""

  def __init__(self, module: Module, costs: dict):
    self.module, self.costs = module, costs  # instruction costs by name, shared with the branches' walkers
    self.classes = {name: ClassCost() for name in CLASSES}
    self.sources: dict[str, ClassCost] = collections.defaultdict(ClassCost)
    self.loops: list[Loop | None] = []
    self.lower_bound = False

  def flops(self) -> float:
    return sum(c.flops for c in self.classes.values())

  def computation(self, name: str, times: float) -> None:
    for ins in self.module.computations[name]:
      self.instruction(ins, times)

  def instruction(self, ins: Instruction, times: float) -> None:
    op, target = ins.opcode, re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    if op == "while":
      trips = hlo_text.trip_count(self.module, ins)
      self.lower_bound |= trips is None
      runs, index, before = times * (1 if trips is None else trips), len(self.loops), self.flops()
      self.loops.append(None)  # an outer loop listed before the loops in its body
      for key in ("body", "condition"):
        self.computation(hlo_text.called(ins, key)[0], runs)
      self.loops[index] = Loop(ins.name, trips, times, (self.flops() - before) / runs if runs else 0.0)
    elif op == "conditional":
      branches = hlo_text.called(ins, "branch_computations") or [
          *hlo_text.called(ins, "true_computation"), *hlo_text.called(ins, "false_computation")]
      walkers = [_Walker(self.module, self.costs) for _ in branches]
      for walker, branch in zip(walkers, branches, strict=True):
        walker.computation(branch, times)
      worst = max(walkers, key=_Walker.flops)
      for name, cost in worst.classes.items():
        self.classes[name].add(cost)
      for name, cost in worst.sources.items():
        self.sources[name].add(cost)
      self.loops += worst.loops
      self.lower_bound |= worst.lower_bound
    elif op in ("call", "async-start"):
      for computation in hlo_text.called(ins, "to_apply") + hlo_text.called(ins, "calls"):
        self.computation(computation, times)
    elif op not in _NO_COST and not op.endswith("-done") and not (target and target.group(1) in _FREE_CUSTOM_CALLS):
      if ins.name not in self.costs:
        self.costs[ins.name] = self.cost(ins)
      cls, cost = self.costs[ins.name]
      self.classes[cls].add(cost, times)
      self.sources[f"{cls}: {hlo_text.source(self.module, ins)}"].add(cost, times)

  def cost(self, ins: Instruction) -> tuple[str, ClassCost]:
    op, base = ins.opcode, ins.opcode.removesuffix("-start")
    if op == "fusion":
      return self.fusion(ins)
    if base in _COLLECTIVES:
      return "collective", _collective(self.module, ins)
    if estimate := re.search(r'"cost_estimate":\{([^}]*)\}', ins.attrs):  # a Pallas kernel's pl.CostEstimate
      e = {k: float(v) for k, v in re.findall(r'"(\w+)":"?([\d.eE+\-]+)"?', estimate.group(1))}
      op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
      cls = "attention" if "attention" in ins.name + (op_name.group(1) if op_name else "") else "kernel"
      return cls, ClassCost(e.get("flops", 0.0), e.get("transcendentals", 0.0), e.get("bytes_accessed", 0.0),
                            e.get("bytes_accessed", 0.0), count=1)
    flops, transcendentals = _compute(self.module, ins)
    cls = ("matmul" if op in ("dot", "convolution") else "copy" if base in _DATA_MOVEMENT
           else "other" if base in _NO_FLOPS else "elementwise")
    return cls, ClassCost(flops, transcendentals, _op_bytes(self.module, ins, shape_bytes),
                          _op_bytes(self.module, ins, _HBM), count=1)

  def fusion(self, ins: Instruction) -> tuple[str, ClassCost]:
    body = self.module.computations[hlo_text.called(ins, "calls")[0]]
    total, opcodes, pending = ClassCost(count=1), set(), [body]
    while pending:  # the body and the fusions nested in it
      for inner in pending.pop():
        opcodes.add(inner.opcode)
        if inner.opcode == "fusion":
          pending.append(self.module.computations[hlo_text.called(inner, "calls")[0]])
        elif inner.opcode in _COLLECTIVES:  # an async-collective fusion: the collective runs inside
          total.ici_bytes += _collective(self.module, inner).ici_bytes
        else:
          flops, transcendentals = _compute(self.module, inner)
          total.flops, total.transcendentals = total.flops + flops, total.transcendentals + transcendentals
    total.bytes = _fusion_bytes(self.module, ins, body, shape_bytes)
    total.hbm_bytes = _fusion_bytes(self.module, ins, body, _HBM)
    if opcodes & {"dot", "convolution"}:
      return "matmul", total
    if opcodes & _COLLECTIVES:
      return "collective", total
    return "copy" if opcodes <= _DATA_MOVEMENT | _NO_COST | {"fusion"} else "elementwise", total


def analyze(hlo: str) -> HloCost:
  """The loop-aware, per-op-class cost of one device's program (`compiled.as_text()`)."""
  module = hlo_text.parse_module(hlo)
  walker = _Walker(module, {})
  walker.computation(module.entry, 1.0)
  return HloCost(walker.classes, walker.loops, walker.lower_bound, dict(walker.sources))


def _prefix(total: float) -> tuple[str, float]:
  return next(((p, f) for p, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)) if total >= f),
              ("", 1.0))


def quantity(x: float, unit: str) -> str:
  """`x` with an SI prefix: quantity(2.5e12, "FLOP") == "2.5 TFLOP"."""
  prefix, factor = _prefix(abs(x))
  return f"{x / factor:.4g} {prefix}{unit}"


def format_table(cost: HloCost | dict) -> str:
  """The per-class table, its totals and the loops, from an `HloCost` or its `to_dict()`."""
  d = cost.to_dict() if isinstance(cost, HloCost) else cost
  t, hbm = d["totals"], max(sum(c["hbm_bytes"] for c in d["classes"].values()), 1)
  (fp, f), (bp, b) = _prefix(t["flops"]), _prefix(t["bytes"])
  rows = [f"{'op class':<28}{fp + 'FLOP':>10}{'%':>5}{bp + 'B':>9}{'HBM ' + bp + 'B':>9}{'%':>5}"
          f"{'ICI ' + bp + 'B':>9}{'ops run':>10}"]
  for name, c in d["classes"].items():
    if c["count"]:
      rows.append(f"{CLASSES[name]:<28}{c['flops'] / f:>10.3f}{c['flops'] / max(t['flops'], 1):>5.0%}"
                  f"{c['bytes'] / b:>9.3f}{c['hbm_bytes'] / b:>9.3f}{c['hbm_bytes'] / hbm:>5.0%}"
                  f"{c['ici_bytes'] / b:>9.3f}{c['count']:>10,.0f}")
  rows.append(f"{'total' + (' (a lower bound)' if d['lower_bound'] else ''):<28}{t['flops'] / f:>10.3f}{'':>5}"
              f"{t['bytes'] / b:>9.3f}{t['hbm_bytes_excluding_collectives'] / b:>9.3f}{'':>5}"
              f"{t['ici_bytes'] / b:>9.3f}   (HBM: collectives excluded)")
  for loop in d["loops"]:
    trips = "unknown trip count (counted once)" if loop["trip_count"] is None else f"{loop['trip_count']} trips"
    rows.append(f"  loop {loop['name']}: {trips}, run {loop['times']:,.0f}x, "
                f"{quantity(loop['body_flops'], 'FLOP')} a trip")
  top = [s for s in d.get("top_sources_by_hbm", []) if s["hbm_bytes"] > 0][:8]
  if top:
    rows.append("most HBM traffic, by the project's source line ('?': ops XLA made without one, such as prefetches):")
    rows += [f"  {quantity(s['hbm_bytes'], 'B'):>10} {s['hbm_bytes'] / hbm:>4.0%}  {s['source']}" for s in top]
  return "\n".join(rows)
