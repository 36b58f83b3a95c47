"""Train with your own loss: a hinge variant of the concept spatial diversity loss.

  python examples/custom_loss.py [--epochs=10] [--workdir=runs/custom_loss]

A loss is any function `(aux, labels, *, <keywords>) -> (loss, metrics)`
named by its import path: `--config.loss.fn=my_package.my_module.my_loss`. It
receives the `config.loss` values of the keywords it declares, and only those
(a new `loss.*` key is not forced on it). Here the paper's
L_csd (mean cosine between the M concept attention maps, Eq. 8) becomes a
per-image hinge that only penalises pairs more similar than `HINGE`, so that
concepts may overlap a little. The script trains the synthetic default twice,
with the built-in L_csd and with the hinge (both at weight 1, the paper's), and
prints mAP@R and how similar the concept attention maps end up.
"""
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from concepthash_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINGE = 0.3  # Cosine between two concept maps that costs nothing.

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; only when run as a script.

  The trainer imports this file a second time, as `custom_loss`, to resolve
  the loss by its import path: flags defined at import would clash then.
  """
  flags.DEFINE_integer('epochs', 10, 'Training epochs of each run.')
  flags.DEFINE_string('workdir', os.path.join(ROOT, 'runs', 'custom_loss'),
                      'Parent directory of the two runs.')


def hinge_csd_loss(*, concept_attn, hinge=HINGE):
  """Per-image mean over concept pairs of relu(cos(A_m, A_n) - hinge).

  Args:
    concept_attn: (B, M, HW) concept attention over the patches.
    hinge: similarity allowed for free.

  Returns:
    Scalar.
  """
  maps = concept_attn / jnp.maximum(
      jnp.linalg.norm(concept_attn, axis=-1, keepdims=True), 1e-12)
  cos = jnp.einsum('bmh,bnh->bmn', maps, maps)  # (B, M, M)
  m = cos.shape[-1]
  upper = jnp.triu(jnp.ones((m, m), bool), k=1)
  pairs = max(m * (m - 1) // 2, 1)
  return (jnp.where(upper, jax.nn.relu(cos - hinge), 0.0).sum((1, 2)) /
          pairs).mean()


def hinge_csd_total_loss(aux, labels, *, scale, margin, concept_margin,
                         weight_cont, weight_bin, weight_concept, weight_csd):
  """losses.total_loss with L_csd replaced by `hinge_csd_loss`."""
  _, metrics = losses.total_loss(
      aux, labels, scale=scale, margin=margin, concept_margin=concept_margin,
      weight_cont=weight_cont, weight_bin=weight_bin,
      weight_concept=weight_concept, weight_csd=0.0)
  csd = hinge_csd_loss(concept_attn=aux['concept_attn'])
  total = metrics['total'] + weight_csd * csd
  return total, dict(metrics, loss_csd=csd, total=total)


def mean_concept_similarity(concept_attn):
  """Mean cosine between different concepts' maps, over images (numpy)."""
  maps = concept_attn / np.maximum(
      np.linalg.norm(concept_attn, axis=-1, keepdims=True), 1e-12)
  cos = np.einsum('bmh,bnh->bmn', maps, maps)
  m = cos.shape[-1]
  return float(cos[:, ~np.eye(m, dtype=bool)].mean())


def run(name, loss_fn):
  """Trains the synthetic default with weight_csd=1 and `loss_fn`."""
  sys.path.insert(0, ROOT)
  from concepthash_jax.configs import synthetic  # pylint: disable=g-import-not-at-top
  from concepthash_jax import data, encoding, inference, train  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config()
  config.loss.fn = loss_fn
  config.loss.weight_csd = 1.0
  config.optim.epochs = FLAGS.epochs
  config.eval.every_epochs = FLAGS.epochs
  workdir = os.path.join(FLAGS.workdir, name)
  results = train.train_and_evaluate(config, workdir)
  hasher = inference.ConceptHasher.load(workdir)
  test = data.build(config.data, 'test')
  encoded = encoding.encode_split(hasher.model, hasher.variables, test, config.data,
                                  keep=('attention',))
  return results, mean_concept_similarity(encoded['concept_attn'])


def main(argv):
  """Trains both variants and prints the comparison."""
  del argv
  # Importable by path: this file's directory is sys.path[0] when run.
  rows = [('built-in L_csd', *run('default', '')),
          (f'hinge L_csd ({HINGE})',
           *run('hinge', 'custom_loss.hinge_csd_total_loss'))]
  print(f'\n| loss | mAP@R | chance | final loss | concept map cosine |')
  print('|---|---|---|---|---|')
  for name, results, similarity in rows:
    print(f'| {name} | {results["map_at_r"]:.4f} | '
          f'{results["chance_map_at_r"]:.4f} | {results["loss"]:.4f} | '
          f'{similarity:.3f} |')
  (_, a, sa), (_, b, sb) = rows
  print(f'\nhinge - built-in: mAP@R {b["map_at_r"] - a["map_at_r"]:+.4f}, '
        f'concept map cosine {sb - sa:+.3f}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
