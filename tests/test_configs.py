"""Config files: all load, validate, build a model shape; bad input fails clearly."""
import os
import re
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # The checkout's package when it is not installed.

from concepthash_jax import configuration  # pylint: disable=g-import-not-at-top
from concepthash_jax import errors  # pylint: disable=g-import-not-at-top
from concepthash_jax import models  # pylint: disable=g-import-not-at-top
from concepthash_jax import optim  # pylint: disable=g-import-not-at-top
from concepthash_jax import run_files  # pylint: disable=g-import-not-at-top
from concepthash_jax import sharding  # pylint: disable=g-import-not-at-top
from concepthash_jax import train  # pylint: disable=g-import-not-at-top
from concepthash_jax import workdir  # pylint: disable=g-import-not-at-top
from concepthash_jax import xla_flags  # pylint: disable=g-import-not-at-top
from concepthash_jax.interop import hf  # pylint: disable=g-import-not-at-top

from concepthash_jax.tools import cli  # pylint: disable=g-import-not-at-top

DATASETS = ('cub', 'cars', 'aircraft', 'nabirds')
CONFIG_NAMES = cli.config_names()
CONFIG_ARGS = ([f'configs/{n}.py' for n in CONFIG_NAMES if n != 'paper'] +
         [f'configs/paper.py:{d}' for d in DATASETS])


def load(spec, *overrides):
  """Parses `--config=spec --config.x=y ...` exactly as launch.py does."""
  argv = cli.resolve_config_args(['prog', f'--config={spec}', *overrides])
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'cfg', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_every_config_file_is_covered():
  assert set(CONFIG_NAMES) == {'base', 'synthetic', 'paper', *DATASETS}
  # The checkout's configs/ is the installed folder, not a copy.
  assert os.path.samefile(os.path.join(ROOT, 'configs'), cli.CONFIG_DIR)


def test_config_names_resolve_to_the_installed_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Outside the checkout: no configs/ here.
  cub = os.path.join(cli.CONFIG_DIR, 'cub.py')
  assert cli.resolve_config('cub') == cub
  assert cli.resolve_config('cub:nbit=32') == cub + ':nbit=32'
  assert cli.resolve_config('configs/paper.py:cars,16') == (
      os.path.join(cli.CONFIG_DIR, 'paper.py') + ':cars,16')
  mine = tmp_path / 'cub.py'  # A file of the user's wins over the name.
  mine.write_text('def get_config():\n  return None\n')
  assert cli.resolve_config('cub.py:nbit=16') == 'cub.py:nbit=16'
  assert cli.resolve_config_args(['p', '--config', 'synthetic', '--config.seed=1']) == [
      'p', '--config', os.path.join(cli.CONFIG_DIR, 'synthetic.py'), '--config.seed=1']
  with pytest.raises(SystemExit) as err:
    cli.resolve_config('cubb:nbit=32')
  message = str(err.value)
  assert message.startswith('--config=cubb:nbit=32: cubb is neither a config file')
  assert 'cub, nabirds, paper, synthetic' in message and '\n' not in message
  assert load('synthetic:nbit=32').model.nbit == 32


@pytest.mark.parametrize('spec', CONFIG_ARGS)
def test_config_loads_and_validates(spec):
  config = load(spec)
  configuration.validate_config(config)
  assert config.model.nbit % config.model.num_concepts == 0


def test_dataset_configs_share_the_released_model():
  """So the shape test below covers them through configs/base.py."""
  base = load('configs/base.py')
  for name in DATASETS:
    config = load(f'configs/{name}.py')
    assert config.model == base.model and config.data.name == name
  paper = [load(f'configs/paper.py:{name}') for name in DATASETS]
  assert all(p.model == paper[0].model for p in paper)


# One config per distinct model section (the dataset files reuse base's).
@pytest.mark.parametrize('spec', ['configs/base.py', 'configs/synthetic.py',
                                  'configs/paper.py:cub'])
