"""Runs our model on a golden file from the reference implementations (docs/method.md §6.2).

  concepthash-parity GOLDEN.npz --clip DIR --out OUT.npz
  python -m concepthash_jax.tools.parity GOLDEN.npz --clip DIR --out OUT.npz

Two golden kinds:
* official (has `param/*`): the official ConceptHash state dict (`param/*`, `buffer/*`)
  is imported through interop/official.py; one training-mode step (dropout off, batch
  statistics) writes out/*, loss/*, grad/<official name> (PyTorch layouts) and the
  updated BatchNorm buffers, then `case/sgd_steps` SGD steps from the golden state
  write sgd/*. Every size comes from the arrays, `case/*` and the CLIP config.
* HF CLIP (has `vision/last_hidden_state`): our CLIP towers on its inputs, every
  `vision/*` and `text/*` key it has.

Everything runs in float32. The output has the golden's keys and layouts, so a plain
key-by-key comparison checks parity.
"""
import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from concepthash_jax import errors
from concepthash_jax import losses
from concepthash_jax import models
from concepthash_jax import optim
from concepthash_jax import safe_files
from concepthash_jax import train
from concepthash_jax.interop import hf
from concepthash_jax.interop import official
from concepthash_jax.models import concepthash

LOSS_KEYS = {'total': 'total', 'cont': 'loss_cont', 'bin': 'loss_bin',
             'concept': 'loss_concept', 'attn_div': 'loss_csd', 'quan': 'quantization_gap'}
BN_BUFFERS = ('hash_bn.running_mean', 'hash_bn.running_var')


def official_state_dict(golden) -> dict:
  """{official name: array} from a golden's param/* and buffer/* entries."""
  state = {}
  for key in golden:
    for prefix in ('param/', 'buffer/'):
      if key.startswith(prefix):
        state[key[len(prefix):]] = np.asarray(golden[key])
  return state


def _case(golden, name, default=None):
  """A scalar from case/*, or `default` when the golden lacks it (None = required)."""
  key = f'case/{name}'
  if key not in golden:
    if default is None:
      raise KeyError(f'golden has no {key}')
    return default
  value = np.asarray(golden[key])
  return value.item() if value.dtype.kind != 'U' else str(value)


def model_config_from_state(state: dict, golden) -> tuple:
  """(config.model-like ConfigDict, num_classes) describing the official model in `state`."""
  if 'hash_pe' not in state:
    raise ValueError('official state dict has no hash_pe: not a ConceptHash model')
  num_concepts = state['hash_pe'].shape[1]
  nbit = state['hash_fc.weight'].shape[0] * num_concepts
  num_classes = state['trainable_params.concept_ce_centroids'].shape[0]
  adapter = 'backbone.vision_model.encoder.layers.0.adapt_mlp_1.down_proj.weight'
  if 'text_projection.0.weight' in state:
    center_type, projection = 'language', 'mlp'
  elif 'text_projection.weight' in state:
    center_type, projection = 'language', 'linear'
  elif 'center' in state and state['center'].shape == (num_classes, nbit) and \
      'param/center' in golden:
    center_type, projection = 'learnable', 'mlp'
  else:
    center_type, projection = 'random_orthogonal', 'mlp'
  cfg = ml_collections.ConfigDict(dict(
      num_concepts=num_concepts,
      nbit=nbit,
      concept_tokens='generated' if 'hash_queries' in state else 'learned',
      generator_heads=int(_case(golden, 'upt_heads', 8)),
      dropout=float(_case(golden, 'dropout', 0.0)),
      adapter_dim=state[adapter].shape[0] if adapter in state else 0,
      code_norm='batchnorm' if 'hash_bn.weight' in state else 'none',
      center_type=center_type,
      # The official model projects its `center` buffer as stored (already sign(e_c)).
      center_input='raw',
      center_projection=projection,
      concept_embedding='separate' if 'concept_pe' in state else 'shared',
      dtype='float32'))
  return cfg, num_classes


