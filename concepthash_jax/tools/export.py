r"""Exports a trained run for use anywhere; converts to and from the authors' PyTorch layout.

  concepthash-export --workdir runs/synthetic --out exported/synthetic
  concepthash-export --workdir W --out DIR --trained_only \
      [--base_clip openai/clip-vit-base-patch32]   # frozen CLIP named, not copied
  concepthash-export --workdir W --out DIR --official
      # also DIR/official.safetensors: the authors' state_dict names and layouts
  concepthash-export --from_official FILE --like DIR --out DIR2
      # an official-layout state dict (e.g. trained with the authors' code) -> an
      # export, taking config, class names and text tower from the export/run DIR

The export (see `concepthash_jax.exporting`) holds parameters only, no optimizer
state, and loads offline with `inference.ConceptHasher.load(DIR)`. --out is a new
or empty folder, or an earlier export, which is replaced whole (written beside
it, then swapped in); a workdir or a folder holding other files is refused.
"""
import os

from absl import flags
import jax
import numpy as np
from flax import traverse_util

from concepthash_jax import errors
from concepthash_jax import exporting
from concepthash_jax import inference
from concepthash_jax.interop import hf
from concepthash_jax.models import concepthash
from concepthash_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (only when run as a program)."""
  cli.define_run_flags(data_root=False)
  flags.DEFINE_string('out', None, 'Export directory to write.')
  flags.DEFINE_bool('trained_only', False,
                    'Store only the trained parameters; the frozen CLIP comes '
                    'from --base_clip when loading.')
  flags.DEFINE_string('base_clip', None,
                      'With --trained_only: hub name or local directory of the '
                      "base CLIP (default: the run's model.clip).")
  flags.DEFINE_bool('official', False,
                    'Also write official.safetensors in the authors\' layout.')
  flags.DEFINE_string('from_official', None,
                      'Official-layout .safetensors to import (with --like).')
  flags.DEFINE_string('like', None,
                      'Export or workdir giving config, class names and text '
                      'tower for --from_official.')


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _official_extras(clip_params, num_patches: int, step) -> dict:
  """Tensors the authors' module holds but ConceptHash ignores (strict loading)."""
  return {
      'backbone.logit_scale': np.asarray(clip_params['logit_scale'], np.float32),
      'backbone.visual_projection.weight':
          np.asarray(clip_params['visual_projection']['kernel']).T,
      'backbone.text_projection.weight':
          np.asarray(clip_params['text_projection']['kernel']).T,
      'backbone.vision_model.embeddings.position_ids':
          np.arange(1 + num_patches, dtype=np.int64)[None],
      'hash_bn.num_batches_tracked': np.asarray(step or 0, np.int64),
  }


def export_hasher(hasher, out: str, *, trained_only: bool = False,
                  base_clip=None, official_file: bool = False) -> dict:
  """Writes `hasher` (a loaded run or export) as an export directory.

  Args:
    hasher: inference.ConceptHasher.
    out: directory to write.
    trained_only: leave the frozen CLIP weights out (named by `base_clip`).
    base_clip: hub name or directory of the base CLIP (default model.clip).
    official_file: also write out/official.safetensors.

  Returns:
    The export's config.json dict.
  """
  config = hasher.config
  variables = _numpy(hasher.variables)
  stored = dict(variables)
  if trained_only:
    flat = traverse_util.flatten_dict(variables['params'])
    mask = traverse_util.flatten_dict(concepthash.trainable_mask(
        variables['params']))
    stored['params'] = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if mask[k]})
  meta = {'config': config.to_dict(), 'clip_config': hasher.clip_config.to_dict(),
          'base_clip': base_clip or config.model.clip,
          'trained_only': bool(trained_only), 'step': hasher.step,
          'nbit': hasher.nbit, 'num_concepts': hasher.num_concepts}
  exporting.check_destination(out)  # Before any slow work.
  tokenizer = hasher.tokenizer() if config.model.center_type == 'language' else None
  official_state = None
  if official_file:
    grid = hasher.image_size // hasher.clip_config.vision_config.patch_size
    official_state = exporting.official_state_dict(
        variables, extras=_official_extras(hasher.clip_params(), grid * grid,
                                           hasher.step))
  exporting.write_export(
      out, meta=meta, variables=stored,
      text_params=None if trained_only else hasher.text_params(),
      class_names=hasher.class_names, class_centers=hasher.class_centers,
      results=hasher.results,
      tokenizer=tokenizer if isinstance(tokenizer, hf.HFTokenizer) else None,
      official_state=official_state)
  return meta


def import_official(official_path: str, like: str, out: str):
  """Writes an export whose weights come from an official-layout file.

  Args:
    official_path: .safetensors with the authors' state_dict names.
    like: export or workdir of the same model (config, class names, text tower).
    out: export directory to write.
  """
  hasher = inference.ConceptHasher.load(like)
  template = inference.abstract_variables(hasher.model, hasher.image_size)
  hasher.variables = jax.device_put(exporting.read_official(official_path,
                                                            template))
  hasher.results, hasher._class_centers = None, None  # pylint: disable=protected-access
  export_hasher(hasher, out)


def main(argv):
  """Entry point; user mistakes end in one FATAL line (cli.run), exit code 2."""
  del argv
  if FLAGS.from_official:
    if not (FLAGS.like and FLAGS.out):
      raise errors.ConfigError('--from_official needs --like (an export or '
                               'workdir of the same model) and --out.')
    exporting.check_destination(FLAGS.out)
    import_official(FLAGS.from_official, FLAGS.like, FLAGS.out)
    print(f'{FLAGS.from_official} -> {FLAGS.out}')
    return
  if not (FLAGS.workdir and FLAGS.out):
    raise errors.ConfigError('Pass --workdir (a trained run) and --out (the '
                             'export directory), or --from_official FILE '
                             '--like DIR --out DIR.')
  if FLAGS.base_clip and not FLAGS.trained_only:
    raise errors.ConfigError('--base_clip only applies with --trained_only.')
  exporting.check_destination(FLAGS.out)  # Before the slow restore.
  hasher = inference.ConceptHasher.load(FLAGS.workdir, which=FLAGS.checkpoint)
  export_hasher(hasher, FLAGS.out, trained_only=FLAGS.trained_only,
                base_clip=FLAGS.base_clip, official_file=FLAGS.official)
  size = sum(os.path.getsize(os.path.join(FLAGS.out, f))
             for f in os.listdir(FLAGS.out))
  print(f'{FLAGS.workdir} -> {FLAGS.out} ({size / 2**20:.1f} MiB'
        f'{", trained parameters only" if FLAGS.trained_only else ""}'
        f'{", with " + exporting.OFFICIAL_FILE if FLAGS.official else ""})')


def run():
  """Console script `concepthash-export`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
