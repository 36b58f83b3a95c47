"""Tests for models/clip.py, adapter.py and layer_norm.py: HF parity, interpolation, adapters."""
import math
import os

import numpy as np
import jax
import jax.numpy as jnp
from flax import traverse_util
import flax.linen as nn
import pytest

from concepthash_jax.interop import hf
from concepthash_jax.configs import base
from concepthash_jax.models import clip
from concepthash_jax.models import dots
from concepthash_jax.models import layer_norm
from concepthash_jax.models.adapter import Adapter

DATA = os.path.join(os.path.dirname(__file__), 'data')
TOL = 1e-4


@pytest.fixture(scope='module')
def tiny():
  """(config, params) of tests/data/tiny_clip."""
  return hf.load_clip(os.path.join(DATA, 'tiny_clip'))


@pytest.fixture(scope='module')
def golden():
  """transformers' PyTorch CLIP outputs on the tiny checkpoint."""
  return dict(np.load(os.path.join(DATA, 'hf_clip_tiny.npz')))


@pytest.fixture(scope='module')
def ours(tiny, golden):
  """Our outputs under the golden's keys."""
  config, params = tiny
  return hf.hf_golden_outputs(config, params, golden['pixel_values'], golden['input_ids'],
                              golden['attention_mask'])


def test_golden_has_the_keys_we_write(golden, ours):
  golden_keys = {k for k in golden if k.startswith(('vision/', 'text/'))}
  assert golden_keys == set(ours)


def test_vision_tower_matches_hf_golden(golden, ours):
  keys = [k for k in golden if k.startswith('vision/')]
  assert len(keys) == 3 + 2 + 3  # outputs, attentions/0..1, hidden_states/0..2.
  for key in keys:
    assert ours[key].shape == golden[key].shape, key
    np.testing.assert_allclose(ours[key], golden[key], atol=TOL, rtol=0, err_msg=key)


def test_text_hidden_states_match_hf_golden(golden, ours):
  np.testing.assert_allclose(ours['text/last_hidden_state'], golden['text/last_hidden_state'],
                             atol=TOL, rtol=0)


def test_text_pooler_and_embeds_match_hf_golden(tiny, golden, ours):
  # tiny_clip has eos_token_id == 2: the legacy rule pools at the highest token id.
  assert tiny[0].text_config.eos_token_id == 2
  for key in ('text/pooler_output', 'text/text_embeds'):
    np.testing.assert_allclose(ours[key], golden[key], atol=TOL, rtol=0, err_msg=key)


def test_eos_positions_both_conventions():
  ids = jnp.array([[5, 9, 3, 7, 0], [4, 2, 8, 2, 1]])
  np.testing.assert_array_equal(clip.eos_positions(ids, 2), [1, 2])  # Legacy: argmax id.
  np.testing.assert_array_equal(clip.eos_positions(ids, 7), [3, 0])  # First occurrence.
  np.testing.assert_array_equal(clip.eos_positions(jnp.array([[1, 7, 7]]), 7), [1])


def test_text_tower_pools_at_first_eos_for_new_style_config(tiny, golden):
  config, params = tiny
  module = hf.text_module_from_config(config.text_config)
  ids = golden['input_ids']
  last, aux = module.apply({'params': params['text_model']}, ids, golden['attention_mask'],
                           eos_token_id=37)
  first37 = [list(row).index(37) if 37 in row else 0 for row in ids]
  assert any(p > 0 for p in first37)
  np.testing.assert_array_equal(aux['pooler_output'], last[np.arange(len(ids)), first37])


