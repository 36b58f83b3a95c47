"""ConceptHash losses (paper §3.3, docs/method.md §3): pure functions of model outputs.

Notation: B batch, C classes, K code bits, M concepts, HW patch tokens.
Every cosine loss is a softmax cross-entropy on margin-shifted, scaled cosines
`s · (cos − m · onehot(y))` (s = 1/τ). Labels are int class ids (B,) or multi-hot
(B, C); multi-hot targets are normalised to a distribution (as the released code does).
All functions are jit/grad/vmap friendly and import nothing from the model.
"""
import jax
import jax.numpy as jnp

CONCEPT_MARGINS = ('first', 'all')


def _targets(labels, num_classes):
  """Returns (margin indicator (B, C), target distribution (B, C)) from labels."""
  labels = jnp.asarray(labels)
  if labels.ndim == 1:
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot, onehot
  multihot = labels.astype(jnp.float32)
  # Released code divides by the label count; an all-zero row would be 0/0.
  count = jnp.maximum(multihot.sum(-1, keepdims=True), 1.0)
  return multihot, multihot / count


def margin_logits(*, cosines, labels, scale, margin):
  """Scaled cosine logits with an additive margin on the true classes.

  Args:
    cosines: (..., B, C) cosine similarities.
    labels: (B,) int class ids or (B, C) multi-hot.
    scale: s = 1/τ.
    margin: m, subtracted from the true-class cosine(s); scalar or an array
      broadcastable against `cosines`' leading axes (e.g. (M, 1, 1)).

  Returns:
    (..., B, C) logits `s · (cos − m · onehot(y))`.
  """
  indicator, _ = _targets(labels, cosines.shape[-1])
  return scale * (cosines - margin * indicator)


def cosine_cross_entropy(*, cosines, labels, scale, margin):
  """Mean softmax cross-entropy of margin cosine logits (CosFace-style).

  Args:
    cosines: (..., B, C) cosine similarities; the mean runs over all leading rows.
    labels: (B,) int or (B, C) multi-hot.
    scale: s = 1/τ.
    margin: scalar m, or an array broadcastable to (..., 1, 1).

  Returns:
    Scalar loss.
  """
  logits = margin_logits(cosines=cosines, labels=labels, scale=scale, margin=margin)
  _, target = _targets(labels, cosines.shape[-1])
  nll = -(target * jax.nn.log_softmax(logits, axis=-1)).sum(-1)
  return nll.mean()


def classification_loss(*, logits_cont, labels, scale, margin):
  """L_clf (paper Eq. 6): codes b against continuous class centers o_c.

  Args:
    logits_cont: (B, C) cos(b, o_c).
    labels: (B,) int or (B, C) multi-hot.
    scale: s = 1/τ (released 8).
    margin: m (released 0.2, paper 0).

  Returns:
    Scalar loss.
  """
  return cosine_cross_entropy(cosines=logits_cont, labels=labels, scale=scale, margin=margin)


def quantization_loss(*, logits_bin, labels, scale, margin):
  """L_quan (paper Eq. 7): codes b against binarised centers sign(o_c).

  Args:
    logits_bin: (B, C) cos(b, sign o_c).
    labels: (B,) int or (B, C) multi-hot.
    scale: s = 1/τ.
    margin: m.

  Returns:
    Scalar loss.
  """
  return cosine_cross_entropy(cosines=logits_bin, labels=labels, scale=scale, margin=margin)


