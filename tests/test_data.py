"""EpochMix: an epoch of a fixed number of draws from one or more datasets in fixed shares (fixed steps per
epoch whatever the set's size; true labels beside many more pseudo-labels), each item augmented anew per draw."""
from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from data import EpochMix, SegmentationDataset, build_eval_transform, build_train_transform
from index import read_mask, samples_from_folders, segmentation_splits
from utils import ToothSegError, write_png


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


@pytest.mark.parametrize("shares, length, counts", [([0.5, 0.5], 1, None), ([0.1, 0.9], 3, [1, 2]),
                                                     ([0.5, 0.5], 4, [2, 2]), ([0, 1], 3, [0, 3])])
def test_rounding_starves_no_part_of_a_small_epoch(pairs, shares, length, counts):
    """Each part with a share gets a draw while another part has two (rounded alike every epoch, a share of 0.1
    of 3 draws had never drawn the labelled pairs at all); a part of share 0 gets none."""
    mix = EpochMix([dataset(pairs[:2]), dataset(pairs[2:])], shares, length)
    assert sum(mix.counts) == length == len(mix)
    if counts is not None:
        assert mix.counts == counts


def test_a_negative_seed_draws_as_set_seed_takes_it(pairs):
    """--seed takes any integer (utils.set_seed wraps it); numpy's generators take only non-negative ones."""
    negative = SegmentationDataset(pairs, build_train_transform(32, 64), seed=-1)[0]
    wrapped = SegmentationDataset(pairs, build_train_transform(32, 64), seed=2**32 - 1)[0]
    assert torch.equal(negative[0], wrapped[0]) and torch.equal(negative[1], wrapped[1])


