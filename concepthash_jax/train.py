"""Training and evaluation of ConceptHash: state, steps and the loop.

`train_and_evaluate(config, workdir)` is the only place that does I/O: it
builds data, model and state, runs the jitted `train_step`, logs
(metrics.jsonl, TensorBoard, tqdm), evaluates mAP@R (queries = test split,
database = train split with test transforms, SPEC §5), checkpoints and writes
results.json (SPEC §6.3). The steps are module-level pure functions whose
static pieces (model, optimizer, loss) are bound with functools.partial.

Reproducibility: data order and augmentation depend on (seed, epoch), dropout
on fold_in(rng, step), so a run resumed from any checkpoint ends bit-identical
to an uninterrupted one.
"""
import functools
import itertools
import json
import math
import os
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from concepthash_jax import checkpointing
from concepthash_jax import configuration
from concepthash_jax import data as data_lib
from concepthash_jax import encoding
from concepthash_jax import models
from concepthash_jax import optim
from concepthash_jax import sharding
from concepthash_jax.interop import hf
from concepthash_jax.models import concepthash

# Re-exported: the public entry points of training live in this module.
validate_config = configuration.validate_config
resolve_loss_fn = configuration.resolve_loss_fn
loss_kwargs = configuration.loss_kwargs
encode_step = encoding.encode_step
encode_dataset = encoding.encode_dataset
chance_map_at_r = encoding.chance_map_at_r
evaluate = encoding.evaluate

# Files a run keeps beside its checkpoints so that it can be restored for
# inference without the dataset or the network.
CONFIG_FILE = 'config.json'
CLIP_CONFIG_FILE = 'clip_config.json'
CLASS_NAMES_FILE = 'class_names.json'
RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array  # () int32, optimizer steps taken.
  params: Any  # Full tree: trainable and frozen CLIP weights.
  opt_state: Any  # Optimizer state of the trainable sub-tree only.
  model_state: Any  # {'batch_stats': code BN stats, 'centers': text embeds}.
  rng: jax.Array  # Base key; step keys are fold_in(rng, step).


# ---------------------------------------------------------------- steps


