"""Known-answer tests of the analysis functions in concepthash_jax.interpret."""
import numpy as np
import pytest

from concepthash_jax import interpret

S = 64  # Model input side in pixels.
G = 8  # Patch grid side (patch = 8 px).


def _peaked_attn(peaks, floor=0.01):
  """(N, M, G*G) attention with each map peaked at the given (row, col)."""
  peaks = np.asarray(peaks)
  n, m = peaks.shape[:2]
  attn = np.full((n, m, G, G), floor)
  for i in range(n):
    for j in range(m):
      attn[i, j, peaks[i, j, 0], peaks[i, j, 1]] = 1.0
  return attn.reshape(n, m, G * G)


def _patch_xy(row, col):
  return np.array([(col + 0.5) * S / G, (row + 0.5) * S / G])


def test_peak_location_is_the_centre_of_the_argmax_patch():
  attn = _peaked_attn([[[2, 5], [7, 0]]])
  loc = interpret.attention_locations(attn, (S, S), method='peak')
  np.testing.assert_allclose(loc[0, 0], _patch_xy(2, 5))
  np.testing.assert_allclose(loc[0, 1], [4.0, 60.0])


def test_centroid_of_uniform_map_is_centre_and_of_two_peaks_the_midpoint():
  uniform = np.ones((1, 1, G * G))
  np.testing.assert_allclose(
      interpret.attention_locations(uniform, (S, S), method='centroid')[0, 0],
      [S / 2, S / 2])
  two = np.zeros((1, 1, G, G))
  two[0, 0, 1, 1] = two[0, 0, 1, 5] = 0.5
  loc = interpret.attention_locations(two.reshape(1, 1, -1), (S, S),
                                      method='centroid')
  np.testing.assert_allclose(loc[0, 0], (_patch_xy(1, 1) + _patch_xy(1, 5)) / 2)


def test_attention_grid_rejects_non_square_without_shape():
  with pytest.raises(ValueError, match='square'):
    interpret.attention_grid(np.zeros((1, 2, 12)))
  assert interpret.attention_grid(np.zeros((1, 2, 12)), (3, 4)).shape == (
      1, 2, 3, 4)


