"""EpochMix: an epoch of a fixed number of draws from one or more datasets in fixed shares (fixed steps per
epoch whatever the set's size; true labels beside many more pseudo-labels), each item augmented anew per draw."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from data import EpochMix, SegmentationDataset, build_train_transform
from index import segmentation_splits
from utils import ToothSegError


@pytest.fixture(scope="module")
def pairs(phantom_data_root):
    """The phantom's labelled pairs (train, val and test together: 8), as a training set would see them."""
    splits = segmentation_splits(phantom_data_root / "processed_2d")
    return [s for part in splits.values() for s in part]


def dataset(samples) -> SegmentationDataset:
    return SegmentationDataset(samples, build_train_transform(32, 64), seed=3)


def epoch(mix: EpochMix, number: int) -> list:
    mix.set_epoch(number)
    return [mix[i] for i in range(len(mix))]


def test_one_part_at_its_own_length_is_the_dataset_unchanged(pairs):
    plain, mix = dataset(pairs), EpochMix([dataset(pairs)], [1], len(pairs))
    for number in (0, 1):
        plain.set_epoch(number)
        for (image, mask, meta), (mixed_image, mixed_mask, mixed_meta) in zip([plain[i] for i in range(len(plain))],
                                                                              epoch(mix, number)):
            assert meta["pair_id"] == mixed_meta["pair_id"]
            assert torch.equal(image, mixed_image) and torch.equal(mask, mixed_mask)


def test_a_small_set_fills_the_epoch_and_each_draw_is_augmented_anew(pairs):
    mix = EpochMix([dataset(pairs)], [1], 3 * len(pairs))
    items = epoch(mix, 0)
    assert Counter(meta["pair_id"] for _, _, meta in items) == Counter({s.pair_id: 3 for s in pairs})
    distinct = {(meta["pair_id"], image.numpy().tobytes()) for image, _, meta in items}
    assert len(distinct) > len(pairs) + len(pairs) // 2, "the copies of an item must see different augmentations"


def test_shares_fix_each_part_and_a_large_part_is_covered_round_robin(pairs):
    small, large = pairs[:2], pairs[2:]  # 2 "labelled" and 6 "pseudo-labelled" items
    mix = EpochMix([dataset(small), dataset(large)], [0.5, 0.5], 4)
    seen = Counter()
    for number in range(3):  # 2 draws of the large part an epoch: three epochs cover its 6 items once each
        ids = [meta["pair_id"] for _, _, meta in epoch(mix, number)]
        assert sorted(ids[:2]) == sorted(s.pair_id for s in small)
        seen.update(ids[2:])
    assert seen == Counter({s.pair_id: 1 for s in large})


def test_a_share_of_zero_leaves_a_part_out_and_bad_shares_are_refused(pairs):
    mix = EpochMix([dataset(pairs[:2]), dataset(pairs[2:])], [0, 1], 5)
    assert {meta["pair_id"] for _, _, meta in epoch(mix, 0)} <= {s.pair_id for s in pairs[2:]}
    with pytest.raises(ToothSegError, match="share"):
        EpochMix([dataset(pairs)], [0], 4)