def _to_float32(tree):
  """Casts floating leaves to float32 (losses run in float32 under bf16)."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def train_step(state: TrainState, batch: dict, *, model, tx, loss_fn,
               loss_kwargs: dict, trainable_mask, schedule):
  """One SGD step on a global batch; pure and jittable.

  Args:
    state: the TrainState.
    batch: {'image': (B,S,S,3) uint8 or normalised float32, 'label': (B,) int32, ...} global arrays.
    model: the ConceptHash module (static).
    tx: optax transformation over the trainable sub-tree (static).
    loss_fn: (aux, labels, **loss_kwargs) -> (loss, metrics) (static).
    loss_kwargs: static keyword arguments of `loss_fn`.
    trainable_mask: bool tree like params; True = trained.
    schedule: step -> lr, only for logging.

  Returns:
    (new_state, metrics) with scalar metrics (loss terms, 'loss', 'lr').
  """
  batch = dict(batch, image=data_lib.transforms.to_model_input(batch['image']))
  # Same key for the same step whatever happened before: resume replays it.
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  trainable, frozen = optim.partition_params(state.params, trainable_mask)

  def objective(trainable):
    params = optim.merge_params(trainable, frozen)
    (_, aux), updates = model.apply(
        {'params': params, **state.model_state}, batch['image'], train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    loss, metrics = loss_fn(_to_float32(aux), batch['label'], **loss_kwargs)
    return loss, (metrics, updates)

  (loss, (metrics, updates)), grads = jax.value_and_grad(
      objective, has_aux=True)(trainable)
  param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, param_updates)
  metrics = dict(metrics, loss=loss, lr=schedule(state.step))
  new_state = state.replace(
      step=state.step + 1, params=optim.merge_params(trainable, frozen),
      opt_state=opt_state, model_state={**state.model_state, **updates})
  return new_state, metrics


def jit_train_step(config, model, tx, trainable_mask, schedule, shardings,
                   mesh):
  """`train_step` with its static pieces bound, jitted and donating the state.

  Args:
    config: the run config (loss section).
    model, tx, trainable_mask, schedule: as `train_step`.
    shardings: TrainState of NamedShardings (from `create_train_state`).
    mesh: the device mesh.

  Returns:
    (state, global batch) -> (state, metrics), metrics replicated.
  """
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx,
                        loss_fn=resolve_loss_fn(config.loss.fn),
                        loss_kwargs=loss_kwargs(config.loss),
                        trainable_mask=trainable_mask, schedule=schedule),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0)


def configure_xla_flags(config) -> str:
  """Adds the XLA flags `config.train` asks for to XLA_FLAGS; returns them.

  XLA reads XLA_FLAGS once, when the first backend starts, so call this before
  any JAX computation (launch.py does, first thing). Flags the user already set
  in XLA_FLAGS win. (jax.jit's compiler_options accepts the scheduler flag but
  XLA:CPU does not read it from there: the step's memory is unchanged.)
  """
  wanted = {}
  if not config.train.cpu_concurrency_scheduler:
    # Ignored by GPU/TPU compilers.
    wanted['xla_cpu_enable_concurrency_optimized_scheduler'] = 'false'
  current = os.environ.get('XLA_FLAGS', '')
  added = [f'--{k}={v}' for k, v in wanted.items() if f'--{k}=' not in current]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return ' '.join(added)


# ------------------------------------------------------------ state


def load_clip(model_cfg, seed: int):
  """(CLIPConfig, params) from the hub, a local dir, or 'random' (seeded)."""
  if model_cfg.clip == 'random':
    clip_config = hf.random_clip_config(model_cfg.random_clip)
    return clip_config, hf.init_clip_params(clip_config,
                                            jax.random.PRNGKey(seed))
  return hf.load_clip(model_cfg.clip)


def center_embeddings(model_cfg, clip_config, clip_params, class_names):
  """Text-tower features e_c (C, T) of the class prompts, or None if unused."""
  if model_cfg.center_type != 'language':
    return None
  tokenizer = hf.get_tokenizer(model_cfg.clip, clip_config)
  return concepthash.class_text_embeddings(
      clip_config, clip_params['text_model'], class_names, tokenizer,
      model_cfg.prompt)


def _init_state(rng, clip_params, text_embeds, *, model, tx, image_size):
  """Fresh TrainState: CLIP weights merged into a new ConceptHash init."""
  init_rng, state_rng = jax.random.split(rng)
  sample = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = concepthash.init_variables(model, clip_params, init_rng,
                                         text_embeds, sample)
  variables = dict(variables)
  params = variables.pop('params')
  mask = concepthash.trainable_mask(params)
  trainable, _ = optim.partition_params(params, mask)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(trainable), model_state=variables,
                    rng=state_rng)


def create_train_state(config, model, tx, clip_params, text_embeds, mesh):
  """Builds the state directly in its shardings (no host copy of it all).

  jax.eval_shape gives the structure; shardings follow from it
  (`train.fsdp`); jit(out_shardings=...) then materialises each leaf where
  it lives.

  Args:
    config: the run config.
    model: ConceptHash module.
    tx: optimizer over the trainable sub-tree.
    clip_params: pretrained CLIP params (numpy) or ShapeDtypeStructs.
    text_embeds: (C, T) class text features (numpy) or ShapeDtypeStruct.
    mesh: device mesh.

  Returns:
    (init_fn, abstract_state, state_shardings, trainable_mask): init_fn() ->
    TrainState placed per the shardings; abstract_state carries shardings
    (for checkpoint restore).
  """
  init = functools.partial(_init_state, model=model, tx=tx,
                           image_size=config.data.image_size)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng, clip_params, text_embeds)
  shardings = state_shardings(abstract, mesh, fsdp=config.train.fsdp)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  mask = concepthash.trainable_mask(abstract.params)

  def init_fn():
    return jax.jit(init, out_shardings=shardings)(rng, clip_params,
                                                  text_embeds)
  return init_fn, abstract, shardings, mask


def state_shardings(abstract_state: TrainState, mesh, *, fsdp: bool):
  """Params and optimizer state per `fsdp`; the rest replicated."""
  rep = sharding.replicated(mesh)
  return TrainState(
      step=rep,
      params=sharding.tree_shardings(mesh, abstract_state.params, fsdp=fsdp),
      opt_state=sharding.tree_shardings(mesh, abstract_state.opt_state,
                                        fsdp=fsdp),
      model_state=jax.tree.map(lambda _: rep, abstract_state.model_state),
      rng=rep)


def _reset_to_init(fresh: TrainState, restored: TrainState) -> TrainState:
  """Params/model state of `restored`, step/optimizer/rng of `fresh`."""
  return fresh.replace(params=restored.params,
                       model_state=restored.model_state)


# -------------------------------------------------------- inference


def build_model(config, clip_config, num_classes):
  """ConceptHash from the config (model-core's factory)."""
  return models.build_model(config.model, clip_config, num_classes)


def restore_for_inference(workdir: str, *, step: Optional[int] = None,
                          which: str = 'latest'):
  """Loads a trained run for encoding/explaining; needs no dataset or network.

  Args:
    workdir: a run directory written by `train_and_evaluate`.
    step: explicit checkpoint step; overrides `which`.
    which: 'latest' (the final model, as in results.json) or 'best'.

  Returns:
    (config, model, variables, class_names): variables =
    {'params', 'batch_stats', 'centers'} ready for `model.apply(...,
    train=False)` on the default device(s).
  """
  config = read_run_config(workdir)
  clip_config = _read_clip_config(workdir)
  with open(os.path.join(workdir, CLASS_NAMES_FILE)) as f:
    class_names = json.load(f)
  model = build_model(config, clip_config, len(class_names))
  mesh = sharding.create_mesh()
  tx = optim.make_optimizer(config.optim, 1)  # Structure only.
  abstract_clip = abstract_vision_params(clip_config)
  abstract_text = None
  if config.model.center_type == 'language':
    abstract_text = jax.ShapeDtypeStruct(
        (len(class_names), clip_config.text_config.hidden_size), jnp.float32)
  _, abstract, _, _ = create_train_state(config, model, tx, abstract_clip,
                                         abstract_text, mesh)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir))
  try:
    if step is None:
      if which not in ('latest', 'best'):
        raise ValueError(f"which={which!r}; valid: ['latest', 'best']")
      step = ckpt.best_step() if which == 'best' else ckpt.latest_step()
      step = ckpt.latest_step() if step is None else step
    state = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return config, model, {'params': state.params, **state.model_state}, \
      class_names


