"""metrics.py against independent references: brute-force point-set distances, set arithmetic,
explicit loss formulas, and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from metrics import (
    METRIC_NAMES,
    BCEDiceLoss,
    DeepSupervisionLoss,
    dice_per_image,
    empty_distance_penalty,
    masked_l1_loss,
    overlap_per_image,
    segmentation_metrics,
    soft_dice_loss,
    summarize,
)
from utils import ToothSegError


# ----------------------------------------------------------------------------------------------
# Independent reference: coordinate sets, explicit neighbour test, all-pairs distances
# ----------------------------------------------------------------------------------------------
def reference_surface_points(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or outside the image), as (row, col)."""
    height, width = mask.shape
    points = []
    for r, c in zip(*np.nonzero(mask)):
        neighbours = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
        if any(not (0 <= nr < height and 0 <= nc < width) or not mask[nr, nc] for nr, nc in neighbours):
            points.append((r, c))
    return np.array(points, dtype=float)


def reference_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    pred_set = set(zip(*np.nonzero(pred)))
    gt_set = set(zip(*np.nonzero(gt)))
    tp = len(pred_set & gt_set)
    distances = cdist(reference_surface_points(pred), reference_surface_points(gt))
    pred_to_gt, gt_to_pred = distances.min(axis=1), distances.min(axis=0)
    return dict(
        dice=2 * tp / (len(pred_set) + len(gt_set)),
        iou=tp / len(pred_set | gt_set),
        precision=tp / len(pred_set),
        recall=tp / len(gt_set),
        hd95=max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)),
        assd=(pred_to_gt.mean() + gt_to_pred.mean()) / 2,
    )


