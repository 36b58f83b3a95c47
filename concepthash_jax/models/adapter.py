"""AdaptFormer adapter (ConceptHash paper Eq. 10-11, released `models/layers/adapter.py`).

adapter(z) = s * W_up GELU(W_down LN(z)), added in parallel to a frozen sub-layer's
output. W_up starts at zero, so a freshly adapted ViT computes exactly the frozen one.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn

# torch.nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance scaling 1/3, fan_in, uniform.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def dot_general_f32_accumulate(lhs, rhs, dimension_numbers, precision=None,
                               preferred_element_type=None, **kwargs):
  """lax.dot_general that sums in float32 and returns the inputs' dtype.

  For float32 inputs this is plain dot_general. For bfloat16 it asks XLA for a
  float32 result (the CPU's bf16 matrix units - AVX512_BF16, AMX - accumulate in
  float32; a bf16-out dot there falls back to a slower path) and rounds once at the
  end. nn.Dense takes it as `dot_general=`.
  """
  del preferred_element_type  # Always float32 inside, the inputs' dtype outside.
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                            preferred_element_type=jnp.float32, **kwargs)
  return out.astype(jnp.result_type(lhs, rhs))


class Adapter(nn.Module):
  """Bottleneck adapter: LayerNorm -> down -> exact GELU -> dropout -> up -> * scale."""
  bottleneck: int  # D_down (384 in the released recipe).
  dropout: float = 0.0  # Released recipe: 0.
  layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default.
  dtype: jnp.dtype = jnp.float32  # Compute dtype; params stay float32.

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    """Adapter output, same shape as x (B, T, D)."""
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                     name='adapter_layer_norm')(x)
    y = nn.Dense(self.bottleneck, dtype=self.dtype, kernel_init=torch_linear_kernel_init,
                 bias_init=nn.initializers.zeros, name='down_proj',
                 dot_general=dot_general_f32_accumulate)(y)
    y = nn.gelu(y, approximate=False)  # torch.nn.GELU() is the erf form.
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros, name='up_proj',
                 dot_general=dot_general_f32_accumulate)(y)
    scale = self.param('scale', nn.initializers.ones, (1,), jnp.float32)
    return y * scale.astype(y.dtype)