def abstract_vision_params(clip_config):
  """{'vision_model': ShapeDtypeStructs} of a CLIP config (no text tower traced)."""
  vision_config = clip_config.vision_config
  pixels = jax.ShapeDtypeStruct(
      (1, vision_config.image_size, vision_config.image_size, 3), jnp.float32)
  module = hf.vision_module_from_config(vision_config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
  return {'vision_model': shapes['params']}


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (workdir/config.json)."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(json.load(f))


def _read_clip_config(workdir: str):
  """The CLIPConfig a run was built with (saved so inference is offline)."""
  import transformers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, CLIP_CONFIG_FILE)) as f:
    return transformers.CLIPConfig.from_dict(json.load(f))


# -------------------------------------------------------------- loop


class _Writer:
  """metrics.jsonl + TensorBoard on process 0; silent elsewhere."""

  def __init__(self, workdir: str, start_step: int):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    path = os.path.join(workdir, METRICS_FILE)
    # A resumed run replays the steps after its checkpoint: drop their lines.
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= start_step]
    with open(path, 'w') as f:
      f.writelines(kept)
    self.history = [json.loads(l) for l in kept]
    self.jsonl = open(path, 'a')
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict):
    """Writes scalars named 'train/...' / 'eval/...' at `step`."""
    if not self.active:
      return
    self.jsonl.write(json.dumps({'step': int(step), **{
        k: float(v) for k, v in scalars.items()}}) + '\n')
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def close(self):
    """Closes the files."""
    if self.active:
      self.jsonl.close()
      self.tb.close()


def _write_json(path: str, obj):
  """Writes `obj` as JSON on process 0 only (shared filesystem)."""
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(obj, f, indent=2)


