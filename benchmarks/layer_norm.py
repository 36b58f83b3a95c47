"""Layer norm: ours (models/layer_norm.py) against flax.linen.LayerNorm and PyTorch.

  python benchmarks/layer_norm.py --rounds=12            # the layer norm alone
  python benchmarks/layer_norm.py --step --rounds=8      # the whole float32 train step

Alone: forward, and forward plus the gradient with respect to x, scale and bias, at the
train step's activation shape (batch 32, 54 tokens, width 768), ours and flax's jitted
with `train.cpu_matmul`'s compiler options, PyTorch's F.layer_norm beside them when
torch is installed (2 threads). With --step: the shipped ViT-B/32 train step and eval
forward (benchmarks/train_step.py's build_ours), built twice in this process, once as
shipped and once with flax's LayerNorm put back in the model's modules; the two run in
turn, so a box whose speed drifts still gives a fair ratio. Tables of medians.
"""
import statistics

from absl import app
from absl import flags
import numpy as np

import table  # benchmarks/table.py: print_table
import train_step  # build_ours, interleave, {jax,torch}_forward_backward; --batch

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 12, 'Timed rounds (after one warm-up round).')
flags.DEFINE_integer('tokens', 54, 'Tokens per image (ViT-B/32: 49 + CLS + 4 concepts).')
flags.DEFINE_integer('width', 768, 'Features normalised (ViT-B/32: 768).')
flags.DEFINE_bool('step', False, 'Time the whole train step and eval forward instead.')

# The model modules that construct a LayerNorm, by the name they imported it under.
MODEL_MODULES = ('concepthash_jax.models.clip', 'concepthash_jax.models.adapter',
                 'concepthash_jax.models.concepthash')


def ours_and_flax(x, scale, bias, grad) -> dict:
  """{variant: (forward fn, forward + vjp fn)}, each blocking until done."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from concepthash_jax.models import layer_norm  # pylint: disable=g-import-not-at-top

  variables = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}
  args = (variables, jnp.asarray(x))
  return {name: train_step.jax_forward_backward(module.apply, args, jnp.asarray(grad),
                                                FLAGS.cpu_matmul)
          for name, module in (('ours (models/layer_norm.py)', layer_norm.LayerNorm(1e-5)),
                               ('flax.linen.LayerNorm', nn.LayerNorm(1e-5)))}


def pytorch(x, scale, bias, grad) -> dict:
  """{variant: (forward fn, forward + backward fn)} in PyTorch, or {} without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  torch.set_num_threads(2)
  xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
  gt = torch.tensor(grad)
  norm = lambda: torch.nn.functional.layer_norm(xt, xt.shape[-1:], st, bt, 1e-5)
  return {f'PyTorch {torch.__version__}, F.layer_norm':
              train_step.torch_forward_backward(norm, (xt, st, bt), gt)}


def alone() -> None:
  """The layer norm alone: a table of forward and forward + gradient medians."""
  rng = np.random.default_rng(0)
  shape = (FLAGS.batch, FLAGS.tokens, FLAGS.width)
  # A residual stream is not centred: give rows an offset, as the variance formula cares.
  x = (rng.normal(size=shape) + rng.normal(size=shape[:-1] + (1,))).astype(np.float32)
  grad = rng.normal(size=shape).astype(np.float32)
  scale, bias = (rng.normal(size=FLAGS.width).astype(np.float32) for _ in range(2))
  fns = {**pytorch(x, scale, bias, grad), **ours_and_flax(x, scale, bias, grad)}
  calls = {(name, part): fn for name, pair in fns.items() for part, fn in enumerate(pair)}
  times = train_step.interleave(calls, FLAGS.rounds)
  print(train_step.cpu_line())
  print(f'{shape}, float32, train.cpu_matmul={FLAGS.cpu_matmul}, '
        f'{FLAGS.rounds} interleaved rounds\n')
  ms = lambda key: f'{1e3 * statistics.median(times[key]):.2f}'
  table.print_table(['layer norm', 'forward ms', 'forward + gradient ms'],
                    [(name, ms((name, 0)), ms((name, 1))) for name in fns])


def build_with(layer_norm_cls) -> tuple:
  """build_ours's (train, eval) with `layer_norm_cls` in the model's modules."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  modules = [importlib.import_module(name) for name in MODEL_MODULES]
  shipped = [m.LayerNorm for m in modules]
  for m in modules:
    m.LayerNorm = layer_norm_cls
  jax.clear_caches()  # Traces of the other variant must not be reused.
  try:
    train, evaluate, _ = train_step.build_ours('float32', FLAGS.batch, 200, 'dots',
                                               cpu_matmul=FLAGS.cpu_matmul)
  finally:
    for m, cls in zip(modules, shipped):
      m.LayerNorm = cls
  return train, evaluate


def step() -> None:
  """The train step and eval forward, ours against flax's layer norm, interleaved."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
  from concepthash_jax.configs import cub  # pylint: disable=g-import-not-at-top
  from concepthash_jax.models import layer_norm  # pylint: disable=g-import-not-at-top
  xla_flags.configure_xla_flags(cub.get_config())
  variants = {'ours': layer_norm.LayerNorm, 'flax.linen.LayerNorm': nn.LayerNorm}
  fns, losses = {}, {}
  for name, cls in variants.items():
    train, evaluate = build_with(cls)
    losses[name] = float(train()['loss'])  # The first step, before the timed rounds.
    fns[('train', name)], fns[('eval', name)] = train, evaluate
  times = train_step.interleave(fns, FLAGS.rounds)
  train_step.print_step_heading(
      f'float32, model.remat=dots, train.cpu_matmul={FLAGS.cpu_matmul}, {FLAGS.rounds} '
      'interleaved rounds; first-step loss ' + ', '.join(f'{k} {v:.6f}'
                                                         for k, v in losses.items()))
  rows = []
  for kind in ('train', 'eval'):
    base, ours = times[(kind, 'flax.linen.LayerNorm')], times[(kind, 'ours')]
    rows.append((kind, f'{FLAGS.batch / statistics.median(base):.2f}',
                 f'{FLAGS.batch / statistics.median(ours):.2f}',
                 *train_step.speed_up(base, ours)))
  table.print_table(['step', 'flax LayerNorm img/s', 'ours img/s', 'speed-up (median)',
                     'range'], rows)


def main(argv):
  del argv
  if FLAGS.step:
    step()
  else:
    alone()


if __name__ == '__main__':
  app.run(main)
