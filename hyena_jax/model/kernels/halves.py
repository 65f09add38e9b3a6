"""A causal convolution past the kernels' two-pass limit, from four of half the length.

With u = [u0 | u1] and k = [k0 | k1] (zero-padded to 2B, B = ceil(L / 2)),

    y[:B] = conv(u0, k0)
    y[B:] = conv(u1, k0) + conv(u0, k1) + spill,   spill[t] = sum_{s > t} u0[s] k0[B + t - s],

and the spill (the part of u0 * k0 past B) is a causal convolution of the reversed halves:
spill = flip1(conv(reverse(u0), reverse(k0))). The gate is pointwise, so each piece takes its own
slice of it (flip1(g1) for the spill) and the kernels keep fusing it.

Piece i reads its operands from the halves of u, k and gate (the last piece reversed or flipped,
both their own transposes) and adds its output to a half of y: the pieces run one at a time in a
fori_loop, so their kernels compile once and only one piece's operands exist at a time. The
backward runs their kernels' backward the same way, from the residuals u, k and gate alone,
adding each piece's gradients into the half it was read from. Each halving doubles the work.
`pallas_conv` wraps these in its custom VJP; `conv`, `conv_bwd` and `zeros` come from it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Which half each of the four pieces reads: signal u0, u1, u0, reverse(u0); filter k0, k0, k1,
# reverse(k0); gate (and output, cotangent) g0, g1, g1, flip1(g1).
_SIGNAL, _FILTER, _GATE = (0, 1, 0, 0), (0, 0, 1, 0), (0, 1, 1, 1)


def _flip1(x: jax.Array) -> jax.Array:
  """x[..., B - 2 - t] for t < B - 1, and 0 at t = B - 1 (x: [..., B]). Its own transpose."""
  return jnp.pad(x[..., -2::-1], [(0, 0)] * (x.ndim - 1) + [(0, 1)])


def _reverse(x: jax.Array) -> jax.Array:
  return x[..., ::-1]


def _padded(x: jax.Array, half: int) -> jax.Array:
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 2 * half - x.shape[-1])])


def _window(x: jax.Array, halves, mirror, i, half: int) -> jax.Array:
  """Piece i's operand: half `halves[i]` of x ([..., 2B]), through `mirror` for the spill."""
  w = jax.lax.dynamic_slice_in_dim(x, jnp.asarray(halves)[i] * half, half, axis=-1)
  return jnp.where(i == 3, mirror(w), w)


def _add_window(x: jax.Array, part: jax.Array, halves, mirror, i, half: int) -> jax.Array:
  """The transpose of `_window`, added into x ([..., 2B])."""
  part = part.astype(x.dtype)
  part = jnp.where(i == 3, mirror(part), part)
  start = jnp.asarray(halves)[i] * half
  total = jax.lax.dynamic_slice_in_dim(x, start, half, axis=-1) + part
  return jax.lax.dynamic_update_slice_in_dim(x, total, start, axis=-1)


def _pieces(u, k_eff, gate, i, half: int):
  return (_window(u, _SIGNAL, _reverse, i, half), _window(k_eff, _FILTER, _reverse, i, half),
          None if gate is None else _window(gate, _GATE, _flip1, i, half))


def forward(u: jax.Array, k_eff: jax.Array, gate: jax.Array | None,
            conv: Callable, zeros: Callable) -> jax.Array:
  """u, gate: [batch, channels, L]; k_eff: [channels, L] -> y [batch, channels, L] (u's dtype).
  conv(u, k, gate) is the length-B convolution; zeros(shape) a float32 loop carry."""
  length, half = u.shape[-1], -(-u.shape[-1] // 2)
  u, k_eff = _padded(u, half), _padded(k_eff, half)
  gate = None if gate is None else _padded(gate, half)

  def body(i, y):
    return _add_window(y, conv(*_pieces(u, k_eff, gate, i, half)), _GATE, _flip1, i, half)

  y = jax.lax.fori_loop(0, 4, body, zeros(u.shape))
  return y[..., :length].astype(u.dtype)


def backward(u: jax.Array, k_eff: jax.Array, gate: jax.Array | None, dy: jax.Array,
             conv_bwd: Callable, zeros: Callable):
  """The gradients (du, dk_eff, dgate or None) of `forward` for the cotangent dy; conv_bwd(
  (u, k, gate), dy) is the length-B convolution's."""
  length, half = u.shape[-1], -(-u.shape[-1] // 2)
  dtypes = (u.dtype, k_eff.dtype, None if gate is None else gate.dtype)
  u, k_eff, dy = _padded(u, half), _padded(k_eff, half), _padded(dy, half)
  gate = None if gate is None else _padded(gate, half)

  def body(i, grads):
    du, dk, dg = grads
    pu, pk, pg = conv_bwd(_pieces(u, k_eff, gate, i, half), _window(dy, _GATE, _flip1, i, half))
    return (_add_window(du, pu, _SIGNAL, _reverse, i, half),
            _add_window(dk, pk, _FILTER, _reverse, i, half),
            None if dg is None else _add_window(dg, pg, _GATE, _flip1, i, half))

  carry = tuple(None if x is None else zeros(x.shape) for x in (u, k_eff, gate))
  grads = jax.lax.fori_loop(0, 4, body, carry)
  return tuple(None if g is None else g[..., :length].astype(d) for g, d in zip(grads, dtypes))
