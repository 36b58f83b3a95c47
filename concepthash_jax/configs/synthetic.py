r"""The embedded default: a tiny random CLIP on the built-in synthetic dataset.

  concepthash-train --config=synthetic --workdir=runs/synthetic

Runs offline in a few minutes on a 2-core CPU and exercises the whole method
(concept tokens, adapters, language centers from the text tower, the four
losses with L_csd at the paper's weight, mAP@R). Expected: mAP@R >= 0.9 at 16
bits on the held-out queries (chance ~0.09 with 12 classes), and concept maps
on different parts (`concepthash-explain --workdir=DIR`).
"""
from concepthash_jax.configs import base
from concepthash_jax.configs import common


def get_config(arg=None):
  """Synthetic config; `arg` may set nbit (e.g. 'nbit=32')."""
  args = common.parse_arg(arg, nbit=16)
  config = base.get_config()
  config.model.nbit = args.nbit
  # Random weights need no download; small enough to train on a laptop CPU.
  config.model.clip = 'random'
  config.model.random_clip = dict(
      image_size=64, patch_size=8, vision_width=96, vision_layers=3,
      vision_heads=4, vision_mlp=384, projection_dim=64, text_width=64,
      text_layers=2, text_heads=4, text_mlp=256, vocab_size=49408,
      # Prompts are ~50 bytes: a shorter context would truncate class names
      # that differ only at the end into identical centers.
      max_text_len=77)
  # Twice the tower's width: a random backbone leaves all the learning to the
  # adapters, so their capacity limits retrieval (the pretrained recipe's 384
  # is half of B/32's width).
  config.model.adapter_dim = 192
  config.model.generator_heads = 4

  config.data.name = 'synthetic'
  config.data.source = 'synthetic'
  config.data.tfds_name = ''
  config.data.image_size = 64
  config.data.resize_size = 64
  # The class cue is the colour of small parts: 'released' TrivialAugmentWide
  # recolours them (Solarize/Posterize/Color) and shifts them by up to half
  # the image, which destroys the cue.
  config.data.train_augment = 'none'
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.num_workers = 0  # In-process: 2 cores are better spent on XLA.

  # A random frozen backbone learns only through the adapters, so they need a
  # far higher lr than the pretrained recipe's 1e-3, but not so high that the
  # first adapter's output grows until every later token state is the same
  # vector: then all M concepts show one attention map. This lr keeps the token
  # states bounded and the maps sharp; weight decay does not stop that growth.
  config.optim.lr = 0.05
  config.optim.weight_decay = 5e-5
  # With sharp maps L_csd (the paper's weight 1; released 0) separates the
  # concepts without costing retrieval; without it the concepts' maps collapse
  # into one. The concept generator trains at the common lr, as released: a
  # lower generator lr lets two concepts settle on the background.
  # On these birds a concept is a colour detector, not a fixed part: the
  # classes permute one palette over the parts, so "where is the blue part"
  # is the cue, and one concept usually covers the background.
  config.loss.weight_csd = 1.0
  config.optim.epochs = 40
  config.optim.warmup_epochs = 2
  config.eval.every_epochs = 20
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 300
  return config
