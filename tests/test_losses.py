"""losses.py against small float64 numpy references; grad/jit/vmap usability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concepthash_jax import losses


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_cosine_ce(cos, labels, scale, margin):
  """Per-row loop: -log softmax(s * (cos - m * onehot))[y]."""
  cos = np.asarray(cos, np.float64)
  out = []
  for b, y in enumerate(labels):
    row = cos[b].copy()
    row[y] -= margin
    out.append(-np_log_softmax(scale * row)[y])
  return np.mean(out)


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  b, c, m, k, hw = 5, 7, 3, 12, 9
  attn = rng.uniform(size=(b, m, hw)).astype(np.float32) / hw
  return {
      'labels': rng.integers(0, c, size=b),
      'aux': {
          'logits_cont': rng.uniform(-1, 1, (b, c)).astype(np.float32),
          'logits_bin': rng.uniform(-1, 1, (b, c)).astype(np.float32),
          'logits_concept': rng.uniform(-1, 1, (m, b, c)).astype(np.float32),
          'concept_attn': attn,
          'codes': rng.normal(size=(b, k)).astype(np.float32),
      },
  }


@pytest.mark.parametrize('scale,margin', [(8.0, 0.2), (8.0, 0.0), (1.0, 0.5)])
def test_classification_and_quantization_match_numpy(batch, scale, margin):
  aux, labels = batch['aux'], batch['labels']
  got = losses.classification_loss(logits_cont=aux['logits_cont'], labels=labels,
                                   scale=scale, margin=margin)
  np.testing.assert_allclose(got, np_cosine_ce(aux['logits_cont'], labels, scale, margin),
                             rtol=1e-5)
  got = losses.quantization_loss(logits_bin=aux['logits_bin'], labels=labels,
                                 scale=scale, margin=margin)
  np.testing.assert_allclose(got, np_cosine_ce(aux['logits_bin'], labels, scale, margin),
                             rtol=1e-5)


def test_margin_lowers_true_logit_only(batch):
  cos, labels = batch['aux']['logits_cont'], batch['labels']
  logits = np.asarray(losses.margin_logits(cosines=cos, labels=labels, scale=2.0, margin=0.3))
  expected = 2.0 * cos.astype(np.float64)
  expected[np.arange(len(labels)), labels] -= 2.0 * 0.3
  np.testing.assert_allclose(logits, expected, rtol=1e-6)


@pytest.mark.parametrize('concept_margin', ['first', 'all'])
def test_concept_loss_margin_variants(batch, concept_margin):
  aux, labels = batch['aux'], batch['labels']
  logits = aux['logits_concept']
  per_concept = []
  for i in range(logits.shape[0]):
    margin = 0.2 if (concept_margin == 'all' or i == 0) else 0.0
    per_concept.append(np_cosine_ce(logits[i], labels, 8.0, margin))
  got = losses.concept_discrimination_loss(logits_concept=logits, labels=labels, scale=8.0,
                                           margin=0.2, concept_margin=concept_margin)
  np.testing.assert_allclose(got, np.mean(per_concept), rtol=1e-5)


def test_concept_margin_variants_differ_and_unknown_raises(batch):
  aux, labels = batch['aux'], batch['labels']
  kw = dict(logits_concept=aux['logits_concept'], labels=labels, scale=8.0, margin=0.2)
  first = losses.concept_discrimination_loss(concept_margin='first', **kw)
  every = losses.concept_discrimination_loss(concept_margin='all', **kw)
  assert float(every) > float(first)  # A margin on the true class only raises the loss.
  with pytest.raises(ValueError, match='Unknown concept_margin'):
    losses.concept_discrimination_loss(concept_margin='last', **kw)


def test_csd_matches_numpy(batch):
  attn = batch['aux']['concept_attn'].astype(np.float64)
  b, m, _ = attn.shape
  maps = attn / np.linalg.norm(attn, axis=-1, keepdims=True)
  cos = np.mean([maps[i] @ maps[i].T for i in range(b)], axis=0)
  expected = np.mean([cos[i, j] for i in range(m) for j in range(i + 1, m)])
  got = losses.concept_spatial_diversity_loss(concept_attn=batch['aux']['concept_attn'])
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_csd_is_zero_for_disjoint_and_one_for_identical_maps():
  disjoint = jnp.eye(3)[None].repeat(2, 0)  # (B=2, M=3, HW=3)
  assert float(losses.concept_spatial_diversity_loss(concept_attn=disjoint)) == 0.0
  same = jnp.ones((2, 3, 4))
  np.testing.assert_allclose(losses.concept_spatial_diversity_loss(concept_attn=same), 1.0,
                             rtol=1e-6)


def test_quantization_gap_matches_numpy_and_has_no_gradient(batch):
  codes = batch['aux']['codes'].astype(np.float64)
  signs = np.sign(codes)
  cos = (codes * signs).sum(-1) / (np.linalg.norm(codes, axis=-1) * np.linalg.norm(signs, axis=-1))
  got = losses.quantization_gap(codes=batch['aux']['codes'])
  np.testing.assert_allclose(got, 1 - cos.mean(), rtol=1e-5)
  grad = jax.grad(lambda c: losses.quantization_gap(codes=c))(batch['aux']['codes'])
  assert np.all(np.asarray(grad) == 0)
  assert float(losses.quantization_gap(codes=jnp.sign(batch['aux']['codes']))) == pytest.approx(
      0.0, abs=1e-6)


def test_multi_hot_labels_match_soft_target_reference():
  rng = np.random.default_rng(1)
  cos = rng.uniform(-1, 1, (4, 5))
  multihot = np.zeros((4, 5))
  multihot[[0, 0, 1, 2, 3], [1, 3, 0, 4, 2]] = 1
  logits = 8.0 * (cos - 0.2 * multihot)
  target = multihot / multihot.sum(-1, keepdims=True)
  expected = -(target * np_log_softmax(logits)).sum(-1).mean()
  got = losses.cosine_cross_entropy(cosines=cos.astype(np.float32), labels=multihot,
                                    scale=8.0, margin=0.2)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


LOSS_KW = dict(scale=8.0, margin=0.2, concept_margin='first', weight_cont=1.0,
               weight_bin=0.5, weight_concept=2.0, weight_csd=0.25)


def test_total_loss_combines_weighted_terms(batch):
  loss, metrics = losses.total_loss(batch['aux'], batch['labels'], **LOSS_KW)
  expected = (metrics['loss_cont'] + 0.5 * metrics['loss_bin'] + 2.0 * metrics['loss_concept']
              + 0.25 * metrics['loss_csd'])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert set(metrics) == {'loss_cont', 'loss_bin', 'loss_concept', 'loss_csd',
                          'quantization_gap', 'total'}
  np.testing.assert_allclose(metrics['total'], loss)


def test_total_loss_under_jit_grad_and_vmap(batch):
  aux = jax.tree.map(jnp.asarray, batch['aux'])
  labels = jnp.asarray(batch['labels'])
  fn = jax.jit(lambda a, y: losses.total_loss(a, y, **LOSS_KW)[0])
  eager = losses.total_loss(aux, labels, **LOSS_KW)[0]
  np.testing.assert_allclose(fn(aux, labels), eager, rtol=1e-6)

  grads = jax.grad(fn)(aux, labels)
  for key in ('logits_cont', 'logits_bin', 'logits_concept', 'concept_attn'):
    assert np.all(np.isfinite(grads[key])) and np.any(grads[key] != 0), key
  # Finite-difference check of one logit's gradient.
  eps = 1e-3
  bump = aux['logits_cont'].at[0, 0].add(eps)
  fd = (fn(dict(aux, logits_cont=bump), labels) - eager) / eps
  np.testing.assert_allclose(grads['logits_cont'][0, 0], fd, rtol=2e-2, atol=1e-3)

  # vmap over two stacked batches equals two separate calls.
  stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1] if x.ndim else x]), aux)
  # logits_concept is (M, B, C): reverse the batch axis, not M.
  stacked['logits_concept'] = jnp.stack([aux['logits_concept'], aux['logits_concept'][:, ::-1]])
  stacked_labels = jnp.stack([labels, labels[::-1]])
  per = jax.vmap(fn)(stacked, stacked_labels)
  second = dict(jax.tree.map(lambda x: x[::-1], aux),
                logits_concept=aux['logits_concept'][:, ::-1])
  np.testing.assert_allclose(per, [eager, fn(second, labels[::-1])], rtol=1e-5)
