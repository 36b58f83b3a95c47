"""AdaptFormer adapter (ConceptHash paper Eq. 10-11, released `models/layers/adapter.py`).

adapter(z) = s * W_up GELU(W_down LN(z)), added in parallel to a frozen sub-layer's
output. W_up starts at zero, so a freshly adapted ViT computes exactly the frozen one.
"""
import jax.numpy as jnp
import flax.linen as nn

from concepthash_jax.models.dots import dot_general_f32_accumulate
from concepthash_jax.models.layer_norm import LayerNorm

# torch.nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance scaling 1/3, fan_in, uniform.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


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
    y = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
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
