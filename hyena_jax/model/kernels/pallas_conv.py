"""Pallas long convolution: FFTs as matrix multiplications, fused with the skip term and the gate.
This is the op; plan.py plans it, pallas_calls.py calls the kernels of pallas_kernels.py,
matmul.py holds their matmuls, halves.py splits sequences past the two-pass limit.

Computes exactly what `fftconv.fft_long_conv` computes,

    y[b, c, t] = (sum_{s <= t} k[c, t - s] u[b, c, s] + D[c] u[b, c, t]) * gate[b, c, t],

but with every DFT written as dense matmuls (the four-step / Monarch decomposition FlashFFTConv
uses), so that tensor cores and the TPU MXU do the work instead of XLA's FFT.

The maths, for an FFT of size n = p * q (input index j = j1 q + j2, output index f = f1 + p f2):

    X[f1 + p f2] = sum_j2 F_q[j2, f2] * T[f1, j2] * sum_j1 F_p[f1, j1] x[j1, j2]
    i.e.  X_tile = ((F_p @ x_tile) * T) @ F_q          with T[f1, j2] = exp(-2 pi i f1 j2 / n)

and its inverse conj(F_p) @ ((Y_tile @ conj(F_q)) * conj(T)). Spectra stay in this "tile order";
every product between spectra is pointwise, so the order never needs undoing. Complex numbers are
(real, imag) float32 pairs (stored between the two-pass kernels as `spectra_dtype` pairs). n is a
power of two >= 2L, so the input occupies the first half of the tile's rows (half of the first
matmul is skipped) and only the first half of the output rows is ever computed.

Two tricks keep the kernels small:
  * the skip term is folded into the filter, conv(u, k) + D u = conv(u, k + D delta), so
    D never enters a kernel and dD = dk_eff[:, 0]; the two-pass path adds D / n to the
    filter's column spectrum (column 0 of each row) instead of writing k_eff, and every 1/n
    rides on a DFT matrix, so neither costs a pass over [C, L];
  * the filter is transformed by the kernels themselves, beside the signal: the single-pass
    kernel takes k_eff / n as a half tile, the two-pass row kernels take its column transform
    (the signal's column kernel, run once per call on the batch-independent filter) and do its
    row DFT on-chip. A precomputed spectrum costs more HBM traffic than its matmuls cost time
    (XLA's rfft, the conjugate half and the tile-order transpose moved ~95 MB per channel each
    time at 1M tokens; the filter's column pass moves 13 MB; issue 24).

Schemes (see `make_plan`):
  * single pass, n <= `max_onchip` (GPU 4096, TPU 16384): one kernel per (batch, channel) row
    does DFT, spectrum product, inverse DFT and gate on a [p, q] tile that lives on-chip.
  * two pass, larger n (up to 1M tokens on GPU, 4M on TPU): n = n1 * m with m on-chip;
    kernel 1 does the length-n1 DFTs down the columns of the [n1, m] view (plus twiddles) and
    writes them to HBM, kernel 2 does each row's length-m DFT on-chip as a [p, q] tile, the
    spectrum product and the row's inverse DFT, kernel 3 does the inverse column DFTs, the gate
    and the output cast.
    Every signal is real and the column DFT is shifted by half a bin (frequencies g1 + 1/2:
    kernel 1's matrix G[g1, j1] = exp(-2 pi i j1 (g1 + 1/2) / n1), twiddles
    exp(-2 pi i j2 (g1 + 1/2) / n)), so row n1 - 1 - g1 of a column spectrum is the conjugate
    of row g1 and no row is its own mirror: exactly the first n1/2 rows are computed and stored
    (a power of two, as the block rules want), and kernel 3 takes Re(.) with every row's term
    doubled. The shift makes the transform's convolution negacyclic instead of cyclic, which is
    the same causal convolution here: the zero padding to n >= 2L means nothing wraps. This
    halves the intermediates' HBM traffic and the matmul flops of all three kernels. (The
    unshifted DFT needs rows 0 .. n1/2, its Nyquist row n1/2 being its own mirror: n1/2 + 1
    rows, which the block rules rounded up to n1/2 + 16 on GPU, 48 of 64 rows at 131k tokens.)
  * past the two-pass limit (2^21 points on GPU: L > 1M; 2^23 on TPU: L > 4M) the sequence is
    split in halves, and its convolution is four half-length ones (halves.py) run by the
    schemes above: the kernel is kept, at twice the work per halving.

Backward (`jax.custom_vjp`), with z = dy * gate and s = conv(u, k_eff):
    du = corr(z, k_eff)                (spectrum product with conj(K)),
    dgate = dy * s                     (the forward recomputed, not stored),
    dk_eff = sum_b corr(z_b, u_b)      (product Z conj(U); per-row results are summed over the
                                        batch by XLA, a documented mix: Pallas grids on GPU cannot
                                        accumulate across programs),
    dD = dk_eff[:, 0].
In the single-pass scheme one kernel computes all three from u, gate and dy. In the two-pass
scheme with one channel group the forward keeps the column spectra of u and of the filter for
the backward (instead of u and k), which then runs two column passes fewer.

Lowerings: Triton-flavoured Pallas on GPU, Mosaic on TPU, chosen from the devices the program
is compiled for (the mesh in context; without one, `lax.platform_dependent` lets lowering pick),
never from `jax.default_backend()`, so ahead-of-time compiles for an absent TPU or GPU get their
real kernels. On a CPU target the same kernels run through the Pallas interpreter
(`interpret=True` forces it anywhere, for tests). Block shapes follow each backend's rules:
Triton needs power-of-two blocks and matmul dims >= 16; Mosaic needs the last two block dims to
be multiples of (8, 128) or the full array dims. The DFT matmuls run on the matrix units at
float32-level accuracy: multi-pass bf16 (Precision.HIGHEST) on the MXU, three TF32 passes
(DotAlgorithmPreset.TF32_TF32_F32_X3) on tensor cores; see `long_conv(precision=...)`.
Under a multi-device mesh the op wraps itself in a shard_map over the batch axes (XLA cannot
partition Mosaic kernels and would replicate Triton ones); inside a shard_map the outputs carry
the operands' varying mesh axes.
STATUS: compiled deviceless by the real compilers (libtpu for TPU v5e/v5p, XLA:GPU + Triton +
ptxas for H100; see launch/aot_compile.py); never run on TPU or GPU hardware, so speed and
on-device numerics are unmeasured. Interpret mode (CPU tests) checks the maths, with the TF32
operand rounding of the GPU path emulated.
"""


