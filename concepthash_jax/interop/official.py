"""Official PyTorch ConceptHash state dicts <-> our Flax variables, driven by one table.

`official_table(variables)` lists, for every leaf of our variables, the official
(`models.arch.coop.LGHWithFixedPrompt`) parameter/buffer name and the layout
transform between the two. The same rows drive `import_official` (official state
dict -> our variables) and `export_official` (our params / grads -> official names
and PyTorch layouts). Official names are those of `named_parameters()` /
`named_buffers()` (shared tensors appear once, under their first name).

Layouts: 'same'; 'linear' (torch Linear weight (out, in) <-> our kernel (in, out));
'conv' (torch OIHW <-> our HWIO); 'lead1' (torch (1, N, X) <-> our (N, X)); plus an
optional chunk (i, n): our leaf is the i-th of n equal row blocks of the official
tensor (nn.MultiheadAttention packs q|k|v into in_proj_weight / in_proj_bias).
"""
import dataclasses
from typing import Optional

import numpy as np
from flax import traverse_util

VISION_PREFIX = 'backbone.vision_model.'

# Official names that the released model holds but ConceptHash never reads.
IGNORED_OFFICIAL = {
    'backbone.logit_scale': 'CLIP contrastive temperature; unused for hashing',
    'backbone.visual_projection.weight': 'codes come from pre-projection features',
    'backbone.text_projection.weight': 'centers use pre-projection text features',
    'backbone.vision_model.embeddings.position_ids': 'arange buffer; we index directly',
    'hash_bn.num_batches_tracked': 'only used by momentum=None BatchNorm',
}

# Our module path -> official module name (leaves: kernel/scale -> weight, bias -> bias).
_MODULES = {
    ('concept_generator', 'self_attn', 'out_proj'): 'hash_attention.sa.out_proj',
    ('concept_generator', 'norm1'): 'hash_attention.norm1',
    ('concept_generator', 'norm2'): 'hash_attention.norm2',
    ('concept_generator', 'ffn_in'): 'hash_attention.ffn.0',
    ('concept_generator', 'ffn_out'): 'hash_attention.ffn.3',
    ('concept_generator', 'to_vision'): 'hash_attention.ffn2',
    ('code_head',): 'hash_fc',
    ('code_norm',): 'hash_bn',
    ('center_projection', 'fc1'): 'text_projection.0',
    ('center_projection', 'fc2'): 'text_projection.2',
    ('center_projection', 'fc'): 'text_projection',
}
# Our whole-parameter leaves -> (official name, layout kind).
_LEAVES = {
    ('concept_generator', 'queries'): ('hash_queries', 'lead1'),
    ('concept_tokens',): ('visual_context', 'lead1'),
    ('concept_specificity',): ('hash_pe', 'lead1'),
    ('concept_embedding',): ('concept_pe', 'lead1'),
    ('concept_classifier',): ('trainable_params.concept_ce_centroids', 'same'),
    ('learnable_centers',): ('center', 'same'),
}
_QKV = ('q_proj', 'k_proj', 'v_proj')
_BUFFERS = {
    ('batch_stats', 'code_norm', 'mean'): 'hash_bn.running_mean',
    ('batch_stats', 'code_norm', 'var'): 'hash_bn.running_var',
    ('centers', 'text_embeds'): 'center',
    ('centers', 'codebook'): 'center',
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Transform between an official tensor and our leaf."""
  kind: str = 'same'  # 'same' | 'linear' | 'conv' | 'lead1'
  chunk: Optional[tuple] = None  # (index, count) of row blocks of the official tensor.

  def to_ours(self, x):
    """Official array -> our layout."""
    x = np.asarray(x)
    if self.chunk is not None:
      index, count = self.chunk
      if x.shape[0] % count:
        raise ValueError(f'cannot split {x.shape} into {count} row blocks')
      x = np.split(x, count, axis=0)[index]
    if self.kind == 'linear':
      return x.T
    if self.kind == 'conv':
      return x.transpose(2, 3, 1, 0)
    if self.kind == 'lead1':
      if x.shape[0] != 1:
        raise ValueError(f'expected a leading axis of 1, got {x.shape}')
      return x[0]
    return x

  def to_official(self, x):
    """Our array -> official layout (one chunk of it when chunked)."""
    x = np.asarray(x)
    if self.kind == 'linear':
      return x.T
    if self.kind == 'conv':
      return x.transpose(3, 2, 0, 1)
    if self.kind == 'lead1':
      return x[None]
    return x


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: our variable path (collection first), official name, layout."""
  path: tuple
  official: str
  layout: Layout


def _vision_row(path, parent_keys):
  """Row for a leaf under params/vision_model (HF Flax names -> HF PyTorch names)."""
  *module, leaf = path[2:]
  layout = Layout('same')
  name = leaf
  if leaf == 'kernel':
    name, layout = 'weight', Layout('conv' if module[-1] == 'patch_embedding' else 'linear')
  elif leaf == 'embedding':
    name = 'weight'
  elif leaf == 'scale' and parent_keys == {'scale', 'bias'}:
    name = 'weight'  # LayerNorm; the adapter's own 'scale' keeps its name.
  return Row(path, VISION_PREFIX + '.'.join(list(module) + [name]), layout)


def _param_row(path):
  """Row for a ConceptHash leaf outside the vision tower."""
  key = path[1:]
  if key in _LEAVES:
    official, kind = _LEAVES[key]
    return Row(path, official, Layout(kind))
  *module, leaf = key
  module = tuple(module)
  if module[:2] == ('concept_generator', 'self_attn') and module[-1] in _QKV:
    chunk = (_QKV.index(module[-1]), len(_QKV))
    if leaf == 'kernel':
      return Row(path, 'hash_attention.sa.in_proj_weight', Layout('linear', chunk))
    return Row(path, 'hash_attention.sa.in_proj_bias', Layout('same', chunk))
  if module in _MODULES:
    name = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]
    return Row(path, f'{_MODULES[module]}.{name}', Layout('linear' if leaf == 'kernel' else 'same'))
  raise KeyError(f'no official name for params/{"/".join(key)}')


