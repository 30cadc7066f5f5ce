"""Per-tooth labels in FDI notation, without torch: the numbers, their left/right mirror, label maps.

A per-tooth label map is an 8-bit image whose pixels hold the FDI number of their tooth (11..48 for
permanent teeth, 51..85 for primary teeth) and 0 for background. The first digit is the quadrant
(1 upper right, 2 upper left, 3 lower left, 4 lower right, in the patient's frame; 5..8 the same for
primary teeth), the second the position from the midline.
"""
from __future__ import annotations

import numpy as np

from utils import ToothSegError

PERMANENT = tuple(10 * q + i for q in (1, 2, 3, 4) for i in range(1, 9))
PRIMARY = tuple(10 * q + i for q in (5, 6, 7, 8) for i in range(1, 6))
FDI_NUMBERS = PERMANENT + PRIMARY
# A horizontal flip of a panoramic image mirrors the patient: right quadrants become left ones.
MIRROR_QUADRANT = {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7}


def mirror_fdi(number: int) -> int:
    """The FDI number of the same tooth on the other side (14 -> 24, 46 -> 36, 55 -> 65); 0 stays 0."""
    return 0 if number == 0 else 10 * MIRROR_QUADRANT[number // 10] + number % 10


# Lookup tables over all 8-bit values, so a whole label map is mirrored with one indexing.
MIRROR_LUT = np.arange(256, dtype=np.uint8)
for _number in FDI_NUMBERS:
    MIRROR_LUT[_number] = mirror_fdi(_number)
del _number


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
        raise ToothSegError(f"{name}: pixel values {wrong[:5]} are not FDI tooth numbers (11..48, 51..85) or 0; "
                            f"a per-tooth label map holds each pixel's FDI number")