from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hyena_jax.model import mesh_axes
from hyena_jax.model.config import SPECTRA_DTYPES, SpectraDtype
from hyena_jax.model.kernels import halves
from hyena_jax.model.kernels import pallas_calls as kernels
from hyena_jax.model.kernels.matmul import Dot
from hyena_jax.model.kernels.plan import (HIGHEST, RULES, Plan, Platform, make_plan,
                                          two_pass_limit)

PrecisionName = Literal["auto", "highest", "high", "default", "float32"]


# What the kernels' matmuls run as, compiled, per (block rules, precision), and their cost in
# bf16-rate passes.
_COMPILED_DOTS = {
    # MXU: HIGHEST is the six-pass bf16 product (float32 accuracy), DEFAULT one bf16 pass.
    ("tpu", "highest"): Dot(HIGHEST, passes=6),
    ("tpu", "default"): Dot(jax.lax.Precision.DEFAULT, passes=1),
    ("tpu", "float32"): Dot(HIGHEST, passes=6),
    # bf16x3, written out (see Dot): three bf16 passes, ~16 mantissa bits.
    ("tpu", "high"): Dot(jax.lax.Precision.DEFAULT, passes=3, bf16x3=True),
    # Tensor cores: three TF32 passes (hi*hi + hi*lo + lo*hi) keep ~22 mantissa bits; one TF32
    # pass keeps 10 (TF32 runs at half the bf16 rate). IEEE float32 ("float32") uses no tensor
    # cores (67 of 989 TFLOP/s on an H100): Triton unrolls it into FMA code that ptxas does not
    # finish compiling at L = 131k (issue 17), so it is for tests only.
    ("gpu", "highest"): Dot(jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3, passes=6),
    ("gpu", "default"): Dot(jax.lax.DotAlgorithmPreset.TF32_TF32_F32, passes=2),
    ("gpu", "float32"): Dot(HIGHEST, passes=15),
    ("gpu", "high"): Dot(jax.lax.Precision.DEFAULT, passes=3, bf16x3=True),
}