def test_config_builds_the_train_state_shape(spec):
  """eval_shape only: the real (B/32-sized) CLIP config, nothing downloaded."""
  config = load(spec)
  clip_config = hf.random_clip_config(config.model.random_clip)
  num_classes = 7
  model = models.build_model(config.model, clip_config, num_classes)
  abstract_clip = run_files.abstract_vision_params(clip_config)
  text = None
  if config.model.center_type == 'language':
    text = jax.ShapeDtypeStruct(
        (num_classes, clip_config.text_config.hidden_size), 'float32')
  tx = optim.make_optimizer(config.optim, 10)
  _, abstract, _, mask = train.create_train_state(
      config, model, tx, abstract_clip, text, sharding.create_mesh())
  n_trainable = sum(
      a.size for a, m in zip(jax.tree.leaves(abstract.params),
                             jax.tree.leaves(mask)) if m)
  n_opt = sum(a.size for a in jax.tree.leaves(abstract.opt_state))
  # Optimizer state covers the trainable leaves only (momentum + a counter).
  assert n_trainable < n_opt <= n_trainable + 16
  assert n_trainable < sum(a.size for a in jax.tree.leaves(abstract.params)) / 2


def test_bit_width_comes_from_the_config_arg():
  assert load('configs/cub.py:nbit=32').model.nbit == 32
  assert load('configs/paper.py:cars,nbit=16').data.name == 'cars'
  assert load('configs/paper.py:cars,nbit=16').model.nbit == 16
  with pytest.raises(Exception, match="valid: \\['nbit'\\]"):
    load('configs/cub.py:bits=32')
  with pytest.raises(Exception, match='valid:'):
    load('configs/paper.py:imagenet')


def test_command_line_overrides_and_unknown_key_fails():
  config = load('configs/synthetic.py', '--config.optim.lr=0.5',
                '--config.model.center_type=learnable')
  assert config.optim.lr == 0.5 and config.model.center_type == 'learnable'
  with pytest.raises(Exception, match='nbitt'):
    load('configs/synthetic.py', '--config.model.nbitt=3')


def test_launch_names_the_valid_keys_of_an_unknown_one():
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--workdir=unused',
       '--config=' + os.path.join(ROOT, 'configs/synthetic.py'),
       '--config.optim.lr=0.1', '--config.model.nbitt=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 2
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('FATAL Flags parsing error: unknown key '
                         'config.model.nbitt (from --config.model.nbitt=3); '
                         "valid keys of config.model: ['adapter_dim'"), last
  assert "'nbit'" in last


@pytest.mark.parametrize('key,value', [
    ('model.center_type', 'orthogonal'), ('model.code_norm', 'layernorm'),
    ('data.source', 'web'), ('optim.schedule', 'linear'),
    ('eval.ties', 'random'), ('loss.concept_margin', 'none'),
    ('model.remat', 'some'),
])
def test_bad_choice_names_the_valid_ones(key, value):
  config = load('configs/synthetic.py', f'--config.{key}={value}')
  with pytest.raises(ValueError, match=f'config.{key}=.*valid: \\['):
    configuration.validate_config(config)


def test_bad_lr_multipliers_fail_at_validation():
  config = load('configs/synthetic.py',
                '--config.optim.lr_multipliers=concept_generator=fast')
  with pytest.raises(ValueError, match='optim.lr_multipliers entry'):
    configuration.validate_config(config)


def test_nbit_not_divisible_by_concepts_is_an_error():
  config = load('configs/synthetic.py', '--config.model.nbit=18')
  with pytest.raises(ValueError, match='divisible by config.model.num_concepts'):
    configuration.validate_config(config)


def test_unimportable_loss_fn_is_an_error():
  config = load('configs/synthetic.py', '--config.loss.fn=nowhere.loss')
  with pytest.raises(ValueError, match='cannot be imported'):
    configuration.validate_config(config)


def test_configure_xla_flags_adds_the_scheduler_flag_once_and_user_flags_win(
    monkeypatch):
  flag = '--xla_cpu_enable_concurrency_optimized_scheduler'
  config = load('configs/synthetic.py')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert xla_flags.configure_xla_flags(config) == f'{flag}=false'
  assert os.environ['XLA_FLAGS'] == (
      f'--xla_force_host_platform_device_count=2 {flag}=false')
  assert xla_flags.configure_xla_flags(config) == ''  # Already there: unchanged.
  monkeypatch.setenv('XLA_FLAGS', f'{flag}=true')  # The user's choice wins.
  assert xla_flags.configure_xla_flags(config) == ''
  assert os.environ['XLA_FLAGS'] == f'{flag}=true'
  monkeypatch.delenv('XLA_FLAGS')
  config.train.cpu_concurrency_scheduler = True
  assert xla_flags.configure_xla_flags(config) == ''
  assert 'XLA_FLAGS' not in os.environ


