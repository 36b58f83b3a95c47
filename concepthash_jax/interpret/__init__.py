"""Analysis of ConceptHash codes and concept attention (§4.2-4.3, App. B).

The analyses are pure functions: arrays in, arrays or dicts out, no file I/O;
`figures` draws them and `report` writes the report (neither is re-exported
here: they import matplotlib), `tools/explain.py` runs the steps.
One module per question:
  attention  concept attention maps: grid, upsampling, locations, correlation
             between concepts (Fig. 7), crops and the images a panel shows
  parts      part localisation (Table 3) and which part each concept is on
  families   family-level retrieval (Table 5), class centers by family (Fig. 5)
  subcodes   each concept's sub-code: values, Fig. 3's layout, galleries
Every public name is re-exported here, so `interpret.X` serves callers without
their knowing which module holds X.

Names: M -> `num_concepts`, K -> `nbit`, HW -> the patch grid (h x w), S ->
side of the model input in pixels. Points are (x, y) pixel coordinates of the
model input (after the test transform); keypoints are (x, y, visible).
"""
from concepthash_jax.interpret import attention
from concepthash_jax.interpret import families
from concepthash_jax.interpret import parts
from concepthash_jax.interpret import subcodes
from concepthash_jax.interpret.attention import attention_grid
from concepthash_jax.interpret.attention import attention_locations
from concepthash_jax.interpret.attention import concept_correlation
from concepthash_jax.interpret.attention import correlation_summary
from concepthash_jax.interpret.attention import crop_box
from concepthash_jax.interpret.attention import normalise_for_display
from concepthash_jax.interpret.attention import patch_centres
from concepthash_jax.interpret.attention import pick_display
from concepthash_jax.interpret.attention import upsample_attention
from concepthash_jax.interpret.families import family_map_at_r
from concepthash_jax.interpret.families import family_similarity
from concepthash_jax.interpret.families import retrieval_by_level
from concepthash_jax.interpret.families import to_family_labels
from concepthash_jax.interpret.families import top_families
from concepthash_jax.interpret.families import tsne_embed
from concepthash_jax.interpret.parts import BACKGROUND
from concepthash_jax.interpret.parts import concept_part_hits
from concepthash_jax.interpret.parts import localisation
from concepthash_jax.interpret.parts import localisation_bars
from concepthash_jax.interpret.parts import NO_PART
from concepthash_jax.interpret.parts import normalise_points
from concepthash_jax.interpret.parts import part_hit_summary
from concepthash_jax.interpret.parts import part_hits
from concepthash_jax.interpret.parts import part_localisation
from concepthash_jax.interpret.parts import point_errors
from concepthash_jax.interpret.parts import visible_mask
from concepthash_jax.interpret.subcodes import gallery_groups
from concepthash_jax.interpret.subcodes import subcode_layout
from concepthash_jax.interpret.subcodes import subcode_string
from concepthash_jax.interpret.subcodes import subcode_values

__all__ = [
    'attention', 'families', 'parts', 'subcodes',
    # attention
    'attention_grid', 'attention_locations', 'concept_correlation',
    'correlation_summary', 'crop_box', 'normalise_for_display',
    'patch_centres', 'pick_display', 'upsample_attention',
    # families
    'family_map_at_r', 'family_similarity', 'retrieval_by_level',
    'to_family_labels', 'top_families', 'tsne_embed',
    # parts
    'BACKGROUND', 'NO_PART', 'concept_part_hits', 'localisation',
    'localisation_bars', 'normalise_points', 'part_hit_summary', 'part_hits',
    'part_localisation', 'point_errors', 'visible_mask',
    # subcodes
    'gallery_groups', 'subcode_layout', 'subcode_string', 'subcode_values',
]