def test_upsampling_keeps_constant_maps_and_the_peak_patch():
  const = np.full((2, 3, G, G), 0.25)
  up = interpret.upsample_attention(const, (S, S))
  assert up.shape == (2, 3, S, S)
  np.testing.assert_allclose(up, 0.25, atol=1e-6)
  peak = interpret.attention_grid(_peaked_attn([[[3, 6]]]))
  up = interpret.upsample_attention(peak, (S, S))[0, 0]
  y, x = np.unravel_index(np.argmax(up), up.shape)
  assert (y // (S // G), x // (S // G)) == (3, 6)


def test_correlation_is_one_for_identical_and_zero_for_disjoint_maps():
  same = np.tile(np.random.default_rng(0).random((5, 1, G * G)), (1, 3, 1))
  np.testing.assert_allclose(interpret.concept_correlation(same),
                             np.ones((3, 3)))
  disjoint = _peaked_attn([[[0, 0], [4, 4]]], floor=0.0)
  np.testing.assert_allclose(interpret.concept_correlation(disjoint), np.eye(2))
  # Pearson: a map and its mirror image anti-correlate.
  a = np.arange(G * G, dtype=float)
  pair = np.stack([a, a[::-1]])[None]
  np.testing.assert_allclose(
      interpret.concept_correlation(pair, method='pearson'),
      [[1, -1], [-1, 1]], atol=1e-12)


def test_best_concept_error_is_zero_on_the_peak_and_known_for_an_offset():
  rng = np.random.default_rng(0)
  n = 6
  peaks = np.stack([rng.integers(0, G, (n, 2)), rng.integers(0, G, (n, 2))], 1)
  loc = interpret.attention_locations(_peaked_attn(peaks), (S, S))
  # Part 0 sits on concept 1's peak, part 1 on concept 0's peak + 4 px in x.
  kp = np.zeros((n, 2, 3))
  kp[:, 0, :2] = loc[:, 1]
  kp[:, 1, :2] = loc[:, 0] + [4.0, 0.0]
  kp[..., 2] = 1
  kp[:, 1, 0] = np.minimum(kp[:, 1, 0], S - 1)  # Stay inside the image.
  res = interpret.part_localisation(loc, kp, loc, kp, image_size=(S, S),
                                    protocol='best_concept')
  np.testing.assert_array_equal(res['assignment'], [1, 0])
  assert res['per_part'][0] == pytest.approx(0.0)
  expected = 100 * np.abs(kp[:, 1, 0] - loc[:, 0, 0]).mean() / S
  assert res['per_part'][1] == pytest.approx(expected)
  assert res['concept_part_error'].shape == (2, 2)
  np.testing.assert_array_equal(res['count'], [n, n])


def test_centre_baseline_formula_and_visibility():
  loc = np.full((3, 1, 2), 32.0)
  kp = np.array([[[16.0, 32.0, 1.0]],  # 16 px left of the centre: 25 %.
                 [[32.0, 0.0, 1.0]],  # 32 px above: 50 %.
                 [[0.0, 0.0, 0.0]]])  # Invisible: ignored.
  res = interpret.part_localisation(loc, kp, loc, kp, image_size=(S, S),
                                    protocol='best_concept')
  assert res['centre_baseline'] == pytest.approx(37.5)
  assert res['count'][0] == 2
  # Prediction = centre too, so the same error; the mean baseline is the
  # distance to the mean visible location (24, 16).
  assert res['mean'] == pytest.approx(37.5)
  d = [np.hypot(16 - 24, 32 - 16), np.hypot(32 - 24, 0 - 16)]
  assert res['mean_baseline'] == pytest.approx(100 * np.mean(d) / S)
  # Outside the model input counts as invisible.
  assert not interpret.visible_mask([[[64.0, 3.0, 1.0]]], (S, S))[0, 0]


def test_box_normalisation_divides_per_axis():
  pts = np.array([[[30.0, 20.0]]])
  out = interpret.normalise_points(pts, (S, S),
                                   boxes=[[10.0, 10.0, 40.0, 20.0]])
  np.testing.assert_allclose(out, [[[0.5, 0.5]]])
  np.testing.assert_allclose(interpret.normalise_points(pts, (64, 32)),
                             [[[30 / 32, 20 / 64]]])


def test_regression_recovers_an_affine_part_and_beats_both_baselines():
  rng = np.random.default_rng(1)
  n, m = 80, 3
  loc = rng.uniform(0, S, (2 * n, m, 2))
  # The part is an affine function of concepts 0 and 2 (inside the image).
  part = 0.4 * loc[:, 0] + 0.3 * loc[:, 2] + [8.0, 5.0]
  kp = np.concatenate([part, np.ones((2 * n, 1))], -1)[:, None]
  res = interpret.part_localisation(loc[:n], kp[:n], loc[n:], kp[n:],
                                    image_size=(S, S))
  assert res['mean'] < 1e-6
  assert res['mean_baseline'] > 5 and res['centre_baseline'] > 5
  with pytest.raises(ValueError, match='protocol'):
    interpret.part_localisation(loc, kp, loc, kp, image_size=(S, S),
                                protocol='nearest')


def test_parts_without_fit_samples_are_nan():
  loc = np.full((4, 2, 2), 10.0)
  kp = np.zeros((4, 2, 3))
  kp[:, 0] = [12.0, 12.0, 1.0]
  res = interpret.part_localisation(loc, kp, loc, kp, image_size=(S, S))
  assert np.isnan(res['per_part'][1]) and not np.isnan(res['per_part'][0])
  assert res['count'][1] == 0


def test_family_labels_for_int_and_multi_hot():
  family_of = np.array([0, 1, 0, 2])
  np.testing.assert_array_equal(
      interpret.to_family_labels([3, 2, 1], family_of), [2, 0, 1])
  multi = np.array([[1, 0, 1, 0], [0, 1, 0, 1]])
  np.testing.assert_array_equal(interpret.to_family_labels(multi, family_of),
                                [[1, 0, 0], [0, 1, 1]])


def test_family_map_at_r_is_one_when_codes_identify_the_family_only():
  # Four classes, two families; codes depend on the family alone, so class
  # retrieval is at chance within a family but family retrieval is perfect.
  family_of = np.array([0, 0, 1, 1])
  labels = np.repeat(np.arange(4), 5)
  codes = np.where(family_of[labels][:, None] == 0, 1.0, -1.0) * np.ones((1, 8))
  score = interpret.family_map_at_r(codes, labels, codes, labels, family_of)
  assert score == pytest.approx(1.0)
  from concepthash_jax import evaluation  # pylint: disable=g-import-not-at-top
  assert evaluation.map_at_r(codes, labels, codes, labels) < 0.9


def test_subcode_values_and_strings():
  codes = np.array([[1, -1, 1, 1], [-1, -1, -1, 1]])
  np.testing.assert_array_equal(interpret.subcode_values(codes, 2),
                                [[2, 3], [0, 1]])
  assert interpret.subcode_string(1, 2) == '01'
  with pytest.raises(ValueError, match='divisible'):
    interpret.subcode_values(codes, 3)


def test_two_bit_layout_is_the_papers_quadrants():
  rows, cols, cells = interpret.subcode_layout(2)
  assert (rows, cols) == (2, 2)
  # Fig. 3: 00 bottom-left, 01 top-left, 11 top-right, 10 bottom-right.
  assert cells == {0b00: (1, 0), 0b01: (0, 0), 0b11: (0, 1), 0b10: (1, 1)}


@pytest.mark.parametrize('bits', [1, 3, 4])
def test_layout_neighbours_differ_in_one_bit(bits):
  rows, cols, cells = interpret.subcode_layout(bits)
  assert rows * cols == 2 ** bits
  where = {cell: value for value, cell in cells.items()}
  assert len(where) == 2 ** bits
  for (r, c), value in where.items():
    for nb in ((r + 1, c), (r, c + 1)):
      if nb in where:
        assert bin(value ^ where[nb]).count('1') == 1


def test_gallery_groups_keep_populous_values_and_best_scores():
  values = np.array([0, 1, 1, 2, 1, 0])
  scores = np.array([0.1, 0.5, 0.9, 0.3, 0.2, 0.8])
  groups = interpret.gallery_groups(values, scores, per_group=2, max_groups=2)
  assert list(groups) == [1, 0]
  np.testing.assert_array_equal(groups[1], [2, 1])
  np.testing.assert_array_equal(groups[0], [5, 0])


def test_crop_box_covers_the_hot_region_with_a_minimum_size():
  heat = np.zeros((S, S))
  heat[10:20, 30:50] = 1.0
  assert interpret.crop_box(heat) == (30, 10, 50, 20)
  dot = np.zeros((S, S))
  dot[0, 63] = 1.0
  assert interpret.crop_box(dot, min_size=16) == (48, 0, 64, 16)
  assert interpret.crop_box(np.ones((S, S))) == (0, 0, S, S)


def test_family_similarity_and_top_families():
  centers = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-0.1, 1.0]])
  sim = interpret.family_similarity(centers, [0, 0, 1, 1])
  assert sim['within'] > 0.99 and abs(sim['between']) < 0.2
  np.testing.assert_array_equal(interpret.top_families([2, 0, 2, 1, 1, 2], 2),
                                [2, 1])