def resolve_precision(precision: str, platform: Platform, dtype) -> str:
  """'auto' -> 'highest' for float32 signals. For bfloat16 signals, whose rounding (3.9e-3
  relative, of the signal and of the output) dwarfs the matmuls' error, less: on GPU one TF32
  pass ('default', ~3e-4) for a third of the tensor-core work (the kernels are compute-bound at
  three passes on an H100); on TPU bf16x3 ('high', ~1.5e-5) for half the MXU passes of
  'highest' (the kernels are compute-bound at six passes on a v5p). One bf16 pass would err like
  bfloat16 itself."""
  if precision != "auto":
    return precision
  if jnp.dtype(dtype) != jnp.bfloat16:
    return "highest"
  return "default" if platform == "gpu" else "high"


# The operand rounding interpret mode emulates for the same requests (see Dot).
_EMULATED = {("gpu", "highest"): "tf32x3", ("gpu", "default"): "tf32", ("tpu", "default"): "bf16"}


def _dot_for(platform: Platform, precision: str, interpret: bool) -> Dot:
  if interpret and precision != "high":  # bf16x3 is written out: it interprets as it compiles
    return Dot(HIGHEST, _EMULATED.get((platform, precision)))
  return _COMPILED_DOTS[platform, precision]


@dataclasses.dataclass(frozen=True)
class _Exec:
  """Everything static about one call: plan, interpret or compile, matmul numerics, the dtype
  the two-pass scheme stores its spectra in, and the mesh axes the operands vary over inside a
  shard_map (the outputs vary over the same)."""
  plan: Plan
  interpret: bool
  dot: Dot
  spectra_dtype: jnp.dtype = jnp.dtype(jnp.float32)
  vma: frozenset = frozenset()

  def sds(self, shape, dtype) -> jax.ShapeDtypeStruct:
    mat = jax.sharding.ManualAxisType(varying=self.vma) if self.vma else None
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)

  def consts(self, arrays) -> list[jax.Array]:
    """Constants as operands that vary like the others (the interpreter adds them to varying
    blocks, which check_vma refuses for unvarying ones)."""
    return [_varying(a, self.vma) for a in arrays]


# Two-pass intermediates are complex signals of `kept` x m points (8 MiB per channel and
# sequence at 1M tokens in float32; the backward's row kernel reads four and writes six):
# channels are processed in groups holding at most this many bytes per such signal in float32,
# so that the kernel needs no more memory than XLA's FFT path. (2^29 held 32 channels of the
# unshifted scheme's n1/2 + tail rows at 1M tokens, but 64 of the n1/2 rows kept since: 2^28
# keeps 32.) bfloat16 spectra keep the same groups, at half the memory.
_GROUP_BYTES = 2 ** 28


