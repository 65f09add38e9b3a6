"""Flops and HBM bytes of a compiled program, loops counted, and the roofline bound they imply.

XLA's own count (`compiled.cost_analysis()`, HloCostAnalysis) is exact for straight-line code
but counts a while loop's body once (a scanned 8-layer model looks like one layer), is missing
for GPU executables, and gives up on custom calls (-1 flops and bytes each: cuBLAS GEMMs,
Pallas kernels). `program_cost` takes the optimized HLO text and

  * runs XLA's HloCostAnalysis (with this host's CPU client: the analysis is generic HLO
    arithmetic) on the module and, for every while loop, on a copy of the module whose entry
    is the loop's body, so a body runs `known_trip_count` times and nested loops multiply;
  * counts each custom call itself: bytes = its operands and results (a kernel reads and
    writes HBM; a Pallas kernel carries the bytes of the blocks it visits in its metadata,
    `kernels.matmul.KERNEL_BYTES_KEY`, which is less where it writes part of an aliased
    array), flops = a GEMM's from its dot dimensions, a Pallas kernel's from the matmul count
    it carries in its metadata (`kernels.matmul.KERNEL_FLOPS_KEY`), 0 otherwise.

On a program without loops or custom calls the result is XLA's count exactly (tests check it).
Bytes are XLA's "bytes accessed": every top-level op (fusion, copy, collective, ...) reads its
operands and writes its results once, the traffic an op-by-op HBM model implies.

`roofline` turns a cost into a lower bound on the step time, max(flops / peak, bytes / HBM
bandwidth), with the peaks of `PEAKS` (vendor datasheets, dense, per chip or GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from hyena_jax.model.kernels.matmul import KERNEL_BYTES_KEY, KERNEL_FLOPS_KEY, KERNEL_PASSES_KEY


@dataclasses.dataclass(frozen=True)
class Peak:
  """A chip's dense matmul peak (bf16 operands) and HBM bandwidth, from its datasheet."""
  name: str
  bf16_flops: float       # per second
  hbm_bytes_per_s: float


PEAKS = {
    "h100": Peak("H100 SXM: 989 TFLOP/s bf16, 3.35 TB/s", 989e12, 3.35e12),
    "h200": Peak("H200 SXM: 989 TFLOP/s bf16, 4.8 TB/s", 989e12, 4.8e12),
    "v4": Peak("TPU v4: 275 TFLOP/s bf16, 1.2 TB/s", 275e12, 1.2e12),
    "v5e": Peak("TPU v5e: 197 TFLOP/s bf16, 819 GB/s", 197e12, 0.819e12),
    "v5p": Peak("TPU v5p: 459 TFLOP/s bf16, 2.765 TB/s", 459e12, 2.765e12),
    "v6e": Peak("TPU v6e: 918 TFLOP/s bf16, 1.64 TB/s", 918e12, 1.64e12),
}

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(?:, |$)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"condition=%([\w.\-]+), body=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _metadata_number(key: str) -> re.Pattern:
  r"""`"key": "123"` in a kernel's serialized metadata: on GPU quotes are written \22, on TPU
  " or \"."""
  return re.compile(key + r'(?:\\22|\\?")\s*:\s*(?:\\22|\\?")(\d+)')