def test_cpu_matmul_is_a_compile_option_and_auto_follows_the_cpu(monkeypatch, tmp_path):
  # Eigen = YNN fusions off, set per compile: no process-wide flag to go stale.
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert xla_flags.configure_xla_flags(load('configs/synthetic.py')) == (
      '--xla_cpu_enable_concurrency_optimized_scheduler=false')
  assert xla_flags.compiler_options('eigen', jnp.float32) == {
      'xla_cpu_experimental_ynn_fusion_type': ''}
  assert xla_flags.compiler_options('ynnpack', 'float32') is None
  assert xla_flags.compiler_options('auto', 'bfloat16') is None
  # The step and the encode step carry it: their compiled programs differ.
  x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
  hlo = {lib: jax.jit(jnp.dot, compiler_options=xla_flags.compiler_options(lib))
         .lower(x, w).compile().as_text() for lib in ('eigen', 'ynnpack')}
  assert 'ynn' not in hlo['eigen'] and 'ynn' in hlo['ynnpack']

  def cpu(vendor, flags_):
    path = tmp_path / f'{vendor}_{len(flags_)}'
    path.write_text(f'processor\t: 0\nvendor_id\t: {vendor}\n'
                    f'flags\t\t: fpu sse2 {flags_}\n\nprocessor\t: 1\n')
    return str(path)
  intel = cpu('GenuineIntel', 'avx2 avx512f')
  resolve = xla_flags.resolve_cpu_matmul
  assert resolve('auto', 'float32', intel) == 'eigen'
  assert resolve('auto', 'bfloat16', intel) == 'ynnpack'  # YNNPACK's bf16 kernels.
  assert resolve('auto', 'float32', cpu('GenuineIntel', 'avx2 fma')) == 'ynnpack'
  assert resolve('auto', 'float32', cpu('AuthenticAMD', 'avx2 avx512f')) == 'ynnpack'
  assert resolve('auto', 'float32', str(tmp_path / 'absent')) == 'ynnpack'
  assert resolve('ynnpack', 'float32', intel) == 'ynnpack'
  with pytest.raises(ValueError, match='train.cpu_matmul'):
    xla_flags.resolve_cpu_matmul('mkl')
  with pytest.raises(ValueError, match='train.cpu_matmul'):
    configuration.validate_config(load('configs/synthetic.py', '--config.train.cpu_matmul=mkl'))


def test_compilation_cache_folder_follows_the_config_and_user_settings_win(
    monkeypatch, tmp_path):
  config = load('configs/synthetic.py')
  from concepthash_jax.data import cache  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cache, 'default_dir', lambda: str(tmp_path / 'user_cache'))
  # Beside the image caches, one subfolder per kind of machine and JAX build.
  default = str(tmp_path / 'user_cache' / 'xla' / xla_flags.host_key())
  assert xla_flags.compilation_cache_dir(config) == default
  assert xla_flags.compilation_cache_dir(None) == default  # Tools without a config.
  config.train.compilation_cache_dir = str(tmp_path / 'mine')
  assert xla_flags.compilation_cache_dir(config) == str(tmp_path / 'mine' / xla_flags.host_key())
  config.train.compilation_cache_dir = 'gs://bucket/xla'  # JAX's to reach: as given.
  assert xla_flags.compilation_cache_dir(config) == 'gs://bucket/xla/' + xla_flags.host_key()
  cpus = []
  for flags_ in ('fma avx2', 'fma avx2 avx512f'):
    cpus.append(tmp_path / f'cpuinfo_{len(cpus)}')
    cpus[-1].write_text(f'processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags_}\n\n'
                        'processor\t: 1\nflags\t\t: other\n')
  keys = [xla_flags.host_key(str(cpu)) for cpu in cpus]
  assert keys[0] != keys[1] and keys[0] == xla_flags.host_key(str(cpus[0]))
  assert re.fullmatch(r'\w+-[0-9a-f]{12}', keys[0]), keys
  config.train.compilation_cache = False
  assert xla_flags.compilation_cache_dir(config) is None
  # This session's cache (conftest) is the user's choice: left as it is.
  session = jax.config.jax_compilation_cache_dir
  config.train.compilation_cache = True
  assert xla_flags.configure_compilation_cache(config) is None
  assert jax.config.jax_compilation_cache_dir == session
  assert not os.path.exists(tmp_path / 'mine')
  # An explicit folder that cannot be one: one sentence naming the key and the ways on.
  monkeypatch.setattr(xla_flags, '_user_chose_cache', lambda: False)
  (tmp_path / 'a_file').write_text('')
  config.train.compilation_cache_dir = str(tmp_path / 'a_file' / 'xla')
  with pytest.raises(errors.ConfigError,
                     match=r"config\.train\.compilation_cache_dir='.*a_file/xla' cannot hold "
                     r'the compilation cache .*--config\.train\.compilation_cache=False'):
    xla_flags.configure_compilation_cache(config)
  # The default folder that cannot be one: no cache, no error.
  monkeypatch.setattr(cache, 'default_dir', lambda: str(tmp_path / 'a_file'))
  assert xla_flags.configure_compilation_cache(None) is None


