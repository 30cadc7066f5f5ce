"""Overlay colours: a prediction laid over its X-ray, green where it hits the truth, red for false
positives, blue for missed tooth pixels. numpy only, so training scripts can draw TensorBoard
overlays without loading matplotlib."""
from __future__ import annotations

import numpy as np

# RGB: correct tooth pixels, false positives, missed tooth pixels.
TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE = (40, 200, 60), (230, 40, 40), (40, 110, 255)


def overlay_mask(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 overlay of a prediction on a grayscale uint8 image. With `gt`, pixels are coloured
    green (hit), red (false positive) and blue (missed); without it, the prediction is green."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    pred = pred > 0
    layers = [(pred, TRUE_POSITIVE)] if gt is None else [
        (pred & (gt > 0), TRUE_POSITIVE), (pred & ~(gt > 0), FALSE_POSITIVE), (~pred & (gt > 0), FALSE_NEGATIVE)]
    for where, colour in layers:
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour, np.float32)
    return rgb.round().astype(np.uint8)
