"""Segmentation metrics (numpy, per image) and training losses (torch).

Evaluation metrics -- `segmentation_metrics(pred, gt)` on one binary HxW mask pair, at the image's
own resolution; `summarize(rows)` then averages over images. Conventions:

* Masks are binarised with `> 0`, so bool, 0/1 and 0/255 masks all work.
* Dice, IoU, precision, recall come from pixel counts (TP, FP, FN).
* Surface distances are Euclidean, in pixels. A mask's surface is the mask minus its erosion by a
  3x3 cross (4-connected structuring element; pixels outside the image count as background, so a
  mask touching the image edge has a surface there). This is medpy's default.
* HD95 = max(P95(d_pg), P95(d_gp)), where d_pg holds, for every pred surface pixel, the distance to
  the nearest gt surface pixel (and d_gp the reverse); P95 is `np.percentile` with linear
  interpolation. This is MONAI's `compute_hausdorff_distance(percentile=95)`. medpy's `hd95` differs:
  one percentile of d_pg and d_gp pooled, at most ours and lower where the two directions differ.
* ASSD = (mean(d_pg) + mean(d_gp)) / 2, as medpy's `assd`: each surface weighs equally, however
  many pixels it has. This is not MONAI's symmetric average surface distance, which pools d_pg and
  d_gp into one mean (mean(d_pg ∪ d_gp)) and so weighs the larger surface more: on 101 real tooth
  predictions the two differed by up to 0.94 px per image. Dice and HD95 match MONAI exactly.
* Empty masks:
    - both empty: dice = iou = precision = recall = 1, hd95 = assd = 0 (a perfect "no tooth");
    - pred empty, gt not: dice = iou = recall = 0, and precision (0/0) is defined as 0;
    - gt empty, pred not: dice = iou = precision = 0, and recall (0/0) is defined as 0;
    - exactly one empty: hd95 = assd = the image diagonal sqrt(H^2 + W^2), the largest distance
      two pixels of the image can have (`empty_distance_penalty`). It is finite, so the mean over
      images stays defined, and it depends on the image size, so compare HD across data sets with
      the same image size only.
  No metric is ever NaN; `summarize` refuses NaN rather than dropping it.

Training losses take logits and targets of shape (B, 1, H, W), targets in {0, 1}, and compute in
fp32 even under autocast (bf16 sums over 200k pixels lose digits).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from utils import ToothSegError

METRIC_NAMES = ("dice", "iou", "precision", "recall", "hd95", "assd")
ASSD_DEFINITION = ("medpy assd: (mean pred->gt + mean gt->pred surface distance) / 2, in pixels; "
                   "not MONAI's pooled symmetric mean")

# 4-connected cross: the erosion removes pixels with a background pixel above, below, left or right.
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(2, 1)


# ----------------------------------------------------------------------------------------------
# Evaluation metrics (numpy)
# ----------------------------------------------------------------------------------------------
def empty_distance_penalty(shape: Sequence[int]) -> float:
    """HD95/ASSD when exactly one mask is empty: the image diagonal, in pixels."""
    height, width = shape
    return math.hypot(height, width)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask: the mask minus its 4-connected erosion."""
    return mask & ~ndimage.binary_erosion(mask, structure=_SURFACE_STRUCTURE, border_value=0)