def random_blobs(rng: np.random.Generator, shape: tuple[int, int], smoothing: float) -> np.ndarray:
    """Irregular blobs (several components, holes, some touching the image edge)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), smoothing)
    return field > np.quantile(field, rng.uniform(0.4, 0.8))


def assert_all_finite(scores: dict) -> None:
    assert set(scores) == set(METRIC_NAMES)
    assert all(math.isfinite(v) for v in scores.values()), scores


# ----------------------------------------------------------------------------------------------
# segmentation_metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_matches_bruteforce_reference_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    gt = random_blobs(rng, (37, 53), smoothing=2.5)
    # A realistic prediction: the gt dilated or eroded, plus independent blobs of its own.
    shifted = ndimage.binary_dilation(gt) if seed % 2 else ndimage.binary_erosion(gt)
    pred = shifted ^ (random_blobs(rng, (37, 53), smoothing=1.5) & (rng.random((37, 53)) < 0.3))
    assert pred.any() and gt.any() and (pred != gt).any()
    scores = segmentation_metrics(pred, gt)
    assert_all_finite(scores)
    expected = reference_metrics(pred, gt)
    for key in METRIC_NAMES:
        assert scores[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-9), key


def test_single_pixels_are_their_euclidean_distance_apart():
    pred = np.zeros((20, 30), bool)
    gt = np.zeros((20, 30), bool)
    pred[4, 5] = True
    gt[7, 9] = True  # 3-4-5 triangle
    scores = segmentation_metrics(pred, gt)
    assert scores["hd95"] == pytest.approx(5.0)
    assert scores["assd"] == pytest.approx(5.0)
    assert scores["dice"] == scores["iou"] == scores["precision"] == scores["recall"] == 0.0


@pytest.mark.parametrize("offset", [1, 3, 6])
def test_parallel_lines_offset_by_k_rows_have_hd_k(offset):
    # A one-pixel line is all surface, and each point's nearest point on the other line is straight across.
    pred = np.zeros((20, 25), np.uint8)
    gt = np.zeros((20, 25), np.uint8)
    pred[5, 2:21] = 1
    gt[5 + offset, 2:21] = 1
    scores = segmentation_metrics(pred, gt)
    assert scores["hd95"] == pytest.approx(offset)
    assert scores["assd"] == pytest.approx(offset)
    assert scores["dice"] == 0.0


def test_square_inside_larger_concentric_square():
    pred = np.zeros((40, 50), bool)
    gt = np.zeros((40, 50), bool)
    pred[15:26, 20:31] = True  # 11 x 11
    gt[12:29, 17:34] = True  # 17 x 17, 3 pixels larger on each side
    scores = segmentation_metrics(pred, gt)
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(121 / 289)
    assert scores["dice"] == pytest.approx(2 * 121 / (121 + 289))
    assert scores["iou"] == pytest.approx(121 / 289)
    # every pred surface pixel is exactly 3 from the gt surface; gt corners are further (3*sqrt 2).
    assert 3.0 <= scores["assd"] < scores["hd95"] <= 3 * math.sqrt(2)


def test_identical_masks_score_perfectly():
    mask = random_blobs(np.random.default_rng(7), (31, 45), smoothing=2.0)
    assert segmentation_metrics(mask, mask) == dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, assd=0.0)


def test_mask_encodings_give_the_same_scores():
    rng = np.random.default_rng(3)
    pred, gt = random_blobs(rng, (30, 40), 2.0), random_blobs(rng, (30, 40), 2.0)
    as_bool = segmentation_metrics(pred, gt)
    assert segmentation_metrics(pred.astype(np.uint8), gt.astype(np.uint8)) == as_bool
    assert segmentation_metrics(pred.astype(np.uint8) * 255, gt.astype(np.uint8) * 255) == as_bool
    # JPEG-like noisy 255 masks still binarise with > 0
    assert segmentation_metrics(pred * np.uint8(200), gt * np.uint8(17)) == as_bool


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((37, 53), np.uint8)
    assert segmentation_metrics(empty, empty) == dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95=0.0, assd=0.0)


def test_empty_prediction_gets_zero_overlap_and_the_diagonal_penalty():
    gt = np.zeros((37, 53), bool)
    gt[10:20, 5:9] = True
    scores = segmentation_metrics(np.zeros_like(gt), gt)
    assert_all_finite(scores)
    diagonal = math.sqrt(37**2 + 53**2)
    assert empty_distance_penalty(gt.shape) == pytest.approx(diagonal)
    assert scores == dict(dice=0.0, iou=0.0, precision=0.0, recall=0.0, hd95=pytest.approx(diagonal), assd=pytest.approx(diagonal))


def test_prediction_on_empty_ground_truth_gets_zero_overlap_and_the_diagonal_penalty():
    pred = np.zeros((37, 53), bool)
    pred[0, 0] = True
    scores = segmentation_metrics(pred, np.zeros_like(pred))
    assert_all_finite(scores)
    diagonal = math.sqrt(37**2 + 53**2)
    assert scores == dict(dice=0.0, iou=0.0, precision=0.0, recall=0.0, hd95=pytest.approx(diagonal), assd=pytest.approx(diagonal))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ToothSegError, match=r"\(10, 12\).*\(12, 10\)"):
        segmentation_metrics(np.zeros((10, 12)), np.zeros((12, 10)))
    with pytest.raises(ToothSegError, match="not HxW"):
        segmentation_metrics(np.zeros((1, 10, 12)), np.zeros((1, 10, 12)))


# ----------------------------------------------------------------------------------------------
# summarize
# ----------------------------------------------------------------------------------------------
def test_summarize_statistics():
    rows = [dict(stem=f"img{i}", dice=d, iou=d / 2, precision=1.0, recall=0.5, hd95=h, assd=1.0)
            for i, (d, h) in enumerate([(0.9, 2.0), (0.5, 10.0), (0.7, 3.0), (0.1, 100.0)])]
    summary = summarize(rows)
    assert set(summary) == set(METRIC_NAMES)
    assert summary["dice"]["mean"] == pytest.approx(0.55)
    assert summary["dice"]["std"] == pytest.approx(math.sqrt((0.35**2 + 0.05**2 + 0.15**2 + 0.45**2) / 4))
    assert summary["dice"]["median"] == pytest.approx(0.6)
    assert summary["hd95"]["median"] == pytest.approx(6.5)
    assert summary["precision"]["std"] == 0.0
    assert summary["assd"]["n"] == 4
    assert summarize(rows[:1])["dice"] == dict(mean=0.9, std=0.0, median=0.9, n=1)


def test_summarize_refuses_nan_and_names_the_image():
    rows = [dict(stem="a", **dict.fromkeys(METRIC_NAMES, 1.0)), dict(stem="b", **dict.fromkeys(METRIC_NAMES, 1.0))]
    rows[1]["hd95"] = float("nan")
    with pytest.raises(ValueError, match=r"'hd95'.*\bb\b"):
        summarize(rows)
    with pytest.raises(ToothSegError, match="no images"):
        summarize([])


# ----------------------------------------------------------------------------------------------
# Torch: validation Dice and losses
# ----------------------------------------------------------------------------------------------
def test_dice_per_image_matches_segmentation_metrics():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 24, 36, generator=gen) * 3
    targets = (torch.rand(5, 1, 24, 36, generator=gen) > 0.6).float()
    logits[3] = -10.0  # pred empty, gt not
    targets[4] = 0.0
    logits[4] = -10.0  # both empty
    dice = dice_per_image(logits, targets, threshold=0.5)
    assert dice.shape == (5,) and dice.dtype == torch.float32
    masks = (torch.sigmoid(logits) > 0.5).numpy()
    expected = [segmentation_metrics(masks[i, 0], targets[i, 0].numpy())["dice"] for i in range(5)]
    assert dice.tolist() == pytest.approx(expected, abs=1e-6)
    assert dice[3] == 0.0 and dice[4] == 1.0
    # a higher threshold gives a different (smaller) prediction, so the threshold is honoured
    strict = (torch.sigmoid(logits) > 0.9).numpy()
    assert dice_per_image(logits, targets, threshold=0.9)[0].item() == pytest.approx(
        segmentation_metrics(strict[0, 0], targets[0, 0].numpy())["dice"], abs=1e-6)


def test_pooled_dice_is_swayed_by_stray_pixels_not_by_a_whole_image():
    """An image without teeth and 3 stray pixels: 0 of the mean Dice's 2 images, 3 pixels of the pooled one."""
    from finetune_seg import SegmentationTask

    targets = torch.zeros(2, 1, 20, 20)
    targets[0, :, 5:15, 5:15] = 1  # 100 tooth pixels; image 1 has none
    logits = torch.where(targets > 0, 10.0, -10.0)
    logits[1, 0, 0, :3] = 10.0  # stray pixels on the toothless image
    overlap, volume = overlap_per_image(logits, targets)
    assert overlap.tolist() == [200, 0] and volume.tolist() == [200, 3]
    task = SegmentationTask(lambda_dice=0.2)
    means = {k: v.item() / 2 for k, v in task.val_step(lambda x: logits, (logits, targets, {})).items() if k != "count"}
    figures = task.summarise(means)
    assert figures["dice"] == pytest.approx(0.5) and figures["dice_pooled"] == pytest.approx(200 / 203)
    assert "overlap" not in figures and "volume" not in figures