def test_area_mask_resize_gives_each_network_pixel_its_tooth_share(pairs):
    sample = pairs[0]
    mask = read_mask(sample.mask)
    factor = 4  # the phantom's 320x640 to 80x160; Tufts' 1615x840 to 320x640 is 2.5x
    height, width = mask.shape[0] // factor, mask.shape[1] // factor
    targets = {resize: SegmentationDataset([sample], build_eval_transform(height, width, mask_resize=resize),
                                           seed=0, fixed=True)[0][1][0].numpy()
               for resize in ("nearest", "area")}
    assert set(np.unique(targets["nearest"])) == {0.0, 1.0}  # binary, as before the flag
    share = mask.reshape(height, factor, width, factor).mean((1, 3))  # each block's tooth share
    assert np.abs(targets["area"] - share).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    assert ((targets["area"] > 0) & (targets["area"] < 1)).any()

    def round_trip_dice(target: np.ndarray) -> float:
        back = cv2.resize(target, mask.shape[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
        return 2 * (back & (mask > 0)).sum() / (back.sum() + mask.sum())

    assert round_trip_dice(targets["area"]) > round_trip_dice(targets["nearest"])


def test_area_image_resize_averages_every_source_pixel():
    noise = np.random.default_rng(0).integers(0, 256, (96, 192), dtype=np.uint8)
    factor = 3  # bilinear at a whole factor reads one source pixel per output pixel: the noise passes unaveraged
    height, width = 96 // factor, 192 // factor
    images = {resize: build_eval_transform(height, width, normalize=False, image_resize=resize)(image=noise)
              ["image"][0].numpy() for resize in ("linear", "area")}
    block_means = noise.reshape(height, factor, width, factor).mean((1, 3)) / 255
    assert np.abs(images["area"] - block_means).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    assert np.abs(images["linear"] - block_means).mean() > 10 / 255
    assert images["area"].std() < images["linear"].std() / 2


@pytest.mark.parametrize("flag, valid", [("mask_resize", "nearest, area"), ("image_resize", "linear, area")])
def test_an_unknown_resize_is_one_line(flag, valid):
    with pytest.raises(ToothSegError, match=f"unknown {flag.split('_')[0]} resize 'cubic'; valid: {valid}"):
        build_train_transform(32, 64, **{flag: "cubic"})


# ----------------------------------------------------------------------------------------------
# Bare folders (no index): pairing by file stem
# ----------------------------------------------------------------------------------------------
def bare_tree(root, stems, folders=("images", "masks", "teeth")):
    for folder in folders:
        for stem in stems:
            write_png(root / folder / f"{stem}.png", np.zeros((8, 8), np.uint8))
    return root


def test_one_tree_pairs_each_image_with_its_mask_not_its_label_map(tmp_path):
    root = bare_tree(tmp_path, [f"x{i}" for i in range(5)])
    for folders in ((root, root), (root / "images", root / "masks")):  # the first as segmentation_splits calls it
        samples = samples_from_folders(*folders)
        assert [(s.image.parent.name, s.mask.parent.name) for s in samples] == [("images", "masks")] * 5


@pytest.mark.parametrize("cache", [True, False])
def test_a_mask_of_another_size_is_named_and_cached_sets_name_it_before_training(tmp_path, cache):
    root = bare_tree(tmp_path, ["a", "b"], folders=("images", "masks"))
    write_png(root / "masks" / "b.png", np.zeros((8, 9), np.uint8))
    samples = samples_from_folders(root / "images", root / "masks")
    unequal = r"b.png: mask size \(9, 8\) differs from its image \(8, 8\); fix the pair"
    if cache:  # found while caching, by every torchrun process alike, not by the one rank that draws the pair
        with pytest.raises(ToothSegError, match=unequal):
            SegmentationDataset(samples, build_eval_transform(8, 8), cache=True)
    else:
        uncached = SegmentationDataset(samples, build_eval_transform(8, 8))
        assert uncached[0][1].shape == (1, 8, 8)
        with pytest.raises(ToothSegError, match=unequal):
            uncached[1]


@pytest.mark.parametrize("where, flag", [("images", "--images-dir"), ("masks", "--masks-dir")])
def test_two_files_with_one_stem_are_refused_in_one_line(tmp_path, where, flag):
    root = bare_tree(tmp_path, ["a", "b"], ("images", "masks"))
    write_png(root / where / "sub" / "a.png", np.zeros((8, 8), np.uint8))  # eval would save both as a.png
    with pytest.raises(ToothSegError, match=f"has the same name stem as .*a.png.*move it out of {flag}"):
        samples_from_folders(root / "images", root / "masks")


def test_masks_without_images_are_left_out_with_a_note(tmp_path, capsys):
    """A subset of a set's X-rays scored against its whole masks folder: a note counts what is left out (a deleted
    X-ray had left its mask out without a word)."""
    root = bare_tree(tmp_path, ["a", "b", "c"], ("images", "masks"))
    (root / "images" / "b.png").unlink()
    assert [s.pair_id for s in samples_from_folders(root / "images", root / "masks")] == ["a", "c"]
    assert f"note: 1 masks in {root / 'masks'} have no image in {root / 'images'} (first: b.png)" in capsys.readouterr().out


def test_a_leftover_broken_link_beside_its_file_is_named_as_a_broken_link(tmp_path):
    root = bare_tree(tmp_path, ["a", "b"], ("images", "masks"))
    (root / "masks" / "b.bmp").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ToothSegError, match=r"b\.bmp: is a link to .*nowhere\.png, which does not exist, beside "
                                            r".*b\.png of the same name stem; remove it"):
        samples_from_folders(root / "images", root / "masks")


def test_a_missing_masks_folder_is_named(tmp_path):
    root = bare_tree(tmp_path, ["a"], ("images",))
    with pytest.raises(ToothSegError, match=f"{tmp_path / 'nope'}: masks folder not found; check --masks-dir"):
        samples_from_folders(root / "images", tmp_path / "nope")


def test_a_link_to_processed_2d_uses_the_index_beside_its_target(phantom_data_root, tmp_path):
    (tmp_path / "my_data").symlink_to(phantom_data_root / "processed_2d")  # no index beside the link
    splits, linked = (segmentation_splits(folder) for folder in (phantom_data_root / "processed_2d", tmp_path / "my_data"))
    for name in ("train", "val", "test"):  # the index's splits, not a file-name split of a bare tree
        assert [s.pair_id for s in linked[name]] == [s.pair_id for s in splits[name]] != []
        assert all(s.image.is_relative_to(tmp_path / "my_data") for s in linked[name])


def test_too_few_images_to_hold_out_names_the_folder_and_the_fix(tmp_path):
    from index import Sample, hold_out

    with pytest.raises(ToothSegError, match=f"found 1 in {tmp_path}; give --images-dir a folder with more"):
        hold_out([Sample(tmp_path / "only.png", None, "only")], 0.1, minimum=2)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (64, 128)])
def test_models_genesis_perturbs_inputs_down_to_one_pixel(size):
    from data import GenesisConfig, models_genesis  # an input of 1x1 was a numpy traceback ("high <= 0")

    image = np.random.default_rng(0).random(size, dtype=np.float32)
    always = GenesisConfig(flip_prob=1, local_shuffle_prob=1, nonlinear_prob=1, paint_prob=1)
    for seed in range(20):
        perturbed, target = models_genesis(image, np.random.default_rng(seed), always)
        assert perturbed.shape == target.shape == size and np.isfinite(perturbed).all()


def test_a_cache_larger_than_the_free_shared_memory_is_one_line_not_a_bus_error(monkeypatch):
    """Docker's default /dev/shm is 64 MB; a larger cache crashed the DataLoader workers with a bus error."""
    import os
    from types import SimpleNamespace

    import data

    images = [np.zeros((1000, 2000), np.uint8)] * 40  # 76 MB
    monkeypatch.setattr(data.os, "statvfs", lambda folder: SimpleNamespace(f_bavail=16384, f_frsize=4096))  # 64 MB
    with pytest.raises(ToothSegError, match=r"^/dev/shm: the decoded-image cache needs 76 MB of shared memory and 64 MB "
                                            r"are free there; give it more \(docker run --shm-size=8g\) or train with "
                                            r"--no-cache$"):
        data.SharedImages(images)
    monkeypatch.setattr(data.os, "statvfs", os.statvfs)
    assert data.SharedImages(images[:1])[0].shape == (1000, 2000)  # what fits is cached as before
