"""A small fine-grained dataset drawn on the fly: birds whose classes differ only in part colours.

Each image shows one "bird" (body, head with eye and beak, breast, striped
wing, tail) in a random pose (position, scale, rotation, left/right flip) over
a smooth background with clutter blobs. The four coloured parts (head, breast,
wing, tail) take the four palette colours in a class-specific permutation, so
every class has the same amount of each colour: a global colour histogram
cannot tell classes apart, while the colour of any one part can (the local,
part-level cue that ConceptHash's concept tokens are meant to find). Part
sizes are equalised per family so that even the visible pixel counts match.

Families share body shape, tail shape (fan / fork) and, when possible, the
tail colour; class names read like CUB's ("Crimson-crowned Azure-breasted
Finch", the family is the last word). Every image carries ground-truth
keypoints for `PART_NAMES` and the bird's box. Generation is deterministic in
(seed, split, class, image).
"""
import functools
import itertools

import numpy as np

from concepthash_jax.data import core

PART_NAMES = ('beak', 'head', 'breast', 'wing', 'tail', 'body')
COLOURED_PARTS = ('head', 'breast', 'wing', 'tail')
PALETTE = np.array([[215, 35, 35], [35, 80, 220], [240, 205, 30],
                    [30, 165, 65]], np.float32)  # red, blue, yellow, green
COLOUR_WORDS = ('Crimson', 'Azure', 'Golden', 'Emerald')
FAMILY_WORDS = (
    'Finch', 'Warbler', 'Tanager', 'Sparrow', 'Bunting', 'Oriole', 'Thrush',
    'Wren', 'Vireo', 'Grosbeak', 'Flycatcher', 'Swallow', 'Kingfisher', 'Jay',
    'Lark', 'Pipit', 'Shrike', 'Starling', 'Weaver', 'Sunbird', 'Robin',
    'Cardinal', 'Chickadee', 'Nuthatch')
# Body half-length, half-height and superellipse exponent of each base shape.
_BODY_SHAPES = ((0.50, 0.30, 2.0), (0.62, 0.24, 2.0), (0.48, 0.31, 3.5),
                (0.56, 0.27, 1.5))
_PART_AREA = 0.15  # Visible colour area of each coloured part (canonical units^2).
_SUPERSAMPLE = 2  # Anti-aliasing: render at 2x and average 2x2 blocks.
# Pose ranges: scale (canonical unit in image widths), rotation (degrees),
# shift (image widths). Kept narrow because a frozen random patch embedding
# sees a few-pixel shift as new content: with +-7% shifts and 40 images per
# class a learned head on it reached 0.45 test accuracy, with +-2% 0.85.
_SCALE = (0.42, 0.46)
_ROTATION_DEG = 15.0
_SHIFT = 0.02
_SPLIT_CODE = {'train': 0, 'test': 1}


def class_structure(num_classes, num_families):
  """Decides each class's family and colour permutation (seed-independent).

  Args:
    num_classes: C <= 24 (the number of permutations of 4 colours).
    num_families: F <= C, at most len(FAMILY_WORDS).

  Returns:
    (family_of list of C int, perms list of C tuples giving the palette
    index of (head, breast, wing, tail)).
  """
  if not 1 <= num_classes <= 24:
    raise ValueError(f'synthetic num_classes must be in [1, 24] (the '
                     f'permutations of 4 part colours); got {num_classes}')
  if not 1 <= num_families <= min(num_classes, len(FAMILY_WORDS)):
    raise ValueError(f'synthetic num_families must be in [1, '
                     f'{min(num_classes, len(FAMILY_WORDS))}]; got '
                     f'{num_families}')
  sizes = [num_classes // num_families + (f < num_classes % num_families)
           for f in range(num_families)]
  used, family_of, perms = set(), [], []
  for family, size in enumerate(sizes):
    tail = family % 4
    rest = [c for c in range(4) if c != tail]
    # Cyclic shifts first: classes of a family then differ in every part.
    own = [tuple(rest[(i + k) % 3] for i in range(3)) + (tail,)
           for k in range(3)]
    own += [tuple(rest[::-1][(i + k) % 3] for i in range(3)) + (tail,)
            for k in range(3)]
    others = list(itertools.permutations(range(4)))
    for _ in range(size):
      perm = next(p for p in own + others if p not in used)
      used.add(perm)
      family_of.append(family)
      perms.append(perm)
  return family_of, perms