def manual_bce_dice(logits: torch.Tensor, targets: torch.Tensor, lambda_dice: float) -> torch.Tensor:
    logits, targets = logits.double(), targets.double()
    p = 1 / (1 + torch.exp(-logits))
    bce = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    per_sample = [1 - (2 * (p[i] * targets[i]).sum() + 1) / (p[i].sum() + targets[i].sum() + 1) for i in range(len(p))]
    return bce + lambda_dice * torch.stack(per_sample).mean()


@pytest.mark.parametrize("lambda_dice", [0.2, 1.0])
def test_bce_dice_equals_manual_formula(lambda_dice):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 16, 20, generator=gen)
    targets = (torch.rand(3, 1, 16, 20, generator=gen) > 0.5).float()
    targets[2] = 0.0
    loss = BCEDiceLoss(lambda_dice)(logits, targets)
    assert loss.item() == pytest.approx(manual_bce_dice(logits, targets, lambda_dice).item(), rel=1e-5)
    assert soft_dice_loss(logits, targets).item() == pytest.approx(
        manual_bce_dice(logits, targets, 1.0).item() - manual_bce_dice(logits, targets, 0.0).item(), rel=1e-5)


def test_bce_dice_gradient_is_finite_and_descends():
    gen = torch.Generator().manual_seed(2)
    targets = (torch.rand(2, 1, 32, 32, generator=gen) > 0.5).float()
    logits = torch.randn(2, 1, 32, 32, generator=gen).requires_grad_()
    criterion = BCEDiceLoss(0.2)
    loss = criterion(logits, targets)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with torch.no_grad():
        toward_targets = criterion(logits + (2 * targets - 1), targets)
        gradient_step = criterion(logits - 50.0 * logits.grad, targets)
    assert toward_targets < loss and gradient_step < loss


