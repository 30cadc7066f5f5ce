"""Prediction exactly as training validated it: a checkpoint's model at its own input size, precision
and normalisation (in overlapping windows blended into the whole input when it was trained on crops),
probabilities resized back to each image's own size before thresholding, and optionally small connected
components dropped. eval.py scores with it, and the visualizer and notebook show with it, so a Dice shown
anywhere is eval.py's.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import rotate as rotate_tensor

from checkpoints import Checkpoint, open_checkpoint
from data import build_eval_transform, normalize_tensor
from engine import autocast, checkpoint_amp, memory_format
from index import read_mask
from teeth import ARCH_ROWS, class_lookup, mirror_fdi, read_label_map
from utils import ToothSegError


# ----------------------------------------------------------------------------------------------
# Sliding windows: a model trained on crops predicts the whole input from overlapping windows
# ----------------------------------------------------------------------------------------------
def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Offsets of the windows along one side: a step of window * (1 - overlap), the last window flush with
    the far edge (as MONAI's sliding_window_inference). Steps never exceed the window, so every pixel is covered."""
    if window >= length:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    return list(range(0, length - window, step)) + [length - window]


def blend_weights(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(height, width) Gaussian importance of a window's pixels, sigma 1/8 of each side (MONAI's mode="gaussian",
    nnU-Net): a pixel counts most from the window it is central in, where the model sees most context, and
    seams between windows fade instead of stepping. At a corner it is exp(-16) > 0 for any size, so the
    weights never sum to zero."""
    def side(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n / 8)) ** 2)
    return torch.outer(side(height), side(width))


def sliding_window(forward, batch: torch.Tensor, window: tuple[int, int], overlap: float) -> torch.Tensor:
    """`forward` (inputs (n, C, h, w) -> outputs (n, K, h, w), e.g. a model's logits) over overlapping
    `window`-sized tiles of `batch` (N, C, H, W), blended with `blend_weights` into (N, K, H, W) float32
    outputs of the whole input. Tiles go through `forward` in groups holding about as many pixels as
    `batch`, so memory stays near that of one whole-input pass."""
    n, _, height, width = batch.shape
    h, w = min(window[0], height), min(window[1], width)
    corners = [(y, x) for y in window_starts(height, h, overlap) for x in window_starts(width, w, overlap)]
    tiles = [(i, y, x) for i in range(n) for y, x in corners]
    weight = blend_weights(h, w, batch.device)
    total = torch.zeros(height, width, device=batch.device)
    for y, x in corners:
        total[y:y + h, x:x + w] += weight
    out, per_pass = None, max(1, n * height * width // (h * w))
    for first in range(0, len(tiles), per_pass):
        group = tiles[first:first + per_pass]
        pred = forward(torch.stack([batch[i, :, y:y + h, x:x + w] for i, y, x in group])).float()
        if out is None:
            out = pred.new_zeros(n, pred.shape[1], height, width)
        for tile, (i, y, x) in zip(pred, group):
            out[i, :, y:y + h, x:x + w] += tile * weight
    return out / total


def network_logits(model, batch: torch.Tensor, window: tuple[int, int] | None = None,
                   overlap: float = 0.5) -> torch.Tensor:
    """float32 logits of whole network inputs: one forward pass, or, for a model trained on crops (its
    checkpoint's data.window), overlapping windows blended in logit space, as nnU-Net does; training
    validates with the same call, so its val/dice and loss see what eval scores."""
    return model(batch).float() if window is None else sliding_window(model, batch, window, overlap)


def mirror_channels(classes: list[int]) -> list[int]:
    """For a per-tooth model's classes (FDI numbers), the channel of each class's mirror tooth: the prediction
    of a flipped image, flipped back, holds tooth 11 in the channel of 21, so `probs[:, mirror_channels]` reads it
    back in place. The classes are closed under mirroring (finetune_seg.py makes them so)."""
    channel = {number: i for i, number in enumerate(classes)}
    return [channel[mirror_fdi(number)] for number in classes]


def rotate(batch: torch.Tensor, degrees: float, fill: float) -> torch.Tensor:
    """(N, C, H, W) rotated by `degrees` (counter-clockwise) about the centre, bilinear, `fill` outside; in
    float32 even under autocast, where a bf16 sampling grid misplaces pixels (it halved a model's tooth area)."""
    with torch.autocast(device_type=batch.device.type, enabled=False):
        return rotate_tensor(batch.float(), degrees, interpolation=InterpolationMode.BILINEAR, fill=fill)


@torch.inference_mode()
def predict_probabilities(model, batch: torch.Tensor, tta: bool, amp_dtype, device,
                          window: tuple[int, int] | None = None, overlap: float = 0.5,
                          mirror: list[int] | None = None, rotations: tuple[float, ...] = ()) -> torch.Tensor:
    """Probabilities at network size: a binary model's tooth probability (sigmoid), or with `mirror` (a per-tooth
    model's `mirror_channels`) each class's (softmax). Test-time augmentation averages them over views, in
    probability space: with `tta`, the horizontally flipped image (whose teeth are renumbered to their own side
    first); with `rotations` (degrees), the image rotated by each angle (and flipped and rotated with `tta`),
    each prediction rotated back. Where a rotated view did not cover a pixel (the corners), the other views decide."""
    def probabilities(inputs: torch.Tensor) -> torch.Tensor:
        logits = network_logits(model, inputs, window, overlap)
        return torch.sigmoid(logits) if mirror is None else torch.softmax(logits, 1)

    black = float(normalize_tensor(torch.tensor(0.0)))  # what lies outside the X-ray, on the network's scale
    total = weight = 0
    with autocast(device, amp_dtype):
        for degrees in (0.0, *rotations):
            # How much of each pixel a prediction rotated back covers (all of it unrotated): the back-rotation's
            # zero fill has already scaled the prediction by it, so it weighs the view and is not applied again.
            covered = rotate(torch.ones_like(batch[:1, :1]), -degrees, 0.0) if degrees else 1
            for flip in (False, True) if tta else (False,):
                view = batch.flip(-1) if flip else batch
                probs = probabilities(rotate(view, degrees, black) if degrees else view)
                probs = rotate(probs, -degrees, 0.0) if degrees else probs
                if flip:  # a rotated frame is not symmetric left to right: the flipped view covers the mirror image
                    probs = probs.flip(-1) if mirror is None else probs.flip(-1)[:, mirror]
                total, weight = total + probs, weight + (covered.flip(-1) if flip and degrees else covered)
    return total / weight


# ----------------------------------------------------------------------------------------------
# Masks at each image's own size
# ----------------------------------------------------------------------------------------------
def prob_at_size(probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (1, 1, h, w) probability map resized (bilinear) to the image's own (H, W), as float32 numpy."""
    return F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """The boolean mask without its connected components of fewer than `min_pixels` pixels; nothing is added
    and every other pixel stays. 8-connected, so a root thinned to a diagonal line of pixels stays one
    component instead of falling apart into single pixels that would be dropped."""
    mask = np.asarray(mask, bool)
    if min_pixels <= 1:
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    keep = np.bincount(labels.ravel()) >= min_pixels
    keep[0] = False  # background
    return keep[labels]


def clean_mask(mask: np.ndarray, min_component: float) -> np.ndarray:
    """`remove_small_components` with the size given as a share of the mask's area (eval.py --min-component):
    a share means the same at every image resolution, where a pixel count would not."""
    return remove_small_components(mask, math.ceil(min_component * mask.size)) if min_component else mask


def mask_at_size(probs: torch.Tensor, size: tuple[int, int], threshold: float,
                 min_component: float = 0.0) -> np.ndarray:
    """A (1, 1, h, w) probability map resized to the image's own (H, W), thresholded, and cleaned of
    components under `min_component` of its area: masks are scored, saved and shown at the original
    resolution, never at network size."""
    return clean_mask(prob_at_size(probs, size) > threshold, min_component)


def keep_largest_region(label_map: np.ndarray, join_strays: bool = False) -> np.ndarray:
    """Each tooth number kept on its largest 8-connected region only: a tooth is one region, so a second blob
    with its number is a stray (eval.py --one-region-per-tooth). Strays become background, or with `join_strays`
    (eval.py --join-strays) each connected group of strays takes the number of the kept tooth it borders most,
    since a fragment inside or beside a tooth is more often that tooth misnumbered than background; a group
    that touches no kept tooth still becomes background."""
    strays = np.zeros(label_map.shape, bool)
    for number in np.unique(label_map[label_map > 0]):
        parts, areas = region_areas(label_map == number)
        if areas.size > 1:
            strays |= (parts > 0) & (parts != 1 + int(np.argmax(areas)))
    out = label_map.copy()
    out[strays] = 0
    if join_strays:
        groups = region_areas(strays)[0]
        for label, group in enumerate(ndimage.find_objects(groups), start=1):
            # the group's bounding box grown by one pixel holds its 8-connected border; a group is a whole
            # connected component of strays, so its border holds only kept teeth and background, which no
            # other group's joining rewrites
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in group)
            member = groups[box] == label
            border = ndimage.binary_dilation(member, np.ones((3, 3), bool)) & ~member
            numbers = out[box][border]
            numbers = numbers[numbers > 0]
            if numbers.size:
                out[box][member] = np.bincount(numbers).argmax()
    return out


def ordered_assignment(score: np.ndarray) -> list[int]:
    """For an (n, m) score table with n <= m, the strictly increasing columns k_0 < ... < k_(n-1), one per
    row, of the largest total score (a dynamic programme over rows, as in sequence alignment)."""
    rows, columns = score.shape
    best, back = score[0].astype(float), np.zeros((rows, columns), int)
    for i in range(1, rows):
        # prior[k]: the best total of rows < i with row i-1 in a column before k, and which column that was
        prior, where = np.full(columns, -np.inf), np.zeros(columns, int)
        for k in range(1, columns):
            take = best[k - 1] > prior[k - 1]
            prior[k], where[k] = (best[k - 1], k - 1) if take else (prior[k - 1], where[k - 1])
        best, back[i] = score[i] + prior, where
    chosen = [int(np.argmax(best))]
    for i in range(rows - 1, 0, -1):
        chosen.append(int(back[i, chosen[-1]]))
    return chosen[::-1]


def order_along_arch(label_map: np.ndarray, probs: np.ndarray, classes: list[int],
                     join_strays: bool = False) -> np.ndarray:
    """The label map with each jaw's permanent teeth renumbered so that their numbers run in arch order across
    the image (teeth.ARCH_ROWS), by the most probable such numbering. A tooth is a region (8-connected) of one
    number of at least half a typical tooth (the median of the numbers' largest regions). A jaw's teeth are
    taken by the x of their centres, and each gets a distinct number of its jaw, in order, maximising the sum
    over teeth of area x log(mean probability of the number over the tooth). So neighbours numbered in the
    wrong order, or two teeth given one number, are renumbered where the probabilities allow; a jaw whose teeth
    are all shifted by one position stays shifted. Smaller regions keep their numbers and do not constrain the
    order (a stray weighs nothing against a tooth). Then each number keeps its largest region only
    (keep_largest_region, with `join_strays` as there). Primary teeth keep their numbers: in a mixed dentition
    they sit above or below permanent teeth, not beside them. `probs` is (C, H, W) at the map's size."""
    channel = {number: i for i, number in enumerate(classes)}
    out = label_map.copy()
    # Per permanent number: its regions' map and their areas (region k has area areas[k - 1]).
    regions = {n: region_areas(label_map == n) for row in ARCH_ROWS for n in row if n in channel}
    largest = [areas.max() for _, areas in regions.values() if areas.size]
    typical = float(np.median(largest)) if largest else 0.0
    for row in ARCH_ROWS:
        numbers = [n for n in row if n in channel]  # the numbers of this jaw the model can give
        teeth = []
        for number in numbers:
            parts, areas = regions[number]
            teeth += [parts == k + 1 for k in np.flatnonzero(areas >= typical / 2)]
        teeth = sorted(teeth, key=np.sum, reverse=True)[:len(numbers)]  # more teeth than numbers: the largest
        if not teeth:
            continue
        teeth.sort(key=lambda mask: np.nonzero(mask)[1].mean())
        columns = [channel[n] for n in numbers]
        score = np.stack([mask.sum() * np.log(np.maximum(probs[:, mask][columns].mean(1), 1e-6)) for mask in teeth])
        for mask, k in zip(teeth, ordered_assignment(score)):
            out[mask] = numbers[k]
    return keep_largest_region(out, join_strays)


def region_areas(where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8-connected regions of a boolean map: the map of their labels (1..K, 0 outside) and their K areas."""
    parts, count = ndimage.label(where, structure=np.ones((3, 3), bool))
    return parts, np.bincount(parts.ravel(), minlength=count + 1)[1:]


def teeth_at_size(probs: torch.Tensor, size: tuple[int, int], classes: list[int],
                  one_region: bool = False, arch_order: bool = False, join_strays: bool = False,
                  union: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A per-tooth model's (1, C, h, w) class probabilities resized (bilinear) to the image's own (H, W), then
    (FDI label map, uint8; each pixel's probability of its label, float32): each pixel takes its most
    probable class, or with `union` (a boolean HxW mask of the teeth, e.g. a binary model's) each pixel of the
    union its most probable tooth and every other pixel background; with `one_region` each tooth keeps only
    its largest region, and with `arch_order` the teeth are also renumbered to run in order along each jaw
    (order_along_arch); `join_strays` as in keep_largest_region."""
    resized = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)[0]
    if union is None:
        chosen = resized.argmax(0)
    else:  # class 0 is the background (mirror_closed numbers follow it)
        chosen = torch.where(torch.from_numpy(union).to(resized.device), resized[1:].argmax(0) + 1, 0)
    label_map = np.asarray(classes, np.uint8)[chosen.cpu().numpy()]
    if arch_order:
        label_map = order_along_arch(label_map, resized.cpu().numpy(), classes, join_strays)
    elif one_region:
        label_map = keep_largest_region(label_map, join_strays)
    labels = torch.from_numpy(class_lookup(classes, 0)[label_map]).to(resized.device)  # every label is a class
    return label_map, resized.gather(0, labels[None])[0].cpu().numpy()


def tooth_chart(label_map: np.ndarray, confidence: np.ndarray) -> list[dict]:
    """The teeth of an FDI label map, in FDI order: number, area in pixels, bounding box [x0, y0, x1, y1]
    (inclusive, pixels of the image's own size) and the mean probability the model gave it over its pixels."""
    chart = []
    for number in np.unique(label_map[label_map > 0]):
        where = label_map == number
        ys, xs = np.nonzero(where)
        chart.append({"fdi": int(number), "area_px": int(where.sum()),
                      "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                      "mean_probability": round(float(confidence[where].mean()), 4)})
    return chart


@dataclass
class Predictor:
    """A fine-tuned segmentation model with the preprocessing and data it was trained with."""
    model: torch.nn.Module  # in eval mode, on `device`
    checkpoint: Checkpoint
    device: torch.device
    _mask_paths: dict[Path, Path] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.amp_dtype = checkpoint_amp(self.checkpoint, self.device)  # the precision it was validated in
        self.classes = self.checkpoint.tooth_classes  # None for a binary model
        self.mirror = mirror_channels(self.classes) if self.classes else None

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def transform(self):
        """The eval transform at the checkpoint's input size (standardise intensities if it trained so, resize as
        it trained, normalise, to tensor)."""
        data = self.checkpoint.data
        return build_eval_transform(*data.input_size, landmarks=data.intensity_landmarks,
                                    image_resize=data.image_resize)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """(1, 1, h, w) normalised tensor at network size, via the eval transform."""
        return self.transform()(image=image)["image"][None]

    def probabilities(self, batch: torch.Tensor, tta: bool = False, rotations: tuple[float, ...] = ()) -> torch.Tensor:
        """(N, 1, h, w) tooth probabilities of a batch of network inputs (in the checkpoint's windows, if any);
        (N, C, h, w) class probabilities for a per-tooth model."""
        batch = batch.to(self.device, memory_format=memory_format(self.device))
        data = self.checkpoint.data
        return predict_probabilities(self.model, batch, tta, self.amp_dtype, self.device, data.window,
                                     data.window_overlap, self.mirror, rotations)

    def predict(self, image: np.ndarray, threshold: float = 0.5, tta: bool = False,
                min_component: float = 0.0, one_region: bool = False, rotations: tuple[float, ...] = (),
                arch_order: bool = False, join_strays: bool = False) -> np.ndarray:
        """At the image's own size, as eval.py predicts: a boolean HxW mask (resize, threshold, --min-component),
        or for a per-tooth model an FDI label map (resize, most probable class, --one-region-per-tooth,
        --arch-order, --join-strays)."""
        if not self.classes:
            return ensemble_mask([self], image, threshold, tta, min_component, rotations)
        probs = self.probabilities(self.network_input(image), tta, rotations)
        return teeth_at_size(probs, image.shape[:2], self.classes, one_region, arch_order, join_strays)[0]

    def chart(self, image: np.ndarray, tta: bool = False, one_region: bool = False,
              rotations: tuple[float, ...] = (), arch_order: bool = False,
              join_strays: bool = False) -> tuple[np.ndarray, list[dict]]:
        """A per-tooth model's FDI label map of an image at its own size and its tooth chart (`tooth_chart`)."""
        return ensemble_chart([self], image, tta, one_region, rotations, arch_order, join_strays)

    def saliency(self, image: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """`get_saliency_map` for an original-size uint8 image, resized back to its size. `region`
        (optional boolean mask at the image's size) picks the logits whose sum is explained."""
        batch = self.network_input(image)
        if region is not None:
            region = cv2.resize(np.asarray(region, np.uint8), batch.shape[:-3:-1], interpolation=cv2.INTER_NEAREST) > 0
        saliency = get_saliency_map(self.model, batch, region)
        return np.clip(cv2.resize(saliency, image.shape[1::-1], interpolation=cv2.INTER_LINEAR), 0, 1)

    def ground_truth(self, image_path: str | os.PathLike) -> np.ndarray:
        """The mask (uint8 0/1) of one of the labelled images this model was trained and tested with, paired as
        eval.py pairs them (the index, or file names in the masks folder); its FDI label map for a per-tooth model."""
        if self._mask_paths is None:
            splits = self.checkpoint.data.labelled_splits()
            self._mask_paths = {s.image.resolve(): s.teeth if self.classes else s.mask
                                for part in splits.values() for s in part}
        mask_path = self._mask_paths.get(Path(image_path).resolve())
        if mask_path is None:
            raise ToothSegError(f"{image_path}: not one of the {'per-tooth ' if self.classes else ''}labelled images "
                                f"of {self.path}; pass its {'label map' if self.classes else 'mask'} explicitly")
        return read_label_map(mask_path) if self.classes else read_mask(mask_path)


def mean_probabilities(predictors: list[Predictor], batch: torch.Tensor, tta: bool = False,
                       rotations: tuple[float, ...] = ()) -> torch.Tensor:
    """An ensemble's probabilities of a batch of network inputs: the checkpoints share an input size and
    intensity standardisation (eval.load_ensemble checks), and their probabilities are averaged at network size."""
    return sum(p.probabilities(batch, tta, rotations) for p in predictors) / len(predictors)


def ensemble_mask(predictors: list[Predictor], image: np.ndarray, threshold: float = 0.5, tta: bool = False,
                  min_component: float = 0.0, rotations: tuple[float, ...] = ()) -> np.ndarray:
    """What eval.py predicts for one image with binary checkpoints (averaged): the mask at the image's own size."""
    if predictors[0].classes:  # channel 0 of a per-tooth model is its background
        raise ToothSegError(f"{predictors[0].path}: is a per-tooth model; its mask is the union of its teeth "
                            f"(ensemble_chart's label map > 0)")
    probs = mean_probabilities(predictors, predictors[0].network_input(image), tta, rotations)
    return mask_at_size(probs, image.shape[:2], threshold, min_component)


def ensemble_chart(predictors: list[Predictor], image: np.ndarray, tta: bool = False, one_region: bool = False,
                   rotations: tuple[float, ...] = (), arch_order: bool = False, join_strays: bool = False,
                   union_from: list[Predictor] = (), threshold: float = 0.5) -> tuple[np.ndarray, list[dict]]:
    """What eval.py predicts for one image with per-tooth checkpoints (their probabilities averaged at network
    size) and --union-from binary ones (averaged, at `threshold`): the FDI label map at the image's own size and
    its tooth chart."""
    if not predictors[0].classes:
        raise ToothSegError(f"{predictors[0].path}: is a binary model; tooth charts need a per-tooth model "
                            f"(finetune_seg.py --task teeth)")
    union = ensemble_mask(union_from, image, threshold, tta, rotations=rotations) if union_from else None
    probs = mean_probabilities(predictors, predictors[0].network_input(image), tta, rotations)
    labels, confidence = teeth_at_size(probs, image.shape[:2], predictors[0].classes, one_region, arch_order,
                                       join_strays, union)
    return labels, tooth_chart(labels, confidence)


def load_predictor(source: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """A Predictor from a segmentation checkpoint, or a run folder (its best.pth)."""
    record = open_checkpoint(source, ("segmentation",), "a prediction")
    device = torch.device(device)
    model = record.build_model().to(device, memory_format=memory_format(device)).eval()
    return Predictor(model, record, device)


def get_saliency_map(model, image, region: np.ndarray | None = None) -> np.ndarray:
    """Gradient saliency of a segmentation model: |d objective / d input|, max over channels,
    scaled to [0, 1] (all zeros when the gradient vanishes). The objective is the mean logit over
    the predicted foreground (logit > 0; every pixel when nothing is predicted), or, with `region`
    (boolean HxW at the input's size), the sum of the logits inside it. `image` is a normalised
    (C, H, W) or (1, C, H, W) tensor; returns an HxW float32 array. Runs in eval mode on the model's
    device and leaves the model's parameters' gradients and its train/eval mode untouched."""
    device = next(model.parameters()).device
    x = torch.as_tensor(image).detach().clone().float()
    x = (x[None] if x.ndim == 3 else x).to(device).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)[0, 0]
            if region is not None:
                where = torch.as_tensor(np.asarray(region, bool), device=device)
                if where.shape != logits.shape:
                    raise ToothSegError(f"saliency region has shape {tuple(where.shape)}, the input {tuple(logits.shape)}; "
                                        f"give a mask of the input's size")
                objective = logits[where].sum()
            else:
                foreground = logits > 0
                objective = logits[foreground].mean() if foreground.any() else logits.mean()
            (grad,) = torch.autograd.grad(objective, x)
    finally:
        model.train(was_training)
    saliency = grad[0].abs().amax(dim=0)
    peak = saliency.max()
    return (saliency / peak if peak > 0 else saliency).cpu().numpy().astype(np.float32)