def build_official(golden, clip_config):
  """(model, variables, loss_fn (aux, labels) -> (loss, metrics)) for an official golden."""
  state = official_state_dict(golden)
  model_cfg, num_classes = model_config_from_state(state, golden)
  # Every token through the final layer, as the authors' model: out/last_attn is (B,H,T,T).
  model = models.build_model(model_cfg, clip_config, num_classes).clone(full_final_layer=True)
  if 'hash_queries' in state and state['hash_queries'].shape[-1] != model.generator_width:
    raise ValueError(f'hash_queries width {state["hash_queries"].shape[-1]} != '
                     f'vision_config.projection_dim {model.generator_width}')
  pixels = _pixels(golden)
  template = jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0)}, pixels, train=False))
  variables = official.import_official(state, template)
  loss_fn = functools.partial(
      losses.total_loss, scale=float(_case(golden, 'scale')), margin=float(_case(golden, 'margin')),
      concept_margin=_case(golden, 'concept_margin', 'first'),
      weight_cont=float(_case(golden, 'weight_cont')),
      weight_bin=float(_case(golden, 'weight_bin')),
      weight_concept=float(_case(golden, 'weight_concept')),
      weight_csd=float(_case(golden, 'weight_attn_div', 0.0)))
  return model, variables, loss_fn


def _pixels(golden):
  """Golden NCHW pixels -> our NHWC float32."""
  return jnp.asarray(np.asarray(golden['input/pixels'], np.float32).transpose(0, 2, 3, 1))


def pre_step_batch_stats(golden, state) -> dict:
  """BatchNorm statistics before the golden's training step.

  The official golden stores its buffers as dumped *after* that step
  (num_batches_tracked == 1): the statistics it started from are a fresh
  BatchNorm's (mean 0, var 1). With num_batches_tracked == 0 the stored buffers are
  the starting point themselves. The SGD run starts from the stored buffers (docs/method.md §6.2).
  """
  if 'batch_stats' not in state:
    return {}
  tracked = int(np.asarray(golden.get('buffer/hash_bn.num_batches_tracked', 0)))
  if tracked == 0:
    return {}
  if tracked != 1:
    raise ValueError(f'buffer/hash_bn.num_batches_tracked = {tracked}: the statistics '
                     'before the recorded step cannot be recovered (expected 0 or 1).')
  stats = state['batch_stats']['code_norm']
  return {'batch_stats': {'code_norm': {'mean': np.zeros_like(stats['mean']),
                                        'var': np.ones_like(stats['var'])}}}


def make_step_fns(model, loss_fn):
  """Jitted (loss+grads on the trainable leaves, eval forward) for `model`.

  The gradient is the trainer's: `train.objective` with the dropout key fixed
  (the goldens run without dropout).
  """
  def value_and_grad(trainable, frozen, state, pixels, labels):
    (loss, (metrics, updates, aux)), grads = jax.value_and_grad(
        train.objective, has_aux=True)(
            trainable, frozen, state, pixels, labels, jax.random.PRNGKey(0),
            model=model, loss_fn=loss_fn)
    return (loss, (aux, metrics, updates)), grads

  grad_fn = jax.jit(value_and_grad)

  @jax.jit
  def eval_codes(params, state, pixels):
    return model.apply({'params': params, **state}, pixels, train=False)[0]

  return grad_fn, eval_codes


def run_official(golden, clip_config, clip_params) -> dict:
  """Our values for every key of an official golden (see module docstring)."""
  model, variables, loss_fn = build_official(golden, clip_config)
  params = variables.pop('params')
  state = variables  # batch_stats and centers, as in the golden
  first_state = {**state, **pre_step_batch_stats(golden, state)}
  mask = concepthash.trainable_mask(params)
  trainable, frozen = optim.partition_params(params, mask)
  pixels = _pixels(golden)
  labels = jnp.asarray(np.asarray(golden['input/labels']), jnp.int32)
  grad_fn, eval_codes = make_step_fns(model, loss_fn)
  out = {}

  (_, (aux, metrics, updates)), grads = grad_fn(trainable, frozen, first_state, pixels,
                                                labels)
  out['out/codes_train'] = aux['codes']
  for key in ('logits_cont', 'logits_bin', 'logits_concept', 'hash_features', 'last_attn'):
    out[f'out/{key}'] = aux[key]
  for key, metric in LOSS_KEYS.items():
    out[f'loss/{key}'] = metrics[metric]
  for name, value in official.export_official(grads).items():
    out[f'grad/{name}'] = value
  new_state = {**first_state, **updates}
  if 'batch_stats' in new_state:
    for name, value in official.export_official(new_state['batch_stats'],
                                                collection='batch_stats').items():
      out[f'buffer/{name}'] = value
  out['out/codes_eval'] = eval_codes(params, new_state, pixels)

  if 'input/text_ids' in golden:
    out['text/pooler'] = text_pooler(clip_config, clip_params, golden['input/text_ids'])

  # SGD from the golden's parameters and buffers again, BN statistics updated every step.
  if int(_case(golden, 'sgd_steps', 0)) > 0:
    out.update(run_sgd(golden, grad_fn, trainable, frozen, state, pixels, labels))
  return {k: np.asarray(v) for k, v in out.items()}