def _channel_groups(plan: Plan, batch: int, channels: int) -> int:
  if plan.n1 == 1:
    return 1
  per_group = max(1, _GROUP_BYTES // (batch * plan.kept * plan.m * 8))
  while channels % per_group:
    per_group -= 1
  return channels // per_group


@dataclasses.dataclass(frozen=True)
class _Halves:
  """A convolution past the two-pass limit: four of half the length (halves.py), each by
  `inner`."""
  inner: "_Exec | _Halves"

  @property
  def vma(self) -> frozenset:
    return self.inner.vma

  def zeros(self, shape) -> jax.Array:
    """A float32 loop carry that varies like the pieces' outputs (inside a shard_map)."""
    return _varying(jnp.zeros(shape, jnp.float32), self.vma)


def _with_skip(k, d_bias):
  """k_eff = k + d_bias delta: conv(u, k) + D u == conv(u, k_eff)."""
  return k if d_bias is None else k.at[:, 0].add(d_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _conv(u, k, d_bias, gate, ex):
  """u, gate: [B, C, L]; k: [C, L] float32; d_bias: [C] float32 (or None: no skip term)."""
  if isinstance(ex, _Halves):
    # Each piece's filter is a window of k_eff, the skip term already in: no d_bias of its own.
    return halves.forward(u, _with_skip(k, d_bias), gate,
                          lambda u, k, gate: _conv(u, k, None, gate, ex.inner), ex.zeros)
  if ex.plan.n1 == 1:
    return kernels.single_forward(u, _with_skip(k, d_bias), gate, ex)
  groups = _channel_groups(ex.plan, u.shape[0], u.shape[1])
  # The two-pass kernels take the skip term into the filter's spectrum themselves: k_eff
  # would be a pass over the filter (read and write [C, L] float32) for one value per channel.
  return kernels.two_pass_forward(u, k, d_bias, gate, ex, groups)


def _conv_fwd(u, k, d_bias, gate, ex):
  if not isinstance(ex, _Halves) and ex.plan.n1 > 1 and _channel_groups(
      ex.plan, u.shape[0], u.shape[1]) == 1:
    # One channel group: the backward reuses the column spectra of the filter and of u
    # instead of recomputing them, and keeps them instead of k and u (one group's spectra, at
    # most _GROUP_BYTES each). With several groups (long sequences) it would be every group's
    # at once.
    cols = kernels.filter_columns(k, d_bias, ex), kernels.signal_columns(u, ex)
    y = kernels.two_pass_forward(u, k, d_bias, gate, ex, 1, *cols)
    return y, (None, None, d_bias, gate, cols)
  if isinstance(ex, _Halves) or ex.plan.n1 == 1:
    # These paths take k_eff itself: keep it for the backward instead of forming it again
    # (at 8M tokens a second [C, L] float32 copy next to k).
    k_eff = _with_skip(k, d_bias)
    return _conv(u, k_eff, None, gate, ex), (u, k_eff, d_bias, gate, None)
  return _conv(u, k, d_bias, gate, ex), (u, k, d_bias, gate, None)


def _conv_bwd(ex, residuals, dy):
  u, k, d_bias, gate, cols = residuals   # k is k_eff on the halves and single-pass paths
  if isinstance(ex, _Halves):
    def piece_bwd(pieces, dy):
      du, dk, _, dg = _conv_bwd(ex.inner, (pieces[0], pieces[1], None, pieces[2], None), dy)
      return du, dk, dg
    du, dk, dg = halves.backward(u, k, gate, dy, piece_bwd, ex.zeros)
  else:
    g = jnp.ones_like(dy) if gate is None else gate
    if ex.plan.n1 == 1:
      du, dg, dk = kernels.single_backward(u, g, dy, k, ex)
    else:
      groups = _channel_groups(ex.plan, dy.shape[0], dy.shape[1])
      du, dg, dk = kernels.two_pass_backward(u, g, dy, k, d_bias, ex, groups,
                                             *(cols or (None, None)))
  dd = None if d_bias is None else dk[:, 0]   # dD = dk_eff[:, 0]; k and d_bias are float32
  return du, dk, dd, None if gate is None else dg


_conv.defvjp(_conv_fwd, _conv_bwd)


# Device platform names -> block rules ('cpu': the interpreter).
_TARGETS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}


def target_platform() -> str | None:
  """'tpu', 'gpu' or 'cpu': the devices of the mesh in context (`jax.set_mesh`, or the mesh of an
  enclosing `jax.shard_map`); None when there is none. Never `jax.default_backend()`: a program
  compiled ahead of time for a TPU or GPU topology is traced on a CPU host."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return None if device is None else _TARGETS.get(device.platform)


def _varying(x, vma: frozenset):
  missing = tuple(sorted(vma - jax.typeof(x).mat.varying))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def halvings(length: int, platform: Platform, max_onchip: int | None = None,
             max_fft: int | None = None) -> int:
  """How many times `long_conv` halves a length-`length` sequence before each piece's FFT
  (2 x its length, rounded up to a power of two) fits `max_fft`, by default the kernels'
  two-pass limit: 0 up to 1M tokens on GPU and 4M on TPU, 1 at 2M on GPU."""
  limit = two_pass_limit(platform, max_onchip)
  limit = min(limit, max_fft) if max_fft else limit
  levels = 0
  while 1 << (2 * _piece_length(length, levels) - 1).bit_length() > limit:
    levels += 1
  return levels


def _piece_length(length: int, levels: int) -> int:
  """The length of each piece after `levels` halvings (odd lengths round up: the pieces pad)."""
  for _ in range(levels):
    length = -(-length // 2)
  return length


def _device_conv(u, filt, gate, *, interpret, platform, max_onchip, max_fft, precision,
                 spectra_dtype):
  """The convolution on each device's own operands (inside a shard_map, or unsharded);
  filt = (k [C, L], d_bias [C]), both float32."""
  operands = [x for x in (u, *filt, gate) if x is not None]
  vma = frozenset().union(*(jax.typeof(x).mat.varying for x in operands))
  # Inside a shard_map the kernel's outputs vary over every axis an operand varies over; the
  # filter is made varying too, so its cotangent is summed over those axes by the transpose.
  u, filt = _varying(u, vma), tuple(_varying(x, vma) for x in filt)
  gate = None if gate is None else _varying(gate, vma)

  def rules(target):
    return platform or ("tpu" if target == "tpu" else "gpu")

  def run(target, u, filt, gate):
    interp = target == "cpu" if interpret is None else interpret
    levels = halvings(u.shape[-1], rules(target), max_onchip, max_fft)
    plan = make_plan(_piece_length(u.shape[-1], levels), rules(target), max_onchip)
    numerics = resolve_precision(precision, plan.platform, u.dtype)
    ex = _Exec(plan, interp, _dot_for(plan.platform, numerics, interp),
               jnp.dtype(spectra_dtype), vma)
    for _ in range(levels):
      ex = _Halves(ex)
    return _conv(u, *filt, gate, ex)

  target = "cpu" if interpret else target_platform()
  if target is not None:
    return run(target, u, filt, gate)
  # No mesh says where this runs: trace a branch per platform, and let lowering (which knows
  # the target) keep one.
  branches = {name: functools.partial(run, _TARGETS[name])
              for name in ("cpu", "tpu", "cuda", "rocm")}
  return jax.lax.platform_dependent(u, filt, gate, **branches)


def _batch_shard_map(fn, u, filt, gate, batch_axes):
  """Runs `fn` under a shard_map over all the context mesh's non-manual axes, batch split over
  `batch_axes` (those whose sizes divide the batch), everything else replicated.

  Mosaic kernels cannot be partitioned by XLA, and Triton ones would be all-gathered (every
  device computing the whole batch), so a mesh in context always gets an explicit shard_map.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # Every non-manual axis becomes manual, size-1 ones included: Mosaic refuses a region with
  # any axis left to the partitioner.
  free = () if mesh.empty else tuple(
      a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Manual)
  if math.prod(mesh.shape[a] for a in free) == 1:
    return fn(u, filt, gate)
  split, size = [], 1
  for a in batch_axes:
    if a in free and u.shape[0] % (size * mesh.shape[a]) == 0:
      split.append(a)
      size *= mesh.shape[a]
  spec = P(tuple(split)) if split else P()
  if gate is None:
    return jax.shard_map(lambda u, k: fn(u, k, None), mesh=mesh, in_specs=(spec, P()),
                         out_specs=spec, axis_names=set(free))(u, filt)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, P(), spec), out_specs=spec,
                       axis_names=set(free))(u, filt, gate)