def _surface_distances(pred_surface: np.ndarray, gt_surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances pred->gt and gt->pred, one per surface pixel."""
    # Nearest surface pixels of both masks lie inside the bounding box of both surfaces, so the
    # distance transforms can run on that crop only (exact, and much cheaper for small objects).
    rows, cols = np.nonzero(pred_surface | gt_surface)
    crop = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    pred_surface, gt_surface = pred_surface[crop], gt_surface[crop]
    distance_to_gt = ndimage.distance_transform_edt(~gt_surface)
    distance_to_pred = ndimage.distance_transform_edt(~pred_surface)
    return distance_to_gt[pred_surface], distance_to_pred[gt_surface]


def overlap_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of one mask pair, from pixel counts alone (cheap enough to score
    many candidate masks, e.g. eval.py --min-component auto); see module doc."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    pred_area, gt_area = int(pred.sum()), int(gt.sum())
    if pred_area == 0 and gt_area == 0:
        return dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0)
    true_pos = int(np.count_nonzero(pred & gt))
    return dict(
        dice=2 * true_pos / (pred_area + gt_area),
        iou=true_pos / (pred_area + gt_area - true_pos),
        precision=true_pos / pred_area if pred_area else 0.0,
        recall=true_pos / gt_area if gt_area else 0.0,
    )


def segmentation_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall, HD95 and ASSD (pixels) of one HxW mask pair; see module doc."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ToothSegError(
            f"prediction shape {pred.shape} and ground-truth shape {gt.shape} differ or are not HxW; "
            "resize the prediction to the mask's own resolution before scoring"
        )
    pred, gt = pred > 0, gt > 0
    scores = overlap_metrics(pred, gt)
    pred_area, gt_area = int(pred.sum()), int(gt.sum())
    if pred_area == 0 and gt_area == 0:
        return scores | dict(hd95=0.0, assd=0.0)
    if pred_area == 0 or gt_area == 0:
        penalty = empty_distance_penalty(pred.shape)
        return scores | dict(hd95=penalty, assd=penalty)

    pred_to_gt, gt_to_pred = _surface_distances(surface(pred), surface(gt))
    hd95 = max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95))
    assd = (pred_to_gt.mean() + gt_to_pred.mean()) / 2
    return scores | dict(hd95=float(hd95), assd=float(assd))


def summarize(per_image: Sequence[dict], keys: Sequence[str] = METRIC_NAMES) -> dict[str, dict[str, float]]:
    """Mean, std, median and n of each metric over images: {"dice": {"mean": ..., ...}, ...}.

    std is the population standard deviation (ddof=0), defined for a single image too. Rows may hold
    other fields (a "stem" names the image in errors). A NaN or infinite value raises ValueError:
    it means a bug upstream, and dropping it would bias the mean.
    """
    if not per_image:
        raise ToothSegError("no images were scored, so there is nothing to summarize; check the split and folders")
    summary = {}
    for key in keys:
        values = np.array([float(row[key]) for row in per_image], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            row = per_image[bad[0]]
            name = row.get("stem", f"row {bad[0]}")
            raise ValueError(f"metric {key!r} is {row[key]} for {name} ({bad.size} non-finite values in all)")
        summary[key] = dict(
            mean=float(values.mean()), std=float(values.std()), median=float(np.median(values)), n=len(values)
        )
    return summary


# ----------------------------------------------------------------------------------------------
# Training losses and on-device validation Dice (torch)
# ----------------------------------------------------------------------------------------------
def _check_same_shape(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != targets shape {tuple(targets.shape)}")


@torch.no_grad()
def overlap_per_image(logits: torch.Tensor, targets: torch.Tensor,
                      threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """2|P∩G| and |P|+|G| per sample (shapes [B], fp32) of `sigmoid(logits) > threshold` against `targets > 0.5`:
    Dice's numerator and denominator, which a validation set can also pool (nnU-Net's pseudo-Dice)."""
    _check_same_shape(logits, targets)
    pred = torch.sigmoid(logits.float()) > threshold
    gt = targets > 0.5
    dims = tuple(range(1, logits.ndim))
    return 2 * (pred & gt).sum(dims).float(), pred.sum(dims).float() + gt.sum(dims).float()


@torch.no_grad()
def dice_per_image(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard Dice per sample (shape [B], fp32) of `sigmoid(logits) > threshold` against `targets > 0.5`.

    Both empty gives 1, matching `segmentation_metrics`. No host sync and no NaN, so a DDP caller can
    sum the result and all-reduce it.
    """
    return dice_from_overlap(*overlap_per_image(logits, targets, threshold))


