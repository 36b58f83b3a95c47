"""Model factory: translates `config.model` + a CLIP config into a ConceptHash module."""
import jax.numpy as jnp

from concepthash_jax.models.concepthash import ConceptHash

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(model_cfg, clip_config, num_classes: int) -> ConceptHash:
  """Builds ConceptHash from `config.model` and a transformers CLIPConfig.

  Args:
    model_cfg: `config.model` (num_concepts, nbit, concept_tokens, generator_heads,
      dropout, adapter_dim, code_norm, center_type, center_input, center_projection,
      concept_embedding, dtype; optional remat, default 'none').
    clip_config: transformers CLIPConfig; the vision tower's sizes come from its
      vision_config, the generator width P from vision_config.projection_dim, the
      text width T from text_config.hidden_size.
    num_classes: C.

  Returns:
    A ConceptHash module.

  Raises:
    ValueError: nbit not divisible by num_concepts, or an unknown string option.
  """
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f'Unknown dtype {model_cfg.dtype!r}; valid: {", ".join(DTYPES)}.')
  vision = clip_config.vision_config
  adapter_dim = model_cfg.adapter_dim
  return ConceptHash(
      num_classes=int(num_classes),
      hidden_size=vision.hidden_size,
      intermediate_size=vision.intermediate_size,
      num_layers=vision.num_hidden_layers,
      num_heads=vision.num_attention_heads,
      patch_size=vision.patch_size,
      image_size=vision.image_size,
      layer_norm_eps=vision.layer_norm_eps,
      hidden_act=vision.hidden_act,
      adapter_dim=int(adapter_dim) if adapter_dim else None,
      remat=model_cfg.get('remat', 'none'),
      num_concepts=model_cfg.num_concepts,
      nbit=model_cfg.nbit,
      concept_tokens=model_cfg.concept_tokens,
      # The vision sub-config's own projection_dim, not CLIPConfig.projection_dim (docs/method.md §2.2).
      generator_width=vision.projection_dim,
      generator_heads=model_cfg.generator_heads,
      dropout=model_cfg.dropout,
      code_norm=model_cfg.code_norm,
      text_width=clip_config.text_config.hidden_size,
      center_type=model_cfg.center_type,
      center_input=model_cfg.center_input,
      center_projection=model_cfg.center_projection,
      concept_embedding=model_cfg.concept_embedding,
      dtype=DTYPES[model_cfg.dtype],
  )