def test_tsne_keeps_separated_clusters_apart():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(2, 16)) * 5
  points = np.concatenate([base[0] + rng.normal(size=(6, 16)) * 0.1,
                           base[1] + rng.normal(size=(6, 16)) * 0.1])
  emb = interpret.tsne_embed(points, seed=0)
  assert emb.shape == (12, 2)
  dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
  np.fill_diagonal(dist, np.inf)
  nearest = dist.argmin(1)
  assert np.all((nearest < 6) == (np.arange(12) < 6))
  np.testing.assert_allclose(emb, interpret.tsne_embed(points, seed=0))


def test_part_hits_take_the_nearest_visible_part_or_the_background():
  # Two parts in a 64-px image, box x 10..50, y 20..40.
  keypoints = np.array([[[15., 30., 1.], [45., 30., 1.]],
                        [[15., 30., 1.], [45., 30., 0.]],  # part 1 hidden
                        [[15., 30., 0.], [45., 30., 0.]]])  # none visible
  boxes = np.tile([[10., 20., 40., 20.]], (3, 1))
  locations = np.array([[[20., 28.], [40., 35.], [60., 5.]]] * 3)
  hits = interpret.concept_part_hits(locations, keypoints, image_size=(64, 64),
                                     boxes=boxes)
  bg, none = interpret.BACKGROUND, interpret.NO_PART
  np.testing.assert_array_equal(hits, [[0, 1, bg], [0, 0, bg],
                                       [none, none, none]])
  # Without boxes nothing is background: the far point goes to part 1.
  no_box = interpret.concept_part_hits(locations[:1], keypoints[:1],
                                       image_size=(64, 64))
  np.testing.assert_array_equal(no_box, [[0, 1, 1]])


def test_part_hit_summary_separates_fixed_parts_from_class_dependent_cues():
  bg = interpret.BACKGROUND
  labels = np.array([0, 0, 1, 1])
  # Concept 0 is always part 0; concept 1 follows a cue that sits on part 1
  # in class 0 and part 2 in class 1; concept 2 is background, concept 3
  # repeats concept 0 in the first image only.
  hits = np.array([[0, 1, bg, 0],
                   [0, 1, bg, 2],
                   [0, 2, bg, 1],
                   [0, 2, bg, 1],
                   [interpret.NO_PART] * 4])
  out = interpret.part_hit_summary(hits, np.append(labels, 0), num_parts=3)
  assert out['count'] == 4
  np.testing.assert_allclose(out['fraction'][0], [1, 0, 0, 0])
  np.testing.assert_allclose(out['fraction'][1], [0, .5, .5, 0])
  np.testing.assert_allclose(out['fraction'][2], [0, 0, 0, 1])
  np.testing.assert_allclose(out['consistency'], [1, .5, 1, .5])
  np.testing.assert_allclose(out['consistency_within_class'], [1, 1, 1, .75])
  assert out['distinct_rate'] == pytest.approx(0.75)
  # Parts hit per image (background not counted): 2, 3, 3, 3.
  assert out['mean_distinct_parts'] == pytest.approx(2.75)


def test_part_hit_summary_of_no_scored_image_is_nan_not_zero():
  out = interpret.part_hit_summary(np.full((2, 3), interpret.NO_PART),
                                   np.zeros(2), num_parts=4)
  assert out['count'] == 0
  assert np.isnan(out['consistency']).all()
  assert np.isnan(out['consistency_within_class']).all()
  assert np.isnan(out['distinct_rate'])
