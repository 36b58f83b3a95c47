"""ConceptHash (Ng et al., CVPRW 2024): concept tokens on an adapted CLIP ViT -> K-bit codes.

Paper symbols -> names here: M -> `num_concepts`, K -> `nbit`, C -> `num_classes`,
D -> ViT width (`hidden_size`), P -> generator width (`generator_width`, the vision
sub-config's `projection_dim`), T -> text width (`text_width`), V^m -> concept tokens,
Z_m -> `hash_features`, E -> `concept_specificity`, h -> `code_head`,
t -> `center_projection`, e_c -> centers/text_embeds, o_c -> class centers,
E' -> `concept_embedding`, W -> `concept_classifier`.

Variables of `ConceptHash`:
  params:      vision_model (HF Flax CLIP names + adapt_mlp_{1,2}), concept_generator |
               concept_tokens, concept_specificity, code_head, code_norm,
               center_projection | learnable_centers, concept_embedding, concept_classifier.
  batch_stats: code_norm/{mean, var} (PyTorch BatchNorm1d running statistics).
  centers:     text_embeds (C, T) for center_type='language' | codebook (C, K) for
               'random_orthogonal'; constants, never trained.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from concepthash_jax.models.clip import CLIPVisionTransformer
from concepthash_jax.models.layer_norm import LayerNorm

CONCEPT_TOKENS = ('generated', 'learned')
CODE_NORMS = ('batchnorm', 'none')
CENTER_TYPES = ('language', 'random_orthogonal', 'learnable')
CENTER_INPUTS = ('sign', 'raw')
CENTER_PROJECTIONS = ('mlp', 'linear')
CONCEPT_EMBEDDINGS = ('separate', 'shared')
# Adapter sub-trees are the only trained leaves inside the CLIP vision tower.
ADAPTER_PREFIX = 'adapt_mlp_'


def _check_choice(kind: str, value: str, valid) -> None:
  """Raises ValueError('Unknown <kind> ...') for a string outside `valid`."""
  if value not in valid:
    raise ValueError(f'Unknown {kind} {value!r}; valid: {", ".join(valid)}.')


def _uniform_init(bound: float):
  """U(-bound, bound) initializer."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class _TorchLinear(nn.Module):
  """Linear layer initialised like torch.nn.Linear (params: kernel (in, out), bias)."""
  features: int
  use_bias: bool = True
  bias_zero: bool = False  # torch MHA zeroes its out_proj bias.

  @nn.compact
  def __call__(self, inputs):
    fan_in = inputs.shape[-1]
    # variance_scaling(1/3, fan_in, uniform) has bound 1/sqrt(fan_in): torch's
    # kaiming_uniform(a=sqrt 5).
    kernel = self.param('kernel', nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                        (fan_in, self.features))
    y = inputs @ kernel.astype(inputs.dtype)
    if self.use_bias:
      # torch.nn.Linear's bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
      bias_init = (nn.initializers.zeros if self.bias_zero
                   else _uniform_init(1.0 / math.sqrt(fan_in)))
      y = y + self.param('bias', bias_init, (self.features,)).astype(y.dtype)
    return y


