"""A synthetic panoramic dental X-ray phantom: the built-in data for the demo and the tests.

`generate_panoramic(seed)` draws one 320x640 panoramic image and its tooth mask;
`generate_panoramic_teeth(seed)` also its per-tooth label map (FDI numbers, see teeth.py). The anatomy
is drawn in a 640x320 reference frame and scaled to the requested size:

- dark soft tissue, with the cervical spine's blurred shadow at both sides;
- the maxilla and the mandible (with its rami, cortical border and the hard palate) as soft,
  textured brighter arches;
- two arches of teeth along a "smile" occlusal curve. Each tooth is an enamel crown on a tapering
  root (two roots for molars), with a darker pulp, a dark periodontal gap and a bright lamina dura
  where it sits in bone. Adults have 28-32 tooth positions (third molars come and go); children
  have a mixed dentition: primary teeth, erupted first molars and unerupted permanent tooth buds
  in dark follicles inside the bone;
- missing teeth, very bright restorations (fillings, metal crowns, root fillings; labelled tooth)
  and implants (bright threaded screws, some with a crown; labelled background);
- blur, uneven exposure and Poisson-Gaussian noise.

The mask is 255 on every natural tooth, erupted or not (buds included), and 0 elsewhere. Roots
are barely brighter than the bone around them and the exposure varies across the image, so no
single global threshold separates teeth from bone (tests/test_phantom.py checks this); the tooth
outlines and their context do.

The label map gives each tooth of the mask its FDI number, from its quadrant and its slot from the
midline: adults 11..48; children their primary teeth 51..85 and their permanent teeth (erupted
incisors and first molars, and the buds) by their permanent number, each bud that of the tooth that
will erupt there (the buds under the primary molars are premolars 4 and 5). As on a real panoramic,
the patient's right (quadrants 1, 4, 5, 8) is drawn on the image's left, so a left-right flip of image
and label map is teeth.mirror_label_map. Where two teeth touch, the one drawn later (a bud under its
primary tooth) keeps the shared pixels; the label map is non-zero exactly where the mask is.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_HEIGHT, DEFAULT_WIDTH = 320, 640
REF_H, REF_W = 320.0, 640.0  # all geometry below is in pixels of this reference frame
SHIFT = 4  # sub-pixel bits for cv2.fillPoly
MIN_SIZE = (32, 64)  # (height, width): the smallest panoramic drawn
# STS-2D-Tooth image counts: A-PXI 850 labelled / 2650 unlabelled, C-PXI 50 / 450.
STS_COUNTS = {("adult", "labeled"): 850, ("adult", "unlabeled"): 2650,
              ("children", "labeled"): 50, ("children", "unlabeled"): 450}
# Small-N floors for synthetic_manifest: enough labelled pairs that train, val and test each
# get at least one of every age group (the split gives >= 1 per split to a stratum of >= 3).
MIN_LABELED = {"adult": 5, "children": 3}

# Tooth slots from the midline outwards: (width, length, crown fraction, roots), reference px.
ADULT_UPPER = [(21, 74, .42, 1), (18, 68, .42, 1), (21, 84, .36, 1), (21, 70, .40, 1),
               (21, 70, .40, 1), (31, 62, .42, 2), (29, 58, .44, 2), (26, 52, .46, 2)]
ADULT_LOWER = [(15, 70, .38, 1), (16, 72, .38, 1), (20, 84, .36, 1), (21, 76, .36, 1),
               (21, 76, .36, 1), (33, 70, .36, 2), (31, 66, .38, 2), (28, 60, .40, 2)]
# Primary teeth A-E, then the permanent first molar; the second molar is a bud (see _child_quadrant).
PRIMARY_UPPER = [(17, 50, .50, 1), (14, 46, .50, 1), (17, 54, .45, 1), (22, 46, .50, 2), (26, 48, .50, 2)]
PRIMARY_LOWER = [(12, 46, .50, 1), (13, 48, .50, 1), (16, 52, .45, 1), (23, 46, .50, 2), (28, 48, .50, 2)]


@dataclass
class Tooth:
    x: float            # centre of the occlusal end, reference px
    y: float
    axis: np.ndarray    # unit vector from the crown towards the apex
    width: float
    length: float
    crown_frac: float
    roots: int
    follicle: bool = False  # an unerupted bud: drawn inside a dark follicle
    fdi: int = 0            # its FDI number, for the per-tooth label map


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
@dataclass
class Jaw:
    x0: float          # midline
    occ_y: float       # occlusal line height at the sides of the arch
    occ_dip: float     # how much lower it is at the midline (the "smile")
    half_span: float   # half width of the dental arch
    gap: float         # vertical gap between upper and lower crowns
    scale: float       # tooth size factor (children are smaller)
    child: bool

    def occlusal_y(self, x):
        u = (x - self.x0) / self.half_span
        return self.occ_y + self.occ_dip * (1 - u * u)

    def normal(self, x: float, upper: bool) -> np.ndarray:
        """Unit vector perpendicular to the occlusal curve, pointing into the upper or lower jaw."""
        slope = -2 * self.occ_dip * (x - self.x0) / self.half_span ** 2
        n = np.array([-slope, 1.0]) / np.hypot(slope, 1.0)
        return -n if upper else n


def _jaw(rng: np.random.Generator, age_group: str) -> Jaw:
    child = age_group == "children"
    return Jaw(x0=REF_W / 2 + rng.normal(0, 4), occ_y=REF_H * rng.uniform(0.44, 0.48),
               occ_dip=REF_H * rng.uniform(0.035, 0.07), half_span=rng.uniform(180, 200) * (0.88 if child else 1.0),
               gap=rng.uniform(1, 6), scale=rng.uniform(0.93, 1.05) * (0.9 if child else 1.0), child=child)


def _quadrant(side: int, upper: bool) -> int:
    """The FDI quadrant of permanent teeth on the image's `side` (-1 left, +1 right): the patient's right
    is the viewer's left."""
    return (1 if side < 0 else 2) if upper else (4 if side < 0 else 3)