def test_bce_dice_is_fp32_and_finite_under_bf16_autocast():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 1, 32, 32, generator=gen)
    targets = (images > 0.3).float()
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(images) * 20  # large logits: saturating sigmoid must not make inf/NaN
        assert logits.dtype == torch.bfloat16
        loss = BCEDiceLoss(0.2)(logits, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(BCEDiceLoss(0.2)(logits.float(), targets).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_masked_l1_ignores_unmasked_pixels():
    gen = torch.Generator().manual_seed(4)
    pred, target = torch.rand(2, 1, 16, 24, generator=gen), torch.rand(2, 1, 16, 24, generator=gen)
    mask = (torch.rand(2, 1, 16, 24, generator=gen) > 0.5).float()
    loss = masked_l1_loss(pred, target, mask)
    expected = sum(abs(pred[i] - target[i]).item() for i in zip(*torch.nonzero(mask, as_tuple=True))) / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed_outside = torch.where(mask.bool(), pred, pred + 5.0)
    assert masked_l1_loss(changed_outside, target, mask).item() == loss.item()
    changed_inside = torch.where(mask.bool(), pred + 5.0, pred)
    assert masked_l1_loss(changed_inside, target, mask).item() != loss.item()
    # an empty mask falls back to the whole-image L1 (documented) rather than 0/0
    assert masked_l1_loss(pred, target, torch.zeros_like(mask)).item() == pytest.approx((pred - target).abs().mean().item())


@pytest.mark.parametrize("size,patch", [((16, 24), 8), ((20, 29), 8)])
def test_masked_l1_with_patch_normalised_targets(size, patch):
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 1, *size, generator=gen)
    target = torch.rand(2, 1, *size, generator=gen) * 3 + 1
    mask = (torch.rand(2, 1, *size, generator=gen) > 0.4).float()
    normalised = torch.empty_like(target)
    for top in range(0, size[0], patch):  # edge patches may be smaller: own statistics
        for left in range(0, size[1], patch):
            block = np.s_[..., top : top + patch, left : left + patch]
            for i in range(2):
                values = target[i][block].double()
                normalised[i][block] = ((values - values.mean()) / math.sqrt(values.var(unbiased=False).item() + 1e-6)).float()
    expected = ((pred - normalised).abs() * mask).sum() / mask.sum()
    loss = masked_l1_loss(pred, target, mask, norm_patch_size=patch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(masked_l1_loss(pred, target, mask).item(), rel=1e-3)


def test_masked_l1_under_bf16_autocast_is_fp32():
    pred = torch.rand(1, 1, 16, 16).bfloat16()
    loss = masked_l1_loss(pred, torch.rand(1, 1, 16, 16), torch.ones(1, 1, 16, 16), norm_patch_size=4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_torch_helpers_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        BCEDiceLoss()(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="shape"):
        dice_per_image(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_assd_is_medpys_mean_of_the_two_directions_not_monais_pooled_mean():
    """A small square beside a long bar: the two surfaces differ in size, so averaging the two directed
    means (medpy) and averaging all distances pooled (MONAI's symmetric ASSD) give different numbers."""
    pred, gt = np.zeros((40, 60), np.uint8), np.zeros((40, 60), np.uint8)
    pred[10:14, 5:9] = 1          # 4x4 square: 12 surface pixels
    gt[20:22, 2:58] = 1           # 2x56 bar: 112 surface pixels
    distances = cdist(reference_surface_points(pred), reference_surface_points(gt))
    pred_to_gt, gt_to_pred = distances.min(axis=1), distances.min(axis=0)
    medpy = (pred_to_gt.mean() + gt_to_pred.mean()) / 2
    monai = np.concatenate([pred_to_gt, gt_to_pred]).mean()
    assert abs(medpy - monai) > 1.0  # the cases are far enough apart to tell which one is computed
    assert segmentation_metrics(pred, gt)["assd"] == pytest.approx(medpy)


def test_deep_supervision_weighs_each_resolution_by_half_the_finer_one():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    logits, coarse, middle, fine = (torch.randn(2, 1, 8, 8) for _ in range(4))
    base, deep = BCEDiceLoss(0.2), DeepSupervisionLoss(BCEDiceLoss(0.2))
    expected = (base(logits, target) + base(fine, target) / 2 + base(middle, target) / 4
                + base(coarse, target) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert torch.allclose(deep(logits, target, aux=[coarse, middle, fine]), expected)
    assert torch.equal(deep(logits, target), base(logits, target))