def torch_bicubic_reference(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Per-pixel port of torch's upsample_bicubic2d (align_corners=False, scale_factor)."""
  a = -0.75
  def cubic(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0
  g = grid.shape[0]
  sh, sw = (out_h + 0.1) / g, (out_w + 0.1) / g
  out = np.zeros((out_h, out_w, grid.shape[-1]))
  for oy in range(out_h):
    ry = (oy + 0.5) / sh - 0.5
    for ox in range(out_w):
      rx = (ox + 0.5) / sw - 0.5
      for iy in range(math.floor(ry) - 1, math.floor(ry) + 3):
        for ix in range(math.floor(rx) - 1, math.floor(rx) + 3):
          w = cubic(ry - iy) * cubic(rx - ix)
          out[oy, ox] += w * grid[min(max(iy, 0), g - 1), min(max(ix, 0), g - 1)]
  return out


def test_position_interpolation_identity_at_config_size():
  table = jax.random.normal(jax.random.PRNGKey(0), (1 + 16, 6))
  assert clip.interpolate_position_embedding(table, 4, 4) is table


@pytest.mark.parametrize('out_h,out_w', [(6, 6), (3, 5)])
def test_position_interpolation_matches_torch_bicubic_reference(out_h, out_w):
  table = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1 + 16, 5)))
  got = np.asarray(clip.interpolate_position_embedding(jnp.asarray(table), out_h, out_w))
  assert got.shape == (1 + out_h * out_w, 5)
  np.testing.assert_array_equal(got[0], table[0])  # CLS position kept.
  want = torch_bicubic_reference(table[1:].reshape(4, 4, 5), out_h, out_w)
  np.testing.assert_allclose(got[1:].reshape(out_h, out_w, 5), want, atol=1e-5)


def test_position_interpolation_preserves_constant_grid():
  # Bicubic taps sum to one (edge taps clamped), so a constant grid stays constant.
  table = jnp.concatenate([jnp.zeros((1, 2)), jnp.full((49, 2), 3.5)])
  got = np.asarray(clip.interpolate_position_embedding(table, 10, 4))
  np.testing.assert_allclose(got[1:], 3.5, atol=1e-5)


def test_vision_tower_runs_at_other_image_size(tiny):
  config, params = tiny
  module = hf.vision_module_from_config(config.vision_config)
  pixels = jax.random.normal(jax.random.PRNGKey(0), (2, 48, 40, 3))
  last, aux = module.apply({'params': params['vision_model']}, pixels)
  assert last.shape == (2, 1 + 6 * 5, 48)
  assert aux['attentions'][0].shape == (2, 4, 31, 31)
  assert np.isfinite(np.asarray(last)).all()


def _adapted(params_plain, config, adapter_dim, rng=0):
  """Adapter-enabled vision params: fresh adapters, CLIP weights from params_plain."""
  module = hf.vision_module_from_config(config.vision_config, adapter_dim=adapter_dim)
  pixels = jnp.zeros((1, 32, 32, 3))
  init = jax.jit(module.init)  # Eager init runs op by op, slow even for this tiny tower.
  fresh = traverse_util.flatten_dict(init(jax.random.PRNGKey(rng), pixels)['params'])
  plain = traverse_util.flatten_dict(params_plain)
  assert set(plain) <= set(fresh)
  fresh.update(plain)
  return module, traverse_util.unflatten_dict(fresh)


def test_adapter_param_names_and_init(tiny):
  config, params = tiny
  _, adapted = _adapted(params['vision_model'], config, adapter_dim=8)
  layer = adapted['encoder']['layers']['1']
  for name in ('adapt_mlp_1', 'adapt_mlp_2'):
    adapter = layer[name]
    assert set(adapter) == {'adapter_layer_norm', 'down_proj', 'up_proj', 'scale'}
    assert adapter['down_proj']['kernel'].shape == (48, 8)
    assert adapter['scale'].shape == (1,) and float(adapter['scale'][0]) == 1.0
    np.testing.assert_array_equal(adapter['down_proj']['bias'], 0)
    np.testing.assert_array_equal(adapter['up_proj']['kernel'], 0)
    np.testing.assert_array_equal(adapter['up_proj']['bias'], 0)
    down = np.asarray(adapter['down_proj']['kernel'])
    assert 0 < np.abs(down).max() <= 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) bound.