def _place(jaw: Jaw, rng: np.random.Generator, slots, side: int, upper: bool):
    """Yield (slot index, tooth) for consecutive slots along the arch from the midline out."""
    edge = 1.0
    for i, (width, length, crown_frac, roots) in enumerate(slots):
        w = width * jaw.scale
        x = jaw.x0 + side * (edge + w / 2)
        edge += w + rng.uniform(1, 3)
        y = jaw.occlusal_y(x) + (-1 if upper else 1) * (jaw.gap / 2 + rng.uniform(0, 2))
        axis = _rotate(jaw.normal(x, upper), rng.normal(0, 0.05))
        yield i, Tooth(x, y, axis, w * rng.uniform(0.94, 1.04), length * jaw.scale * rng.uniform(0.92, 1.06),
                       crown_frac, roots)


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _adult_quadrant(jaw, rng, side, upper, has_third_molar):
    slots = ADULT_UPPER if upper else ADULT_LOWER
    quadrant = _quadrant(side, upper)
    teeth = [t for i, t in _place(jaw, rng, slots, side, upper) if i < 7 or has_third_molar]
    for i, tooth in enumerate(teeth):
        tooth.fdi = 10 * quadrant + i + 1
    return teeth


def _child_quadrant(jaw, rng, side, upper, dental_age):
    """Primary teeth A-E, each with its permanent successor as a bud deep beneath its (resorbing)
    roots, the erupted first molar, and the second molar as a bud behind it. In older children
    (dental_age near 1) the permanent incisors have already replaced the primary ones."""
    primary = PRIMARY_UPPER if upper else PRIMARY_LOWER
    permanent = ADULT_UPPER if upper else ADULT_LOWER
    quadrant = _quadrant(side, upper)
    teeth = []
    for i, tooth in _place(jaw, rng, primary + permanent[5:7], side, upper):
        successor = 10 * quadrant + i + 1  # slot i holds primary tooth i + 1 (i < 5), then molars 6 and 7
        if i < 2 and dental_age > (0.35, 0.6)[i]:
            w, length, crown_frac, roots = permanent[i]
            teeth.append(Tooth(tooth.x, tooth.y, tooth.axis, w * jaw.scale * 0.9,
                               length * jaw.scale * rng.uniform(0.8, 1.0), crown_frac, roots, fdi=successor))
            continue
        if i == 5:
            tooth.fdi = successor
            teeth.append(tooth)
            continue
        depth = tooth.length * rng.uniform(0.85, 0.95) if i < 5 else 36 * jaw.scale + rng.uniform(0, 8)
        if i < 5:
            tooth.length *= rng.uniform(0.75, 0.9)
            tooth.fdi = successor + 40  # the primary quadrants are 5..8
            teeth.append(tooth)
        w, length, crown_frac, _ = permanent[i]
        formed = rng.uniform(0.0, 0.35) * dental_age  # how much of the root has formed
        bud_len = length * jaw.scale * (crown_frac + (1 - crown_frac) * formed)
        base = np.array([tooth.x, tooth.y]) + depth * tooth.axis
        teeth.append(Tooth(base[0], base[1], _rotate(tooth.axis, rng.normal(0, 0.12)), w * jaw.scale * 0.92, bud_len,
                           crown_frac * length * jaw.scale / bud_len, 1, follicle=True, fdi=successor))
    return teeth