def long_conv(u: jax.Array, k: jax.Array, d_bias: jax.Array, gate: jax.Array | None = None, *,
              interpret: bool | None = None, platform: Platform | None = None,
              max_onchip: int | None = None, max_fft: int | None = None,
              precision: PrecisionName = "auto", spectra_dtype: SpectraDtype = "float32",
              batch_axes: tuple[str, ...] = mesh_axes.BATCH_AXES) -> jax.Array:
  """Gated causal long convolution, `(causal_conv(u, k) + d_bias[:, None] * u) * gate`.

  Same semantics as `fftconv.fft_long_conv`; differentiable in u, k, d_bias and gate; works
  under jit, vmap and inside `jax.shard_map` (context parallelism calls it per device).

  Where it runs comes from the devices the program is compiled for, never from
  `jax.default_backend()`: the mesh in context (`jax.set_mesh(mesh)`, or an enclosing
  shard_map) names them; without one, a branch per platform is traced and lowering keeps the
  target's (Mosaic on TPU, Triton on CUDA/ROCm, the Pallas interpreter on CPU, where there is
  no Pallas compiler). Under a mesh with non-manual axes of size > 1 the op wraps itself in a
  shard_map that splits the batch over `batch_axes` (Mosaic kernels cannot be partitioned by
  XLA); callers that jit over a multi-device mesh must trace under `jax.set_mesh(mesh)`.

  Args:
    u: [batch, channels, length] float32 or bfloat16.
    k: [channels, length] filter (computed in float32).
    d_bias: [channels] skip term D.
    gate: optional [batch, channels, length] multiplier.
    interpret: True runs the Pallas interpreter (tests), False always compiles; None interprets
      only when the target is the CPU.
    platform: block rules (and lowering) to use, 'gpu' (Triton) or 'tpu' (Mosaic); None takes
      them from the target ('gpu' rules on the CPU). Tests use it to run both in interpret mode.
    max_onchip: largest FFT done in one kernel (default: the platform's); smaller values force
      the two-pass scheme (tests use it at small lengths).
    max_fft: largest FFT the kernels do (default and cap: the two-pass limit, 2^21 points on
      GPU, 2^23 on TPU); a longer sequence is split in halves until its pieces fit, four
      convolutions of half the length per halving (halves.py). Tests use small values.
    precision: numerics of the DFT matmuls. 'highest' keeps float32-level accuracy on the
      matrix units: multi-pass bf16 on the TPU MXU, three TF32 passes on tensor cores.
      'high': bf16x3, three bf16 passes (~1.5e-5 relative error). 'default': one bf16 / TF32
      pass (about 3e-4 relative error with TF32). 'auto' (default): 'highest', but for
      bfloat16 signals 'default' on GPU and 'high' on TPU (`resolve_precision`). 'float32':
      IEEE float32 (on GPU without tensor cores; Triton/ptxas compile times explode at long
      lengths). In interpret mode the TF32 / bf16 operand rounding of the target is emulated.
    spectra_dtype: what the two-pass scheme (past 2048 tokens on GPU, 8192 on TPU) stores its
      intermediate spectra in, between kernels. 'float32' (default) keeps the accuracy of the
      arithmetic. 'bfloat16' halves the kernels' HBM traffic, which is most of it (H100, 1M
      tokens: 53 -> 33 GB per layer, forward and backward), at bfloat16-level error (max error
      over max value, against the fft path, interpret mode): float32 signals' outputs and
      gradients ~2e-3 off (3e-7 with float32 spectra); on bfloat16 signals, whose own rounding
      is 3.9e-3, the float32 filter gradient goes from 5e-4 to 1.8e-3 on GPU rules and from
      6e-6 to 1.7e-3 on TPU rules. The arithmetic stays float32.
    batch_axes: mesh axes the batch is split over when the op shards itself.

  Returns:
    [batch, channels, length] in u's dtype; all DFT arithmetic is float32.
  """
  if u.ndim != 3 or k.ndim != 2 or u.shape[1:] != k.shape:
    raise ValueError(f"long_conv expects u [B, C, L] and k [C, L]; got {u.shape}, {k.shape}")
  if d_bias.shape != (u.shape[1],):
    raise ValueError(f"d_bias must be [channels] = ({u.shape[1]},), got {d_bias.shape}")
  if gate is not None and gate.shape != u.shape:
    raise ValueError(f"gate must have u's shape {u.shape}, got {gate.shape}")
  if not jnp.issubdtype(u.dtype, jnp.floating):
    raise TypeError(f"u must be a float array (float32 or bfloat16), got {u.dtype}")
  if precision not in ("auto", "highest", "high", "default", "float32"):
    raise ValueError("precision must be 'auto', 'highest', 'high', 'default' or 'float32', got "
                     f"{precision!r}")
  if spectra_dtype not in SPECTRA_DTYPES:
    raise ValueError(f"spectra_dtype must be one of {SPECTRA_DTYPES}, got {spectra_dtype!r}")
  if platform is not None and platform not in RULES:
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
  if max_fft is not None and max_fft < 2:
    raise ValueError(f"max_fft must be >= 2, got {max_fft}")
  # conv(u, k) + D u == conv(u, k + D delta): D joins the filter's first tap (in the kernels).
  filt = (k.astype(jnp.float32), d_bias.astype(jnp.float32))
  fn = functools.partial(_device_conv, interpret=interpret, platform=platform,
                         max_onchip=max_onchip, max_fft=max_fft, precision=precision,
                         spectra_dtype=spectra_dtype)
  return _batch_shard_map(fn, u, filt, gate, batch_axes)

