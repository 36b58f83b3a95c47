"""The attention core of one ViT-B/32 layer, ours against PyTorch's, interleaved.

  python benchmarks/attention.py --rounds=7    # in an environment with torch: both sides

The core is what sits between the q/k/v projections and the output projection:
q k^T, softmax, p v, with the head split and merge around them, at the shapes of the
shipped train step (batch 32, 12 heads, 49 patches + CLS + 4 concept tokens = 54
tokens, head width 64). Weight products are left out: `cpu_matmul.py` times those.
Timed: the forward alone and the forward plus the gradient with respect to q, k and v,
as the train step's backward needs it. Ours: the einsums of `models.clip.CLIPAttention`
and two alternatives (heads first, (B, H, T, d), before both products; and
jax.nn.dot_product_attention), each jitted with `train.cpu_matmul`'s compiler options.
Theirs: HF's eager CLIP attention (the authors' model) as PyTorch ops, with autograd.
Without torch only ours run. Every variant runs once per round, in turn; the table
gives medians in milliseconds.
"""
import statistics
import time

from absl import app
from absl import flags
import numpy as np

import table  # benchmarks/table.py: print_table
import train_step  # cpu_line, {jax,torch}_forward_backward; defines --batch, --cpu_matmul

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 7, 'Timed rounds (after one warm-up round).')
flags.DEFINE_integer('tokens', 54, 'Tokens per image (ViT-B/32: 49 + CLS + 4 concepts).')

HEADS, HEAD_DIM = 12, 64


def ours(q, k, v, g) -> dict:
  """{variant: (forward fn, forward + vjp fn)}, each blocking until done."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  b, t, width = q.shape
  split = lambda y: y.reshape(b, t, HEADS, HEAD_DIM)

  def shipped(q, k, v):  # models.clip.CLIPAttention's einsums.
    probs = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)), axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, split(v)).reshape(b, t, width)

  def heads_first(q, k, v):
    first = lambda y: split(y).transpose(0, 2, 1, 3)
    probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', first(q), first(k)), axis=-1)
    out = jnp.einsum('bhqk,bhkd->bhqd', probs, first(v))
    return out.transpose(0, 2, 1, 3).reshape(b, t, width)

  def library(q, k, v):
    return jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(b, t, width)

  args = [jnp.asarray(a) for a in (q, k, v)]
  return {name: train_step.jax_forward_backward(core, args, jnp.asarray(g), FLAGS.cpu_matmul)
          for name, core in (('ours, shipped einsums', shipped),
                             ('ours, heads first', heads_first),
                             ('ours, jax.nn.dot_product_attention', library))}


def theirs(q, k, v, g):
  """{variant: (forward fn, forward + backward fn)} in PyTorch, or {} without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  b, t, width = q.shape
  qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
  gt = torch.tensor(g)

  def heads(y):  # HF CLIPAttention's _shape, then (B * H, T, d) for bmm.
    return y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2).reshape(b * HEADS, t, HEAD_DIM)

  def core():
    probs = torch.bmm(heads(qt), heads(kt).transpose(1, 2)).softmax(dim=-1)
    out = torch.bmm(probs, heads(vt)).view(b, HEADS, t, HEAD_DIM)
    return out.transpose(1, 2).reshape(b, t, width)

  return {f'PyTorch {torch.__version__}, HF eager attention':
              train_step.torch_forward_backward(core, (qt, kt, vt), gt)}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  shape = (FLAGS.batch, FLAGS.tokens, HEADS * HEAD_DIM)
  q, k, v, g = (rng.normal(size=shape).astype(np.float32) for _ in range(4))
  fns = {**theirs(q, k, v, g), **ours(q, k, v, g)}
  times = {(name, part): [] for name in fns for part in (0, 1)}
  for r in range(FLAGS.rounds + 1):
    for name, pair in fns.items():
      for part, fn in enumerate(pair):
        t0 = time.perf_counter()
        fn()
        if r:
          times[(name, part)].append(1e3 * (time.perf_counter() - t0))
  print(train_step.cpu_line())
  print(f'batch {FLAGS.batch}, {HEADS} heads x {HEAD_DIM}, {FLAGS.tokens} tokens, float32, '
        f'train.cpu_matmul={FLAGS.cpu_matmul}, {FLAGS.rounds} interleaved rounds\n')
  table.print_table(
      ['attention core', 'forward ms', 'forward + gradient ms'],
      [(name, f'{statistics.median(times[(name, 0)]):.1f}',
        f'{statistics.median(times[(name, 1)]):.1f}') for name in fns])


if __name__ == '__main__':
  app.run(main)