def test_zero_init_adapters_are_identity_and_nonzero_ones_are_not(tiny, golden):
  config, params = tiny
  plain = hf.vision_module_from_config(config.vision_config)
  module, adapted = _adapted(params['vision_model'], config, adapter_dim=8)
  pixels = jnp.asarray(golden['pixel_values'].transpose(0, 2, 3, 1))
  tokens = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 48))
  want, _ = plain.apply({'params': params['vision_model']}, pixels, tokens)
  got, _ = module.apply({'params': adapted}, pixels, tokens)
  np.testing.assert_allclose(got, want, atol=1e-6)
  up = adapted['encoder']['layers']['0']['adapt_mlp_2']['up_proj']
  up['bias'] = jnp.full_like(up['bias'], 0.1)
  moved, _ = module.apply({'params': adapted}, pixels, tokens)
  assert np.abs(np.asarray(moved - want)).max() > 1e-2


def test_adapter_matches_numpy_formula():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 6))
  adapter = Adapter(4)
  variables = adapter.init(jax.random.PRNGKey(1), x)
  p = jax.tree.map(np.asarray, variables['params'])
  p['up_proj']['kernel'] = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 6)))
  p['scale'] = np.array([0.5], np.float32)
  xn = np.asarray(x, np.float64)
  z = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
  z = z * p['adapter_layer_norm']['scale'] + p['adapter_layer_norm']['bias']
  h = z @ p['down_proj']['kernel'] + p['down_proj']['bias']
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  want = 0.5 * (h @ p['up_proj']['kernel'] + p['up_proj']['bias'])
  np.testing.assert_allclose(adapter.apply({'params': p}, x), want, atol=1e-5)


def test_extra_tokens_appended_after_positions_before_pre_layrnorm(tiny, golden):
  config, params = tiny
  module = hf.vision_module_from_config(config.vision_config)
  pixels = jnp.asarray(golden['pixel_values'].transpose(0, 2, 3, 1))
  tokens = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 48))
  _, aux = module.apply({'params': params['vision_model']}, pixels, tokens)
  ln = params['vision_model']['pre_layrnorm']
  t = np.asarray(tokens, np.float64)
  want = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
  want = want * ln['scale'] + ln['bias']
  np.testing.assert_allclose(aux['hidden_states'][0][:, -2:], want, atol=1e-5)
  np.testing.assert_allclose(aux['hidden_states'][0][:, :-2],
                             golden['vision/hidden_states/0'], atol=TOL)


def test_final_tokens_compute_cls_and_the_last_tokens_exactly(tiny, golden):
  # ConceptHash reads only the concept tokens of the final layer; computing that layer
  # for CLS and them alone must not change their values, the pooler or the attentions.
  config, params_plain = tiny
  module, params = _adapted(params_plain['vision_model'], config, adapter_dim=8, rng=5)
  params = jax.tree.map(lambda p: p + 0.01, params)  # Non-zero adapters (up_proj is 0).
  pixels = jnp.asarray(golden['pixel_values'].transpose(0, 2, 3, 1))
  tokens = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 48))
  apply = jax.jit(lambda p, n: module.apply({'params': p}, pixels, tokens, final_tokens=n),
                  static_argnums=1)
  last, aux = apply(params, None)
  kept = np.r_[0, last.shape[1] - 2:last.shape[1]]
  last_n, aux_n = apply(params, 2)
  assert last_n.shape == (3, 3, 48)
  np.testing.assert_allclose(last_n, last[:, kept], atol=1e-5)
  np.testing.assert_allclose(aux_n['pooler_output'], aux['pooler_output'], atol=1e-5)
  np.testing.assert_allclose(aux_n['attentions'][-1], aux['attentions'][-1][:, :, kept],
                             atol=1e-6)
  for full, pruned in zip(aux['hidden_states'][:-1], aux_n['hidden_states'][:-1]):
    np.testing.assert_array_equal(full, pruned)  # Earlier layers untouched.
  # Gradients and remat: test_concepthash, on the whole model.