def dice_from_overlap(overlap: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Dice per sample from `overlap_per_image`'s two counts; both masks empty gives 1."""
    return torch.where(total > 0, overlap / total.clamp_min(1), torch.ones_like(total))


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0, per_sample: bool = False) -> torch.Tensor:
    """1 - (2*sum(p*t) + eps) / (sum(p) + sum(t) + eps) per sample, averaged over the batch (fp32).
    Targets may be soft (probabilities): the same formula is then the soft Dice of two maps."""
    _check_same_shape(logits, targets)
    probs, targets = torch.sigmoid(logits.float()), targets.float()
    dims = tuple(range(1, logits.ndim))
    overlap = (probs * targets).sum(dims)
    total = probs.sum(dims) + targets.sum(dims)
    losses = 1 - (2 * overlap + eps) / (total + eps)
    return losses if per_sample else losses.mean()


class BCEDiceLoss(nn.Module):
    """BCE-with-logits (mean over pixels) + lambda_dice * soft Dice loss, always in fp32. Targets in
    [0, 1] may be soft (pseudo-labels: BCE against a probability is the cross-entropy to it). With
    `weights` (one per sample), the batch mean weighs each sample's loss."""

    def __init__(self, lambda_dice: float = 0.2):
        super().__init__()
        self.lambda_dice = lambda_dice

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        _check_same_shape(logits, targets)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, targets = logits.float(), targets.float()
            if weights is None:
                bce = F.binary_cross_entropy_with_logits(logits, targets)
                return bce + self.lambda_dice * soft_dice_loss(logits, targets)
            dims = tuple(range(1, logits.ndim))
            bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dims)
            per_sample = bce + self.lambda_dice * soft_dice_loss(logits, targets, per_sample=True)
            return (weights.float() * per_sample).mean()

    def extra_repr(self) -> str:
        return f"lambda_dice={self.lambda_dice}"


class DeepSupervisionLoss(nn.Module):
    """nnU-Net's deep supervision around a segmentation loss: with auxiliary logits (a deeply supervised
    model's coarser decoder stages, coarse to fine, at the target's size), the loss at each resolution
    weighted 1, 1/2, 1/4, ... from the finest, normalised to sum to 1; without them, the loss alone."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                aux: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        finest_first = [logits, *reversed(aux)]
        scales = [0.5 ** i for i in range(len(finest_first))]
        return sum(scale * self.loss(x, targets, weights) for scale, x in zip(scales, finest_first)) / sum(scales)


def normalize_patches(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Normalise each non-overlapping patch_size x patch_size patch to zero mean, unit std.

    (x - patch mean) / sqrt(patch variance + eps), with the population variance. Patches at the
    right/bottom edge may be smaller when H or W is not a multiple of patch_size; their statistics
    use their own pixels only. This is the "norm_pix_loss" target of MAE/SimMIM (which use the
    unbiased variance, a factor sqrt(n/(n-1)) of 1.002 for 16x16 patches).
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    height, width = images.shape[-2:]

    def patch_mean(x: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(x, patch_size, patch_size, ceil_mode=True, count_include_pad=False)
        return means.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)[..., :height, :width]

    centred = images - patch_mean(images)
    return centred / torch.sqrt(patch_mean(centred.square()) + eps)


def masked_l1_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_patch_size: int | None = None
) -> torch.Tensor:
    """Mean L1 over masked pixels (mask == 1: hidden from the model, to be reconstructed), in fp32.

    With `norm_patch_size=p` the target is first normalised per p x p patch (`normalize_patches`),
    so the model learns to predict normalised patches, not raw intensities; undo that before
    showing a reconstruction. An all-zero mask falls back to the L1 over the whole image, as the
    seed does; the mask generators never produce one, so this only guards against a 0/0.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        if norm_patch_size is not None:
            target = normalize_patches(target, norm_patch_size)
        l1 = (pred - target).abs()
        mask = mask.float().expand_as(l1)
        masked_count = mask.sum()
        masked_mean = (l1 * mask).sum() / masked_count.clamp_min(1)
        # torch.where instead of `if masked_count.item()`: no host-device sync per step.
        return torch.where(masked_count > 0, masked_mean, l1.mean())


