"""Overlay colours: a prediction laid over its X-ray, green where it hits the truth, red for false
positives, blue for missed tooth pixels; or each tooth of a per-tooth label map in its own colour with
its FDI number printed on it. numpy and cv2 only, so training scripts can draw TensorBoard overlays
without loading matplotlib."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

from teeth import FDI_NUMBERS

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


def _tooth_colours() -> np.ndarray:
    """(256, 3) RGB per label value: neighbouring teeth get distant hues (the position from the midline steps
    the hue by 3/8 of the circle), quadrants differ in brightness, primary teeth are paler; 0 is unused."""
    colours = np.zeros((256, 3), np.uint8)
    for number in FDI_NUMBERS:
        quadrant, position = divmod(number, 10)
        hue = (position * 3 / 8 + quadrant * 0.11) % 1.0
        saturation, value = (0.55, 1.0) if quadrant > 4 else (0.9, 0.75 + 0.25 * (quadrant % 2))
        colours[number] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colours


TOOTH_COLOURS = _tooth_colours()


def overlay_teeth(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.45, numbers: bool = True) -> np.ndarray:
    """An RGB uint8 overlay of an FDI label map on a grayscale uint8 image: each tooth in its colour, and with
    `numbers` its FDI number printed at the centre of its largest part."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    teeth = label_map > 0
    rgb[teeth] = (1 - alpha) * rgb[teeth] + alpha * TOOTH_COLOURS[label_map[teeth]].astype(np.float32)
    rgb = rgb.round().astype(np.uint8)
    if numbers:
        scale = max(0.3, min(image.shape) / 900)
        thickness = max(1, round(scale * 2))
        for number in np.unique(label_map[teeth]):
            _, parts, stats, centres = cv2.connectedComponentsWithStats((label_map == number).astype(np.uint8))
            x, y = centres[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
            text = str(int(number))
            (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
            origin = (int(x - w / 2), int(y + h / 2))
            cv2.putText(rgb, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
            cv2.putText(rgb, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return rgb