def run_sgd(golden, grad_fn, trainable, frozen, state, pixels, labels) -> dict:
  """case/sgd_steps torch-SGD steps on the same batch -> sgd/* keys."""
  tx = optim.sgd(float(_case(golden, 'lr')), momentum=float(_case(golden, 'momentum')),
                 weight_decay=float(_case(golden, 'weight_decay')))
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, state):
    (loss, (_, _, updates)), grads = grad_fn(trainable, frozen, state, pixels, labels)
    param_updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, param_updates)
    return trainable, opt_state, {**state, **updates}, loss

  step_losses = []
  for _ in range(int(_case(golden, 'sgd_steps'))):
    trainable, opt_state, state, loss = step(trainable, opt_state, state)
    step_losses.append(loss)
  out = {'sgd/loss': np.asarray(step_losses)}
  for name, value in official.export_official(trainable).items():
    out[f'sgd/param/{name}'] = value
  if 'batch_stats' in state:
    for name, value in official.export_official(state['batch_stats'],
                                                collection='batch_stats').items():
      out[f'sgd/buffer/{name}'] = value
  return out


def text_pooler(clip_config, clip_params, input_ids):
  """Our text tower's pooled output (B, T) on given token ids (no padding mask)."""
  text_config = clip_config.text_config
  module = hf.text_module_from_config(text_config)
  _, aux = module.apply({'params': clip_params['text_model']},
                        jnp.asarray(np.asarray(input_ids), jnp.int32),
                        eos_token_id=text_config.eos_token_id)
  return aux['pooler_output']


def run_hf(golden, clip_config, clip_params) -> dict:
  """Our CLIP towers on a transformers CLIP golden: its vision/* and text/* keys."""
  ours = hf.hf_golden_outputs(clip_config, clip_params, golden['pixel_values'],
                              golden['input_ids'], golden['attention_mask'])
  wanted = [k for k in golden if k.startswith(('vision/', 'text/'))]
  missing = [k for k in wanted if k not in ours]
  if missing:
    raise KeyError(f'no output of ours for golden keys {missing}')
  return {k: ours[k] for k in wanted}


def run(golden_path: str, clip: str) -> dict:
  """Our outputs for the golden at `golden_path`, keyed as the golden."""
  with np.load(golden_path) as data:
    golden = {k: data[k] for k in data.files}
  clip_config, clip_params = hf.load_clip(clip)
  if any(k.startswith('param/') for k in golden):
    return run_official(golden, clip_config, clip_params)
  if 'vision/last_hidden_state' in golden:
    return run_hf(golden, clip_config, clip_params)
  raise ValueError(f'{golden_path}: neither an official golden (param/*) nor a HF CLIP '
                   'golden (vision/last_hidden_state)')


def _npz_keys(path: str) -> set:
  """The array names of an .npz file; empty when it is not one."""
  try:
    with np.load(path, allow_pickle=False) as stored:
      return set(stored.files)
  except (OSError, ValueError, EOFError, AttributeError):
    return set()


def main(argv=None) -> int:
  """CLI entry point (console script `concepthash-parity`); returns the exit status."""
  parser = argparse.ArgumentParser(prog='concepthash-parity', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('golden', help='golden .npz from the reference implementation')
  parser.add_argument('--clip', required=True,
                      help='CLIP directory (config.json + model.safetensors) or hub name')
  parser.add_argument('--out', required=True, help='output .npz (same keys as the golden)')
  args = parser.parse_args(argv)
  try:
    # An earlier output of this golden (its keys a subset of the golden's) may
    # be replaced; any other file is the user's.
    golden_keys = _npz_keys(args.golden)
    safe_files.check_replaceable(
        args.out, 'parity output (.npz)',
        is_ours=lambda path: bool(_npz_keys(path)) and _npz_keys(path) <= golden_keys)
    outputs = run(args.golden, args.clip)
    with safe_files.atomic_write(args.out) as f:
      np.savez(f, **outputs)
  except errors.UserError as e:
    print(f'FATAL: {e}', file=sys.stderr)
    return errors.EXIT_USER_ERROR
  print(f'wrote {len(outputs)} arrays to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