# ----------------------------------------------------------------------------------------------
# Per-tooth metrics (numpy, on FDI label maps at the image's own size)
# ----------------------------------------------------------------------------------------------
# A label map holds each pixel's FDI number (0 = background); each number present is one tooth.
#
# * Tooth Dice: for every true tooth, the Dice of the predicted pixels with its number against its pixels
#   (a tooth predicted under another number, or not at all, scores 0). The dataset's mean per-tooth Dice
#   averages over all true teeth of all images, each tooth counting once; an image's mean over its own.
# * Detection: a predicted tooth matches a true one when their regions overlap at IoU >= 0.5, whatever
#   their numbers (greedy by IoU; above 0.5 a match is unique anyway, since teeth do not overlap).
#   Unmatched predictions are false positives, unmatched true teeth misses. Precision, recall and F1 over
#   a dataset pool the counts of all images (micro average).
# * Numbering accuracy: the share of matched teeth whose predicted number is the true one; with no tooth
#   matched it is 0 (nothing was numbered right), unless there were no teeth and none were predicted (1).
DETECTION_IOU = 0.5
TOOTH_SUMMARY_NAMES = ("tooth_dice", "detection_precision", "detection_recall", "detection_f1", "numbering_accuracy")


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


def tooth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Per-tooth scores of one pair of FDI label maps; see the section comment. Returns the counts an
    image contributes to the dataset figures ("true_teeth", "pred_teeth", "matched", "numbered_right"),
    its own precision/recall/F1 and mean tooth Dice, and "dice_by_fdi" ({FDI number: Dice} of its true teeth)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ToothSegError(f"prediction shape {pred.shape} and ground-truth shape {gt.shape} differ or are not HxW; "
                            "resize the prediction to the label map's own resolution before scoring")
    # joint[g, p]: pixels labelled g in the truth and p in the prediction.
    joint = np.bincount(gt.astype(np.int64).ravel() * 256 + pred.astype(np.int64).ravel(),
                        minlength=256 * 256).reshape(256, 256)
    gt_area, pred_area = joint.sum(1), joint.sum(0)
    true_teeth, pred_teeth = np.flatnonzero(gt_area[1:]) + 1, np.flatnonzero(pred_area[1:]) + 1
    dice = {int(n): float(2 * joint[n, n] / (gt_area[n] + pred_area[n])) for n in true_teeth}
    pairs = []
    for g in true_teeth:
        for p in pred_teeth:
            if joint[g, p]:
                iou = joint[g, p] / (gt_area[g] + pred_area[p] - joint[g, p])
                if iou >= DETECTION_IOU:
                    pairs.append((iou, int(g), int(p)))
    matched_true, matched_pred, numbered_right = set(), set(), 0
    for _, g, p in sorted(pairs, reverse=True):
        if g not in matched_true and p not in matched_pred:
            matched_true.add(g)
            matched_pred.add(p)
            numbered_right += g == p
    matched, n_true, n_pred = len(matched_true), len(true_teeth), len(pred_teeth)
    precision = _ratio(matched, n_pred, 1.0 if not n_true else 0.0)
    recall = _ratio(matched, n_true, 1.0 if not n_pred else 0.0)
    return {"true_teeth": n_true, "pred_teeth": n_pred, "matched": matched, "numbered_right": numbered_right,
            "tooth_dice": float(np.mean(list(dice.values()))) if dice else float(not n_pred),
            "detection_precision": precision, "detection_recall": recall,
            "detection_f1": _ratio(2 * precision * recall, precision + recall, 0.0),
            "numbering_accuracy": _ratio(numbered_right, matched, float(not n_true and not n_pred)),
            "dice_by_fdi": dice}


