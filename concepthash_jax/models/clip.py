"""CLIP vision and text towers in Flax, with optional AdaptFormer adapters.

Parameter names follow transformers' Flax CLIP (`vision_model/embeddings/patch_embedding`,
`encoder/layers/<i>/self_attn/q_proj`, `pre_layrnorm`, ...), so a HF PyTorch checkpoint
loads by transposes alone (interop/hf.py). The vision tower can take extra tokens (the
ConceptHash concept tokens), appended after the position embeddings and before
`pre_layrnorm`, as the released code does.
"""
import math
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from concepthash_jax.models import dots
from concepthash_jax.models.adapter import Adapter
from concepthash_jax.models.layer_norm import LayerNorm


def activation(name: str):
  """The activation a HF CLIP config names in `hidden_act`."""
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast'):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == 'relu':
    return jax.nn.relu
  raise ValueError(f'Unknown hidden_act: {name!r}')


def torch_bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """(out_size, in_size) matrix of torch's bicubic resize along one axis.

  torch.nn.functional.interpolate(mode='bicubic', align_corners=False, scale_factor=scale):
  source x = (dst + 0.5) / scale - 0.5, Keys kernel with A = -0.75, edge taps clamped.
  """
  a = -0.75
  out = np.zeros((out_size, in_size), np.float64)
  for dst in range(out_size):
    real = (dst + 0.5) / scale - 0.5
    base = math.floor(real)
    t = real - base
    taps = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    for k, w in enumerate(taps):
      out[dst, min(max(base - 1 + k, 0), in_size - 1)] += w
  return out


def interpolate_position_embedding(pos_embed, grid_h: int, grid_w: int):
  """Resizes CLIP position embeddings to a (grid_h, grid_w) patch grid.

  As the released code (DINO recipe): CLS position kept, the square patch grid resized
  bicubically with scale (new + 0.1) / old, which fixes torch's sampling positions.

  Args:
    pos_embed: (1 + G*G, D) position embedding table.
    grid_h: patch rows of the input.
    grid_w: patch columns of the input.

  Returns:
    (1 + grid_h*grid_w, D) table; the input itself when the grid is unchanged.
  """
  grid = int(round(math.sqrt(pos_embed.shape[0] - 1)))
  if (grid_h, grid_w) == (grid, grid):
    return pos_embed
  rows = torch_bicubic_matrix(grid, grid_h, (grid_h + 0.1) / grid)
  cols = torch_bicubic_matrix(grid, grid_w, (grid_w + 0.1) / grid)
  patches = pos_embed[1:].reshape(grid, grid, -1).astype(jnp.float32)
  patches = jnp.einsum('ai,ijd,bj->abd', jnp.asarray(rows, jnp.float32), patches,
                       jnp.asarray(cols, jnp.float32))
  patches = patches.reshape(grid_h * grid_w, -1).astype(pos_embed.dtype)
  return jnp.concatenate([pos_embed[:1], patches], axis=0)


def select_tokens(x, tokens: Optional[int], axis: int = 1):
  """x itself (tokens None), else its first (CLS) and last `tokens` entries along axis."""
  if tokens is None:
    return x
  size = x.shape[axis]
  # Two static slices, not a gather: their gradient is a pad, where a gather's is
  # a scatter-add, which XLA:CPU runs as a loop.
  return jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                          jax.lax.slice_in_dim(x, size - tokens, size, axis=axis)],
                         axis=axis)


