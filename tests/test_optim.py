"""optim.py: torch.optim.SGD semantics, the schedules and the trainable split."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from concepthash_jax import optim


def torch_sgd_reference(params, grads_per_step, lrs, *, momentum, weight_decay):
  """torch.optim.SGD.step written out in numpy (dampening 0, no nesterov)."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  buf = {}
  for grads, lr in zip(grads_per_step, lrs):
    for k in params:
      d_p = grads[k] + weight_decay * params[k]
      if momentum:
        buf[k] = d_p if k not in buf else momentum * buf[k] + d_p
        d_p = buf[k]
      params[k] = params[k] - lr * d_p
  return params


def test_sgd_matches_torch_semantics_with_schedule():
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(4, 3)).astype(np.float32),
            'bias': rng.normal(size=(3,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in params.items()} for _ in range(6)]
  schedule = optim.epoch_schedule(0.1, warmup_epochs=2, epochs=5,
                                  steps_per_epoch=2)
  tx = optim.sgd(schedule, momentum=0.9, weight_decay=5e-2)
  state, p = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  lrs = [float(schedule(i)) for i in range(6)]
  ref = torch_sgd_reference(params, grads, lrs, momentum=0.9,
                            weight_decay=5e-2)
  for k in params:
    np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-6)


def test_weight_decay_is_coupled_not_decoupled():
  # Zero gradient, momentum: decay accumulates in the buffer (torch), so the
  # second step moves by lr*wd*p*(1+momentum) approximately, not lr*wd*p.
  tx = optim.sgd(1.0, momentum=0.5, weight_decay=0.1)
  p = {'w': jnp.ones((2,))}
  state = tx.init(p)
  moves = []
  for _ in range(2):
    u, state = tx.update({'w': jnp.zeros((2,))}, state, p)
    p = optax.apply_updates(p, u)
    moves.append(float(-u['w'][0]))
  assert moves[0] == pytest.approx(0.1)
  assert moves[1] == pytest.approx(0.5 * 0.1 + 0.1 * 0.9)


@pytest.mark.parametrize('epoch', [0, 1, 4, 9, 10, 11, 50, 99])
def test_epoch_schedule_is_released_formula_and_constant_within_epoch(epoch):
  schedule = optim.epoch_schedule(1e-3, warmup_epochs=10, epochs=100,
                                  steps_per_epoch=7)
  e1 = epoch + 1
  factor = (e1 / 10 if e1 <= 10
            else 0.5 * (1 + math.cos(math.pi * (e1 - 10) / (100 - 10 + 1))))
  for step in range(epoch * 7, epoch * 7 + 7):
    assert float(schedule(step)) == pytest.approx(1e-3 * factor, rel=1e-5)


def test_step_schedule_is_smooth_and_agrees_at_epoch_starts():
  kwargs = dict(warmup_epochs=3, epochs=10, steps_per_epoch=4)
  stepped = optim.epoch_schedule(1.0, **kwargs)
  smooth = optim.step_schedule(1.0, **kwargs)
  values = [float(smooth(s)) for s in range(40)]
  for epoch in range(10):
    assert values[epoch * 4] == pytest.approx(float(stepped(epoch * 4)))
  assert len(set(values[:12])) == 12  # Changes every step during warm-up.


def test_make_optimizer_keeps_no_state_for_frozen_params():
  cfg = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=2, warmup_epochs=1,
      schedule='epoch'))
  params = {'clip': {'kernel': jnp.ones((64, 64))},
            'head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones((2,))}}
  mask = {'clip': {'kernel': False}, 'head': {'kernel': True, 'bias': True}}
  # Masked full-tree form: frozen leaves get zero updates and no buffers.
  tx = optim.make_optimizer(cfg, 3, mask)
  state = tx.init(params)
  sizes = [x.size for x in jax.tree.leaves(state)]
  assert sum(sizes) == 4 * 2 + 2 + 1  # Momentum of the head + step count.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates['clip']['kernel']).max()) == 0.0
  # Sub-tree form (what train.py uses): the same numbers for the head.
  trainable, frozen = optim.partition_params(params, mask)
  assert set(frozen) == {'clip'} and set(trainable) == {'head'}
  tx_sub = optim.make_optimizer(cfg, 3)
  sub_updates, _ = tx_sub.update(
      jax.tree.map(jnp.ones_like, trainable), tx_sub.init(trainable),
      trainable)
  chex_equal = jax.tree.map(np.testing.assert_array_equal,
                            sub_updates['head'], updates['head'])
  del chex_equal
  merged = optim.merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_bad_schedule_and_empty_epoch_raise_clear_errors():
  cfg = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, weight_decay=0.0, epochs=2, warmup_epochs=1,
      schedule='linear'))
  with pytest.raises(ValueError, match="valid: \\['epoch', 'step'\\]"):
    optim.make_optimizer(cfg, 3)
  with pytest.raises(ValueError, match='steps_per_epoch must be > 0'):
    optim.epoch_schedule(0.1, warmup_epochs=1, epochs=2, steps_per_epoch=0)


def test_lr_multipliers_scale_one_module_exactly_and_reject_bad_names():
  cfg = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, weight_decay=1e-3, epochs=4, warmup_epochs=0,
      schedule='step', lr_multipliers=''))
  params = {'concept_generator': {'fc': {'kernel': jnp.ones((2, 3))}},
            'code_head': {'kernel': jnp.full((3,), 2.0)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  def two_steps(spec):
    cfg.lr_multipliers = spec
    tx = optim.make_optimizer(cfg, 10)
    state, out = tx.init(params), []
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      out.append(updates)
    return out

  base, scaled = two_steps(''), two_steps('concept_generator=0.01')
  for b, s in zip(base, scaled):
    # Momentum and decay are linear in the update, so the factor is exact.
    np.testing.assert_allclose(s['concept_generator']['fc']['kernel'],
                               0.01 * b['concept_generator']['fc']['kernel'],
                               rtol=1e-6)
    np.testing.assert_array_equal(s['code_head']['kernel'],
                                  b['code_head']['kernel'])
  cfg.lr_multipliers = 'concept_generater=0.01'
  with pytest.raises(ValueError, match=r"names \['concept_generater'\].*"
                     r"'concept_generator'"):
    optim.make_optimizer(cfg, 10).init(params)
  for bad in ('concept_generator', 'concept_generator=0', 'x=abc', '=2'):
    with pytest.raises(ValueError, match='module_name=positive_number'):
      optim.parse_lr_multipliers(bad)
