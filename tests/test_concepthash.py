"""models/concepthash.py + build_model: switches, shapes, BN semantics, trainable mask."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from concepthash_jax import losses
from concepthash_jax import models
from concepthash_jax import optim
from concepthash_jax.interop import hf
from concepthash_jax.models import concepthash
from concepthash_jax.configs import base

NUM_CLASSES = 5
TINY_CLIP = hf.random_clip_config(ml_collections.ConfigDict(dict(
    image_size=32, patch_size=8, vision_width=24, vision_layers=1, vision_heads=4,
    vision_mlp=48, projection_dim=16, text_width=16, text_layers=1, text_heads=2,
    text_mlp=32, vocab_size=50, max_text_len=8)))


def model_cfg(**overrides):
  cfg = dict(num_concepts=4, nbit=16, concept_tokens='generated', generator_heads=4,
             dropout=0.1, adapter_dim=8, code_norm='batchnorm', center_type='language',
             center_input='sign', center_projection='mlp', concept_embedding='separate',
             prompt='a photo of a {}', dtype='float32')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def clip_params():
  return hf.init_clip_params(TINY_CLIP, jax.random.PRNGKey(1))


def init(model, clip_params, batch=3, seed=0):
  text = jax.random.normal(jax.random.PRNGKey(7), (NUM_CLASSES, 16))
  pixels = jax.random.normal(jax.random.PRNGKey(8), (batch, 32, 32, 3))
  variables = concepthash.init_variables(model, clip_params, jax.random.PRNGKey(seed), text,
                                         pixels)
  return variables, pixels


# Each switch away from the released recipe at least once; the paper's choices together.
VARIANTS = [
    {},
    {'concept_tokens': 'learned', 'code_norm': 'none', 'concept_embedding': 'shared',
     'center_input': 'raw', 'center_projection': 'linear'},
    {'center_type': 'random_orthogonal', 'adapter_dim': 0},
    {'center_type': 'learnable'},
    {'dtype': 'bfloat16'},
]


@pytest.mark.parametrize('overrides', VARIANTS, ids=lambda o: ','.join(
    f'{k}={v}' for k, v in o.items()) or 'released')
def test_every_switch_builds_trains_and_evaluates(overrides, clip_params):
  model = models.build_model(model_cfg(**overrides), TINY_CLIP, NUM_CLASSES)
  variables, pixels = init(model, clip_params)
  params = variables.pop('params')
  b, m, k, d = 3, 4, 16, 24
  hw = (32 // 8) ** 2

  def loss_fn(params):
    (codes, aux), updates = model.apply(
        {'params': params, **variables}, pixels, train=True,
        rngs={'dropout': jax.random.PRNGKey(3)}, mutable=['batch_stats'])
    loss, _ = losses.total_loss(aux, jnp.arange(b) % NUM_CLASSES, scale=8.0, margin=0.2,
                                concept_margin='first', weight_cont=1.0, weight_bin=1.0,
                                weight_concept=1.0, weight_csd=1.0)
    return loss, (codes, aux, updates)

  (loss, (codes, aux, updates)), grads = jax.jit(jax.value_and_grad(
      loss_fn, has_aux=True))(params)
  assert np.isfinite(loss)
  assert codes.shape == (b, k)
  assert aux['codes'].shape == (b, k)
  assert aux['logits_cont'].shape == aux['logits_bin'].shape == (b, NUM_CLASSES)
  assert aux['logits_concept'].shape == (m, b, NUM_CLASSES)
  assert aux['hash_features'].shape == (b, m, d)
  assert aux['last_attn'].shape == (b, 4, 1 + m, 1 + hw + m)
  assert aux['concept_attn'].shape == (b, m, hw)
  assert np.all(np.abs(aux['logits_cont']) <= 1 + 1e-5)
  # Trainable leaves get a gradient signal. Exceptions by construction: inside a fresh
  # adapter only up_proj does (W_up = 0 blocks the rest), and the code BN cancels E's.
  mask = traverse_util.flatten_dict(concepthash.trainable_mask(params))
  flat_grads = traverse_util.flatten_dict(grads)
  batchnorm = overrides.get('code_norm', 'batchnorm') == 'batchnorm'
  for path, trained in mask.items():
    in_adapter = any(str(p).startswith('adapt_mlp_') for p in path)
    if not trained or (in_adapter and 'up_proj' not in path) or (
        batchnorm and path == ('concept_specificity',)):
      continue
    assert np.any(np.asarray(flat_grads[path]) != 0), path
  eval_codes, _ = model.apply({'params': params, **variables, **updates}, pixels, train=False)
  assert eval_codes.shape == (b, k)
  assert ('batch_stats' in updates) == (overrides.get('code_norm', 'batchnorm') == 'batchnorm')


@pytest.mark.parametrize('remat', ['dots', 'full'])
def test_remat_and_the_concept_only_final_layer_change_no_value(remat, clip_params):
  """Against the authors' computation (no remat, every token through the final layer).

  Recomputing activations in the backward pass, and computing the final ViT layer for
  CLS and the concept tokens alone (the default), give the same loss, outputs and
  gradients; last_attn keeps the rows of CLS and the concepts.
  """
  labels = jnp.arange(3) % NUM_CLASSES

  def loss_and_grads(remat, full_final_layer):
    model = models.build_model(model_cfg(remat=remat), TINY_CLIP, NUM_CLASSES)
    model = model.clone(full_final_layer=full_final_layer)
    variables, pixels = init(model, clip_params)
    params = variables.pop('params')
    # Non-zero adapter up-projections, so gradients reach every remat'd layer input.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if 'up_proj' in jax.tree_util.keystr(path) else x, params)

    def loss_fn(params):
      (_, aux), _ = model.apply({'params': params, **variables}, pixels, train=True,
                                rngs={'dropout': jax.random.PRNGKey(3)},
                                mutable=['batch_stats'])
      return losses.total_loss(aux, labels, scale=8.0, margin=0.2, concept_margin='first',
                               weight_cont=1.0, weight_bin=1.0, weight_concept=1.0,
                               weight_csd=1.0)[0], aux

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  (loss, aux), grads = loss_and_grads('none', True)
  (loss_remat, aux_remat), grads_remat = loss_and_grads(remat, False)
  # Float noise only: the shorter final layer sums its products in another order.
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for (path, g), g_remat in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree_util.tree_leaves(grads_remat)):
    np.testing.assert_allclose(g_remat, g, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  tokens = aux['last_attn'].shape[-1]
  assert aux['last_attn'].shape == (3, 4, tokens, tokens)
  np.testing.assert_allclose(aux_remat['last_attn'],
                             aux['last_attn'][:, :, np.r_[0, tokens - 4:tokens]], atol=1e-6)
  for key in aux.keys() - {'last_attn'}:
    np.testing.assert_allclose(aux_remat[key], aux[key], atol=1e-5, err_msg=key)


def test_unknown_remat_raises_naming_valid_choices(clip_params):
  model = models.build_model(model_cfg(remat='some'), TINY_CLIP, NUM_CLASSES)
  with pytest.raises(ValueError, match=r"Unknown remat 'some'; valid: \['none', 'dots', 'full'\]"):
    init(model, clip_params)


def test_nbit_not_divisible_by_concepts_raises():
  with pytest.raises(ValueError, match='divisible by num_concepts'):
    models.build_model(model_cfg(nbit=18), TINY_CLIP, NUM_CLASSES)


@pytest.mark.parametrize('field', ['concept_tokens', 'code_norm', 'center_type',
                                   'center_input', 'center_projection', 'concept_embedding',
                                   'dtype'])
def test_unknown_string_values_raise_naming_valid_choices(field):
  with pytest.raises(ValueError, match=f'Unknown {field}.*valid'):
    models.build_model(model_cfg(**{field: 'bogus'}), TINY_CLIP, NUM_CLASSES)


def trainable_names(params):
  flat = traverse_util.flatten_dict(concepthash.trainable_mask(params))
  return {'/'.join(k) for k, v in flat.items() if v}


def test_trainable_mask_is_exactly_the_new_parts(clip_params):
  model = models.build_model(model_cfg(), TINY_CLIP, NUM_CLASSES)
  params = init(model, clip_params)[0]['params']
  names = trainable_names(params)
  vision = {n for n in names if n.startswith('vision_model/')}
  assert vision and all('/adapt_mlp_' in n for n in vision)
  adapter_leaves = {'adapter_layer_norm/scale', 'adapter_layer_norm/bias', 'down_proj/kernel',
                    'down_proj/bias', 'up_proj/kernel', 'up_proj/bias', 'scale'}
  layers = TINY_CLIP.vision_config.num_hidden_layers
  assert len(vision) == layers * 2 * len(adapter_leaves)  # layers x adapters x leaves
  top = {n.split('/')[0] for n in names} - {'vision_model'}
  assert top == {'concept_generator', 'concept_specificity', 'code_head', 'code_norm',
                 'center_projection', 'concept_embedding', 'concept_classifier'}
  frozen = set(map('/'.join, traverse_util.flatten_dict(params))) - names
  assert frozen == {'vision_model/' + '/'.join(k) for k in
                    traverse_util.flatten_dict(clip_params['vision_model'])}

  learned = models.build_model(model_cfg(concept_tokens='learned', center_type='learnable',
                                         concept_embedding='shared', code_norm='none'),
                               TINY_CLIP, NUM_CLASSES)
  params = init(learned, clip_params)[0]['params']
  top = {n.split('/')[0] for n in trainable_names(params)} - {'vision_model'}
  assert top == {'concept_tokens', 'concept_specificity', 'code_head', 'learnable_centers',
                 'concept_classifier'}


def test_init_variables_merges_clip_and_centers(clip_params):
  model = models.build_model(model_cfg(), TINY_CLIP, NUM_CLASSES)
  variables, pixels = init(model, clip_params)
  ours = traverse_util.flatten_dict(variables['params']['vision_model'])
  for path, value in traverse_util.flatten_dict(clip_params['vision_model']).items():
    np.testing.assert_array_equal(ours[path], value)
  text = jax.random.normal(jax.random.PRNGKey(7), (NUM_CLASSES, 16))
  np.testing.assert_array_equal(variables['centers']['text_embeds'], text)
  # Fresh adapters (W_up = 0) leave the merged CLIP tower computing plain CLIP.
  adapted = hf.vision_module_from_config(TINY_CLIP.vision_config, adapter_dim=8)
  plain = hf.vision_module_from_config(TINY_CLIP.vision_config)
  np.testing.assert_allclose(
      adapted.apply({'params': variables['params']['vision_model']}, pixels)[0],
      plain.apply({'params': clip_params['vision_model']}, pixels)[0], atol=1e-6)
  with pytest.raises(ValueError, match='class_text_embeds'):
    concepthash.init_variables(model, clip_params, jax.random.PRNGKey(0),
                               jnp.zeros((NUM_CLASSES + 1, 16)), pixels)
  with pytest.raises(ValueError, match='CLIP param'):
    bad = jax.tree.map(lambda x: x, clip_params)
    bad['vision_model']['pre_layrnorm']['scale'] = np.ones(5, np.float32)
    concepthash.init_variables(model, bad, jax.random.PRNGKey(0), text, pixels)


def test_code_batchnorm_matches_torch_semantics():
  bn = concepthash.CodeBatchNorm()
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5)) * 3 + 1
  variables = bn.init(jax.random.PRNGKey(1), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)  # Normalised with the biased var.
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], 0.1 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)  # Unbiased.
  y_eval = bn.apply({**variables, **updates}, x, train=False)
  np.testing.assert_allclose(
      y_eval, (xn - stats['mean']) / np.sqrt(np.asarray(stats['var']) + 1e-5), rtol=1e-5,
      atol=1e-5)


def test_random_orthogonal_codebook_is_orthogonal_sign_matrix():
  book = np.asarray(concepthash.random_orthogonal_codebook(jax.random.PRNGKey(0), 16, 16))
  assert set(np.unique(book)) == {-1.0, 1.0}
  np.testing.assert_array_equal(book @ book.T, 16 * np.eye(16))
  many = np.asarray(concepthash.random_orthogonal_codebook(jax.random.PRNGKey(0), 40, 16))
  assert many.shape == (40, 16) and set(np.unique(many)) == {-1.0, 1.0}
  odd = np.asarray(concepthash.random_orthogonal_codebook(jax.random.PRNGKey(0), 5, 12))
  assert odd.shape == (5, 12) and set(np.unique(odd)) == {-1.0, 1.0}


def test_logits_are_cosines_against_centers(clip_params):
  model = models.build_model(model_cfg(dropout=0.0), TINY_CLIP, NUM_CLASSES)
  variables, pixels = init(model, clip_params)
  (codes, aux), _ = model.apply(variables, pixels, train=True, mutable=['batch_stats'])
  centers = aux['class_centers']
  assert centers.shape == (NUM_CLASSES, 16)
  b, o = np.asarray(codes, np.float64), np.asarray(centers, np.float64)
  cos = lambda u, v: (u / np.linalg.norm(u, axis=-1, keepdims=True)) @ (
      v / np.linalg.norm(v, axis=-1, keepdims=True)).T
  np.testing.assert_allclose(aux['logits_cont'], cos(b, o), atol=1e-5)
  np.testing.assert_allclose(aux['logits_bin'], cos(b, np.sign(o)), atol=1e-5)
  # center_input='sign': the centers depend on sign(e_c) only.
  text = variables['centers']['text_embeds']
  scaled = dict(variables, centers={'text_embeds': jnp.sign(text) * 3.0})
  (_, aux_scaled), _ = model.apply(scaled, pixels, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(aux_scaled['class_centers'], centers, atol=1e-6)


def test_vit_b32_forward_backward_runs_on_cpu():
  clip_config = hf.random_clip_config(base.get_config().model.random_clip)  # ViT-B/32
  num_classes = 200
  model = models.build_model(model_cfg(nbit=64, generator_heads=8, adapter_dim=384),
                             clip_config, num_classes)
  clip_shapes = jax.eval_shape(lambda: hf.init_clip_params(clip_config, jax.random.PRNGKey(0)))
  text = jax.ShapeDtypeStruct((num_classes, 512), jnp.float32)
  pixels = jax.ShapeDtypeStruct((32, 224, 224, 3), jnp.float32)
  abstract = jax.eval_shape(functools.partial(concepthash.init_variables, model),
                            clip_shapes, jax.random.PRNGKey(0), text, pixels)
  params = abstract['params']
  assert params['concept_generator']['queries'].shape == (4, 512)
  assert params['code_head']['kernel'].shape == (768, 16)
  assert params['concept_classifier'].shape == (200, 768)
  assert abstract['centers']['text_embeds'].shape == (200, 512)
  trainable, _ = optim.partition_params(params, concepthash.trainable_mask(params))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))
  d, p, r, m, k, c, t = 768, 512, 384, 4, 64, 200, 512
  adapters = 12 * 2 * (2 * d + d * r + r + r * d + d + 1)
  generator = m * p + 3 * (p * p + p) + (p * p + p) + 4 * p + 2 * (p * p + p) + p * d + d
  heads = 2 * m * d + d * (k // m) + 2 * k + (t * t + t) + (t * k + k) + c * d
  assert count == adapters + generator + heads  # ~16.7M, 14.2M of it adapters.
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                rngs={'dropout': jax.random.PRNGKey(0)}),
                       abstract, pixels)
  (codes, aux), _ = out
  assert codes.shape == (32, 64) and aux['last_attn'].shape == (32, 12, 5, 54)

  # A real forward + backward at batch 2 with random weights (jitted init: no text tower).
  # The init's ~400 random draws dominate its compile; unsafe_rbg bits compile in ~60%
  # of threefry's time, and these weights need only be random.
  rng = jax.random.key(0, impl='unsafe_rbg')
  variables = jax.jit(lambda r: model.init({'params': r}, jnp.zeros((1, 224, 224, 3)),
                                           train=False))(rng)
  variables = dict(variables, centers={'text_embeds': jax.random.normal(rng, (num_classes, 512))})
  params = variables.pop('params')
  mask = concepthash.trainable_mask(params)
  trainable, frozen = optim.partition_params(params, mask)
  pixels = jax.random.normal(rng, (2, 224, 224, 3))

  # Frozen weights, state and pixels are arguments, not closed-over constants: as
  # constants XLA folds the patch embedding at compile time, a much longer compile.
  def loss_fn(trainable, frozen, variables, pixels):
    (_, aux), _ = model.apply({'params': optim.merge_params(trainable, frozen), **variables},
                              pixels, train=True, rngs={'dropout': rng},
                              mutable=['batch_stats'])
    return losses.total_loss(aux, jnp.array([3, 7]), scale=8.0, margin=0.2,
                             concept_margin='first', weight_cont=1.0, weight_bin=1.0,
                             weight_concept=1.0, weight_csd=0.0)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable, frozen, variables, pixels)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