class GeneratorAttention(nn.Module):
  """torch.nn.MultiheadAttention self-attention (dropout on the attention probabilities)."""
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    """(N, P) -> (N, P) self-attention over the N queries."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'generator width {width} is not divisible by generator_heads '
                       f'{self.num_heads}.')
    head_dim = width // self.num_heads
    # torch packs q|k|v into one (3P, P) matrix initialised xavier-uniform as a whole.
    in_init = _uniform_init(math.sqrt(6.0 / (width + 3 * width)))

    def proj(name):
      return nn.Dense(width, kernel_init=in_init, bias_init=nn.initializers.zeros,
                      name=name)(x).reshape(-1, self.num_heads, head_dim)
    q, k, v = proj('q_proj'), proj('k_proj'), proj('v_proj')
    logits = jnp.einsum('qhd,khd->hqk', q / math.sqrt(head_dim), k)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
    out = jnp.einsum('hqk,khd->qhd', probs, v).reshape(-1, width)
    return _TorchLinear(width, bias_zero=True, name='out_proj')(out)


class ConceptTokenGenerator(nn.Module):
  """Released concept-token generator: learnable queries -> one small block -> ViT width."""
  num_concepts: int
  width: int  # P
  out_width: int  # D
  num_heads: int = 8
  dropout: float = 0.1

  @nn.compact
  def __call__(self, *, train: bool):
    """Returns the concept tokens V (M, D)."""
    queries = self.param('queries', nn.initializers.normal(1.0),
                         (self.num_concepts, self.width))
    ln = lambda name: LayerNorm(epsilon=1e-5, name=name)  # torch LayerNorm eps.
    # Pre-norm on the residual path only, as the released `hash_attention` block.
    x = ln('norm1')(queries) + GeneratorAttention(
        self.num_heads, self.dropout, name='self_attn')(queries, train=train)
    h = nn.relu(_TorchLinear(self.width, name='ffn_in')(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    x = ln('norm2')(x) + _TorchLinear(self.width, name='ffn_out')(h)
    return _TorchLinear(self.out_width, name='to_vision')(x)


class CodeBatchNorm(nn.Module):
  """BatchNorm1d over the K code dims with PyTorch semantics.

  flax.linen.BatchNorm tracks the *biased* batch variance; torch updates the running
  variance with the unbiased one, which parity (and the released eval codes) needs.
  """
  momentum: float = 0.1  # torch convention: new = (1 - m) * old + m * batch.
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool):
    """(B, K) -> (B, K); train uses batch statistics and updates the running ones."""
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if train:
      mean = x.mean(0)
      var = jnp.square(x - mean).mean(0)
      if not self.is_initializing() and self.is_mutable_collection('batch_stats'):
        n = x.shape[0]
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
        running_var.value = (1 - m) * running_var.value + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class CenterProjection(nn.Module):
  """t: class text features e_c (C, T) -> class centers o_c (C, K).

  Also used on its own by `inference.ConceptHasher.encode_text`, so the
  center of any prompt is built exactly as the class centers are.
  """
  nbit: int
  kind: str = 'mlp'  # 'mlp' (released: Linear-ReLU-Linear) | 'linear' (paper).
  center_input: str = 'sign'  # t(sign e) (released) | t(e) 'raw' (paper).

  @nn.compact
  def __call__(self, text_embeds):
    """(C, T) -> (C, K)."""
    if self.center_input == 'sign':
      text_embeds = jnp.sign(text_embeds)
    if self.kind == 'mlp':
      hidden = nn.relu(_TorchLinear(text_embeds.shape[-1], name='fc1')(text_embeds))
      return _TorchLinear(self.nbit, name='fc2')(hidden)
    if self.kind == 'linear':
      return _TorchLinear(self.nbit, name='fc')(text_embeds)
    raise ValueError(f'Unknown center_projection {self.kind!r}; valid: '
                     f'{", ".join(CENTER_PROJECTIONS)}.')


def random_orthogonal_codebook(key, num_classes: int, nbit: int):
  """Fixed random ±1 centers, mutually orthogonal where possible (Table 2 ablation).

  With K a power of two: rows of a Sylvester Hadamard matrix in random order with
  random column signs (mutually orthogonal for C <= K), then their negations (up to
  2K classes, as CSQ); further classes, or any class for other K, get random ±1 rows.

  Returns:
    (C, K) float32 array of ±1.
  """
  perm_key, flip_key, fill_key = jax.random.split(key, 3)
  if nbit & (nbit - 1) == 0:
    hadamard = np.ones((1, 1), np.float32)
    while hadamard.shape[0] < nbit:
      hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    rows = jax.random.permutation(perm_key, jnp.asarray(hadamard))
    rows = jnp.concatenate([rows, -rows])[:num_classes]
  else:
    rows = jnp.zeros((0, nbit), jnp.float32)
  flips = jnp.where(jax.random.bernoulli(flip_key, 0.5, (nbit,)), -1.0, 1.0)
  rows = rows * flips
  extra = num_classes - rows.shape[0]
  if extra > 0:
    fill = jnp.where(jax.random.bernoulli(fill_key, 0.5, (extra, nbit)), -1.0, 1.0)
    rows = jnp.concatenate([rows, fill])
  return rows


def _l2_normalize(x, axis=-1):
  """torch.nn.functional.normalize (eps 1e-12)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class ConceptHash(nn.Module):
  """Image -> K-bit code from M concept sub-codes on an adapted, frozen CLIP ViT."""
  num_classes: int  # C
  # CLIP vision tower (from the CLIP config).
  hidden_size: int = 768  # D
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  patch_size: int = 32
  image_size: int = 224
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  adapter_dim: Optional[int] = 384  # AdaptFormer bottleneck; None = no adapters.
  remat: str = 'none'  # ViT activations kept for backward: clip.REMAT_POLICIES key.
  # Concepts and codes.
  num_concepts: int = 4  # M
  nbit: int = 64  # K, divisible by M.
  concept_tokens: str = 'generated'  # 'generated' (released) | 'learned' (paper Eq. 1).
  generator_width: int = 512  # P = vision_config.projection_dim.
  generator_heads: int = 8
  dropout: float = 0.1  # Inside the concept-token generator.
  code_norm: str = 'batchnorm'  # 'batchnorm' (released) | 'none' (paper).
  # Class centers and concept head.
  text_width: int = 512  # T
  center_type: str = 'language'  # 'language' | 'random_orthogonal' | 'learnable'.
  center_input: str = 'sign'  # 'sign' (released) | 'raw' (paper).
  center_projection: str = 'mlp'  # 'mlp' (released) | 'linear' (paper).
  concept_embedding: str = 'separate'  # 'separate' E' (released) | 'shared' E (paper).
  dtype: Any = jnp.float32  # Vision-tower compute dtype; heads run in float32.
  # The final ViT layer computes CLS and the concept tokens alone (False), the only
  # outputs the heads read: the same codes for ~6 % less compute at ViT-B/32, M=4. True
  # computes every token, as the authors' model does, for a full `last_attn` (parity).
  full_final_layer: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.nbit % self.num_concepts:
      raise ValueError(f'nbit ({self.nbit}) must be divisible by num_concepts '
                       f'({self.num_concepts}): each concept owns nbit/num_concepts bits.')
    _check_choice('concept_tokens', self.concept_tokens, CONCEPT_TOKENS)
    _check_choice('code_norm', self.code_norm, CODE_NORMS)
    _check_choice('center_type', self.center_type, CENTER_TYPES)
    _check_choice('center_input', self.center_input, CENTER_INPUTS)
    _check_choice('center_projection', self.center_projection, CENTER_PROJECTIONS)
    _check_choice('concept_embedding', self.concept_embedding, CONCEPT_EMBEDDINGS)

  def _class_centers(self):
    """o_c (C, K) for the configured center type (called inside __call__'s scope)."""
    shape = (self.num_classes, self.nbit)
    if self.center_type == 'language':
      text_embeds = self.variable('centers', 'text_embeds', jnp.zeros,
                                  (self.num_classes, self.text_width), jnp.float32).value
      return CenterProjection(self.nbit, self.center_projection,
                              self.center_input,
                              name='center_projection')(text_embeds)
    if self.center_type == 'random_orthogonal':
      return self.variable('centers', 'codebook', lambda: random_orthogonal_codebook(
          self.make_rng('params'), *shape)).value
    # 'learnable' (validated in __post_init__): released init N(0, 0.02^2).
    return self.param('learnable_centers', nn.initializers.normal(0.02), shape)

  @nn.compact
  def __call__(self, pixels, *, train: bool):
    """Encodes images into continuous codes.

    Args:
      pixels: (B, H, W, 3) CLIP-normalised images, NHWC.
      train: batch statistics + dropout (rng 'dropout') when True.

    Returns:
      (codes (B, K) continuous codes b (binary code = sign), aux dict with 'codes' (B, K),
      'logits_cont' (B, C), 'logits_bin' (B, C), 'logits_concept' (M, B, C),
      'hash_features' (B, M, D), 'last_attn' (B, H, 1 + M, T) last-layer attention of
      CLS and the concept tokens over all T = 1 + HW + M tokens ((B, H, T, T), every
      query, with full_final_layer), 'concept_attn' (B, M, HW),
      'class_centers' (C, K) class centers o_c).
    """
    batch = pixels.shape[0]
    m, d = self.num_concepts, self.hidden_size
    if self.concept_tokens == 'generated':
      tokens = ConceptTokenGenerator(m, self.generator_width, d, self.generator_heads,
                                     self.dropout, name='concept_generator')(train=train)
    else:
      tokens = self.param('concept_tokens', nn.initializers.normal(1.0), (m, d))
    tokens = jnp.broadcast_to(tokens.astype(self.dtype), (batch, m, d))

    last_hidden, vision_aux = CLIPVisionTransformer(
        hidden_size=d, intermediate_size=self.intermediate_size,
        num_layers=self.num_layers, num_heads=self.num_heads,
        patch_size=self.patch_size, image_size=self.image_size,
        layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
        adapter_dim=self.adapter_dim, remat=self.remat, dtype=self.dtype,
        name='vision_model')(
            pixels.astype(self.dtype), extra_tokens=tokens, train=train,
            final_tokens=None if self.full_final_layer else m)
    # Z_m: raw last-layer outputs at the concept tokens (no post-LN).
    hash_features = last_hidden[:, -m:].astype(jnp.float32)  # (B, M, D)

    # Sub-codes b^m = h(Z_m + E_m) with one shared bias-free h (paper Eq. 3).
    specificity = self.param('concept_specificity', nn.initializers.normal(1.0), (m, d))
    sub_codes = _TorchLinear(self.nbit // m, use_bias=False, name='code_head')(
        hash_features + specificity)  # (B, M, K/M)
    codes = sub_codes.reshape(batch, self.nbit)
    if self.code_norm == 'batchnorm':
      codes = CodeBatchNorm(name='code_norm')(codes, train=train)

    centers = self._class_centers()  # (C, K)
    codes_l2 = _l2_normalize(codes)
    logits_cont = codes_l2 @ _l2_normalize(centers).T
    # |sign o_c| = sqrt(K), so this is cos(b, sign o_c) (as the released code writes it).
    logits_bin = codes_l2 @ (jnp.sign(centers) / math.sqrt(self.nbit)).T

    if self.concept_embedding == 'separate':
      concept_embedding = self.param('concept_embedding', nn.initializers.normal(0.02), (m, d))
    else:
      concept_embedding = specificity
    classifier = self.param('concept_classifier', nn.initializers.normal(1.0),
                            (self.num_classes, d))
    logits_concept = jnp.einsum('bmd,cd->mbc', _l2_normalize(hash_features + concept_embedding),
                                _l2_normalize(classifier))

    last_attn = vision_aux['attentions'][-1]  # (B, H, 1 + M or T, T), T = 1 + HW + M
    tokens_total = last_attn.shape[-1]
    concept_attn = last_attn[:, :, -m:, 1:tokens_total - m].astype(
        jnp.float32).mean(1)  # (B, M, HW)
    aux = {
        'codes': codes,
        'logits_cont': logits_cont,
        'logits_bin': logits_bin,
        'logits_concept': logits_concept,
        'hash_features': hash_features,
        'last_attn': last_attn,
        'concept_attn': concept_attn,
        'class_centers': centers,
    }
    return codes, aux