def test_every_choice_list_is_the_owning_modules_own():
  # configuration reads the lists; it keeps no copy that could drift.
  from concepthash_jax import data  # pylint: disable=g-import-not-at-top
  from concepthash_jax.models import concepthash  # pylint: disable=g-import-not-at-top
  assert configuration.CHOICES['model.center_type'] is concepthash.CENTER_TYPES
  assert configuration.CHOICES['data.name'] == ('synthetic', 'cub', 'cars',
                                                'aircraft', 'nabirds')
  assert configuration.CHOICES['data.source'] == tuple(data.SOURCES)


def test_a_loss_gets_only_the_keywords_it_declares():
  loss_cfg = load('configs/synthetic.py').loss
  loss_cfg.unlock()
  loss_cfg.new_key = 3.0  # A key no loss asked for: not forced on any.

  def weighted_csd(aux, labels, *, weight_csd, scale=1.0):
    del labels
    return weight_csd * scale * aux['x'], {}
  assert configuration.loss_keywords(weighted_csd, loss_cfg) == {
      'weight_csd': loss_cfg.weight_csd, 'scale': loss_cfg.scale}

  def wants_all(aux, labels, **kwargs):
    return 0.0, kwargs
  assert configuration.loss_keywords(wants_all, loss_cfg)['new_key'] == 3.0

  def needs_unknown(aux, labels, *, temperature):
    return temperature, {}
  with pytest.raises(ValueError, match=r"needs keyword\(s\) \['temperature'\] "
                     'that config.loss does not have'):
    configuration.loss_keywords(needs_unknown, loss_cfg)
  # The built-in loss, bound: only (aux, labels) left to pass.
  fn = configuration.make_loss_fn(loss_cfg)
  assert fn.func is configuration.losses.total_loss
  assert 'new_key' not in fn.keywords


def test_workdir_config_check_classifies_every_key():
  config = load('configs/synthetic.py').to_dict()
  keys = workdir.flatten(config)
  assert set(workdir.HARMLESS) <= set(keys)  # The table names real keys.
  changed = {**config, 'seed': 1,
             'model': {**config['model'], 'nbit': 32, 'remat': 'none'},
             'optim': {**config['optim'], 'lr': 0.5},
             'eval': {**config['eval'], 'every_epochs': 3},
             'train': {**config['train'], 'max_steps': 7}}
  breaking, harmless = workdir.config_changes(config, changed)
  assert breaking == {'model.nbit': (config['model']['nbit'], 32),
                      'optim.lr': (config['optim']['lr'], 0.5),
                      'seed': (0, 1)}
  assert set(harmless) == {'model.remat', 'eval.every_epochs',
                           'train.max_steps'}
  # A key one side lacks (another code version) is not compared.
  older = {**config, 'model': {k: v for k, v in config['model'].items()
                               if k != 'remat'}}
  assert workdir.config_changes(older, config) == ({}, {})