def class_names_for(family_of, perms):
  """Readable, unique names with the family as the last word."""
  names = []
  for family, perm in zip(family_of, perms):
    head, breast, wing, _ = (COLOUR_WORDS[c] for c in perm)
    names.append(f'{head}-crowned {breast}-breasted {FAMILY_WORDS[family]}')
  if len(set(names)) < len(names):  # Only when families borrow permutations.
    names = [f'{COLOUR_WORDS[p[0]]}-crowned {COLOUR_WORDS[p[1]]}-breasted '
             f'{COLOUR_WORDS[p[2]]}-winged {FAMILY_WORDS[f]}'
             for f, p in zip(family_of, perms)]
  return names


class _Geometry:
  """Canonical part shapes of one family (x forward, y up, body at 0)."""

  def __init__(self, family):
    bx, by, power = _BODY_SHAPES[family % len(_BODY_SHAPES)]
    grow = 1.0 + 0.08 * (family // len(_BODY_SHAPES))
    self.body = (bx * grow, by * grow, power)
    self.fork = bool(family % 2)
    self.scale = {p: 1.0 for p in COLOURED_PARTS}
    self._equalise()

  def params(self):
    """Part shape parameters at the current part scales."""
    bx, by, _ = self.body
    k = self.scale
    rh = 0.19 * k['head']
    head = (bx * 0.80 + 0.10, by * 0.70 + 0.12)
    return dict(
        head=(head, rh),
        eye=((head[0] + 0.35 * rh, head[1] + 0.2 * rh), 0.26 * rh),
        beak=np.array([[head[0] + 0.8 * rh, head[1] + 0.35 * rh],
                       [head[0] + 0.8 * rh, head[1] - 0.25 * rh],
                       [head[0] + 1.75 * rh, head[1] - 0.05 * rh]]),
        breast=((0.42 * bx, -0.40 * by), 0.22 * k['breast'],
                0.16 * k['breast']),
        wing=((-0.12 * bx, 0.22 * by), 0.33 * k['wing'], 0.14 * k['wing']),
        tail=(-0.75 * bx, bx * 0.25 + 0.30 * k['tail'], 0.21 * k['tail']),
    )

  def masks(self, x, y):
    """Visible masks (dict of bool arrays) at canonical points (x, y)."""
    bx, by, power = self.body
    p = self.params()
    body = np.abs(x / bx) ** power + np.abs(y / by) ** power <= 1.0
    root, length, half = p['tail']
    end = root - length  # Tail tip x, behind the body.
    u = (root - x) / (root - end)  # 0 at the root, 1 at the tip.
    tail = (u >= 0) & (u <= 1) & (np.abs(y) <= half * u)
    if self.fork:  # A notch cut into the tip.
      tail &= ~((u > 0.6) & (np.abs(y) < half * (u - 0.6) / 0.4 * 0.6))
    (cx, cy), a, b = p['breast']
    breast = body & (((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0)
    (cx, cy), a, b = p['wing']
    tilt = np.deg2rad(-12.0)
    wu = (x - cx) * np.cos(tilt) + (y - cy) * np.sin(tilt)
    wv = -(x - cx) * np.sin(tilt) + (y - cy) * np.cos(tilt)
    wing = (wu / a) ** 2 + (wv / b) ** 2 <= 1.0
    stripes = wing & (np.cos(2 * np.pi * wu / (0.55 * a)) > 0.55)
    (cx, cy), rh = p['head']
    head = (x - cx) ** 2 + (y - cy) ** 2 <= rh ** 2
    (ex, ey), re = p['eye']
    eye = (x - ex) ** 2 + (y - ey) ** 2 <= re ** 2
    beak = _in_triangle(x, y, p['beak'])
    # Painter's order: tail, body, breast, wing, head, eye, beak.
    on_top = head | eye | beak
    return dict(
        tail=tail & ~body & ~wing & ~on_top,
        body=body & ~breast & ~wing & ~on_top,
        breast=breast & ~wing & ~on_top,
        wing=wing & ~stripes & ~on_top,
        stripes=stripes & ~on_top,
        head=head & ~eye & ~beak,
        eye=eye & ~beak,
        beak=beak,
    )

  def keypoints(self):
    """Canonical (x, y) of PART_NAMES, (P, 2)."""
    p = self.params()
    root, length, _ = p['tail']
    # Middle of the tail's visible part, between the body's back and the tip.
    tail_x = (-self.body[0] + root - length) / 2
    return np.array([
        p['beak'][2], p['head'][0], p['breast'][0], p['wing'][0],
        (tail_x, 0.0), (0.0, 0.0)], np.float64)

  def _equalise(self):
    """Scales the coloured parts until their visible areas all equal _PART_AREA."""
    for _ in range(6):
      for part, area in self.areas().items():
        self.scale[part] *= (_PART_AREA / max(area, 1e-6)) ** 0.5

  def areas(self):
    """Visible area of each coloured part (canonical units^2)."""
    grid = np.linspace(-1.3, 1.3, 261)  # 0.01 steps: areas to ~1%.
    step = grid[1] - grid[0]
    x, y = np.meshgrid(grid, grid)
    masks = self.masks(x, y)
    return {p: float(masks[p].sum() * step ** 2) for p in COLOURED_PARTS}


@functools.lru_cache(maxsize=None)
def _geometry(family):
  """The (immutable after construction) geometry of `family`, built once."""
  return _Geometry(family)


def _in_triangle(x, y, tri):
  """Points inside the triangle `tri` (3, 2)."""
  def side(p, q):
    return (x - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (y - q[1])
  d1, d2, d3 = side(tri[0], tri[1]), side(tri[1], tri[2]), side(tri[2], tri[0])
  neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
  pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
  return ~(neg & pos)


def _muted_colour(rng, max_saturation):
  """A random RGB colour (0..255) with bounded saturation."""
  hue = rng.random()
  sat = rng.uniform(0.05, max_saturation)
  val = rng.uniform(0.3, 0.9)
  rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
  return 255.0 * val * (1 - sat + sat * rgb)


def render(geometry, perm, rng, *, image_size, clutter):
  """Draws one bird.

  Args:
    geometry: the family's `_Geometry`.
    perm: palette index of (head, breast, wing, tail).
    rng: numpy Generator; the image is a function of its state.
    image_size: side S of the square image.
    clutter: mean number of background blobs.

  Returns:
    (uint8 (S, S, 3) image, float32 (P, 3) keypoints x, y, visible,
    float32 (4,) box x, y, width, height of the visible bird).
  """
  n = image_size * _SUPERSAMPLE
  centres = ((np.arange(n) + 0.5) / _SUPERSAMPLE).astype(np.float32)
  px, py = np.meshgrid(centres, centres)

  # Background: a smooth two-colour gradient plus elliptic clutter blobs.
  c0, c1 = _muted_colour(rng, 0.4), _muted_colour(rng, 0.4)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = ((px * np.cos(angle) + py * np.sin(angle)) / image_size + 1) / 2
  ramp = np.clip(ramp, 0, 1)[..., None]
  canvas = (c0 * (1 - ramp) + c1 * ramp).astype(np.float32)
  for _ in range(rng.poisson(clutter)):
    cx, cy = rng.uniform(0, image_size, 2)
    ax, ay = rng.uniform(0.03, 0.14, 2) * image_size
    theta = rng.uniform(0, np.pi)
    # Only the blob's bounding box can change.
    r = max(ax, ay)
    rows = slice(max(0, int((cy - r) * _SUPERSAMPLE)),
                 max(0, int((cy + r) * _SUPERSAMPLE) + 1))
    cols = slice(max(0, int((cx - r) * _SUPERSAMPLE)),
                 max(0, int((cx + r) * _SUPERSAMPLE) + 1))
    dx, dy = px[rows, cols] - cx, py[rows, cols] - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    canvas[rows, cols][(u / ax) ** 2 + (v / ay) ** 2 <= 1] = _muted_colour(
        rng, 0.55)

  # Pose: canonical -> pixels is p = t + s * R(theta) * diag(flip, -1) * q.
  scale = rng.uniform(*_SCALE) * image_size
  theta = np.deg2rad(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG))
  flip = -1.0 if rng.random() < 0.5 else 1.0
  shift = rng.uniform(-_SHIFT, _SHIFT, 2) * image_size + image_size / 2
  rot = np.array([[np.cos(theta), -np.sin(theta)],
                  [np.sin(theta), np.cos(theta)]])
  linear = scale * rot @ np.diag([flip, -1.0])
  offset = shift - linear @ np.array([-0.12, 0.05])  # Object centre -> shift.
  inv = np.linalg.inv(linear)
  inv, offset32 = inv.astype(np.float32), offset.astype(np.float32)
  qx = inv[0, 0] * (px - offset32[0]) + inv[0, 1] * (py - offset32[1])
  qy = inv[1, 0] * (px - offset32[0]) + inv[1, 1] * (py - offset32[1])

  masks = geometry.masks(qx, qy)
  def jitter():
    return rng.normal(0, 10, 3)  # Colour noise, so no class is one RGB value.

  colours = {part: PALETTE[c] + jitter() for part, c in
             zip(COLOURED_PARTS, perm)}
  colours['body'] = _muted_colour(rng, 0.35)
  colours['stripes'] = np.array([35., 30., 30.]) + jitter()
  colours['eye'] = np.array([15., 15., 15.])
  colours['beak'] = np.array([90., 70., 45.]) + jitter()
  # Paint part indices first, then look colours up once (cheaper than
  # eight masked RGB writes).
  order = ('tail', 'body', 'breast', 'wing', 'stripes', 'head', 'eye', 'beak')
  paint = np.zeros(qx.shape, np.uint8)
  for i, part in enumerate(order):
    paint[masks[part]] = i + 1
  table = np.stack([np.zeros(3)] + [colours[p] for p in order]).astype(
      np.float32)
  canvas = np.where(paint[..., None] > 0, table[paint], canvas)

  s = _SUPERSAMPLE
  canvas = sum(canvas[i::s, j::s] for i in range(s) for j in range(s)) / s**2
  canvas = canvas * np.float32(rng.uniform(0.9, 1.1)) + rng.normal(
      0, 3, canvas.shape).astype(np.float32)
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

  points = geometry.keypoints() @ linear.T + offset
  inside = np.all((points >= 0) & (points < image_size), axis=1)
  keypoints = np.concatenate([points, inside[:, None]], axis=1)
  rows, cols = np.nonzero(paint)
  box = np.zeros(4)
  if rows.size:
    box = np.array([cols.min(), rows.min(), cols.max() + 1 - cols.min(),
                    rows.max() + 1 - rows.min()]) / _SUPERSAMPLE
  return image, keypoints.astype(np.float32), box.astype(np.float32)


class SyntheticDataset(core.Dataset):
  """The synthetic split, generated into memory at construction."""

  def __init__(self, synthetic_cfg, split, *, process_index=0,
               process_count=1):
    """Generates the split.

    Args:
      synthetic_cfg: `data.synthetic` config (num_classes, num_families,
        train_per_class, test_per_class, image_size, seed, clutter).
      split: 'train' (database) or 'test' (queries).
      process_index: this process's index.
      process_count: number of processes.
    """
    core.check_split(split)
    cfg = synthetic_cfg
    family_of, perms = class_structure(cfg.num_classes, cfg.num_families)
    per_class = cfg.train_per_class if split == 'train' else cfg.test_per_class
    labels = np.repeat(np.arange(cfg.num_classes), per_class)
    super().__init__(
        name='synthetic', split=split, labels=labels,
        class_names=class_names_for(family_of, perms), family_of=family_of,
        family_names=list(FAMILY_WORDS[:cfg.num_families]),
        part_names=PART_NAMES, process_index=process_index,
        process_count=process_count)
    self.class_parts = [
        {part: COLOUR_WORDS[c] for part, c in zip(COLOURED_PARTS, perm)}
        for perm in perms]
    geometries = [_geometry(f) for f in range(cfg.num_families)]
    clutter = cfg.clutter
    images, keypoints, boxes = [], [], []
    for i, label in enumerate(labels):
      k = i - label * per_class
      rng = np.random.default_rng(
          [cfg.seed, _SPLIT_CODE[split], int(label), int(k)])
      image, points, box = render(geometries[family_of[label]], perms[label],
                                  rng, image_size=cfg.image_size,
                                  clutter=clutter)
      images.append(image)
      keypoints.append(points)
      boxes.append(box)
    self.images = np.stack(images)  # (N, S, S, 3) uint8
    self.keypoints = np.stack(keypoints)  # (N, P, 3)
    self.boxes = np.stack(boxes)  # (N, 4) x, y, w, h

  def _load(self, index):
    return {'image': self.images[index], 'label': int(self.labels[index]),
            'keypoints': self.keypoints[index], 'box': self.boxes[index]}


def build(data_cfg, split, *, process_index=0, process_count=1):
  """The synthetic split of config `data` (its `synthetic` section)."""
  return SyntheticDataset(data_cfg.synthetic, split,
                          process_index=process_index,
                          process_count=process_count)