def official_table(variables):
  """The table for a variables tree (arrays or ShapeDtypeStructs).

  Args:
    variables: {'params': ..., 'batch_stats': ..., 'centers': ...} of a ConceptHash.

  Returns:
    list of Row, one per leaf of `variables`.
  """
  rows = []
  for path in traverse_util.flatten_dict(dict(variables)):
    path = tuple(path)
    if path[:2] == ('params', 'vision_model'):
      parent = variables
      for key in path[:-1]:
        parent = parent[key]
      rows.append(_vision_row(path, set(parent)))
    elif path[0] == 'params':
      rows.append(_param_row(path))
    elif path in _BUFFERS:
      rows.append(Row(path, _BUFFERS[path], Layout('same')))
    else:
      raise KeyError(f'no official name for {"/".join(path)}')
  return rows


def import_official(state_dict, variables):
  """Builds our variables from an official state dict.

  Args:
    state_dict: {official name: array} (parameters and buffers together).
    variables: template variables (arrays or ShapeDtypeStructs) giving structure,
      shapes and dtypes.

  Returns:
    Nested dict like `variables` of numpy arrays.

  Raises:
    ValueError: an official tensor is missing, unused (and not in IGNORED_OFFICIAL),
      or has the wrong shape.
  """
  rows = official_table(variables)
  flat = traverse_util.flatten_dict(dict(variables))
  missing = sorted({r.official for r in rows} - set(state_dict))
  unused = sorted(set(state_dict) - {r.official for r in rows} - set(IGNORED_OFFICIAL))
  if missing or unused:
    raise ValueError(f'official state dict does not match the model: missing {missing}, '
                     f'unused {unused}.')
  out = {}
  for row in rows:
    value = row.layout.to_ours(state_dict[row.official])
    want = flat[row.path]
    if tuple(value.shape) != tuple(want.shape):
      raise ValueError(f'{row.official} -> {"/".join(row.path)}: shape {value.shape}, '
                       f'expected {tuple(want.shape)}.')
    out[row.path] = value.astype(want.dtype)
  return traverse_util.unflatten_dict(out)


def export_official(tree, *, collection='params', variables=None):
  """Our params (or grads, or a trainable sub-tree of them) -> official names and layouts.

  Args:
    tree: nested dict under `collection` (e.g. params or their gradients; a
      subset of leaves is fine, but chunked tensors need all their chunks).
    collection: the collection `tree` belongs to ('params' | 'batch_stats' | 'centers').
    variables: optional full template for the table (defaults to `tree` itself).

  Returns:
    {official name: numpy array in the official layout}.
  """
  flat = {(collection,) + tuple(k): v for k, v in traverse_util.flatten_dict(tree).items()}
  template = {collection: tree} if variables is None else variables
  rows = [r for r in official_table(template) if r.path in flat]
  chunks = {}
  for row in rows:
    value = row.layout.to_official(flat[row.path])
    if row.layout.chunk is None:
      chunks[row.official] = {0: value}
    else:
      chunks.setdefault(row.official, {})[row.layout.chunk[0]] = value
  out = {}
  for row in rows:
    parts = chunks[row.official]
    count = 1 if row.layout.chunk is None else row.layout.chunk[1]
    if len(parts) != count:
      raise ValueError(f'{row.official}: only chunks {sorted(parts)} of {count} given.')
    out[row.official] = np.concatenate([parts[i] for i in range(count)], axis=0) \
        if count > 1 else parts[0]
  return out