class CLIPAttention(nn.Module):
  """Multi-head self-attention; returns (output, softmax probabilities)."""
  num_heads: int
  dropout: float = 0.0  # CLIP's attention_dropout (0 in every released checkpoint).
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, tokens: Optional[int] = None):
    """x (B, T, D), mask bool broadcastable to (B, H, T, T) (True = attend).

    With `tokens`, only CLS and the last `tokens` positions query (select_tokens): the
    output is (B, 1 + tokens, D) and the probabilities (B, H, 1 + tokens, T); every
    position is still a key and a value.
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name,
                                  dot_general=dots.dot_general_f32_accumulate)
    split = lambda y: y.reshape(y.shape[:2] + (self.num_heads, head_dim))
    if mask is not None and mask.shape[-2] > 1:
      mask = select_tokens(mask, tokens, axis=mask.ndim - 2)
    q = split(dense('q_proj')(select_tokens(x, tokens))) * head_dim**-0.5
    k = split(dense('k_proj')(x))
    v = split(dense('v_proj')(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # (B, H, T, T), float32 for stability.
    dropped = nn.Dropout(self.dropout, deterministic=not train)(probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', dropped.astype(self.dtype), v,
                     preferred_element_type=jnp.float32).astype(self.dtype)
    out = dense('out_proj')(out.reshape(out.shape[:2] + (width,)))
    return out, probs


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""
  intermediate_size: int
  hidden_act: str = 'quick_gelu'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x (B, T, D) -> (B, T, D)."""
    y = nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1',
                 dot_general=dots.dot_general_f32_accumulate)(x)
    y = activation(self.hidden_act)(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2',
                    dot_general=dots.dot_general_f32_accumulate)(y)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer block; with adapter_dim, AdaptFormer adapters beside MSA and MLP.

  a = MSA(LN1(z)); z = z + a + adapt_mlp_1(a); m = MLP(LN2(z)); z = z + m + adapt_mlp_2(m).
  """
  intermediate_size: int
  num_heads: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  attention_dropout: float = 0.0
  adapter_dim: Optional[int] = None  # None = plain CLIP layer.
  adapter_dropout: float = 0.0  # Dropout inside the adapters (released recipe: 0).
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False, tokens: Optional[int] = None):
    """x (B, T, D) -> ((B, T, D), attention probabilities (B, H, T, T)).

    With `tokens`, the layer computes outputs for CLS and the last `tokens` positions
    only (CLIPAttention): ((B, 1 + tokens, D), (B, H, 1 + tokens, T)).
    """
    def adapter(y, name):
      if self.adapter_dim is None:
        return 0.0
      return Adapter(self.adapter_dim, self.adapter_dropout, dtype=self.dtype,
                     name=name)(y, train=train)

    ln = lambda name: LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    attn, probs = CLIPAttention(self.num_heads, self.attention_dropout, dtype=self.dtype,
                                name='self_attn')(ln('layer_norm1')(x), mask, train=train,
                                                  tokens=tokens)
    x = select_tokens(x, tokens) + attn + adapter(attn, 'adapt_mlp_1')
    mlp = CLIPMLP(self.intermediate_size, self.hidden_act, dtype=self.dtype,
                  name='mlp')(ln('layer_norm2')(x))
    x = x + mlp + adapter(mlp, 'adapt_mlp_2')
    return x, probs


# What each layer keeps for the backward pass (`remat`); the rest is recomputed there.
# 'dots' keeps the outputs of the weight matmuls and recomputes the cheap rest (layer
# norms, activation, softmax, attention matmuls), which are memory-bound and cheap next
# to the weight matmuls: less memory at no cost in speed (BENCHMARKS.md, "Train step").
REMAT_POLICIES = {
    'none': None,  # Keep every activation XLA wants.
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(dots.BF16_MATMUL_NAME)),
    'full': jax.checkpoint_policies.nothing_saveable,  # Keep only layer inputs.
}


class CLIPLayerCollection(nn.Module):
  """The stack of encoder layers, named '0'..'L-1' as in HF Flax CLIP."""
  num_layers: int
  layer_kwargs: dict  # CLIPEncoderLayer fields.
  remat: str = 'none'  # A REMAT_POLICIES key.

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False,
               final_tokens: Optional[int] = None):
    """x (B, T, D) -> (last (B, T, D), hidden_states tuple(L+1), attentions tuple(L)).

    With `final_tokens`, the final layer computes CLS and the last `final_tokens`
    positions alone (CLIPEncoderLayer `tokens`), so `last` is (B, 1 + final_tokens, D).
    """
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat {self.remat!r}; valid: {list(REMAT_POLICIES)}')
    layer_cls = CLIPEncoderLayer
    if self.remat != 'none':
      layer_cls = nn.remat(CLIPEncoderLayer, static_argnums=(3, 4),
                           policy=REMAT_POLICIES[self.remat])
    hidden_states, attentions = [x], []
    for i in range(self.num_layers):
      tokens = final_tokens if i == self.num_layers - 1 else None
      x, probs = layer_cls(**self.layer_kwargs, name=str(i))(x, mask, train, tokens)
      hidden_states.append(x)
      attentions.append(probs)
    return x, tuple(hidden_states), tuple(attentions)


class CLIPEncoder(nn.Module):
  """HF's `encoder` scope holding the `layers` collection."""
  num_layers: int
  layer_kwargs: dict
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False,
               final_tokens: Optional[int] = None):
    """Same as CLIPLayerCollection.__call__."""
    return CLIPLayerCollection(self.num_layers, self.layer_kwargs, self.remat,
                               name='layers')(x, mask, train=train,
                                              final_tokens=final_tokens)


