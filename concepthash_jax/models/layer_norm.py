"""LayerNorm with a hand-written gradient whose sums XLA:CPU runs as matrix products.

Same parameters ('scale', 'bias'), same math and the same float32 statistics as
flax.linen.LayerNorm (mean and mean of squares, variance clamped at 0), so checkpoints
load and codes match it to float rounding. Why not flax's: XLA:CPU rewrites every
reduction longer than 32 elements into a reduce-window followed by a reduce (its
TreeReductionRewriter, for accuracy), and the reduce-window cannot fuse with what feeds
it, so each of the layer norm's row sums (two forward, two in the gradient) and its
parameter gradients (sums over all rows) becomes a pass of its own over the (B, T, D)
activation. Written as products with a ones vector, the same sums go to the CPU's
matrix-vector kernel, and the gradient is written out by hand so autodiff does not put
the reductions back. The rewrite also skips reductions with several outputs, but XLA:CPU
runs those slower than the products. Other backends get plain sums: their compilers fuse
reductions as they are.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def _plain_sums() -> bool:
  """Whether to leave the sums to the compiler: off XLA:CPU (read when tracing)."""
  return jax.default_backend() != 'cpu'


def _sums_over_last_axis(a):
  """Sum of `a` over its last axis: (..., D) -> (...)."""
  if _plain_sums():
    return a.sum(-1)
  return a @ jnp.ones((a.shape[-1],), a.dtype)


def _sums_over_rows(a):
  """Sum of `a` over every axis but the last: (..., D) -> (D,)."""
  if _plain_sums():
    return a.sum(tuple(range(a.ndim - 1)))
  rows = a.reshape(-1, a.shape[-1])
  return jnp.ones((rows.shape[0],), a.dtype) @ rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, float32."""
  return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
  width = x.shape[-1]
  total, total_sq = _sums_over_last_axis(x), _sums_over_last_axis(x * x)
  mean = (total / width)[..., None]
  var = jnp.maximum(0.0, (total_sq / width)[..., None] - mean * mean)
  inv_std = jax.lax.rsqrt(var + epsilon)
  normed = (x - mean) * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm_backward(epsilon, residuals, grad):
  del epsilon
  normed, inv_std, scale = residuals
  width = normed.shape[-1]
  grad_normed = grad * scale
  total = _sums_over_last_axis(grad_normed)
  total_dot = _sums_over_last_axis(grad_normed * normed)
  grad_x = inv_std * (grad_normed - (total / width)[..., None]
                      - normed * (total_dot / width)[..., None])
  return grad_x, _sums_over_rows(grad * normed), _sums_over_rows(grad)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
  """Drop-in for flax.linen.LayerNorm(epsilon, dtype): statistics in float32."""
  epsilon: float = 1e-6
  dtype: Optional[Any] = None  # Output dtype; None: x's dtype promoted with float32.
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Normalises x (..., D) over its last axis."""
    width = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (width,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (width,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y = layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32),
                   bias.astype(jnp.float32), self.epsilon)
    return y.astype(dtype)
