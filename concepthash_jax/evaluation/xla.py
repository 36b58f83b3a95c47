"""The evaluator's jitted stages, under `shard_map` over a device mesh.

A Hamming distance takes only K+1 values, so with ties broken by ascending
database index the 1-based rank of item j is #{i : d_i < d_j} + #{i <= j : d_i =
d_j}, and the number of relevant items ranked up to j is the same count
restricted to relevant i. Both are counting-sort positions: per-distance
histograms of 32-item blocks, prefix sums over blocks, and a 32 x 32 comparison
inside each block. Counts of all items and of relevant items travel packed in one
int32 (low / high 16 bits) within 512-item groups, so one pass gives both.
Everything is O(N (K + 32)) per query, in short fixed-size reductions that XLA
vectorises; a comparison sort would be O(N log N) with an expensive comparator.
The database is split over the mesh's devices; per-query histograms cross
devices (all-gather of (Q, K + 2) integers) so every item gets its global rank.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import tqdm

from concepthash_jax.evaluation import packing

_BLOCK = 32  # Items per block: XLA:CPU vectorises reductions this short.
_GROUP = 16  # Blocks per group: packed counts of <= 512 items fit 16 bits.
_SPAN = _BLOCK * _GROUP  # Also the AP summation segment (= SEGMENT in _hamming_src/stats.c).
_SUPER = 32  # Groups per supergroup: packed counts of <= 16384 items fit too.
_SHIFT = 16  # Relevant counts live in the high half of a packed int32.
_LOW = (1 << _SHIFT) - 1
_ITEMS_PER_CHUNK = 1 << 19  # Query chunk x database items per device call.


def _prefix_sum(x, axis, exclusive=False):
  """Prefix sum along `axis` as masked sums over <= 16-long pieces.

  XLA:CPU lowers cumsum to a reduce-window, an op of its own that cannot fuse,
  where these short masked reductions fuse; long axes recurse on the piece totals.
  """
  axis %= x.ndim
  size = x.shape[axis]
  if size > _GROUP:
    padded = -(-size // _GROUP) * _GROUP
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - size)
    pieces = jnp.pad(x, pad).reshape(
        x.shape[:axis] + (padded // _GROUP, _GROUP) + x.shape[axis + 1:])
    inner = _prefix_sum(pieces, axis + 1, exclusive)
    outer = _prefix_sum(jnp.sum(pieces, axis=axis + 1), axis, exclusive=True)
    out = (inner + jnp.expand_dims(outer, axis + 1)).reshape(
        x.shape[:axis] + (padded,) + x.shape[axis + 1:])
    return jax.lax.slice_in_dim(out, 0, size, axis=axis)
  i = jnp.arange(size)
  mask = (i[None, :] < i[:, None]) if exclusive else (i[None, :] <= i[:, None])
  mask = mask.reshape((size, size) + (1,) * (x.ndim - axis - 1))
  return jnp.sum(jnp.where(mask, jnp.expand_dims(x, axis), 0), axis=axis + 1)


def _pairwise_sum(x):
  """Sums the last axis (a power of two) by a tree of adjacent pairs.

  Elementwise adds only, so a segment's sum has the same bits whatever the
  array around it, the device or the engine (`_hamming_src/stats.c` does the same).
  """
  while x.shape[-1] > 1:
    x = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x = x[..., 0] + x[..., 1]
  return x[..., 0]


def _gather(table, rows, index):
  """table[rows, index] for a (M, V) table and equal-shaped int arrays (one gather)."""
  flat = rows * table.shape[-1] + index
  return jnp.take(table.reshape(-1), flat, mode='clip')


# The device work runs as four jitted stages per query chunk. Splitting is for
# speed: inside one program XLA:CPU fuses a reduction into its consumers and
# recomputes it per element (a whole reduction per output element), and
# optimization_barrier does not stop it on CPU; arrays returned from a jit
# are always materialised. Each stage body sees one device's slice of the
# database; `axes` names the mesh axes it is split over (None: not split).


def _count_stage(query_bits, query_labels, db_bits, db_labels, *, nbit, num_db,
                 ranked, axes=None):
  """Distances, relevance and packed per-distance counts of 32-item blocks.

  Args:
    query_bits: (Q, W) uint32.
    query_labels: (Q,) int32 or (Q, L) uint32.
    db_bits: (Np, W) uint32, this device's slice, Np % 512 == 0; items at
      global index >= num_db are padding.
    db_labels: (Np,) or (Np, L).
    nbit: K.
    num_db: number of real database rows (all devices).
    ranked: also return what `_rank_stage` needs.
    axes: mesh axes the database is split over, or None.

  Returns:
    dict: 'counts' (Q, Np/32, K + 2) int32, all-item counts in the low and
    relevant counts in the high 16 bits (the last bin holds the padding, so it
    never ranks before a real item); when ranked also 'dist' (Q, Np) int8 or
    int16, 'rel' (Q, Np) bool and 'within_block' (Q, Np) int32, the packed
    count of equal-distance items at or before each item in its block.
  """
  bins = nbit + 2
  dtype = jnp.int8 if bins < 127 else jnp.int16
  offset = 0 if axes is None else jax.lax.axis_index(axes) * db_bits.shape[0]
  valid = offset + jnp.arange(db_bits.shape[0]) < num_db
  dist = jnp.where(valid, packing.hamming_distance(query_bits, db_bits), nbit + 1)
  dist = dist.astype(dtype)
  rel = packing.relevance(query_labels, db_labels) & valid
  blocks = (dist.shape[0], dist.shape[1] // _BLOCK, _BLOCK)
  d = dist.reshape(blocks)
  x = 1 + (rel.reshape(blocks).astype(jnp.int32) << _SHIFT)
  onehot = d[..., None, :] == jnp.arange(bins, dtype=dtype)[:, None]
  out = {'counts': jnp.sum(jnp.where(onehot, x[..., None, :], 0), axis=-1)}
  if ranked:
    tri = jnp.arange(_BLOCK)[:, None] >= jnp.arange(_BLOCK)[None, :]  # (j, i)
    same = (d[..., :, None] == d[..., None, :]) & tri
    within = jnp.sum(jnp.where(same, x[..., None, :], 0), axis=-1)
    out.update(dist=dist, rel=rel, within_block=within.reshape(dist.shape))
  return out


def _start_stage(counts, *, nbit, num_db, ranked, axes=None):
  """Histograms per query and, when ranked, where each (group, distance) starts.

  Args:
    counts: (Q, Np/32, K + 2) packed block counts from `_count_stage`.
    nbit: K.
    num_db: real database size (static); below 2^15 every start fits 15 bits.
    ranked: also return the start tables.
    axes: mesh axes the database is split over, or None.

  Returns:
    dict: 'hist', 'hist_rel' (Q, K + 1) int32 over the whole database and,
    when ranked, 'starts' (Q, Np/512, K + 2): packed items before each
    512-item group in its distance bin (small databases); or 'starts' packed
    within 16384-item supergroups plus 'super_all', 'super_rel' (Q,
    supergroups, K + 2) unpacked.
  """
  q, _, bins = counts.shape
  group_counts = jnp.sum(counts.reshape(q, -1, _GROUP, bins), axis=2)
  hist_all = jnp.sum(group_counts & _LOW, axis=1)
  hist_rel = jnp.sum(group_counts >> _SHIFT, axis=1)
  before_all = before_rel = 0  # items of this bin on earlier devices
  if axes is not None:
    every_all = jax.lax.all_gather(hist_all, axes)  # (devices, Q, bins)
    every_rel = jax.lax.all_gather(hist_rel, axes)
    earlier = (jnp.arange(every_all.shape[0])
               < jax.lax.axis_index(axes))[:, None, None]
    before_all = jnp.sum(jnp.where(earlier, every_all, 0), axis=0)
    before_rel = jnp.sum(jnp.where(earlier, every_rel, 0), axis=0)
    hist_all, hist_rel = jnp.sum(every_all, axis=0), jnp.sum(every_rel, axis=0)
  out = {'hist': hist_all[:, :nbit + 1], 'hist_rel': hist_rel[:, :nbit + 1]}
  if not ranked:
    return out
  bin_all = (_prefix_sum(hist_all, axis=1, exclusive=True)
             + before_all)[:, None, :]
  bin_rel = (_prefix_sum(hist_rel, axis=1, exclusive=True)
             + before_rel)[:, None, :]
  if num_db < (1 << (_SHIFT - 1)):
    start_all = _prefix_sum(group_counts & _LOW, axis=1, exclusive=True) + bin_all
    start_rel = (_prefix_sum(group_counts >> _SHIFT, axis=1, exclusive=True)
                 + bin_rel)
    out['starts'] = start_all + (start_rel << _SHIFT)
    return out
  # Counts inside a supergroup (16384 items) still fit packed; only the
  # supergroup starts need full int32s.
  groups = group_counts.shape[1]
  supers = -(-groups // _SUPER)
  padded = jnp.pad(group_counts, ((0, 0), (0, supers * _SUPER - groups), (0, 0)))
  padded = padded.reshape(q, supers, _SUPER, bins)
  within_super = _prefix_sum(padded, axis=2, exclusive=True)
  out['starts'] = within_super.reshape(q, -1, bins)[:, :groups]
  super_counts = jnp.sum(padded, axis=2)
  out['super_all'] = (_prefix_sum(super_counts & _LOW, axis=1, exclusive=True)
                      + bin_all)
  out['super_rel'] = (_prefix_sum(super_counts >> _SHIFT, axis=1, exclusive=True)
                      + bin_rel)
  return out


def _rank_stage(dist, within_block, counts, starts, super_all=None,
                super_rel=None):
  """Rank of every item and relevant items ranked up to it (ties by index).

  Args:
    dist, within_block: (Q, Np) from `_count_stage`.
    counts: (Q, Np/32, bins) packed block counts.
    starts, super_all, super_rel: from `_start_stage`.

  Returns:
    Ranks (Q, Np) int32: the 1-based rank in the low and the number of
    relevant items ranked at or before the item (itself included) in the high
    16 bits; for databases of 2^15 items or more, the pair (rank, relevant
    count) of unpacked int32 arrays.
  """
  q, num = dist.shape
  groups, bins = num // _SPAN, counts.shape[-1]
  # Same bin, earlier blocks of the group (packed, <= 512 items): XLA fuses
  # this into the gather, so only the gathered entries get summed.
  within_group = _prefix_sum(counts.reshape(q, groups, _GROUP, bins), axis=2,
                             exclusive=True)
  table = (within_group + starts[:, :, None, :]).reshape(-1, bins)
  index = dist.reshape(q, groups, _GROUP, _BLOCK).astype(jnp.int32)
  query_row = jnp.arange(q, dtype=jnp.int32)[:, None, None, None]
  group_row = jnp.arange(groups, dtype=jnp.int32)[None, :, None, None]
  block_row = jnp.arange(_GROUP, dtype=jnp.int32)[None, None, :, None]
  rows = (query_row * groups + group_row) * _GROUP + block_row
  packed = _gather(table, rows, index) + within_block.reshape(index.shape)
  if super_all is None:
    return packed.reshape(q, num)  # unpacked where it is consumed
  super_rows = query_row * super_all.shape[1] + group_row // _SUPER
  pos = (packed & _LOW) + _gather(super_all.reshape(-1, bins), super_rows, index)
  cum_rel = ((packed >> _SHIFT)
             + _gather(super_rel.reshape(-1, bins), super_rows, index))
  return pos.reshape(q, num), cum_rel.reshape(q, num)


def _ap_stage(ranks, rel, R, *, topk, axes=None):
  """Segment sums of AP terms and relevant items in each top k, from ranks.

  Args:
    ranks: packed (Q, Np) or a (pos, cum_rel) pair, from `_rank_stage`.
    rel: (Q, Np) bool.
    R: int32 scalar cut-off (traced: a new R does not recompile).
    topk: tuple of k (each <= N).
    axes: mesh axes the database is split over, or None.

  Returns:
    dict: 'partial' (Q, Np/512) float32 sums of the precision at each
    relevant item ranked within R, per 512-item segment of the database (all
    devices' segments, in order); 'num_hit' (Q,) int32 relevant items within
    R; 'hits' (Q, len(topk)) int32.
  """
  if isinstance(ranks, tuple):
    pos, cum_rel = ranks
  else:
    pos, cum_rel = ranks & _LOW, ranks >> _SHIFT
  hit = rel & (pos <= R)
  precision = jnp.where(hit, cum_rel.astype(jnp.float32)
                        / jnp.maximum(pos, 1).astype(jnp.float32), 0.0)
  q, num = precision.shape
  partial = _pairwise_sum(precision.reshape(q, num // _SPAN, _SPAN))
  num_hit = jnp.sum(hit, axis=-1, dtype=jnp.int32)
  hits = [jnp.sum(rel & (pos <= k), axis=-1, dtype=jnp.int32) for k in topk]
  hits = jnp.stack(hits, -1) if hits else jnp.zeros((q, 0), jnp.int32)
  if axes is not None:
    partial = jax.lax.all_gather(partial, axes, axis=1, tiled=True)
    num_hit, hits = jax.lax.psum((num_hit, hits), axes)
  return {'partial': partial, 'num_hit': num_hit, 'hits': hits}


def _chunk_stats(query_bits, query_labels, db_bits, db_labels, R, *, nbit,
                 num_db, topk, ranked, axes=None):
  """Per-query statistics of one query chunk against the padded database.

  Returns:
    dict with 'hist', 'hist_rel' (Qc, K + 1) int32 and, when ranked, the
    outputs of `_ap_stage`.
  """
  counted = _count_stage(query_bits, query_labels, db_bits, db_labels,
                         nbit=nbit, num_db=num_db, ranked=ranked, axes=axes)
  starts = _start_stage(counted['counts'], nbit=nbit, num_db=num_db,
                        ranked=ranked, axes=axes)
  out = {'hist': starts['hist'], 'hist_rel': starts['hist_rel']}
  if ranked:
    ranks = _rank_stage(counted['dist'], counted['within_block'],
                        counted['counts'], starts['starts'],
                        starts.get('super_all'), starts.get('super_rel'))
    out.update(_ap_stage(ranks, counted['rel'], R, topk=topk, axes=axes))
  return out


@functools.lru_cache(maxsize=32)
def _sharded_stages(mesh, nbit, num_db, topk, ranked):
  """The four stages as jitted shard_maps over all axes of `mesh`.

  Returns:
    A function (query_bits, query_labels, db_bits, db_labels, R) -> dict of
    `_chunk_stats`, every output replicated; queries and R replicated, the
    database split over the devices in index order.
  """
  axes = tuple(mesh.axis_names)
  split, whole = P(None, axes), P()

  def stage(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                                 out_specs=out_specs, check_vma=False))

  count = stage(
      functools.partial(_count_stage, nbit=nbit, num_db=num_db, ranked=ranked,
                        axes=axes),
      (whole, whole, P(axes), P(axes)),
      {'counts': split} if not ranked else {
          'counts': split, 'dist': split, 'rel': split, 'within_block': split})
  start_specs = {'hist': whole, 'hist_rel': whole}
  if ranked:
    start_specs['starts'] = split
    if num_db >= (1 << (_SHIFT - 1)):
      start_specs.update(super_all=split, super_rel=split)
  start = stage(functools.partial(_start_stage, nbit=nbit, num_db=num_db,
                                  ranked=ranked, axes=axes),
                (split,), start_specs)
  rank_out = split if num_db < (1 << (_SHIFT - 1)) else (split, split)
  rank = stage(_rank_stage, (split,) * 6, rank_out)
  ap = stage(functools.partial(_ap_stage, topk=topk, axes=axes),
             (rank_out, split, whole),
             {'partial': whole, 'num_hit': whole, 'hits': whole})

  def run(query_bits, query_labels, db_bits, db_labels, R):
    counted = count(query_bits, query_labels, db_bits, db_labels)
    starts = start(counted['counts'])
    out = {'hist': starts['hist'], 'hist_rel': starts['hist_rel']}
    if ranked:
      ranks = rank(counted['dist'], counted['within_block'], counted['counts'],
                   starts['starts'], starts.get('super_all'),
                   starts.get('super_rel'))
      out.update(ap(ranks, counted['rel'], R))
    return out
  return run


def average_precision(query_codes, query_labels, db_codes, db_labels, *,
                      R=None):
  """Per-query AP@R with Hamming ties broken by database index (jittable).

  Args:
    query_codes: (Q, K) real codes (value > 0 is bit 1).
    query_labels: (Q,) int or (Q, C) multi-hot.
    db_codes: (N, K) real codes.
    db_labels: (N,) int or (N, C) multi-hot.
    R: cut-off, default N.

  Returns:
    (Q,) float32 AP@R; a query with no relevant item in the top R scores 0.
  """
  nbit, num_db = query_codes.shape[1], db_codes.shape[0]
  R = num_db if R is None else R
  padded = -(-num_db // _SPAN) * _SPAN

  def pack(codes):
    """Traceable `pack_codes`."""
    words = -(-codes.shape[1] // 32)
    bits = jnp.pad(codes > 0, ((0, 0), (0, words * 32 - codes.shape[1])))
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
    return jnp.sum(bits.reshape(bits.shape[0], words, 32) * weights, axis=-1,
                   dtype=jnp.uint32)

  def labels(lab, rows):
    """Traceable `pack_labels`, zero-padded to `rows`."""
    lab = jnp.asarray(lab)
    lab = lab.astype(jnp.int32) if lab.ndim == 1 else pack(lab)
    return jnp.pad(lab, ((0, rows - lab.shape[0]),) + ((0, 0),) * (lab.ndim - 1))

  db_bits = jnp.pad(pack(db_codes), ((0, padded - num_db), (0, 0)))
  out = _chunk_stats(pack(query_codes), labels(query_labels, query_codes.shape[0]),
                     db_bits, labels(db_labels, padded), jnp.int32(R),
                     nbit=nbit, num_db=num_db, topk=(), ranked=True)
  num_hit = out['num_hit']
  return jnp.where(num_hit > 0, jnp.sum(out['partial'], axis=-1)
                   / jnp.maximum(num_hit, 1).astype(jnp.float32), 0.0)


def _put(x, sharding):
  """Host array (the same on every process) -> global jax.Array."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def per_query_stats(query, q_labels, db, d_labels, R, topk, ranked, *, chunk_size,
               progress, mesh):
  """Per-query statistics from the jitted stages, database split over `mesh`.

  Returns:
    dict: 'hist', 'hist_rel' (Q, K + 1); when ranked also 'ap' (Q,) float64
    and 'hits' (Q, len(topk)).
  """
  if mesh is None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  axes = tuple(mesh.axis_names)
  whole = NamedSharding(mesh, P())
  num_q, num_db, nbit = len(query.bits), len(db.bits), db.nbit
  # Every device gets the same whole number of 512-item segments.
  padded = -(-num_db // (_SPAN * mesh.size)) * _SPAN * mesh.size
  db_bits = _put(np.pad(db.bits, ((0, padded - num_db), (0, 0))),
                 NamedSharding(mesh, P(axes)))
  db_lab = _put(np.pad(
      d_labels, ((0, padded - num_db),) + ((0, 0),) * (d_labels.ndim - 1)),
                NamedSharding(mesh, P(axes)))
  if chunk_size is None:
    per_chunk = max(_ITEMS_PER_CHUNK * mesh.size // padded, 1)
    chunk_size = 1 << max(1, min(8, int(np.log2(per_chunk))))
  chunk_size = max(1, min(int(chunk_size), num_q))
  num_chunks = -(-num_q // chunk_size)
  q_pad = num_chunks * chunk_size - num_q  # one compiled shape for all chunks
  q_bits = np.pad(query.bits, ((0, q_pad), (0, 0)))
  q_lab = np.pad(q_labels, ((0, q_pad),) + ((0, 0),) * (q_labels.ndim - 1))
  run = _sharded_stages(mesh, nbit, num_db, tuple(topk), ranked)
  R = _put(np.int32(R), whole)
  # Outputs are replicated: any local shard is the whole array.
  fetch = lambda tree: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                                    tree)
  outputs, pending = [], None
  for c in tqdm.trange(num_chunks, desc='retrieval metrics', unit='chunk',
                       disable=not progress, leave=False):
    sl = slice(c * chunk_size, (c + 1) * chunk_size)
    # Dispatch is asynchronous: fetch the previous chunk while this one runs.
    current = run(_put(q_bits[sl], whole), _put(q_lab[sl], whole), db_bits,
                  db_lab, R)
    if pending is not None:
      outputs.append(fetch(pending))
    pending = current
  outputs.append(fetch(pending))
  out = {k: np.concatenate([o[k] for o in outputs])[:num_q] for k in outputs[0]}
  if ranked:
    # Segment sums in float64, in database order (as `_hamming_src/stats.c` does).
    segments = -(-num_db // _SPAN)
    total = np.cumsum(out.pop('partial')[:, :segments].astype(np.float64),
                      axis=1)[:, -1]
    num_hit = out.pop('num_hit')
    out['ap'] = np.where(num_hit > 0, total / np.maximum(num_hit, 1), 0.0)
  return out
