"""Training and evaluation of ConceptHash: state, steps and the loop.

`train_and_evaluate(config, workdir)` is the only place that does I/O: it
builds data, model and state, runs the jitted `train_step`, logs
(metrics.jsonl, TensorBoard, tqdm), evaluates mAP@R (queries = test split,
database = train split with test transforms, docs/method.md §5.1), checkpoints and writes
results.json (docs/method.md §6.3). The steps are module-level pure functions whose
static pieces (model, optimizer, loss) are bound with functools.partial.

Reproducibility: data order and augmentation depend on (seed, epoch), dropout
on fold_in(rng, step), so a run resumed from any checkpoint ends bit-identical
to an uninterrupted one.
"""
import functools
import json
import math
import os
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from concepthash_jax import checkpointing
from concepthash_jax import configuration
from concepthash_jax import data as data_lib
from concepthash_jax import encoding
from concepthash_jax import evaluation
from concepthash_jax import metrics_log
from concepthash_jax import models
from concepthash_jax import optim
from concepthash_jax import preemption
from concepthash_jax import run_files
from concepthash_jax import safe_files
from concepthash_jax import sharding
from concepthash_jax import workdir as workdir_lib
from concepthash_jax import xla_flags
from concepthash_jax.interop import hf
from concepthash_jax.models import concepthash


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


def objective(trainable, frozen, model_state, images, labels, dropout_rng, *,
              model, loss_fn):
  """The training loss as a function of the trainable params (what is differentiated).

  Args:
    trainable, frozen: the two parts of the params (`optim.partition_params`).
    model_state: {'batch_stats', 'centers'}.
    images: (B,S,S,3) float32.
    labels: (B,) int32 or (B,C) multi-hot.
    dropout_rng: key of this step's dropout.
    model: the ConceptHash module (static).
    loss_fn: (aux, labels) -> (loss, metrics), keywords bound (static).

  Returns:
    (loss, (metrics, batch-stat updates, aux)): the `has_aux` form of
    jax.value_and_grad; aux is the model's (uncast) output dict.
  """
  params = optim.merge_params(trainable, frozen)
  (_, aux), updates = model.apply(
      {'params': params, **model_state}, images, train=True,
      rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  loss, metrics = loss_fn(_to_float32(aux), labels)
  return loss, (metrics, updates, aux)


def train_step(state: TrainState, batch: dict, *, model, tx, loss_fn,
               trainable_mask, schedule):
  """One SGD step on a global batch; pure and jittable.

  Args:
    state: the TrainState.
    batch: {'image': (B,S,S,3) uint8 (or normalised float32), 'label': (B,) int32,
      ...} global arrays.
    model: the ConceptHash module (static).
    tx: optax transformation over the trainable sub-tree (static).
    loss_fn: (aux, labels) -> (loss, metrics), keywords bound (static; see
      `configuration.make_loss_fn`).
    trainable_mask: bool tree like params; True = trained.
    schedule: step -> lr, only for logging.

  Returns:
    (new_state, metrics) with scalar metrics (loss terms, 'loss', 'lr').
  """
  batch = dict(batch, image=data_lib.transforms.to_model_input(batch['image']))
  # Same key for the same step whatever happened before: resume replays it.
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  trainable, frozen = optim.partition_params(state.params, trainable_mask)
  (loss, (metrics, updates, _)), grads = jax.value_and_grad(
      objective, has_aux=True)(trainable, frozen, state.model_state,
                               batch['image'], batch['label'], dropout_rng,
                               model=model, loss_fn=loss_fn)
  param_updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, param_updates)
  metrics = dict(metrics, loss=loss, lr=schedule(state.step))
  new_state = state.replace(
      step=state.step + 1, params=optim.merge_params(trainable, frozen),
      opt_state=opt_state, model_state={**state.model_state, **updates})
  return new_state, metrics


def jit_train_step(loss_fn: Callable, model, tx, trainable_mask, schedule,
                   shardings, mesh, cpu_matmul: str = 'auto'):
  """`train_step` with its static pieces bound, jitted and donating the state.

  Args:
    loss_fn: (aux, labels) -> (loss, metrics), from
      `configuration.make_loss_fn(config.loss)`.
    model, tx, trainable_mask, schedule: as `train_step`.
    shardings: TrainState of NamedShardings (from `create_train_state`).
    mesh: the device mesh.
    cpu_matmul: config train.cpu_matmul (XLA:CPU matmul library).

  Returns:
    (state, global batch) -> (state, metrics), metrics replicated.
  """
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                        trainable_mask=trainable_mask, schedule=schedule),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
      compiler_options=xla_flags.compiler_options(cpu_matmul, model.dtype))


# ------------------------------------------------------------ state


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


# -------------------------------------------------------------- loop


def _write_json(path: str, obj):
  """Writes `obj` as JSON on process 0 only (shared filesystem)."""
  if jax.process_index() == 0:
    safe_files.write_json(path, obj)


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