def _is_trainable(path) -> bool:
  """Whether a params leaf at `path` (tuple of keys) is trained."""
  if path[0] != 'vision_model':
    return True  # Everything ConceptHash adds on top of CLIP trains.
  return any(str(key).startswith(ADAPTER_PREFIX) for key in path)


def trainable_mask(params):
  """Single definition of what trains: everything but the frozen CLIP vision weights.

  Trained: adapters, concept tokens / generator, E, E', h, code BN affine, t,
  W and learnable centers. Frozen: every other leaf under 'vision_model'.

  Args:
    params: the 'params' collection (arrays or ShapeDtypeStructs).

  Returns:
    Same-structure pytree of Python bools.
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: _is_trainable(k) for k in flat})


def init_variables(model: ConceptHash, clip_params, rng, class_text_embeds, sample_pixels):
  """Initialises ConceptHash and merges the pretrained CLIP vision weights in.

  Traceable (works under jax.jit / jax.eval_shape). Pretrained leaves replace the
  random ones under params/vision_model; adapters keep their fresh init.

  Args:
    model: a ConceptHash module.
    clip_params: load_clip's params ({'vision_model': ..., ...}; other entries unused).
    rng: PRNG key.
    class_text_embeds: (C, T) e_c for center_type='language', else ignored (may be None).
    sample_pixels: (B, H, W, 3) example input (values unused).

  Returns:
    {'params', 'batch_stats' (if code_norm='batchnorm'), 'centers' (if any)}.
  """
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': dropout_rng}, sample_pixels,
                         train=False)
  variables = {k: dict(v) for k, v in variables.items()}  # Shallow, mutable copies.
  ours = traverse_util.flatten_dict(variables['params']['vision_model'])
  theirs = traverse_util.flatten_dict(clip_params['vision_model'])
  unknown = sorted('/'.join(k) for k in theirs if k not in ours)
  missing = sorted('/'.join(k) for k in ours
                   if k not in theirs and not _is_trainable(('vision_model',) + k))
  if unknown or missing:
    raise ValueError(f'CLIP vision params do not match the model: unknown {unknown[:5]}, '
                     f'missing {missing[:5]}.')
  for key, value in theirs.items():
    if tuple(value.shape) != tuple(ours[key].shape):
      raise ValueError(f'CLIP param vision_model/{"/".join(key)} has shape {value.shape}, '
                       f'the model expects {ours[key].shape}.')
    ours[key] = jnp.asarray(value, ours[key].dtype)
  variables['params']['vision_model'] = traverse_util.unflatten_dict(ours)
  if model.center_type == 'language':
    if class_text_embeds is None:
      raise ValueError("center_type='language' needs class_text_embeds (C, T).")
    expected = variables['centers']['text_embeds'].shape
    if tuple(class_text_embeds.shape) != tuple(expected):
      raise ValueError(f'class_text_embeds has shape {class_text_embeds.shape}, '
                       f'expected {expected} (num_classes, text width).')
    variables['centers'] = {'text_embeds': jnp.asarray(class_text_embeds, jnp.float32)}
  return variables


def class_texts(class_names, prompt: str = 'a photo of a {}'):
  """Prompts for the language centers; underscores become spaces (docs/method.md §2.5)."""
  return [prompt.format(name.replace('_', ' ')) for name in class_names]


def class_text_embeddings(clip_config, text_params, class_names, tokenizer,
                          prompt: str = 'a photo of a {}'):
  """e_c: CLIP text-tower features of the class prompts (EOS state after final LN).

  Args:
    clip_config: transformers CLIPConfig.
    text_params: CLIP params['text_model'].
    class_names: C class names (underscores allowed).
    tokenizer: interop.hf.get_tokenizer(...) callable.
    prompt: format string with one '{}'.

  Returns:
    (C, T) float32 numpy array.
  """
  # Imported here: interop.hf imports models.clip, so a module-level import would cycle.
  from concepthash_jax.interop import hf  # pylint: disable=g-import-not-at-top
  return np.asarray(hf.text_features(clip_config, text_params,
                                     class_texts(class_names, prompt), tokenizer), np.float32)