_KERNEL_FLOPS = _metadata_number(KERNEL_FLOPS_KEY)
_KERNEL_BYTES = _metadata_number(KERNEL_BYTES_KEY)
_KERNEL_PASSES = _metadata_number(KERNEL_PASSES_KEY)
# A kernel that does not say what its matmuls cost: float32-accurate ones (three TF32 passes at
# half the bf16 rate on tensor cores; six bf16 passes on the MXU).
_DEFAULT_PASSES = 6
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string, tuples summed: 'f32[8,128]{1,0}' -> 4096."""
  return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  bytes: float = 0.0
  kernel_flops: float = 0.0      # of `flops`: Pallas kernels' matmuls
  kernel_pass_flops: float = 0.0  # those, times the bf16-rate passes each costs
  kernel_bytes: float = 0.0      # of `bytes`: Pallas kernels' operands and results
  loops: int = 0                 # while loops multiplied by their trip count
  unknown_loops: int = 0         # while loops without a known trip count (counted once)

  def add(self, other: "Cost", times: float = 1.0) -> None:
    for f in ("flops", "bytes", "kernel_flops", "kernel_pass_flops", "kernel_bytes"):
      setattr(self, f, getattr(self, f) + times * getattr(other, f))
    self.loops += other.loops
    self.unknown_loops += other.unknown_loops


@dataclasses.dataclass
class _Computation:
  name: str
  start: int   # line index of the header
  calls: list[str]
  whiles: list[tuple[str, str, int | None]]   # (condition, body, trip count)
  custom: Cost                                # its custom calls' own cost (not recursive)
  n_custom: int
  int_constants: list[int] = dataclasses.field(default_factory=list)
  less_than: bool = False


class _Module:
  """An optimized HLO module's text, split into computations."""

  def __init__(self, text: str):
    self.lines = text.splitlines()
    self.computations: dict[str, _Computation] = {}
    self.entry = ""
    current, shapes, pending = None, {}, ""
    for i, line in enumerate(self.lines):
      header = _HEADER.match(line)
      if header and current is None:
        current = _Computation(header.group(2), i, [], [], Cost(), 0)
        shapes = dict(re.findall(r"([\w.\-]+): ((?:\([^)]*\))|(?:\w+\[[\d,]*\]))",
                                 line[:line.rfind("->")]))
        if header.group(1):
          self.entry = current.name
        continue
      if current is None:
        continue
      if line == "}":
        if pending:
          self._instruction(current, shapes, pending)
        self.computations[current.name] = current
        current, pending = None, ""
        continue
      # An instruction may span lines (TPU kernels' metadata holds newlines): a line that does
      # not start with the indentation continues the previous one.
      if line.startswith("  ") and pending:
        self._instruction(current, shapes, pending)
        pending = ""
      pending += line
    if not self.entry:
      raise ValueError("no ENTRY computation in the HLO text")

  @staticmethod
  def _instruction(comp: _Computation, shapes: dict, line: str) -> None:
    m = _INSTRUCTION.match(line)
    if not m:
      return
    name, shape, opcode, operands = m.groups()
    shapes[name] = shape
    comp.calls += _CALLS.findall(line)
    for group in _CALL_LISTS.findall(line):
      comp.calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    if opcode == "while":
      cond, body = _WHILE.search(line).groups()
      trip = _TRIP.search(line)
      comp.whiles.append((cond, body, int(trip.group(1)) if trip else None))
    elif opcode == "constant" and re.match(r"s32\[\]", shape):
      comp.int_constants.append(int(re.search(r"constant\((-?\d+)\)", line).group(1)))
    elif opcode == "compare" and "direction=LT" in line:
      comp.less_than = True
    elif opcode == "custom-call":
      # XLA cannot see into these; kernels (Pallas) and GEMMs (cuBLAS) read their operands and
      # write their results in HBM. Other custom calls (TPU buffer bookkeeping) move nothing.
      comp.n_custom += 1
      operand_names = re.findall(r"%([\w.\-]+)", operands)
      operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in operand_names)
      kernel = _KERNEL_FLOPS.search(line)
      if kernel:
        # The blocks the kernel visits (its metadata), else all of its operands and results.
        visited = _KERNEL_BYTES.search(line)
        moved = float(visited.group(1)) if visited else shape_bytes(shape) + operand_bytes
        passes = _KERNEL_PASSES.search(line)
        flops = float(kernel.group(1))
        comp.custom.add(Cost(flops=flops, bytes=moved, kernel_flops=flops, kernel_bytes=moved,
                             kernel_pass_flops=flops * (int(passes.group(1)) if passes
                                                        else _DEFAULT_PASSES)))
      elif any(t in line for t in _GEMM_TARGETS):
        moved = shape_bytes(_ARRAY.search(shape).group(0)) + operand_bytes  # no s8 workspace
        comp.custom.add(Cost(flops=_gemm_flops(line, [shapes.get(o, "") for o in operand_names]),
                             bytes=moved))

  def trip_count(self, cond: str, known: int | None) -> int | None:
    """The loop's trip count: XLA's known_trip_count (GPU, CPU), else read off a condition
    `counter < N` with one integer constant (TPU's scans: the counter starts at 0, step 1)."""
    if known is not None:
      return known
    constants = [n for c in self.reachable(cond) for n in self.computations[c].int_constants]
    if len(constants) == 1 and any(self.computations[c].less_than for c in self.reachable(cond)):
      return constants[0]
    return None

  def as_entry(self, name: str) -> str:
    """The module's text with `name` as its ENTRY computation (the others kept as they are)."""
    lines = list(self.lines)
    for i, line in enumerate(lines):
      if line.startswith("HloModule "):
        # Attributes that describe the old entry's signature.
        for key in ("entry_computation_layout", "input_output_alias", "buffer_donor"):
          line = _drop_attribute(line, key)
        lines[i] = line
        break
    old = self.computations[self.entry].start
    lines[old] = lines[old].removeprefix("ENTRY ")
    new = self.computations[name].start
    lines[new] = "ENTRY " + lines[new]
    return "\n".join(lines)

  def reachable(self, name: str, through_loops: bool = False) -> list[str]:
    """Computations `name` runs (itself included), without entering while loops unless
    `through_loops`."""
    seen, stack = [], [name]
    while stack:
      c = stack.pop()
      if c in seen or c not in self.computations:
        continue
      seen.append(c)
      stack += self.computations[c].calls
      if through_loops:
        stack += [x for cond, body, _ in self.computations[c].whiles for x in (cond, body)]
    return seen