def _tooth_outline(t: Tooth, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(outline polygons, crown, dentin core of the crown, pulp) as polygons in reference px. The
    outline is a crown plus root trunk, and for multi-rooted teeth two splayed roots; the enamel
    is the crown minus its core."""
    hw, L = t.width / 2, t.length
    Lc = L * t.crown_frac
    s = np.linspace(0, 1, 14)

    def to_xy(along, across):
        perp = np.array([-t.axis[1], t.axis[0]])
        return np.stack([t.x + along * t.axis[0] + across * perp[0], t.y + along * t.axis[1] + across * perp[1]], -1)

    def band(s_vals, half):  # closed polygon from centre-line samples and half widths
        along = np.concatenate([s_vals, s_vals[::-1]])
        across = np.concatenate([-half, half[::-1]])
        return to_xy(along, across)

    crown_s = Lc * s
    crown_hw = hw * np.minimum(1.0, 0.72 + 2.5 * s) * (1 - 0.16 * s ** 3)
    bulge = rng.uniform(0.0, 0.06)
    crown_hw = crown_hw * (1 + bulge * np.sin(np.pi * s))
    crown = band(crown_s, crown_hw)
    core_s = Lc * (0.22 + 0.9 * s)
    core = band(core_s, 0.7 * np.interp(core_s, crown_s, crown_hw))
    root_len = L - Lc
    if t.roots == 1:
        root_s = Lc + root_len * s
        root_hw = hw * 0.84 * (1 - 0.82 * s ** 1.4)
        outline = [band(np.concatenate([crown_s, root_s[1:]]), np.concatenate([crown_hw, root_hw[1:]]))]
    else:
        trunk = 0.3 * root_len
        trunk_s = Lc + trunk * s
        outline = [band(np.concatenate([crown_s, trunk_s[1:]]), np.concatenate([crown_hw, hw * 0.84 * (1 - 0.05 * s[1:])]))]
        splay = rng.uniform(0.05, 0.2)
        for sign in (-1, 1):
            along = Lc + trunk * 0.5 + (root_len - trunk * 0.5) * s
            centre = sign * hw * (0.42 + splay * s)
            half = hw * 0.4 * (1 - 0.75 * s ** 1.3)
            outline.append(to_xy(np.concatenate([along, along[::-1]]),
                                 np.concatenate([centre - half, (centre + half)[::-1]])))
    pulp_s = Lc * 0.45 + (L * 0.92 - Lc * 0.45) * s
    pulp = band(pulp_s, hw * (0.32 - 0.26 * s) * (1.4 if t.roots > 1 else 1.0))
    return outline, crown, core, pulp


def _implant_outline(t: Tooth, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A threaded screw in the bone where a tooth was lost, and a crown-shaped superstructure."""
    crest = t.length * t.crown_frac * 0.9
    length = (t.length - crest) * rng.uniform(0.8, 1.0)
    s = np.linspace(0, 1, 25)
    half = t.width / 2 * 0.45 * (1 - 0.25 * s) + 2.0 * (np.arange(25) % 2)  # the thread's teeth
    perp = np.array([-t.axis[1], t.axis[0]])
    along = np.concatenate([crest + length * s, (crest + length * s)[::-1]])
    across = np.concatenate([-half, half[::-1]])
    screw = np.stack([t.x + along * t.axis[0] + across * perp[0], t.y + along * t.axis[1] + across * perp[1]], -1)
    crown_along = np.array([0, 0, crest, crest])
    crown_across = np.array([-1, 1, 0.75, -0.75]) * t.width / 2 * 0.9
    crown = np.stack([t.x + crown_along * t.axis[0] + crown_across * perp[0],
                      t.y + crown_along * t.axis[1] + crown_across * perp[1]], -1)
    return screw, crown


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _sig(x):
    """The logistic function, written with tanh so that float32 never overflows."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _anatomy(rng: np.random.Generator, jaw: Jaw, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(soft-tissue density, bone amount), both smooth, computed at half resolution and upsampled."""
    h, w = max(8, height // 2), max(16, width // 2)
    X, Y = np.meshgrid((np.arange(w, dtype=np.float32) + 0.5) * np.float32(REF_W / w),
                       (np.arange(h, dtype=np.float32) + 0.5) * np.float32(REF_H / h))
    ux = X - jaw.x0
    occ = jaw.occlusal_y(X)
    crest_up, crest_low = 0.8 * 74 * jaw.scale * 0.42, 0.8 * 70 * jaw.scale * 0.38
    half_span = jaw.half_span

    # Mandible: body from the alveolar crest to a U-shaped lower border, rami up to the condyles.
    lower_border = REF_H * (rng.uniform(0.64, 0.7) + rng.uniform(0.19, 0.23) * (1 - (ux / (half_span * 1.25)) ** 2))
    body = _sig((Y - occ - crest_low) / 3) * _sig((lower_border - Y) / 4) * _sig((half_span * 1.27 - np.abs(ux)) / 5)
    ramus = np.zeros_like(X)
    for side in (-1, 1):
        x_bottom, x_top = jaw.x0 + side * half_span * 1.18, jaw.x0 + side * half_span * rng.uniform(1.22, 1.3)
        y_top = REF_H * rng.uniform(0.12, 0.2)
        frac = np.clip((Y - y_top) / (lower_border.min() - y_top), 0, 1)
        centre = x_top + (x_bottom - x_top) * frac
        ramus = np.maximum(ramus, _sig((22 - np.abs(X - centre)) / 4) * _sig((Y - y_top) / 4) * _sig((REF_H * 0.82 - Y) / 6))
    mandible = np.maximum(body, ramus)
    cortex = np.exp(-((lower_border - Y - 6) / 5) ** 2) * _sig((half_span * 1.2 - np.abs(ux)) / 6)

    # Maxilla from its alveolar crest up to the hard palate; sinuses as darker lobes; zygomatic arches.
    palate_y = REF_H * (rng.uniform(0.13, 0.18) if jaw.child else rng.uniform(0.2, 0.26)) + 20 * (ux / half_span) ** 2
    maxilla = _sig((occ - crest_up - Y) / 3) * _sig((Y - palate_y + 8) / 5) * _sig((half_span * 1.12 - np.abs(ux)) / 6)
    palate = np.exp(-((Y - palate_y) / 5) ** 2) * _sig((half_span * 1.05 - np.abs(ux)) / 10)
    sinus = sum(np.exp(-(((X - jaw.x0 - side * half_span * 0.55) / 45) ** 2 + ((Y - palate_y - 28) / 22) ** 2))
                for side in (-1, 1))
    zygoma = (np.exp(-((Y - palate_y + 10 - 0.12 * (np.abs(ux) - half_span)) / 7) ** 2)
              * _sig((np.abs(ux) - half_span * 1.05) / 8) * _sig((REF_W * 0.46 - np.abs(ux)) / 8))

    # Soft tissue is dark; the cervical spine shows as a broad blurred column at each side.
    spine_x = rng.uniform(18, 34)
    spine = (np.exp(-((X - spine_x) / 30) ** 2) + np.exp(-((X - REF_W + spine_x) / 30) ** 2)) * _sig((Y - REF_H * 0.15) / 12)
    airway = np.exp(-((Y - palate_y - 16) / 8) ** 2) * _sig((half_span * 0.9 - np.abs(ux)) / 15)
    soft = (0.13 + 0.06 * Y / REF_H + 0.05 * _sig((half_span * 1.3 - np.abs(ux)) / 30) + rng.uniform(0.12, 0.22) * spine
            + 0.12 * palate + 0.1 * zygoma + 0.14 * cortex - 0.03 * airway)
    bone = np.clip(np.maximum(mandible, maxilla) - 0.35 * sinus * maxilla, 0, 1)

    size = (width, height)
    return (cv2.resize(soft.astype(np.float32), size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(bone.astype(np.float32), size, interpolation=cv2.INTER_LINEAR))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, factor: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-ish random texture with features about `factor` px across."""
    small = rng.standard_normal((max(2, height // factor), max(2, width // factor))).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), sigma)
    small /= small.std() + 1e-6
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


class _Canvas:
    """Float layers, the mask and the per-tooth label map at the output size; polygons come in reference px."""

    def __init__(self, height: int, width: int):
        self.scale = np.array([width / REF_W, height / REF_H]) * (1 << SHIFT)
        self.layers = {name: np.zeros((height, width), np.float32)
                       for name in ("enamel", "pulp", "follicle", "metal", "implant")}
        self.mask = np.zeros((height, width), np.uint8)
        self.teeth = np.zeros((height, width), np.uint8)

    def fill(self, target: np.ndarray, polygons, value: float) -> None:
        pts = [np.round(np.asarray(p) * self.scale).astype(np.int32) for p in polygons]
        cv2.fillPoly(target, pts, value, lineType=cv2.LINE_8, shift=SHIFT)

    def ellipse(self, target: np.ndarray, centre, axes, angle: float, value: float) -> None:
        c = tuple(int(v) for v in np.round(np.asarray(centre) * self.scale))
        a = tuple(max(1, int(v)) for v in np.round(np.asarray(axes) * self.scale))
        cv2.ellipse(target, c, a, angle, 0, 360, value, -1, cv2.LINE_8, SHIFT)


def _draw_tooth(canvas: _Canvas, tooth: Tooth, rng: np.random.Generator, restore: float) -> None:
    outline, crown, core, pulp = _tooth_outline(tooth, rng)
    if tooth.follicle:
        centre = np.array([tooth.x, tooth.y]) + tooth.axis * tooth.length * 0.5
        angle = np.degrees(np.arctan2(tooth.axis[1], tooth.axis[0]))
        canvas.ellipse(canvas.layers["follicle"], centre, (tooth.length * 0.5 + 5, tooth.width / 2 + 5), angle, 1.0)
    canvas.fill(canvas.mask, outline, 255)
    canvas.fill(canvas.teeth, outline, tooth.fdi)
    canvas.fill(canvas.layers["enamel"], [crown], 1.0)
    canvas.fill(canvas.layers["enamel"], [core], 0.0)
    canvas.fill(canvas.layers["pulp"], [pulp], 1.0)
    if tooth.follicle or rng.random() >= restore:
        return
    kind = rng.random()
    if kind < 0.25:  # a full metal crown
        canvas.fill(canvas.layers["metal"], [crown], rng.uniform(0.95, 1.05))
    else:  # a filling in the crown, sometimes with a root filling
        Lc = tooth.length * tooth.crown_frac
        perp = np.array([-tooth.axis[1], tooth.axis[0]])
        c = np.array([tooth.x, tooth.y]) + tooth.axis * Lc * rng.uniform(0.2, 0.45) + perp * rng.normal(0, tooth.width * 0.08)
        canvas.ellipse(canvas.layers["metal"], c, (tooth.width * rng.uniform(0.18, 0.32), Lc * rng.uniform(0.15, 0.3)),
                       np.degrees(np.arctan2(perp[1], perp[0])), rng.uniform(0.9, 1.05))
        if kind > 0.8:
            canvas.fill(canvas.layers["metal"], [pulp], rng.uniform(0.85, 0.95))


@dataclass
class Dentition:
    jaw: Jaw
    teeth: list[Tooth]      # natural teeth, erupted or buds: all labelled
    implants: list[Tooth]   # lost teeth replaced by an implant: labelled background
    positions: int          # tooth positions before any loss (adults: 28-32)
    missing: int            # teeth lost, with or without an implant
    restore: float          # chance that an erupted tooth carries a restoration


def _dentition(rng: np.random.Generator, age_group: str) -> Dentition:
    jaw = _jaw(rng, age_group)
    teeth, implants, missing = [], [], 0
    if age_group == "adult":
        for upper in (True, False):
            for side in (-1, 1):
                teeth += _adult_quadrant(jaw, rng, side, upper, has_third_molar=rng.random() < 0.55)
        positions = len(teeth)
        # Missing teeth in about half of the adults; some gaps hold an implant.
        if rng.random() < 0.5:
            for i in sorted(rng.choice(len(teeth), size=rng.integers(1, 4), replace=False), reverse=True):
                lost = teeth.pop(i)
                missing += 1
                if rng.random() < 0.4:
                    implants.append(lost)
        restore = rng.choice([0.0, 0.08, 0.2])
    else:
        dental_age = rng.random()
        for upper in (True, False):
            for side in (-1, 1):
                teeth += _child_quadrant(jaw, rng, side, upper, dental_age)
        positions = len(teeth)
        restore = rng.choice([0.0, 0.0, 0.06])
    return Dentition(jaw, teeth, implants, positions, missing, float(restore))


def _rng(seed: int, age_group: str) -> np.random.Generator:
    if age_group not in ("adult", "children"):
        raise ValueError(f"age_group must be 'adult' or 'children', got {age_group!r}")
    return np.random.default_rng([seed, age_group == "children"])


def describe(seed: int, age_group: str = "adult") -> dict:
    """What generate_panoramic(seed, age_group=...) draws: counts of teeth, buds, missing teeth,
    implants and tooth positions (the same random stream, without rendering)."""
    d = _dentition(_rng(seed, age_group), age_group)
    buds = sum(t.follicle for t in d.teeth)
    return {"positions": d.positions, "teeth": len(d.teeth) - buds, "buds": buds, "missing": d.missing,
            "implants": len(d.implants), "restore": d.restore}


def generate_panoramic(seed: int, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                       age_group: str = "adult") -> tuple[np.ndarray, np.ndarray]:
    """One synthetic panoramic X-ray: (image uint8 HxW, mask uint8 HxW with 0/255). Deterministic in
    (seed, height, width, age_group)."""
    image, mask, _ = generate_panoramic_teeth(seed, height, width, age_group)
    return image, mask


def generate_panoramic_teeth(seed: int, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                             age_group: str = "adult") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """generate_panoramic's image and mask, and the per-tooth label map (uint8 HxW, FDI numbers, 0
    background, non-zero exactly where the mask is)."""
    rng = _rng(seed, age_group)
    if height < MIN_SIZE[0] or width < MIN_SIZE[1]:
        raise ValueError(f"phantom size must be at least {MIN_SIZE[0]}x{MIN_SIZE[1]}, got {height}x{width}")
    dentition = _dentition(rng, age_group)
    jaw, teeth, implants, restore = dentition.jaw, dentition.teeth, dentition.implants, dentition.restore
    canvas = _Canvas(height, width)

    for tooth in teeth:
        _draw_tooth(canvas, tooth, rng, restore)
    for lost in implants:
        screw, crown = _implant_outline(lost, rng)
        canvas.fill(canvas.layers["implant"], [screw], rng.uniform(0.95, 1.05))
        if rng.random() < 0.6:
            canvas.fill(canvas.layers["implant"], [crown], rng.uniform(0.9, 1.0))

    # Densities: soft tissue and bone, then teeth (dentin, enamel, pulp) with the dark periodontal
    # gap and bright lamina dura around them inside bone. Roots differ from bone only a little.
    soft, bone = _anatomy(rng, jaw, height, width)
    layers = canvas.layers
    tooth = canvas.mask.astype(np.float32) / 255.0
    gap_px = max(1, round(width / REF_W))  # periodontal gap and lamina dura, each about 1 reference px wide
    kernel = np.ones((3, 3), np.uint8)
    grown1 = cv2.dilate(canvas.mask, kernel, iterations=gap_px).astype(np.float32) / 255.0
    grown2 = cv2.dilate(canvas.mask, kernel, iterations=2 * gap_px).astype(np.float32) / 255.0
    texture = _smooth_noise(rng, height, width, 3, 1.0)
    bone_level = rng.uniform(0.26, 0.34)
    density = (soft + bone * (bone_level + 0.035 * texture)
               + tooth * rng.uniform(0.12, 0.17) * (1 + 0.9 * (1 - bone))  # crowns out of bone look brighter
               + layers["enamel"] * rng.uniform(0.1, 0.16) - layers["pulp"] * rng.uniform(0.06, 0.09)
               - (grown1 - tooth) * bone * 0.07 + (grown2 - grown1) * bone * 0.05
               - layers["follicle"] * (1 - tooth) * bone * 0.16)
    metal = np.maximum(layers["metal"] * tooth, layers["implant"])
    density = np.where(metal > 0, np.maximum(density, metal), density)

    # Exposure: a smooth gain field (tilts and blotches) and a random gamma.
    X = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    Y = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    gain = (1 + rng.uniform(-0.15, 0.15) * X + rng.uniform(-0.12, 0.12) * Y + rng.uniform(0.05, 0.12) * X * X
            + 0.1 * _smooth_noise(rng, height, width, 32, 1.5))
    image = np.clip(density * gain, 0, 1.2) ** rng.uniform(0.85, 1.15)

    sigma = rng.uniform(0.7, 1.5) * width / REF_W
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
    # Poisson-Gaussian noise: quantum noise with variance signal/photons plus Gaussian read-out
    # noise, drawn in the usual normal approximation (photon counts here are far above 20).
    photons, read_out = rng.uniform(150, 400), rng.uniform(0.005, 0.015)
    noise_std = np.sqrt(np.clip(image, 0, None) / photons + read_out ** 2)
    image = image + noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(image * 235 + rng.uniform(0, 12), 0, 255).astype(np.uint8)
    return image, canvas.mask, canvas.teeth


# ----------------------------------------------------------------------------------------------
# A data set in STS-2D-Tooth proportions
# ----------------------------------------------------------------------------------------------
def synthetic_manifest(n: int, seed: int) -> list[dict]:
    """Decide (name, age_group, label_status, seed) for `n` phantom images.

    Counts follow STS-2D-Tooth (850/2650 adult labelled/unlabelled, 50/450 children) by largest
    remainder. For small n the proportional share of labelled images is too small to split, so
    at least 5 labelled adults and 3 labelled children are kept (taken from the unlabelled ones,
    adults first), which gives every age group one pair in each of train, val and test. The order
    is shuffled with `seed`; each item's image seed is derived from (seed, position).
    """
    if n < 1:
        raise ValueError(f"need at least one synthetic image, got {n}")
    keys = list(STS_COUNTS)
    total = sum(STS_COUNTS.values())
    exact = [n * STS_COUNTS[k] / total for k in keys]
    counts = {k: int(e) for k, e in zip(keys, exact)}
    by_remainder = sorted(range(len(keys)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in by_remainder[:n - sum(counts.values())]:
        counts[keys[i]] += 1
    for age in ("adult", "children"):
        for donor in (("adult", "unlabeled"), ("children", "unlabeled")):
            take = min(MIN_LABELED[age] - counts[(age, "labeled")], counts[donor])
            if take > 0:
                counts[donor] -= take
                counts[(age, "labeled")] += take
    kinds = [k for k in keys for _ in range(counts[k])]
    order = np.random.default_rng(seed).permutation(n)
    item_seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)
    return [{"name": f"synth_{i:05d}", "age_group": kinds[j][0], "label_status": kinds[j][1], "seed": int(item_seeds[i])}
            for i, j in enumerate(order)]