def _train_batches(train_ds, config, mesh, *, start_step: int,
                   stop_step: int):
  """Global train batches for steps start_step + 1 .. stop_step.

  One pipeline for all of them (`data.train_batches`), so its workers start
  once per run. Order depends on (seed, epoch) only; resuming mid-epoch
  starts at the next step's batch, so the run sees exactly the same batches.
  Closing this generator (the loop ends, raises or stops on SIGTERM) closes
  the pipeline and stops its workers.
  """
  local_bs = config.data.batch_size // jax.process_count()
  local = data_lib.train_batches(train_ds, config.data, batch_size=local_bs,
                                 seed=config.seed, start_step=start_step,
                                 stop_step=stop_step)
  try:
    for batch in local:
      yield sharding.global_batch(
          {'image': batch['image'], 'label': batch['label']}, mesh)
  finally:
    local.close()


def build_results(config, *, step: int, steps_per_epoch: int,
                  eval_result: dict, best: float, loss: float,
                  num_classes: int, skipped_images: dict) -> dict:
  """The results.json dict (docs/method.md §6.3) of a finished run.

  skipped_images: {split: paths left out as corrupt (data.on_corrupt='skip')}.
  """
  return {
      'map_at_r': eval_result['map_at_r'],
      'nbit': int(config.model.nbit),
      'dataset': config.data.name,
      'step': int(step),
      'loss': float(loss),
      'best_map_at_r': float(best),
      'chance_map_at_r': eval_result['chance_map_at_r'],
      'epochs': step / steps_per_epoch,
      'steps_per_epoch': steps_per_epoch,
      'num_concepts': int(config.model.num_concepts),
      'num_classes': num_classes,
      'num_queries': eval_result['num_queries'],
      'num_database': eval_result['num_database'],
      'ties': config.eval.ties,
      'skipped_images': skipped_images,
  }