def summarize_teeth(per_image: Sequence[dict]) -> dict:
    """Dataset figures from `tooth_metrics` rows: mean per-tooth Dice over all true teeth, pooled
    detection precision/recall/F1 and numbering accuracy, and per FDI number its mean Dice and count."""
    if not per_image:
        raise ToothSegError("no images were scored, so there is nothing to summarize; check the split and folders")
    counts = {k: sum(r[k] for r in per_image) for k in ("true_teeth", "pred_teeth", "matched", "numbered_right")}
    by_fdi: dict[int, list[float]] = {}
    for row in per_image:
        for number, value in row["dice_by_fdi"].items():
            by_fdi.setdefault(int(number), []).append(value)
    all_dice = [v for values in by_fdi.values() for v in values]
    # As each image scores them: no tooth predicted where there are some is precision 0, not a vacuous 1.
    precision = _ratio(counts["matched"], counts["pred_teeth"], 1.0 if not counts["true_teeth"] else 0.0)
    recall = _ratio(counts["matched"], counts["true_teeth"], 1.0 if not counts["pred_teeth"] else 0.0)
    return {"tooth_dice": float(np.mean(all_dice)) if all_dice else float(not counts["pred_teeth"]),  # as each image
            "detection_precision": precision, "detection_recall": recall,
            "detection_f1": _ratio(2 * precision * recall, precision + recall, 0.0),
            "numbering_accuracy": _ratio(counts["numbered_right"], counts["matched"],
                                         float(not counts["true_teeth"] and not counts["pred_teeth"])),
            **counts, "n_images": len(per_image),
            "by_fdi": {n: {"dice": float(np.mean(v)), "teeth": len(v)} for n, v in sorted(by_fdi.items())}}


# ----------------------------------------------------------------------------------------------
# Per-tooth training loss and validation score (torch). Targets are class indices (B, H, W), int64,
# with IGNORE_INDEX on pixels whose tooth number the model has no class for.
# ----------------------------------------------------------------------------------------------
IGNORE_INDEX = -100


class CEDiceLoss(nn.Module):
    """Cross-entropy + lambda_dice * soft Dice over the tooth classes (background left out, batch Dice as
    nnU-Net's), in fp32. With `weights` (one per sample), the batch mean weighs each sample's cross-entropy."""

    def __init__(self, lambda_dice: float = 1.0, eps: float = 1.0):
        super().__init__()
        self.lambda_dice, self.eps = lambda_dice, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if logits.ndim != 4 or targets.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"logits {tuple(logits.shape)} need class-index targets (B, H, W), got {tuple(targets.shape)}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none").mean((1, 2))
            ce = (weights.float() * ce).mean() if weights is not None else ce.mean()
            # Per class: overlap = the probability mass on its true pixels, by index_add rather than a one-hot
            # (B, C, H, W) target, which costs more than the network's last layers at 33+ classes.
            valid = targets != IGNORE_INDEX
            truth = targets[valid]
            probs = torch.softmax(logits, 1)
            on_truth = probs.gather(1, targets.clamp_min(0).unsqueeze(1))[:, 0][valid]
            classes = logits.shape[1]
            overlap = torch.zeros(classes, device=logits.device).index_add_(0, truth, on_truth)
            total = (probs * valid.unsqueeze(1)).sum((0, 2, 3)) + torch.bincount(truth, minlength=classes)
            overlap, total = overlap[1:], total[1:]
            dice = (2 * overlap + self.eps) / (total + self.eps)
            return ce + self.lambda_dice * (1 - dice.mean())

    def extra_repr(self) -> str:
        return f"lambda_dice={self.lambda_dice}"


@torch.no_grad()
def tooth_dice_per_image(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample (shape [B], fp32), the mean over its true teeth of the Dice of argmax(logits) against the
    targets, class by class (as `tooth_metrics`' per-tooth Dice, at network size); an image without teeth
    scores 1 when nothing is predicted, else 0. Ignored pixels count for neither side."""
    batch, classes = logits.shape[:2]
    valid = targets != IGNORE_INDEX
    pred, gt = logits.argmax(1), targets.clamp_min(0)
    # Per sample and class, the pixel counts of truth, prediction and both, from one bincount over (sample, class).
    sample = torch.arange(batch, device=logits.device).view(-1, 1, 1).expand_as(pred)

    def counts(where: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keys = (sample * classes + labels)[where]
        return torch.bincount(keys, minlength=batch * classes).view(batch, classes)[:, 1:].float()

    overlap, pred_area, gt_area = counts(valid & (pred == gt), gt), counts(valid, pred), counts(valid, gt)
    present = gt_area > 0
    dice = torch.where(present, 2 * overlap / (pred_area + gt_area).clamp_min(1), torch.zeros_like(overlap))
    n_teeth = present.sum(1)
    empty_score = (pred_area.sum(1) == 0).float()
    return torch.where(n_teeth > 0, dice.sum(1) / n_teeth.clamp_min(1), empty_score)
