"""Per-tooth labels in FDI notation, without torch: the numbers, their left/right mirror, label maps,
and the labelme polygons they are read from.

A per-tooth label map is an 8-bit image whose pixels hold the FDI number of their tooth (11..48 for
permanent teeth, 51..85 for primary teeth) and 0 for background. The first digit is the quadrant
(1 upper right, 2 upper left, 3 lower left, 4 lower right, in the patient's frame; 5..8 the same for
primary teeth), the second the position from the midline. On a panoramic image the patient's right
is on the viewer's left: quadrants 1 and 4 (5 and 8) lie in the left half of the image.

labelme 5.x files (`rasterise_labelme`) hold one polygon per tooth, read by these rules:
- A label is an FDI number first ("14 - 1st Premolar", "14"), or a bare Universal letter A..T for a
  primary tooth (UNIVERSAL_PRIMARY: A-E = 55..51, F-J = 61..65, K-O = 75..71, P-T = 81..85). Anything
  else is an error naming the label and the file.
- Only polygons are read: another shape (rectangle, circle, line, point) is an error, since a box
  or a point does not outline a tooth. Two polygons with one number in a file are an error too
  (the Tufts files have none): merge them into one polygon in labelme.
- imageHeight/imageWidth must equal the image's size. A polygon partly outside the image is clipped
  to it (counted); one wholly outside is an error.
- Overlaps: a pixel inside two polygons goes to the smaller one (the polygons are drawn from the
  largest to the smallest), so a small tooth, such as a bud under a primary tooth, is never
  swallowed by a large neighbour. The pixels claimed twice are counted.
- Each polygon is filled by cv2.fillPoly with its boundary; where a polygon crosses itself the
  even-odd rule leaves the enclosed loop unfilled (in the Tufts files about 0.2 % of tooth pixels).
- A file without polygons has no tooth labelled: it gives no label map (LabelmeTeeth.polygons == 0).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils import ToothSegError, cannot_read, read_image

PERMANENT = tuple(10 * q + i for q in (1, 2, 3, 4) for i in range(1, 9))
PRIMARY = tuple(10 * q + i for q in (5, 6, 7, 8) for i in range(1, 6))
FDI_NUMBERS = PERMANENT + PRIMARY
# A horizontal flip of a panoramic image mirrors the patient: right quadrants become left ones.
MIRROR_QUADRANT = {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7}
# The Universal letters of the primary teeth run from the patient's upper right second molar (A) along the
# upper arch to the upper left one (J), then from the lower left second molar (K) back to the lower right one (T).
UNIVERSAL_PRIMARY = dict(zip("ABCDEFGHIJKLMNOPQRST", (55, 54, 53, 52, 51, 61, 62, 63, 64, 65,
                                                      75, 74, 73, 72, 71, 81, 82, 83, 84, 85)))
# Each jaw's permanent teeth in the order a panoramic image shows them, from its left edge to its right
# (the patient's right first): along the arch a tooth's neighbours are fixed, so numbers must run in this order.
ARCH_ROWS = (tuple(range(18, 10, -1)) + tuple(range(21, 29)), tuple(range(48, 40, -1)) + tuple(range(31, 39)))
LABEL_NUMBER = re.compile(r"(\d+)(?:\s|-|$)")  # the number that starts "14 - 1st Premolar"
MAX_COORDINATE = 1e7  # far beyond any image, yet safe for the int32 points cv2.fillPoly takes


class LabelFileError(ToothSegError):
    """A per-tooth label file that cannot be used, with the file's name and the reason apart, so that
    prepare_sts2d.py can list it among the bad files (--skip-bad)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def mirror_fdi(number: int) -> int:
    """The FDI number of the same tooth on the other side (14 -> 24, 46 -> 36, 55 -> 65); 0 stays 0."""
    return 0 if number == 0 else 10 * MIRROR_QUADRANT[number // 10] + number % 10


# Lookup tables over all 8-bit values, so a whole label map is mirrored with one indexing.
MIRROR_LUT = np.arange(256, dtype=np.uint8)
for _number in FDI_NUMBERS:
    MIRROR_LUT[_number] = mirror_fdi(_number)
del _number


def class_lookup(classes: list[int], missing: int) -> np.ndarray:
    """A table over all 8-bit values from an FDI number to its class index in `classes` (a per-tooth model's
    channels), `missing` for a number without a class, so a whole label map is converted with one indexing."""
    lookup = np.full(256, missing, np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    return lookup


def mirror_label_map(label_map: np.ndarray) -> np.ndarray:
    """A label map flipped left-right, with each tooth renumbered to its mirror quadrant."""
    return MIRROR_LUT[np.ascontiguousarray(label_map[:, ::-1])]


def mirror_closed(numbers) -> list[int]:
    """The sorted FDI numbers together with their mirrors: the classes a flip-augmented model must have."""
    return sorted({n for n in numbers} | {mirror_fdi(n) for n in numbers})


def check_label_map(label_map: np.ndarray, name: str) -> None:
    """A label map holds only 0 and FDI numbers; anything else is a wrong file, not a tooth."""
    values = np.unique(label_map)
    wrong = [int(v) for v in values if v != 0 and int(v) not in FDI_NUMBERS]
    if wrong:
        raise LabelFileError(name, f"pixel values {wrong[:5]} are not FDI tooth numbers (11..48, 51..85) or 0; "
                                   f"a per-tooth label map holds each pixel's FDI number")


def read_label_map(path) -> np.ndarray:
    """A label map that prepare_sts2d.py wrote (8-bit grey PNG), checked to hold only FDI numbers and 0."""
    labels = read_image(path)
    check_label_map(labels, str(path))
    return labels


def as_label_map(image: np.ndarray, name: str) -> np.ndarray:
    """A decoded label-map image (utils.decode_image(..., grayscale=False)) as a checked uint8 map. Colour
    images are refused unless their channels agree: grey conversion would mix the numbers."""
    if image.ndim == 3:
        if not all(np.array_equal(image[..., 0], image[..., c]) for c in range(1, min(image.shape[2], 3))):
            raise LabelFileError(name, "a colour image; a label map is one channel of FDI numbers (an 8-bit grey PNG)")
        image = image[..., 0]
    check_label_map(image, name)
    return image.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# labelme polygons
# ----------------------------------------------------------------------------------------------
def fdi_from_label(text: str, name: str) -> int:
    """The FDI number a labelme label names: "14 - 1st Premolar" -> 14, "A" -> 55 (see the module's rules)."""
    stripped = str(text).strip()
    if stripped in UNIVERSAL_PRIMARY:
        return UNIVERSAL_PRIMARY[stripped]
    match = LABEL_NUMBER.match(stripped)
    if match and int(match[1]) in FDI_NUMBERS:
        return int(match[1])
    raise LabelFileError(name, f"unknown tooth label {text!r}; start each tooth's label with its FDI number "
                               f"('14 - 1st Premolar': 11..48, 51..85) or give a primary tooth's Universal letter A..T, "
                               f"and delete shapes that outline no tooth (an implant, a crown)")


@dataclass(frozen=True)
class LabelmeTeeth:
    label_map: np.ndarray   # uint8 HxW: FDI numbers, 0 background
    polygons: int           # teeth in the file; 0: no tooth is labelled
    overlap_pixels: int     # pixels inside two or more polygons, given to the smallest
    clipped: int            # polygons partly outside the image, clipped to it
    image_path: str = ""    # the image labelme drew it on (its imagePath), as the file records it


def _labelme_document(data: bytes, name: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise LabelFileError(name, f"not a labelme JSON file ({exc}); export it again from labelme") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("shapes"), list)
            and all(isinstance(doc.get(key), int) for key in ("imageHeight", "imageWidth"))):
        raise LabelFileError(name, "not a labelme file (it needs a 'shapes' list and integer imageHeight/imageWidth); "
                                   "export it again from labelme")
    return doc


def _polygon_points(shape: dict, name: str) -> np.ndarray:
    label = shape.get("label")
    kind = shape.get("shape_type") or "polygon"  # labelme before 3.x wrote no shape_type: all polygons
    if kind != "polygon":
        raise LabelFileError(name, f"shape {label!r} is a {kind}; only polygons outline a tooth: "
                                   f"redraw it as a polygon in labelme or delete it")
    try:
        points = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        points = np.empty(0)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 or not np.all(np.abs(points) < MAX_COORDINATE):
        raise LabelFileError(name, f"polygon {label!r} needs at least 3 points of [x, y] pixel coordinates; "
                                   f"fix or redraw it in labelme")
    return np.round(points).astype(np.int64)


def rasterise_labelme(path, height: int, width: int, *, data: bytes | None = None) -> LabelmeTeeth:
    """The label map of a labelme file at its image's size (height x width), by the module's rules.
    `data`, when given, is the file's content (`path` then only names it in messages)."""
    name = str(path)
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise LabelFileError(name, f"{cannot_read(path, exc)}; check --teeth-dir") from None
    doc = _labelme_document(data, name)
    if (doc["imageHeight"], doc["imageWidth"]) != (height, width):
        raise LabelFileError(name, f"drawn on a {doc['imageWidth']}x{doc['imageHeight']} image (imageWidth x imageHeight) "
                                   f"but its image is {width}x{height}; pair it with its own image")
    teeth = []  # (number, the polygon's box in the image as (rows, cols) slices, its filled pixels in that box)
    label_of, clipped = {}, 0
    claims = np.zeros((height, width), np.uint8)
    size = np.array([width, height])
    for shape in doc["shapes"]:
        if not isinstance(shape, dict):
            raise LabelFileError(name, "a shape is not a labelme shape object; export the file again from labelme")
        number = fdi_from_label(shape.get("label", ""), name)
        points = _polygon_points(shape, name)
        if number in label_of:
            raise LabelFileError(name, f"two polygons are labelled {number} ({label_of[number]!r} and {shape.get('label')!r}); "
                                       f"give each tooth one polygon (merge them in labelme)")
        label_of[number] = shape.get("label")
        low, high = np.clip(points.min(0), 0, size), np.clip(points.max(0) + 1, 0, size)
        box = np.zeros((high - low)[::-1], np.uint8)
        if box.size:
            cv2.fillPoly(box, [(points - low).astype(np.int32)], 1)
        if not box.any():
            raise LabelFileError(name, f"polygon {shape.get('label')!r} lies wholly outside the {width}x{height} image; "
                                       f"fix its points or delete it")
        clipped += bool((points < 0).any() or (points >= size).any())
        window = (slice(low[1], high[1]), slice(low[0], high[0]))
        claims[window] += box
        teeth.append((number, window, box))
    label_map = np.zeros((height, width), np.uint8)
    for number, window, box in sorted(teeth, key=lambda t: -int(t[2].sum())):  # largest first: the smaller wins
        label_map[window][box > 0] = number
    return LabelmeTeeth(label_map, len(teeth), int((claims > 1).sum()), clipped, str(doc.get("imagePath") or ""))