class _Run:
  """One run's pieces (data, model, jitted step, checkpoints, log) and state.

  Built by `train_and_evaluate`, which drives the loop; the methods are the
  loop's recurring actions.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    """Builds data, model and state (restored per the resume order)."""
    self.config = config
    self.mesh = mesh = sharding.create_mesh()
    sharding.check_batch_size(config.data.batch_size, mesh)
    sharding.check_batch_size(config.data.eval_batch_size, mesh,
                              'data.eval_batch_size')
    pc, pi = jax.process_count(), jax.process_index()
    self.train_ds = data_lib.build(config.data, 'train', process_index=pi,
                                   process_count=pc)
    self.test_ds = data_lib.build(config.data, 'test', process_index=pi,
                                  process_count=pc)
    self.class_names = list(self.train_ds.class_names)
    for message in data_lib.core.data_warnings(self.train_ds, self.test_ds):
      logging.warning(message)
    self.steps_per_epoch = data_lib.num_batches(
        len(self.train_ds), batch_size=config.data.batch_size // pc,
        process_count=pc, drop_remainder=True)
    if self.steps_per_epoch == 0:
      raise ValueError(f'The train split ({len(self.train_ds)} images) is '
                       'smaller than one batch (data.batch_size='
                       f'{config.data.batch_size})')
    total_steps = config.optim.epochs * self.steps_per_epoch
    self.stop_step = (min(total_steps, config.train.max_steps)
                      if config.train.max_steps > 0 else total_steps)

    clip_config, clip_params = hf.load_backbone(config.model, config.seed)
    text_embeds = center_embeddings(config.model, clip_config, clip_params,
                                    self.class_names)
    # The text tower is needed only for the centers: keep it out of the state.
    clip_params = {'vision_model': clip_params['vision_model']}
    self.model = models.build_model(config.model, clip_config,
                                    len(self.class_names))
    tx = optim.make_optimizer(config.optim, self.steps_per_epoch)
    schedule = optim.make_schedule(config.optim, self.steps_per_epoch)
    init_fn, abstract, shardings, mask = create_train_state(
        config, self.model, tx, clip_params, text_embeds, mesh)
    self.ckpt = checkpointing.Checkpointer(
        checkpointing.checkpoint_dir(workdir),
        keep=config.train.keep_checkpoints)
    self.state, source = checkpointing.restore_or_initialize(
        self.ckpt, abstract, init_fn=init_fn, resume=config.train.resume,
        init=config.train.init, reset_fn=_reset_to_init)
    del clip_params
    self.start_step = int(jax.device_get(self.state.step))
    logging.info('Starting from %s at step %d of %d (%d per epoch).', source,
                 self.start_step, total_steps, self.steps_per_epoch)
    for name, obj in ((run_files.CONFIG_FILE, json.loads(config.to_json())),
                      (run_files.CLIP_CONFIG_FILE, clip_config.to_dict()),
                      (run_files.CLASS_NAMES_FILE, self.class_names)):
      _write_json(os.path.join(workdir, name), obj)
    self.train_step = jit_train_step(
        configuration.make_loss_fn(config.loss), self.model, tx, mask,
        schedule, shardings, mesh, config.train.cpu_matmul)
    self.log = metrics_log.MetricsLogger(
        workdir, start_step=self.start_step, total_steps=self.stop_step,
        batch_size=config.data.batch_size)
    self.best = self.log.best_logged('eval/map_at_r')
    self.last_eval, self.eval_result = None, None
    self.preempt = preemption.PreemptionFlag().install()

  def flush(self, step: int):
    """Fetches the pending step metrics, checks them, logs their mean."""
    means = self.log.take_means()
    if means is not None:
      _check_finite(step, {k: v for k, v in means.items() if 'loss' in k},
                    self.ckpt)
      self.log.write(step, means)

  def save(self, step: int, map_at_r: Optional[float] = None):
    """Checkpoints the state (never one whose loss went non-finite)."""
    self.flush(step)
    self.ckpt.save(step, self.state, map_at_r=map_at_r)

  def evaluate_and_save(self, step: int):
    """Evaluates mAP@R, updates the best, reports it, checkpoints with it."""
    self.flush(step)
    variables = {'params': self.state.params, **self.state.model_state}
    encoded = [encoding.encode_split(
        self.model, variables, ds, self.config.data, mesh=self.mesh,
        desc=f'eval {role}', cpu_matmul=self.config.train.cpu_matmul)
               for role, ds in (('queries', self.test_ds), ('database', self.train_ds))]
    result = evaluation.score(*encoded, self.config.eval, mesh=self.mesh)
    self.eval_result, self.last_eval = result, step
    self.best = max(self.best or 0.0, result['map_at_r'])
    self.log.write(step, {'eval/map_at_r': result['map_at_r'],
                          'eval/chance_map_at_r': result['chance_map_at_r'],
                          'eval/best_map_at_r': self.best})
    self.log.message(
        f'step {step} (epoch {step / self.steps_per_epoch:.2f}): mAP@R '
        f'{result["map_at_r"]:.4f} (best {self.best:.4f}, chance '
        f'{result["chance_map_at_r"]:.4f})')
    self.save(step, result['map_at_r'])

  def stop_requested(self, step: int) -> bool:
    """Saves and says True when SIGTERM asked to stop (same steps on all hosts)."""
    if not self.preempt.requested(step):
      return False
    self.save(step)
    logging.warning('SIGTERM: saved step %d to %s; exiting.', step,
                    self.ckpt.directory)
    return True

  def close(self):
    """Releases the signal handler, the log and the checkpointer."""
    self.preempt.uninstall()
    self.log.close()
    self.ckpt.close()


@workdir_lib.guarded  # One run per workdir; config must match its checkpoints.
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains, evaluates and writes workdir/results.json (docs/method.md §6.3).

  Args:
    config: a config from configs/*.py (validated here again).
    workdir: run directory (checkpoints, metrics, results); resumes from it.

  Returns:
    The results dict (also in results.json), or {'preempted': True, 'step':
    s} when a SIGTERM stopped the run after saving step s.
  """
  configuration.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  run = _Run(config, workdir)
  step, per_epoch = run.start_step, run.steps_per_epoch
  feed = _train_batches(run.train_ds, config, run.mesh, start_step=step,
                        stop_step=run.stop_step)
  try:
    for batch in feed:
      run.state, metrics = run.train_step(run.state, batch)
      step += 1
      run.log.add_step(metrics)
      log_now = step % config.train.log_every_steps == 0
      if log_now or step == run.stop_step:
        run.flush(step)
      epoch_end = step % per_epoch == 0
      if step == run.stop_step or (
          epoch_end and (step // per_epoch) % config.eval.every_epochs == 0):
        run.evaluate_and_save(step)
      elif step % config.train.checkpoint_every_steps == 0:
        run.save(step)
      if (log_now or epoch_end) and step < run.stop_step and (
          run.stop_requested(step)):
        return {'preempted': True, 'step': step}
    if run.last_eval != step:  # Resumed at the very end: evaluate what is there.
      run.evaluate_and_save(step)
    run.flush(step)
  finally:
    feed.close()  # Stops the data workers now, not at garbage collection.
    run.close()

  results = build_results(
      config, step=step, steps_per_epoch=per_epoch,
      eval_result=run.eval_result, best=run.best, loss=run.log.final_loss(),
      num_classes=len(run.class_names),
      skipped_images={ds.split: list(ds.skipped)
                      for ds in (run.train_ds, run.test_ds)})
  _write_json(os.path.join(workdir, run_files.RESULTS_FILE), results)
  logging.info('Final mAP@R %.4f (best %.4f, chance %.4f) at step %d.',
               results['map_at_r'], results['best_map_at_r'],
               results['chance_map_at_r'], step)
  return results
