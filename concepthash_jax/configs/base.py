r"""Every config key concepthash_jax reads, with its default and the reason for it.

Dataset configs import this file and override what differs. The defaults are the
authors' released recipe (github kamwoh/concepthash, `concept_hash_final_v1_nosa_apt`),
because that recipe produced the paper's numbers; `configs/paper.py` switches to the
choices written in the paper (docs/method.md §4 lists each switch and its key).

Override any key from the command line, e.g.
  concepthash-train --config=cub --workdir=runs/cub --config.model.nbit=16
An unknown key is an error (the config is locked).
"""
import ml_collections
from ml_collections import config_dict

from concepthash_jax.configs import common


def get_config():
  """Returns the full default config (released recipe, CUB-like sizes)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # One seed drives init, data order, augmentation and dropout.

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  # HF hub name, a local directory holding config.json + model.safetensors, or
  # "random": a randomly initialised CLIP built from `model.random_clip` (offline).
  model.clip = 'openai/clip-vit-base-patch32'
  model.random_clip = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=32, vision_width=768, vision_layers=12,
      vision_heads=12, vision_mlp=3072, projection_dim=512, text_width=512,
      text_layers=12, text_heads=8, text_mlp=2048, vocab_size=49408,
      max_text_len=77))
  model.num_concepts = 4  # M: concept tokens, one sub-code each.
  model.nbit = 64  # K: code length; must be divisible by num_concepts.
  model.concept_tokens = 'generated'  # 'generated' (released) | 'learned' (paper Eq. 1).
  model.generator_heads = 8  # Heads of the concept-token generator's MHA.
  model.dropout = 0.1  # Dropout inside the concept-token generator.
  model.adapter_dim = 384  # AdaptFormer bottleneck width.
  model.code_norm = 'batchnorm'  # 'batchnorm' (released) | 'none' (paper).
  model.center_type = 'language'  # 'language' | 'random_orthogonal' | 'learnable' (Table 2).
  model.center_input = 'sign'  # 'sign' (released: sign(e_c), frozen) | 'raw' (paper).
  model.center_projection = 'mlp'  # 'mlp' (released) | 'linear' (paper).
  model.concept_embedding = 'separate'  # 'separate' E' (released) | 'shared' with E (paper).
  model.prompt = 'a photo of a {}'  # Text prompt for the language centers.
  model.dtype = 'float32'  # Compute dtype: 'float32' | 'bfloat16' (params stay float32).
  # ViT activations kept for the backward pass: 'dots' (weight-matmul outputs; the
  # rest is recomputed) | 'none' (all) | 'full' (layer inputs only). 'dots' keeps
  # what is costly to recompute and drops the cheap memory-bound rest.
  model.remat = 'dots'

  # ----------------------------------------------------------------- loss
  config.loss = loss = ml_collections.ConfigDict()
  # '' = concepthash_jax.losses.total_loss; or 'my_module.my_loss' with the same signature.
  loss.fn = ''
  loss.scale = 8.0  # s = 1/tau of the cosine logits.
  loss.margin = 0.2  # Released margin (paper: 0).
  loss.concept_margin = 'first'  # 'first' (released quirk, parity) | 'all'.
  loss.weight_cont = 1.0  # L_clf (Eq. 6).
  loss.weight_bin = 1.0  # L_quan (Eq. 7).
  loss.weight_concept = 1.0  # L_cd (Eq. 9).
  loss.weight_csd = 0.0  # L_csd (Eq. 8): released 0, paper 1.

  # ----------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.name = 'cub'  # 'synthetic' | 'cub' | 'cars' | 'aircraft' | 'nabirds'.
  data.source = 'tfds'  # 'tfds' | 'folders' | 'synthetic'.
  data.root = ''  # Dataset folder for source='folders'.
  data.tfds_name = 'caltech_birds2011'  # TFDS builder for source='tfds'.
  data.tfds_data_dir = ''  # '' = TFDS default (~/tensorflow_datasets).
  data.image_size = 224  # Crop fed to the model.
  data.resize_size = 256  # Resize before the crop (released and test pipelines).
  data.train_augment = 'released'  # 'released' (TrivialAugmentWide) | 'paper' (RRC+flip) | 'none'.
  data.batch_size = 32  # Global train batch (paper: 32).
  data.eval_batch_size = 128  # Global batch for encoding the query/database splits.
  data.num_workers = 2  # Parallel decode/augment workers (0 = in-process).
  # 'thread' (grain thread pool; the per-image Python work holds the GIL, so
  # threads stop scaling after a few cores) | 'process' (grain
  # mp_prefetch; what scales past a few cores). Training starts its workers
  # once per run (a process takes seconds: it imports this package anew),
  # encoding once per split it encodes.
  data.worker_type = 'thread'
  # Decode + resize once: the train Resize / test Resize+CenterCrop output is cached as
  # uint8 on disk and reused by every epoch and run (rebuilt when files change).
  # True: reuse while every file's size and mtime match (cheap; trusts them) |
  # 'verify': also compare sha256 of the files, rebuild on a change | 'rebuild':
  # rebuild it now | False: no cache. Typed `object` so a string can override a bool.
  data.cache = config_dict.FieldReference(True, field_type=object)
  data.cache_dir = ''  # '' = $XDG_CACHE_HOME/concepthash_jax (~/.cache/concepthash_jax).
  data.on_corrupt = 'raise'  # 'raise' (error names the file) | 'skip' (count and go on).
  # Built-in dataset (data/synthetic.py): <= 24 classes; clutter = mean number
  # of background blobs. Heads on frozen random-CLIP tokens overfit with half
  # the default train images per class.
  data.synthetic = ml_collections.ConfigDict(dict(
      num_classes=12, num_families=4, train_per_class=80, test_per_class=20,
      image_size=64, seed=0, clutter=4.0))

  # ---------------------------------------------------------------- optim
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 1e-3
  optim.momentum = 0.9
  optim.weight_decay = 5e-4  # Released yaml (paper: 1e-4); coupled L2 as torch.optim.SGD.
  optim.epochs = 100
  optim.warmup_epochs = 10
  # Per-module lr factors, 'name=factor,...' over parameter path components
  # (e.g. 'concept_generator=0.01'); empty = one lr for all, as released.
  optim.lr_multipliers = ''
  optim.schedule = 'epoch'  # 'epoch' (released, stepped per epoch) | 'step' (smooth).

  # ----------------------------------------------------------------- eval
  config.eval = ev = ml_collections.ConfigDict()
  ev.every_epochs = 10  # Paper evaluates every 10 epochs.
  ev.ties = 'index'  # Hamming tie rule of map_at_r: 'index' | 'average'.
  ev.R = -1  # mAP@R cut-off; -1 = the whole database.

  # ---------------------------------------------------------------- train
  config.train = train = ml_collections.ConfigDict()
  train.log_every_steps = 10
  train.checkpoint_every_steps = 500
  train.keep_checkpoints = 2
  train.fsdp = False  # Shard params/optimizer state over the data axis (large backbones).
  # XLA:CPU's concurrency-optimised scheduler keeps more buffers live to run ops side
  # by side; on few cores that buys no speed, only memory (BENCHMARKS.md). Only
  # read on the CPU backend.
  train.cpu_concurrency_scheduler = False
  # XLA:CPU matmul library: 'auto' | 'ynnpack' | 'eigen' (xla_flags.CPU_MATMUL; 'auto'
  # picks per CPU and dtype from side-by-side figures, BENCHMARKS.md). Only read on the
  # CPU backend; encoding a trained run uses the run's own value.
  train.cpu_matmul = 'auto'
  # Compiled programs kept on disk (JAX's persistent compilation cache), so a resumed or
  # repeated run and the tools start without compiling again (BENCHMARKS.md,
  # "Start-up"). The folder is shared by every
  # run ('' = $XDG_CACHE_HOME/concepthash_jax/xla), one subfolder per kind of machine
  # (xla_flags.host_key); JAX_COMPILATION_CACHE_DIR, when set, wins.
  train.compilation_cache = True
  train.compilation_cache_dir = ''
  train.max_steps = -1  # > 0 stops early (smoke tests, benchmarks).
  # Resume order: this workdir's newest checkpoint > resume > init > scratch.
  train.resume = ''  # Another run's workdir to continue (full state, new workdir).
  train.init = ''  # Another run's workdir whose params/BN stats seed a fresh run.
  return config


def dataset_config(arg, *, name, source, tfds_name, nbit=64):
  """The released recipe on one dataset: what configs/{cub,cars,...}.py return.

  Args:
    arg: the config file's `get_config(arg)` string; it may set nbit
      ('nbit=32' or '32').
    name: data.name.
    source: data.source, the way this dataset is read by default.
    tfds_name: data.tfds_name, the TFDS builder ('' if there is none).
    nbit: the code length when `arg` does not set it.

  Returns:
    The full config (every key of `get_config`).
  """
  args = common.parse_arg(arg, nbit=nbit)
  config = get_config()
  config.model.nbit = args.nbit
  config.data.name = name
  config.data.source = source
  config.data.tfds_name = tfds_name
  return config
