"""The synthetic panoramic phantom: format, determinism, anatomy, the labelling rules for implants and
restorations, the failure of every global threshold, and the STS proportions of the manifest."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

import phantom
from prepare_sts2d import split_sizes


def best_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """The best Dice over all 256 global thresholds (prediction = image > t)."""
    fg = mask > 0
    scores = []
    for t in range(256):
        pred = image > t
        scores.append(2 * np.logical_and(pred, fg).sum() / (pred.sum() + fg.sum()))
    return max(scores)


@pytest.mark.parametrize("age_group", ["adult", "children"])
@pytest.mark.parametrize("size", [(320, 640), (160, 320), (256, 400)])
def test_format_and_mask_values(age_group, size):
    image, mask = phantom.generate_panoramic(3, *size, age_group=age_group)
    assert image.shape == mask.shape == size
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert 0.05 < (mask > 0).mean() < 0.35  # teeth cover a realistic share of a panoramic
    assert image.std() > 20  # not a flat image


def test_deterministic_in_seed():
    a = phantom.generate_panoramic(11)
    b = phantom.generate_panoramic(11)
    c = phantom.generate_panoramic(12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], phantom.generate_panoramic(11, age_group="children")[1])


def test_no_global_threshold_segments_the_teeth():
    """Scanning all 256 thresholds on several adult and child images: the best is below Dice 0.8,
    although teeth are brighter than their surroundings on average (so the scan is meaningful)."""
    for seed, age in [(0, "adult"), (1, "adult"), (2, "adult"), (3, "adult"), (4, "children"), (5, "children")]:
        image, mask = phantom.generate_panoramic(seed, age_group=age)
        assert image[mask > 0].mean() > image[mask == 0].mean() + 20
        assert best_threshold_dice(image, mask) < 0.8, (seed, age)


def test_panoramic_layout():
    """Dark surroundings, the spine's shadow at both sides, teeth in the middle band."""
    image, mask = phantom.generate_panoramic(21)
    h, w = image.shape
    rows, cols = np.nonzero(mask)
    assert 0.2 * h < rows.min() and rows.max() < 0.95 * h and 0.1 * w < cols.min() and cols.max() < 0.9 * w
    profile = image[h // 3:, :].mean(axis=0)  # column brightness below the skull base
    for side in (profile, profile[::-1]):  # a bright spine column at the edge, then a dark gap before the jaw
        assert side[:w // 10].max() > side[w // 10:w // 6].min() + 15
    teeth_band = image[int(rows.min()):int(rows.max()), int(cols.min()):int(cols.max())].mean()
    assert image[:h // 10].mean() < teeth_band - 20  # the top of the image is dark


def test_dentitions():
    adults = [phantom.describe(s, "adult") for s in range(40)]
    assert all(28 <= d["positions"] <= 32 for d in adults)
    assert {28, 32} <= {d["positions"] for d in adults}
    assert any(d["missing"] for d in adults) and any(d["implants"] for d in adults)
    assert all(d["teeth"] + d["missing"] == d["positions"] and d["buds"] == 0 for d in adults)
    children = [phantom.describe(s, "children") for s in range(10)]
    assert all(d["buds"] >= 8 and 20 <= d["teeth"] <= 28 and d["implants"] == 0 for d in children)


def test_implants_are_background_and_restorations_are_tooth():
    """Metal is the brightest thing in the image: implants (a bright screw outside the mask)
    and restorations (bright pixels inside the mask)."""
    with_implant = next(s for s in range(100) if phantom.describe(s)["implants"])
    image, mask = phantom.generate_panoramic(with_implant)
    bright = image >= np.percentile(image, 99.7)
    assert (bright & (mask == 0)).sum() > 50
    restored = next(s for s in range(100) if phantom.describe(s)["restore"] == 0.2 and not phantom.describe(s)["implants"])
    image, mask = phantom.generate_panoramic(restored)
    metal = image > 225
    assert metal.sum() > 30 and (metal & (mask > 0)).sum() > 0.9 * metal.sum()


def test_generation_speed_sanity():
    """A generous bound only (the measured rate is about 30-40 images per CPU second on one core)."""
    start = time.process_time()
    for seed in range(10):
        phantom.generate_panoramic(seed)
    assert time.process_time() - start < 5.0


def test_manifest_has_sts_proportions_at_scale():
    manifest = phantom.synthetic_manifest(4000, seed=0)
    counts = Counter((m["age_group"], m["label_status"]) for m in manifest)
    assert counts == Counter(phantom.STS_COUNTS)
    assert len({m["name"] for m in manifest}) == 4000
    assert len({m["seed"] for m in manifest}) > 3990


@pytest.mark.parametrize("n", [12, 16, 24, 60])
def test_manifest_small_n_keeps_splittable_labelled_sets(n):
    manifest = phantom.synthetic_manifest(n, seed=5)
    counts = Counter((m["age_group"], m["label_status"]) for m in manifest)
    assert sum(counts.values()) == n
    for age, floor in phantom.MIN_LABELED.items():
        labelled = counts[(age, "labeled")]
        assert labelled >= floor
        n_val, n_test = split_sizes(labelled, 0.1, 0.1)
        assert n_val >= 1 and n_test >= 1 and labelled - n_val - n_test >= 1
    assert counts[("adult", "unlabeled")] > counts[("children", "unlabeled")] > 0


def test_manifest_is_deterministic_in_seed():
    assert phantom.synthetic_manifest(30, 1) == phantom.synthetic_manifest(30, 1)
    assert phantom.synthetic_manifest(30, 1) != phantom.synthetic_manifest(30, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="age_group"):
        phantom.generate_panoramic(0, age_group="teen")
    with pytest.raises(ValueError, match="at least"):
        phantom.generate_panoramic(0, 16, 16)
    with pytest.raises(ValueError, match="at least one"):
        phantom.synthetic_manifest(0, 0)