def test_bfloat16_compute_keeps_float32_params(tiny, golden):
  config, params = tiny
  module = hf.vision_module_from_config(config.vision_config, adapter_dim=8,
                                        dtype=jnp.bfloat16)
  pixels = jnp.asarray(golden['pixel_values'].transpose(0, 2, 3, 1))
  variables = module.init(jax.random.PRNGKey(0), pixels)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  _, adapted = _adapted(params['vision_model'], config, adapter_dim=8)
  last, aux = module.apply({'params': adapted}, pixels)
  assert last.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(last, np.float32),
                             golden['vision/last_hidden_state'], atol=0.15)


def test_vit_b32_shapes_from_config_without_download():
  # configs/base.py's random CLIP is ViT-B/32 (the released backbone).
  config = hf.random_clip_config(base.get_config().model.random_clip)
  shapes = jax.eval_shape(lambda: hf.init_clip_params(config, jax.random.PRNGKey(0)))
  v, t = shapes['vision_model'], shapes['text_model']
  assert v['embeddings']['patch_embedding']['kernel'].shape == (32, 32, 3, 768)
  assert v['embeddings']['position_embedding']['embedding'].shape == (50, 768)
  assert v['embeddings']['class_embedding'].shape == (768,)
  assert len(v['encoder']['layers']) == 12
  assert v['encoder']['layers']['11']['mlp']['fc1']['kernel'].shape == (768, 3072)
  assert t['embeddings']['token_embedding']['embedding'].shape == (49408, 512)
  assert t['encoder']['layers']['0']['self_attn']['q_proj']['kernel'].shape == (512, 512)
  assert shapes['visual_projection']['kernel'].shape == (768, 512)
  assert shapes['text_projection']['kernel'].shape == (512, 512)
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  assert n_params == 151_277_313  # openai/clip-vit-base-patch32 (without position_ids).

  module = hf.vision_module_from_config(config.vision_config, adapter_dim=384)
  last, aux = jax.eval_shape(
      lambda: module.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 224, 224, 3)),
                                      jnp.zeros((2, 4, 768)))[0])
  assert last.shape == (2, 50 + 4, 768)
  assert aux['pooler_output'].shape == (2, 768)
  assert len(aux['hidden_states']) == 13 and len(aux['attentions']) == 12
  assert aux['attentions'][-1].shape == (2, 12, 54, 54)


def test_dense_dots_sum_in_float32_and_return_the_compute_dtype():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 768)).astype(np.float32)
  w = rng.normal(size=(768, 5)).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  # float32: the plain dot, bit for bit.
  np.testing.assert_array_equal(dots.dot_general_f32_accumulate(x, w, dims),
                                jax.lax.dot_general(x, w, dims))
  # bfloat16: XLA is asked for a float32 result, rounded once to bfloat16 at the end.
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda a, b: dots.dot_general_f32_accumulate(a, b, dims))(xb, wb))
  assert 'preferred_element_type=float32' in jaxpr
  out = dots.dot_general_f32_accumulate(xb, wb, dims)
  assert out.dtype == jnp.bfloat16
  exact = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
  np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=2 ** -8, atol=1e-3)


