r"""Trains and evaluates ConceptHash: flags -> config -> train.train_and_evaluate.

  concepthash-train --config=synthetic --workdir=runs/synthetic
  concepthash-train --config=cub:nbit=32 --workdir=runs/cub32 \
    --config.optim.lr=2e-3
  python launch.py --config=configs/cub.py --workdir=runs/cub   # in a checkout

--config takes a built-in config by name or the path of a config file, either
followed by an optional `:arg` (the bit width, or the dataset for paper):
  base        every key, its default and the reason for it (the released recipe
              at CUB sizes)
  synthetic   tiny random CLIP on the built-in synthetic birds: runs offline on a
              CPU in minutes (the embedded default)
  cub, cars, aircraft, nabirds
              the released recipe on each dataset; `:nbit=16|32|64`
  paper       the paper's choices instead of the released ones; `:cub,nbit=32`
Every key can be overridden with --config.section.key=value; unknown keys and
invalid values stop here with the valid choices. The keys are documented in
configs/base.py; docs/method.md §4 lists the released-vs-paper switches.

Writes WORKDIR/results.json (docs/method.md §6.3), metrics.jsonl, TensorBoard
event files and checkpoints; a run resumes from its newest checkpoint. On a
multi-host job start the same command on every host: jax.distributed is
initialised when the environment describes a cluster (JAX_COORDINATOR_ADDRESS
with JAX_NUM_PROCESSES and JAX_PROCESS_ID, a multi-task SLURM/Open MPI job, a
multi-host TPU slice) or when --distributed is given.

Exit status: 0 finished (results.json written); 2 a mistake to fix - an
unknown config key or bad value, a missing or malformed file, a busy workdir or
one whose checkpoints were trained with another config (one 'FATAL' line naming
the key or file and the fix, no traceback); 75 preempted (SIGTERM): the current
step was saved, rerun the same command to resume; 1 anything else (a fault,
printed with its traceback; also absl's own flag errors such as a missing
--workdir). docs/troubleshooting.md lists each case and what to do.
"""
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from concepthash_jax import configuration
from concepthash_jax import errors
from concepthash_jax import train
from concepthash_jax import xla_flags
from concepthash_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results.json.')
  flags.DEFINE_bool('distributed', None, 'Force (True) or skip (False) '
                    'jax.distributed.initialize(); default: from the '
                    'environment.')
  config_flags.DEFINE_config_file(
      'config', None, 'A built-in config name or a config file path, '
      'with an optional :arg (cub, cub:nbit=32, configs/paper.py:cars).',
      lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])


def cluster_requested() -> bool:
  """Whether the environment describes a multi-process job."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  for key in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(env.get(key, '1') or 1) > 1:
      return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def unknown_key_message(config, argv) -> str:
  """Names the first --config.a.b=... override whose key `config` lacks.

  Args:
    config: the loaded (locked) ConfigDict.
    argv: the command line.

  Returns:
    'unknown key config.a.b; valid keys of config.a: [...]', or '' when every
    override names an existing key.
  """
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--'):].split('=', 1)[0].split('.')[1:]
    node = config
    for depth, name in enumerate(path):
      if not hasattr(node, 'keys') or name not in node:
        where = '.'.join(['config', *path[:depth]])
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f"unknown key {'.'.join(['config', *path[:depth + 1]])} "
                f'(from {arg}); valid keys of {where}: {valid}')
      node = node[name]
  return ''


def parse_flags(argv):
  """absl's flag parsing; an unknown config key exits naming the valid ones."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these from deep inside the override machinery,
    # three chained tracebacks that bury the one line that matters.
    message = ''
    files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    if files:
      parser = config_flags.config_flags.ConfigFileFlagParser(name='config')
      message = unknown_key_message(parser.parse(files[-1]), argv)
    sys.stderr.write(f'FATAL Flags parsing error: {message or e}\n')
    sys.exit(errors.EXIT_USER_ERROR)


# Orbax's own log of a save that failed for want of space (a traceback per
# writer thread): the FATAL line that follows says it once, with the fix.
_REPORTED_BY_US = ('No space left on device', 'RESOURCE_EXHAUSTED')


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter and its disk-full tracebacks."""
  if 'orbax' not in record.pathname:
    return True
  if record.levelno < py_logging.WARNING:
    return False
  return not any(text in record.getMessage() for text in _REPORTED_BY_US)


def main(argv):
  """Entry point."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  py_logging.getLogger('absl').addFilter(_quiet_orbax)
  # Fail on a bad config before anything slow (model download, data).
  try:
    configuration.validate_config(FLAGS.config)
  except ValueError as e:  # validate_config raises only for config values.
    cli.exit_user_error(e)
  xla_flags.configure_xla_flags(FLAGS.config)  # Before the first JAX computation.
  distributed = FLAGS.distributed
  if distributed is None:
    distributed = cluster_requested()
  if distributed:
    env = os.environ
    kwargs = {}
    if env.get('JAX_COORDINATOR_ADDRESS'):
      kwargs = dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                    num_processes=int(env['JAX_NUM_PROCESSES']),
                    process_id=int(env['JAX_PROCESS_ID']))
    jax.distributed.initialize(**kwargs)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    cli.exit_user_error(e)
  if results.get('preempted'):
    sys.exit(errors.EXIT_PREEMPTED)  # A scheduler must not read it as done.


def run():
  """Console script `concepthash-train` (and `python launch.py`)."""
  doc = __doc__ + f'\nThe config files of this install: {cli.CONFIG_DIR}\n'
  cli.run(main, doc, define_flags, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