def concept_discrimination_loss(*, logits_concept, labels, scale, margin, concept_margin='first'):
  """L_cd (paper Eq. 9): every concept feature classifies the image, mean over M and B.

  The released loss scatters the margin with a (1, B, 1) index into (M, B, C)
  logits, so only the *first* concept gets the margin ('first', needed for parity);
  'all' applies it to every concept (the evident intent).

  Args:
    logits_concept: (M, B, C) cos(Z_m + E'_m, W_c).
    labels: (B,) int or (B, C) multi-hot.
    scale: s = 1/τ.
    margin: m.
    concept_margin: 'first' | 'all'.

  Returns:
    Scalar loss.
  """
  num_concepts = logits_concept.shape[0]
  if concept_margin == 'first':
    per_concept = jnp.zeros((num_concepts,), jnp.float32).at[0].set(1.0)
  elif concept_margin == 'all':
    per_concept = jnp.ones((num_concepts,), jnp.float32)
  else:
    raise ValueError(f'Unknown concept_margin {concept_margin!r}; valid: {CONCEPT_MARGINS}.')
  margins = (margin * per_concept)[:, None, None]  # (M, 1, 1)
  return cosine_cross_entropy(cosines=logits_concept, labels=labels, scale=scale, margin=margins)


def concept_spatial_diversity_loss(*, concept_attn):
  """L_csd (paper Eq. 8): mean pairwise cosine between concept attention maps.

  Args:
    concept_attn: (B, M, HW) head-averaged last-layer attention of the concept
      queries over the patch keys (softmax over all tokens, not renormalised).

  Returns:
    Scalar: mean over the strictly upper triangle of the batch-mean (M, M) cosine matrix.
  """
  # Same eps as torch.nn.functional.normalize.
  norm = jnp.linalg.norm(concept_attn, axis=-1, keepdims=True)
  maps = concept_attn / jnp.maximum(norm, 1e-12)
  cossim = jnp.einsum('bmh,bnh->bmn', maps, maps).mean(0)  # (M, M)
  num_concepts = cossim.shape[0]
  upper = jnp.triu(jnp.ones((num_concepts, num_concepts), bool), k=1)
  pairs = max(num_concepts * (num_concepts - 1) // 2, 1)
  return jnp.where(upper, cossim, 0.0).sum() / pairs


def quantization_gap(*, codes):
  """Reported metric 1 − mean cos(b, sign b); carries no gradient.

  Args:
    codes: (B, K) continuous codes b.

  Returns:
    Scalar.
  """
  codes = jax.lax.stop_gradient(codes)
  signs = jnp.sign(codes)
  # torch.nn.functional.cosine_similarity clamps each norm at eps=1e-8.
  denom = (jnp.maximum(jnp.linalg.norm(codes, axis=-1), 1e-8)
           * jnp.maximum(jnp.linalg.norm(signs, axis=-1), 1e-8))
  return 1.0 - ((codes * signs).sum(-1) / denom).mean()


def total_loss(aux, labels, *, scale, margin, concept_margin, weight_cont, weight_bin,
               weight_concept, weight_csd):
  """Weighted sum of the ConceptHash losses (paper Eq. 5; released weights by default).

  Args:
    aux: model outputs with 'logits_cont' (B, C), 'logits_bin' (B, C),
      'logits_concept' (M, B, C), 'concept_attn' (B, M, HW), 'codes' (B, K).
    labels: (B,) int or (B, C) multi-hot.
    scale, margin, concept_margin: see the individual losses.
    weight_cont, weight_bin, weight_concept, weight_csd: loss weights.

  Returns:
    (loss scalar, metrics dict of scalars: loss_cont, loss_bin, loss_concept,
    loss_csd, quantization_gap, total).
  """
  loss_cont = classification_loss(
      logits_cont=aux['logits_cont'], labels=labels, scale=scale, margin=margin)
  loss_bin = quantization_loss(
      logits_bin=aux['logits_bin'], labels=labels, scale=scale, margin=margin)
  loss_concept = concept_discrimination_loss(
      logits_concept=aux['logits_concept'], labels=labels, scale=scale, margin=margin,
      concept_margin=concept_margin)
  loss_csd = concept_spatial_diversity_loss(concept_attn=aux['concept_attn'])
  total = (weight_cont * loss_cont + weight_bin * loss_bin
           + weight_concept * loss_concept + weight_csd * loss_csd)
  metrics = {
      'loss_cont': loss_cont,
      'loss_bin': loss_bin,
      'loss_concept': loss_concept,
      'loss_csd': loss_csd,
      'quantization_gap': quantization_gap(codes=aux['codes']),
      'total': total,
  }
  return total, metrics