def test_bf16_weight_matmul_backward_multiplies_in_bf16_and_sums_in_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(64, 8)), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  loss = lambda x, w: jnp.sum(dots.dot_general_f32_accumulate(x, w, dims).astype(jnp.float32) ** 2)
  dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  g = 2 * np.asarray(jnp.asarray(x64 @ w64, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(dx, np.float64), g @ w64.T, rtol=2 ** -6, atol=0.5)
  np.testing.assert_allclose(np.asarray(dw, np.float64),
                             np.einsum('btk,btn->kn', x64, g), rtol=2 ** -6, atol=0.5)
  # Every product in the backward pass takes bf16 operands and returns float32.
  def products(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        yield ([v.aval.dtype for v in eqn.invars], eqn.params['preferred_element_type'])
      for value in eqn.params.values():  # Sub-jaxprs: closed (.jaxpr) or open.
        sub = getattr(value, 'jaxpr', value)
        if hasattr(sub, 'eqns'):
          yield from products(sub)
  found = list(products(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr))
  assert len(found) == 3  # Forward, dx, dw.
  assert all(ins == [jnp.bfloat16] * 2 and out == jnp.float32 for ins, out in found), found


def _both_layer_norms(x, dtype=None):
  """(ours, flax's) LayerNorm with the same random scale and bias, and those variables."""
  ours, theirs = layer_norm.LayerNorm(1e-5, dtype=dtype), nn.LayerNorm(1e-5, dtype=dtype)
  rng = np.random.default_rng(3)
  variables = {'params': {'scale': jnp.asarray(rng.normal(size=x.shape[-1]), jnp.float32),
                          'bias': jnp.asarray(rng.normal(size=x.shape[-1]), jnp.float32)}}
  shapes = lambda m: jax.tree.map(jnp.shape, m.init(jax.random.PRNGKey(0), x))
  assert shapes(ours) == shapes(theirs)  # Same tree: checkpoints load unchanged.
  return ours, theirs, variables


@pytest.mark.parametrize('plain_sums', [False, True], ids=['cpu_products', 'plain_sums'])
def test_layer_norm_matches_flax_forward_and_gradients(plain_sums, monkeypatch):
  # plain_sums: the branch GPUs and TPUs take, here on the CPU.
  monkeypatch.setattr(layer_norm, '_plain_sums', lambda: plain_sums)
  rng = np.random.default_rng(2)
  # Rows offset from zero, as a residual stream is, and wider than 32 (XLA:CPU rewrites
  # longer reductions; ours must agree with flax's either way).
  x = jnp.asarray(rng.normal(size=(3, 7, 96)) * 2 + rng.normal(size=(3, 7, 1)) * 3,
                  jnp.float32)
  grad = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ours, theirs, variables = _both_layer_norms(x)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  grads = [jax.vjp(m.apply, variables, x)[1](grad) for m in (ours, theirs)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # And both against float64 by hand.
  x64, g64 = np.asarray(x, np.float64), np.asarray(grad, np.float64)
  scale = np.asarray(variables['params']['scale'], np.float64)
  normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(ours.apply(variables, x), normed * scale
                             + np.asarray(variables['params']['bias']), atol=1e-5)
  (d_params, dx) = grads[0]
  np.testing.assert_allclose(d_params['params']['bias'], g64.sum((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(d_params['params']['scale'], (g64 * normed).sum((0, 1)),
                             rtol=1e-4, atol=1e-4)
  gn = g64 * scale
  dx64 = (gn - gn.mean(-1, keepdims=True) - normed * (gn * normed).mean(-1, keepdims=True)
          ) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-5)


def test_layer_norm_in_bfloat16_matches_flax_and_keeps_float32_params():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 64)) + 1.5, jnp.bfloat16)
  ours, theirs, variables = _both_layer_norms(x, dtype=jnp.bfloat16)
  out, ref = ours.apply(variables, x), theirs.apply(variables, x)
  assert out.dtype == ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -7, atol=2 ** -7)
  d_params, dx = jax.grad(lambda v, x: jnp.sum(ours.apply(v, x).astype(jnp.float32) ** 2),
                          argnums=(0, 1))(variables, x)
  assert dx.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(d_params))


def test_layer_norm_sums_escape_the_cpu_reduce_window_rewrite():
  # The reason models/layer_norm.py exists: on XLA:CPU, flax's layer norm gradient has
  # its long sums rewritten into reduce-windows (a pass over the activation each); ours
  # has none. If flax's stops showing any, XLA dropped the rewrite: compare the two on
  # the whole train step again before keeping the hand-written gradient.
  x = jnp.ones((4, 6, 64), jnp.float32)
  ours, theirs, variables = _both_layer_norms(x)
  def windows(module):
    step = jax.jit(lambda v, x: jax.vjp(module.apply, v, x)[1](x))
    return step.lower(variables, x).compile().as_text().count('reduce-window(')
  assert windows(theirs) > 0
  assert windows(ours) == 0