def _check_finite(step: int, logged: dict, ckpt):
  """Stops the run with a clear message on a NaN/inf loss."""
  bad = {k: v for k, v in logged.items() if not math.isfinite(v)}
  if bad:
    last = ckpt.latest_step()
    where = (f'the last good checkpoint (step {last}) is kept in '
             f'{ckpt.directory}' if last is not None else 'no checkpoint yet')
    raise FloatingPointError(
        f'Non-finite training metrics {bad} by step {step}; stopping; {where}. '
        'Lower config.optim.lr or check the data.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains, evaluates and writes workdir/results.json (SPEC §6.3).

  Args:
    config: a config from configs/*.py (validated here again).
    workdir: run directory (checkpoints, metrics, results); resumes from it.

  Returns:
    The results dict (also in results.json), or {'preempted': True, 'step':
    s} when a SIGTERM stopped the run after saving step s.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.data.batch_size, mesh)
  sharding.check_batch_size(config.data.eval_batch_size, mesh,
                            'data.eval_batch_size')
  pc, pi = jax.process_count(), jax.process_index()
  local_bs = config.data.batch_size // pc
  local_eval_bs = config.data.eval_batch_size // pc

  train_ds = data_lib.build(config.data, 'train', process_index=pi,
                            process_count=pc)
  test_ds = data_lib.build(config.data, 'test', process_index=pi,
                           process_count=pc)
  class_names = list(train_ds.class_names)
  for ds in (train_ds, test_ds):
    if getattr(ds, 'num_skipped', 0):
      logging.warning('%s split: skipped %d corrupt images (data.on_corrupt='
                      "'skip')", ds.split, ds.num_skipped)
  steps_per_epoch = data_lib.num_batches(
      len(train_ds), batch_size=local_bs, process_count=pc,
      drop_remainder=True)
  if steps_per_epoch == 0:
    raise ValueError(f'The train split ({len(train_ds)} images) is smaller '
                     f'than one batch (data.batch_size='
                     f'{config.data.batch_size})')
  total_steps = config.optim.epochs * steps_per_epoch
  stop_step = (min(total_steps, config.train.max_steps)
               if config.train.max_steps > 0 else total_steps)

  clip_config, clip_params = load_clip(config.model, config.seed)
  text_embeds = center_embeddings(config.model, clip_config, clip_params,
                                  class_names)
  # The text tower is needed only for the centers: keep it out of the state.
  clip_params = {'vision_model': clip_params['vision_model']}
  model = build_model(config, clip_config, len(class_names))
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  schedule = optim.make_schedule(config.optim, steps_per_epoch)
  init_fn, abstract, shardings, mask = create_train_state(
      config, model, tx, clip_params, text_embeds, mesh)

  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir),
                                    keep=config.train.keep_checkpoints)
  state, source = checkpointing.restore_or_initialize(
      ckpt, abstract, init_fn=init_fn, resume=config.train.resume,
      init=config.train.init, reset_fn=_reset_to_init)
  del clip_params
  step = int(jax.device_get(state.step))
  logging.info('Starting from %s at step %d of %d (%d per epoch).', source,
               step, total_steps, steps_per_epoch)
  _write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))
  _write_json(os.path.join(workdir, CLIP_CONFIG_FILE), clip_config.to_dict())
  _write_json(os.path.join(workdir, CLASS_NAMES_FILE), class_names)

  p_train_step = jit_train_step(config, model, tx, mask, schedule, shardings,
                                mesh)

  def eval_batches(ds):
    return data_lib.batches(ds, config.data, train=False,
                            batch_size=local_eval_bs, seed=config.seed,
                            epoch=0, drop_remainder=False)

  def run_eval(state):
    variables = {'params': state.params, **state.model_state}
    result = evaluate(model, variables, eval_batches(test_ds),
                      eval_batches(train_ds), eval_cfg=config.eval, mesh=mesh)
    return result

  writer = _Writer(workdir, step)
  evals = [h for h in getattr(writer, 'history', []) if 'eval/map_at_r' in h]
  best = max((h['eval/map_at_r'] for h in evals), default=None)
  preempt = checkpointing.PreemptionFlag().install()
  pending, last_loss, last_eval, eval_result = [], None, None, None
  t_log, n_log = time.perf_counter(), 0
  bar = _progress_bar(total=stop_step, initial=step)

  def flush_metrics(step):
    """Fetches the pending step metrics, checks them, logs their mean."""
    nonlocal pending, t_log, n_log, last_loss
    if not pending:
      return
    fetched = jax.device_get(pending)
    means = {f'train/{k}': float(np.mean([m[k] for m in fetched]))
             for k in fetched[0] if k != 'total'}  # 'total' == 'loss'.
    means['train/lr'] = float(fetched[-1]['lr'])
    last_loss = float(fetched[-1]['loss'])
    _check_finite(step, {k: means[k] for k in means if 'loss' in k}, ckpt)
    dt = time.perf_counter() - t_log
    means['train/img_per_sec'] = n_log * config.data.batch_size / max(dt, 1e-9)
    writer.write(step, means)
    bar.set_postfix(loss=f'{means["train/loss"]:.4f}',
                    img_s=f'{means["train/img_per_sec"]:.1f}')
    pending, t_log, n_log = [], time.perf_counter(), 0

  def save(step, map_at_r=None):
    flush_metrics(step)  # Never checkpoint a state whose loss went non-finite.
    ckpt.save(step, state, map_at_r=map_at_r)

  def report_eval(step, result, best):
    """Logs an eval result beside its chance level."""
    writer.write(step, {'eval/map_at_r': result['map_at_r'],
                        'eval/chance_map_at_r': result['chance_map_at_r'],
                        'eval/best_map_at_r': best})
    message = (f'step {step} (epoch {step / steps_per_epoch:.2f}): mAP@R '
               f'{result["map_at_r"]:.4f} (best {best:.4f}, chance '
               f'{result["chance_map_at_r"]:.4f})')
    if jax.process_index() == 0:
      bar.write(message)
    logging.info(message)

  def maybe_stop(step):
    """Saves and reports True when SIGTERM asked to stop (same steps on all hosts)."""
    if not preempt.requested(step):
      return False
    save(step)
    logging.warning('SIGTERM: saved step %d to %s; exiting.', step,
                    ckpt.directory)
    return True

  try:
    batches, batches_epoch = None, None
    while step < stop_step:
      epoch = step // steps_per_epoch
      if batches_epoch != epoch:
        # Order depends on (seed, epoch) only; resuming mid-epoch skips the
        # steps already done, so the run sees exactly the same batches.
        batches = itertools.islice(
            data_lib.batches(train_ds, config.data, train=True,
                             batch_size=local_bs, seed=config.seed,
                             epoch=epoch, drop_remainder=True),
            step - epoch * steps_per_epoch, steps_per_epoch)
        batches_epoch = epoch
      batch = next(batches)
      inputs = sharding.global_batch(
          {'image': batch['image'], 'label': batch['label']}, mesh)
      state, metrics = p_train_step(state, inputs)
      pending.append(metrics)
      step += 1
      n_log += 1
      bar.update(1)
      log_now = step % config.train.log_every_steps == 0
      if log_now or step == stop_step:
        flush_metrics(step)
      epoch_end = step % steps_per_epoch == 0
      if (epoch_end and (step // steps_per_epoch) % config.eval.every_epochs
          == 0) or step == stop_step:
        flush_metrics(step)
        eval_result = run_eval(state)
        last_eval, best = step, max(best or 0.0, eval_result['map_at_r'])
        report_eval(step, eval_result, best)
        save(step, eval_result['map_at_r'])
      elif step % config.train.checkpoint_every_steps == 0:
        save(step)
      if (log_now or epoch_end) and step < stop_step and maybe_stop(step):
        return {'preempted': True, 'step': step}
    if last_eval != step:  # Resumed at the very end: evaluate what is there.
      eval_result = run_eval(state)
      best = max(best or 0.0, eval_result['map_at_r'])
      report_eval(step, eval_result, best)
      save(step, eval_result['map_at_r'])
    flush_metrics(step)
  finally:
    bar.close()
    preempt.uninstall()
    writer.close()
    ckpt.close()

  if last_loss is None:  # Nothing trained in this process: read the log.
    losses_logged = [h['train/loss'] for h in getattr(writer, 'history', [])
                     if 'train/loss' in h]
    last_loss = losses_logged[-1] if losses_logged else float('nan')
  results = {
      'map_at_r': eval_result['map_at_r'],
      'nbit': int(config.model.nbit),
      'dataset': config.data.name,
      'step': int(step),
      'loss': float(last_loss),
      'best_map_at_r': float(best),
      'chance_map_at_r': eval_result['chance_map_at_r'],
      'epochs': step / steps_per_epoch,
      'steps_per_epoch': steps_per_epoch,
      'num_concepts': int(config.model.num_concepts),
      'num_classes': len(class_names),
      'num_queries': eval_result['num_queries'],
      'num_database': eval_result['num_database'],
      'ties': config.eval.ties,
  }
  _write_json(os.path.join(workdir, RESULTS_FILE), results)
  logging.info('Final mAP@R %.4f (best %.4f, chance %.4f) at step %d.',
               results['map_at_r'], results['best_map_at_r'],
               results['chance_map_at_r'], step)
  return results


def _progress_bar(total: int, initial: int):
  """tqdm bar (steps/s, ETA) on process 0; a silent stand-in elsewhere."""
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, unit='step',
                   dynamic_ncols=True, disable=jax.process_index() != 0)