class CLIPVisionEmbeddings(nn.Module):
  """Patch conv (no bias) + class token + (interpolated) position embeddings."""
  hidden_size: int
  patch_size: int
  image_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    """pixel_values (B, H, W, 3) -> (B, 1 + HW, D) with HW = (H/p)(W/p)."""
    batch = pixel_values.shape[0]
    width = self.hidden_size
    class_embedding = self.param('class_embedding', nn.initializers.normal(width**-0.5),
                                 (width,), jnp.float32)
    patches = nn.Conv(width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                      padding='VALID', use_bias=False, dtype=self.dtype,
                      name='patch_embedding')(pixel_values.astype(self.dtype))
    grid_h, grid_w = patches.shape[1:3]
    patches = patches.reshape(batch, grid_h * grid_w, width)
    num_positions = (self.image_size // self.patch_size)**2 + 1
    pos_table = nn.Embed(num_positions, width, embedding_init=nn.initializers.normal(0.02),
                         name='position_embedding')(jnp.arange(num_positions))
    pos_table = interpolate_position_embedding(pos_table, grid_h, grid_w)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, width))
    tokens = jnp.concatenate([cls, patches], axis=1)
    return tokens + pos_table.astype(self.dtype)[None]


class CLIPVisionTransformer(nn.Module):
  """CLIP ViT: embeddings (+ extra tokens) -> pre_layrnorm -> encoder; pooler = post-LN CLS."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  image_size: int
  layer_norm_eps: float = 1e-5
  adapter_dim: Optional[int] = None  # AdaptFormer bottleneck; None = plain CLIP.
  dtype: jnp.dtype = jnp.float32  # Compute dtype; params stay float32.
  hidden_act: str = 'quick_gelu'
  attention_dropout: float = 0.0
  adapter_dropout: float = 0.0
  remat: str = 'none'  # What each layer keeps for backward: a REMAT_POLICIES key.

  @nn.compact
  def __call__(self, pixel_values, extra_tokens=None, *, train: bool = False,
               final_tokens: Optional[int] = None):
    """Encodes images, optionally with extra (concept) tokens at the end.

    Args:
      pixel_values: (B, H, W, 3) CLIP-normalised pixels, NHWC; H, W multiples of patch_size.
      extra_tokens: optional (B, M, D) tokens appended after the position embeddings.
      train: enables dropout (attention / adapter dropout; 0 by default).
      final_tokens: None, or n: the final layer computes CLS and the last n positions
        alone, the only outputs a caller that reads the concept tokens and the pooler
        needs (their values are the same; the layer's queries, MLP and adapters skip the
        other positions, ~6 % of a ViT-B/32 forward with 4 concept tokens).

    Returns:
      last_hidden_state (B, 1 + HW + M, D) (no post-LN; (B, 1 + n, D) with final_tokens)
      and aux with 'pooler_output' (B, D) post-LN CLS, 'hidden_states' tuple(L+1) of
      (B, T, D) (0 = after pre_layrnorm; the last as last_hidden_state) and 'attentions'
      tuple(L) of (B, H, T, T) softmax probabilities (the last (B, H, 1 + n, T) with
      final_tokens).
    """
    x = CLIPVisionEmbeddings(self.hidden_size, self.patch_size, self.image_size,
                             dtype=self.dtype, name='embeddings')(pixel_values)
    if extra_tokens is not None:
      x = jnp.concatenate([x, extra_tokens.astype(self.dtype)], axis=1)
    x = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='pre_layrnorm')(x)
    x, hidden_states, attentions = CLIPEncoder(
        self.num_layers, _layer_kwargs(self), self.remat, name='encoder')(
            x, train=train, final_tokens=final_tokens)
    pooled = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                       name='post_layernorm')(x[:, 0])
    return x, {'pooler_output': pooled, 'hidden_states': hidden_states,
               'attentions': attentions}


def _layer_kwargs(tower) -> dict:
  """CLIPEncoderLayer fields shared by both towers."""
  return dict(intermediate_size=tower.intermediate_size, num_heads=tower.num_heads,
              layer_norm_eps=tower.layer_norm_eps, hidden_act=tower.hidden_act,
              attention_dropout=tower.attention_dropout,
              adapter_dim=getattr(tower, 'adapter_dim', None),
              adapter_dropout=getattr(tower, 'adapter_dropout', 0.0), dtype=tower.dtype)


class CLIPTextEmbeddings(nn.Module):
  """Token + absolute position embeddings."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int

  @nn.compact
  def __call__(self, input_ids):
    """input_ids (B, L) -> (B, L, T) float32."""
    init = nn.initializers.normal(0.02)
    tokens = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init,
                      name='token_embedding')(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, embedding_init=init,
                         name='position_embedding')(jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


def eos_positions(input_ids, eos_token_id: int):
  """Index of the pooled (EOS) token per row (docs/method.md §2.5).

  Legacy CLIP configs (eos_token_id == 2, e.g. OpenAI's) pool at the highest token id;
  otherwise at the first occurrence of eos_token_id.

  Args:
    input_ids: (B, L) int token ids.
    eos_token_id: the text config's eos_token_id.

  Returns:
    (B,) int32 positions.
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


class CLIPTextTransformer(nn.Module):
  """CLIP text tower: causal + padding masked encoder, final LN, EOS pooling."""
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  vocab_size: int
  max_position_embeddings: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  attention_dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: str = 'none'  # A REMAT_POLICIES key.

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, *, eos_token_id: int,
               train: bool = False):
    """Encodes token ids.

    Args:
      input_ids: (B, L) int ids, L <= max_position_embeddings.
      attention_mask: optional (B, L), 1 = real token, 0 = padding.
      eos_token_id: the config's eos_token_id (selects the pooling rule, see eos_positions).
      train: enables attention dropout.

    Returns:
      last_hidden_state (B, L, T) after final_layer_norm, and aux with 'pooler_output' (B, T)
      (state at the EOS position) and 'hidden_states' / 'attentions' tuples.
    """
    batch, length = input_ids.shape
    if length > self.max_position_embeddings:
      raise ValueError(f'Text length {length} > max_position_embeddings '
                       f'{self.max_position_embeddings}')
    x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                           name='embeddings')(input_ids).astype(self.dtype)

    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # (1, 1, L, L) causal.
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] > 0)
    x, hidden_states, attentions = CLIPEncoder(
        self.num_layers, _layer_kwargs(self), self.remat, name='encoder')(x, mask, train=train)
    x = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='final_layer_norm')(x)
    pooled = x[jnp.arange(batch), eos_positions(input_ids, eos_token_id)]
    return x, {'pooler_output': pooled, 'hidden_states': hidden_states,
               'attentions': attentions}
