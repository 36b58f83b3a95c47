r"""An interactive explorer of a trained ConceptHash and its database, in the browser.

  # The database split of the run (encoded now, kept in memory):
  concepthash-explore --model runs/synthetic --db_split train
  # A saved index (concepthash-search --index ... --db_split/--db_folder):
  concepthash-explore --model exported/cub --index cub.index.npz --port 8080

Prints the URL (http://127.0.0.1:PORT/) and serves until interrupted. Upload or
drop a photo or type a prompt; click a result to search from it; switch
concepts off or weight them and the ranking follows; compose a query from the
concepts of two queries; open a concept's gallery (the database grouped by its
sub-code, with that concept's attention). It binds to 127.0.0.1 unless --host
says otherwise: it has no login, so serve it to others only on a trusted network.
Needs the [explore] extra (pip install -e ".[explore]"). docs/explore.md.
"""
import ipaddress
import socket
import sys

from absl import flags

from concepthash_jax import data as data_lib
from concepthash_jax import errors
from concepthash_jax import exporting
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax.tools import cli
from concepthash_jax.tools import search as search_tool

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (only when run as a program)."""
  flags.DEFINE_string('model', None, 'Training workdir or export directory.')
  flags.DEFINE_string('index', None, 'A saved code index (.npz) to explore.')
  flags.DEFINE_enum('db_split', None, list(data_lib.SPLITS),
                    "Database: this split of the run's dataset, encoded now.")
  flags.DEFINE_string('db_folder', None, 'Database: the images in this folder, '
                      'encoded now.')
  flags.DEFINE_string('data_root', None, 'Override config.data.root.')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; 0.0.0.0 serves '
                      'every network the machine is on.')
  flags.DEFINE_integer('port', 7860, 'Port to bind; 0 picks a free one.')
  flags.DEFINE_integer('k', 24, 'Results shown per search.')
  flags.DEFINE_integer('max_upload_mb', 20, 'Largest upload accepted, MiB.')
  flags.mark_flag_as_required('model')


def load_index(hasher, *, index_path=None, db_split=None, db_folder=None,
               data_root=None):
  """The database to explore: a saved index, or a split or folder encoded now."""
  chosen = [f for f, v in (('--index', index_path), ('--db_split', db_split),
                           ('--db_folder', db_folder)) if v]
  if len(chosen) != 1:
    raise errors.ConfigError(
        'Give exactly one database: --index of a saved index, --db_split of '
        f'the run or --db_folder of images (got {", ".join(chosen) or "none"}).')
  if index_path:
    return index_lib.CodeIndex.load(index_path)
  return search_tool.build_index(hasher, split=db_split, folder=db_folder,
                                 data_root=data_root)


def bind(host: str, port: int) -> socket.socket:
  """A listening socket (port 0: a free one); ConfigError when it is taken."""
  try:
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as e:
    raise errors.ConfigError(f'Cannot listen on {host}:{port} ({e.strerror}); '
                             'pass another --port (0 picks a free one) or '
                             '--host.') from e
  sock.listen(128)
  return sock


def url_of(sock: socket.socket) -> str:
  """http://host:port/ of a bound socket."""
  host, port = sock.getsockname()[:2]
  shown = f'[{host}]' if ':' in host else host
  return f'http://{shown}:{port}/'


def make_server(app):
  """A uvicorn server of `app`; `.run(sockets=[sock])` serves until stopped."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  return uvicorn.Server(uvicorn.Config(app, log_level='warning',
                                      timeout_graceful_shutdown=2))


def main(argv):
  """Entry point; user mistakes end in one FATAL line, exit code 2."""
  del argv
  try:
    from concepthash_jax.explore import app as app_lib  # pylint: disable=g-import-not-at-top
    from concepthash_jax.explore import engine  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    cli.exit_user_error(f'concepthash-explore needs the [explore] extra ({e}); '
                        'pip install -e ".[explore]".')
  try:
    if FLAGS.k < 1 or FLAGS.max_upload_mb < 1:
      raise errors.ConfigError('--k and --max_upload_mb must be at least 1.')
    sock = bind(FLAGS.host, FLAGS.port)
    hasher = inference.ConceptHasher.load(FLAGS.model)
    index = load_index(hasher, index_path=FLAGS.index, db_split=FLAGS.db_split,
                       db_folder=FLAGS.db_folder, data_root=FLAGS.data_root)
    explorer = engine.Explorer(hasher, index, default_k=FLAGS.k)
  except (errors.UserError, exporting.ExportError, data_lib.CorruptImageError,
          FileNotFoundError, ValueError) as e:
    cli.exit_user_error(e)
  app = app_lib.create_app(explorer,
                           max_upload_bytes=FLAGS.max_upload_mb * 2**20)
  print(f'concepthash-explore: {len(index)} items, model {FLAGS.model}; '
        f'open {url_of(sock)}', flush=True)
  if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
    print(f'concepthash-explore: serving beyond this machine (--host='
          f'{FLAGS.host}); anyone who reaches the port can use it.', flush=True)
  make_server(app).run(sockets=[sock])
  sys.exit(0)


def run():
  """Console script `concepthash-explore`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
