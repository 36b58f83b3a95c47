"""Matrix products of the vision tower in its compute dtype, summed in float32.

In float32 these are plain `lax.dot_general`. In bfloat16 they ask XLA for a float32
result and round once at the end: CPUs with bf16 matrix instructions (AVX512_BF16,
AMX) accumulate in float32 natively, and XLA:CPU sends only such bf16-in/f32-out
products to those kernels; a bf16-out product takes a path slower than float32.
The backward pass of a weight matmul is written out (`_bf16_matmul`) so its two
products are bf16-in/f32-out too; left to autodiff, the float32 cotangent would turn
them into float32 products.
"""
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# checkpoint_name of every bf16 weight-matmul output: the 'dots' remat policy keeps it,
# as it keeps a plain dot_general's (clip.REMAT_POLICIES).
BF16_MATMUL_NAME = 'bf16_matmul'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(x, w, out_dtype):
  """x (..., K) @ w (K, N), bf16 in, float32 sum, out_dtype out."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(out_dtype)


def _bf16_matmul_fwd(x, w, out_dtype):
  return _bf16_matmul(x, w, out_dtype), (x, w)


def _bf16_matmul_bwd(out_dtype, residuals, g):
  del out_dtype
  x, w = residuals
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(x.dtype)
  rows = tuple(range(x.ndim - 1))
  dw = jax.lax.dot_general(x, g, ((rows, rows), ((), ())),
                           preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def dot_general_f32_accumulate(lhs, rhs, dimension_numbers, precision=None,
                               preferred_element_type=None, **kwargs):
  """lax.dot_general summing in float32 and returning the inputs' dtype.

  nn.Dense takes it as `dot_general=`. float32 inputs: plain dot_general.
  """
  del preferred_element_type  # Always float32 inside, the inputs' dtype outside.
  out_dtype = jnp.result_type(lhs, rhs)
  if out_dtype == jnp.float32:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, **kwargs)
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and rhs.ndim == 2 and not (lb or rb):
    return checkpoint_name(_bf16_matmul(lhs, rhs, out_dtype), BF16_MATMUL_NAME)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                             preferred_element_type=jnp.float32, **kwargs).astype(out_dtype)