def _drop_attribute(line: str, key: str) -> str:
  """Removes `, key={...}` (balanced braces) from a module header line."""
  start = line.find(", " + key + "={")
  if start < 0:
    return line
  depth, i = 0, line.index("{", start)
  while True:
    depth += {"{": 1, "}": -1}.get(line[i], 0)
    if depth == 0:
      return line[:start] + line[i + 1:]
    i += 1


def _gemm_flops(line: str, operand_shapes: list[str]) -> float:
  """2 x (lhs elements) x (rhs non-contracting, non-batch elements) of a cuBLAS GEMM."""
  numbers = re.search(r'"dot_dimension_numbers":(\{[^{}]*\})', line)
  dims = json.loads(numbers.group(1)) if numbers else {}
  lhs, rhs = ([int(d) for d in _ARRAY.search(s).group(2).split(",") if d]
              for s in operand_shapes[:2])
  skip = {int(d) for d in dims.get("rhs_contracting_dimensions", [])}
  skip |= {int(d) for d in dims.get("rhs_batch_dimensions", [])}
  return 2.0 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in skip)


def program_cost(hlo_text: str) -> Cost:
  """Flops and bytes of one execution of an optimized HLO module (`compiled.as_text()`), with
  while loops counted `known_trip_count` times (see the module docstring)."""
  import jax
  from jax._src.lib import _jax
  from jaxlib import _hlo

  client = jax.devices("cpu")[0].client   # the analysis is generic HLO arithmetic
  module = _Module(hlo_text)
  xla_counts: dict[str, dict[str, float]] = {}

  def xla(name: str) -> dict[str, float]:
    """XLA's count with `name` as the entry: every loop body once, custom calls -1 each."""
    if name not in xla_counts:
      text = hlo_text if name == module.entry else module.as_entry(name)
      xla_counts[name] = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
    return xla_counts[name]

  def once(name: str) -> Cost:
    """One pass of `name` with every loop inside run once (what XLA counts), custom calls ours."""
    counts = xla(name)
    cost = Cost(counts.get("flops", 0.0), counts.get("bytes accessed", 0.0))
    for c in module.reachable(name, through_loops=True):
      comp = module.computations[c]
      cost.add(comp.custom)
      # XLA counts each custom call as -1 flops and -1 bytes ("unknown"): added back.
      cost.flops += comp.n_custom
      cost.bytes += comp.n_custom
    return cost

  def total(name: str) -> Cost:
    cost = once(name)
    for c in module.reachable(name):
      for cond, body, known in module.computations[c].whiles:
        trip = module.trip_count(cond, known)
        if trip is None:
          cost.unknown_loops += 1
          continue
        cost.loops += 1
        # once(name) ran the body and the condition once; the loop runs the body `trip` times
        # (each with its own loops multiplied) and the condition trip + 1 times.
        cost.add(total(body), trip)
        cost.add(once(body), -1)
        cost.add(once(cond), trip)
    return cost

  return total(module.entry)


def roofline(cost: Cost, peak: Peak, tokens: int) -> dict[str, float]:
  """The bound max(compute time, HBM time) of one step and the tokens/s it allows.

  Compute time counts XLA's flops at the bf16 matmul peak (a lower bound: elementwise and FFT
  work runs slower) and each Pallas kernel's matmuls at peak / the passes it says they cost."""
  compute_s = (cost.flops - cost.kernel_flops + cost.kernel_pass_flops) / peak.bf16_flops
  memory_s = cost.bytes / peak.hbm_bytes_per_s
  bound = max(compute_s, memory_s)
  return {"flops": cost.flops, "bytes": cost.bytes, "kernel_flops": cost.kernel_flops,
          "kernel_bytes": cost.kernel_bytes, "compute_s": compute_s, "memory_s": memory_s,
          "bound_s": bound, "bound": "memory" if memory_s >= compute_s else "compute",
          "tokens_per_s": tokens / bound if bound > 0 else math.inf, "peaks": peak.name}
