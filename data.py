"""Datasets, transforms and the self-supervised corruptions (MIM masks, Models Genesis): the torch side
of the data. The index, sample discovery, splits and mask reading live in the torch-free `index.py`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset
from tqdm import tqdm

from index import Sample, read_mask
from metrics import IGNORE_INDEX
from teeth import class_lookup, mirror_label_map, read_label_map
from utils import ToothSegError, read_image, to_uint8


# ----------------------------------------------------------------------------------------------
# Transforms (albumentations 2.x). Images are normalised with mean 0.5, std 0.25 on the [0, 1] scale.
# ----------------------------------------------------------------------------------------------
NORM_MEAN, NORM_STD = 0.5, 0.25


def check_same_size(labels: np.ndarray, size: tuple[int, int], path, what: str = "mask",
                    fix: str = "fix the pair or re-run prepare_sts2d.py") -> np.ndarray:
    """A mask or label map must have its image's (H, W): one pixel of it per pixel of the image."""
    if labels.shape != tuple(size):
        raise ToothSegError(f"{path}: {what} size {labels.shape[::-1]} differs from its image {tuple(size)[::-1]}; {fix}")
    return labels


# Histogram standardisation (Nyul & Udupa 1999; TorchIO's HistogramStandardization), with a landmark at every
# 1/256 of the pixels: X-ray units and clinics differ in exposure and contrast curve, so a model trained on one
# clinic's grey levels meets another's shifted. Each image's grey levels are moved so that its quantiles fall on
# the training images' mean quantiles, a monotone map that keeps which tissue is brighter than which.
LANDMARK_QUANTILES = np.linspace(0.0, 1.0, 257)


def intensity_landmarks(samples: Iterable[Sample]) -> tuple[float, ...]:
    """The reference the images are standardised to: the mean over `samples` of each image's grey level at
    each of LANDMARK_QUANTILES (the quantiles' barycentre, which keeps the shape of a typical histogram)."""
    rows = [np.quantile(to_uint8(read_image(s.image)), LANDMARK_QUANTILES)
            for s in tqdm(samples, desc="intensity landmarks", leave=False, disable=None)]
    if not rows:
        raise ToothSegError("no training images to take intensity landmarks from; check --images-dir")
    return tuple(round(float(v), 3) for v in np.mean(rows, axis=0))


def standardize_intensity(image: np.ndarray, landmarks: Iterable[float]) -> np.ndarray:
    """A uint8 image with its histogram matched to `landmarks` (grey levels at LANDMARK_QUANTILES): each grey
    level moves to the landmarks' value at its share of darker pixels (the middle of its own histogram bin)."""
    counts = np.bincount(image.ravel(), minlength=256)
    share = (np.cumsum(counts) - counts / 2) / image.size
    lookup = np.interp(share, LANDMARK_QUANTILES, np.asarray(landmarks, np.float64))
    return np.round(lookup).clip(0, 255).astype(np.uint8)[image]


class StandardizeIntensity(A.ImageOnlyTransform):
    """`standardize_intensity` as the first step of a transform, at the image's own size."""

    def __init__(self, landmarks: Iterable[float], p: float = 1.0):
        super().__init__(p=p)
        self.landmarks = tuple(landmarks)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return standardize_intensity(img, self.landmarks)


def _standardize(landmarks: Iterable[float] | None) -> list:
    return [StandardizeIntensity(landmarks)] if landmarks is not None else []


AUGMENTATIONS = ("standard", "strong")
# How a mask reaches the network's size. Nearest-neighbour samples a 1615x840 Tufts mask at every 2.5th pixel,
# a fraction of a pixel off the image's sampling grid; taken to 320x640 and back, it scores Dice 0.973 against
# itself. Area interpolation of the 8-bit mask keeps each network pixel's tooth share as a soft target (0.997).
MASK_RESIZES = {"nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}
# How the X-ray reaches the network's size. Bilinear reads the 2x2 source pixels nearest each output pixel, so a
# 2.5x downscale (Tufts to 320x640) skips most pixels and aliases noise and thin edges; area averages all of them.
IMAGE_RESIZES = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def build_train_transform(height: int, width: int, modality: str = "xray", normalize: bool = True,
                          window: tuple[int, int] | None = None, flip: bool = True,
                          augment: str = "standard", landmarks: Iterable[float] | None = None,
                          mask_resize: str = "nearest", image_resize: str = "linear") -> A.Compose:
    """The seeds' panoramic recipe; `modality="ultrasound"` gives the TG3K variant (speckle, larger affine).
    `augment="strong"` gives X-rays that affine too (scale ±10 %, shift ±5 %, rotation ±10° instead of ±5°),
    for small labelled sets; ultrasound always has it.
    With `window` (H, W), training sees a random crop of that size, taken after the geometric augmentation.
    `flip=False` leaves the horizontal flip to the dataset (TeethDataset, which must renumber the teeth).
    With `landmarks`, each image is first standardised to them (`standardize_intensity`).
    `mask_resize` (MASK_RESIZES) resizes the mask; "area" is for 8-bit masks (SegmentationDataset's), never for
    label maps, whose numbers it would blend. `image_resize` (IMAGE_RESIZES) resizes the image."""
    if augment not in AUGMENTATIONS:
        raise ToothSegError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    flips = [A.HorizontalFlip(p=0.5)] if flip else []
    # Label maps keep their values: albumentations resamples masks with nearest-neighbour interpolation.
    affine = A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5)
    if modality == "xray":
        rotate = A.Rotate(limit=5, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5)
        geometric = [*flips, affine if augment == "strong" else rotate]
        photometric = [
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.OneOf([A.GaussNoise(std_range=(0.01, 0.03)), A.GaussianBlur(blur_limit=(3, 5))], p=0.3),
        ]
    elif modality == "ultrasound":
        geometric = [*flips, affine]
        photometric = [
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.OneOf([A.MultiplicativeNoise(multiplier=(0.85, 1.15), elementwise=True),
                     A.GaussianBlur(blur_limit=(3, 5))], p=0.4),
        ]
    else:
        raise ToothSegError(f"unknown modality {modality!r}; valid: xray, ultrasound")
    # Uniformly placed, not teeth-biased (A.CropNonEmptyMaskIfExists): prediction slides windows over the whole
    # image, so training should see spine, ramus and edges as often as they occur there, which is where stray
    # false-positive blobs come from. It needs no mask either, so the unlabelled views of --semi crop alike.
    crop = [A.RandomCrop(*window)] if window is not None else []
    return A.Compose([*_standardize(landmarks), _resize(height, width, mask_resize, image_resize), *geometric, *crop,
                      *photometric] + _to_tensor(normalize))


def build_eval_transform(height: int, width: int, normalize: bool = True,
                         landmarks: Iterable[float] | None = None, mask_resize: str = "nearest",
                         image_resize: str = "linear") -> A.Compose:
    return A.Compose([*_standardize(landmarks), _resize(height, width, mask_resize, image_resize)]
                     + _to_tensor(normalize))


def _resize(height: int, width: int, mask_resize: str, image_resize: str) -> A.Resize:
    for name, value, valid in (("mask", mask_resize, MASK_RESIZES), ("image", image_resize, IMAGE_RESIZES)):
        if value not in valid:
            raise ToothSegError(f"unknown {name} resize {value!r}; valid: {', '.join(valid)}")
    return A.Resize(height, width, interpolation=IMAGE_RESIZES[image_resize],
                    mask_interpolation=MASK_RESIZES[mask_resize])


def _to_tensor(normalize: bool) -> list:
    scale = A.Normalize(mean=NORM_MEAN, std=NORM_STD, max_pixel_value=255.0) if normalize \
        else A.ToFloat(max_value=255.0)
    return [scale, ToTensorV2()]


def strong_photometric(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A strong intensity perturbation of a normalised (1, H, W) image, geometry untouched: contrast,
    brightness and gamma far beyond the training augmentation, blur, noise and a cut-out box, as the
    strong branch of FixMatch/UniMatch (and a noisy student) uses."""
    x = (image[0].numpy() * NORM_STD + NORM_MEAN).clip(0, 1)
    height, width = x.shape
    if rng.random() < 0.8:
        x = (x - x.mean()) * rng.uniform(0.6, 1.4) + x.mean() + rng.uniform(-0.2, 0.2)
    if rng.random() < 0.5:
        x = x.clip(0, 1) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), rng.uniform(0.3, 1.5))
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(0.01, 0.06), x.shape)
    if rng.random() < 0.5:
        bh, bw = int(height * rng.uniform(0.1, 0.3)), int(width * rng.uniform(0.1, 0.3))
        y, z = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
        x[y:y + bh, z:z + bw] = NORM_MEAN
    return ((torch.from_numpy(np.asarray(x, np.float32).clip(0, 1)) - NORM_MEAN) / NORM_STD)[None]


def modality_of(samples: list[Sample]) -> str:
    """TG3K thyroid ultrasound gets the ultrasound transform; everything else is an X-ray."""
    return "ultrasound" if samples and all(s.source == "tg3k" for s in samples) else "xray"


def normalize_tensor(x: torch.Tensor) -> torch.Tensor:
    return (x - NORM_MEAN) / NORM_STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] for display."""
    return (x * NORM_STD + NORM_MEAN).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# Datasets. Randomness comes from (seed, epoch, index), so results do not depend on the number of
# workers, and a resumed run sees the same data as an uninterrupted one.
# ----------------------------------------------------------------------------------------------
def check_shared_memory(nbytes: int, folder: str = "/dev/shm") -> None:
    """Shared memory lives in /dev/shm on Linux, which a Docker container gets 64 MB of unless told otherwise: a
    cache larger than what is free there crashed its workers with a bus error, not an error that says why."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no such folder (macOS, Windows): nothing to check
        return
    free = stats.f_bavail * stats.f_frsize
    if nbytes > free:
        raise ToothSegError(f"{folder}: the decoded-image cache needs {nbytes / 2**20:,.0f} MB of shared memory and "
                            f"{free / 2**20:,.0f} MB are free there; give it more (docker run --shm-size=8g) or "
                            f"train with --no-cache")


class SharedImages:
    """Decoded uint8 images in one shared-memory buffer. DataLoader workers start from a fork server, so
    each receives the dataset pickled; this buffer travels as one shared-memory handle, not as a copy."""

    def __init__(self, images: list[np.ndarray]):
        self.shapes = [image.shape for image in images]
        self.offsets = np.cumsum([0] + [image.size for image in images]).tolist()
        check_shared_memory(self.offsets[-1])
        self.buffer = torch.empty(self.offsets[-1], dtype=torch.uint8).share_memory_()
        for image, start in zip(images, self.offsets):
            self.buffer[start:start + image.size] = torch.from_numpy(np.ascontiguousarray(image).reshape(-1))

    def __getitem__(self, index: int) -> np.ndarray:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.buffer[start:end].numpy().reshape(self.shapes[index])


class _ImageDataset(Dataset):
    # Randomness is a function of (seed, epoch, draw); a class that is drawn beside another at the same draw
    # numbers (SemiDataset) sets its own stream, so the two do not share one augmentation.
    STREAM = 0

    def __init__(self, samples: list[Sample], transform: A.Compose, *, seed: int = 0,
                 fixed: bool = False, cache: bool = False):
        if not samples:
            raise ToothSegError("no images to build a dataset from; check --images-dir and the index splits")
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.fixed = fixed  # validation: the same corruption/augmentation every epoch
        # Shared memory so that persistent DataLoader workers see set_epoch from the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # A bar for long caches on a terminal only (disable=None), so logs stay readable.
        self._images = SharedImages([to_uint8(read_image(s.image)) for s in tqdm(
            self.samples, desc="caching images", leave=False, disable=None if len(self.samples) >= 200 else True)]) \
            if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def _rng(self, draw: int) -> np.random.Generator:
        epoch = 0 if self.fixed else int(self._epoch)
        # numpy seeds must be non-negative; --seed takes any integer, as utils.set_seed does
        return np.random.default_rng([self.seed % 2**32, epoch, draw, *([self.STREAM] if self.STREAM else [])])

    def __getitem__(self, index: int):
        return self.draw(index, index)

    def draw(self, index: int, draw: int):
        """Item `index` with the randomness of this epoch's draw number `draw` (EpochMix draws one image
        several times an epoch, each time augmented anew)."""
        return self._item(index, self._rng(draw))

    def _image(self, index: int) -> np.ndarray:
        return self._images[index] if self._images is not None else to_uint8(read_image(self.samples[index].image))

    def _meta(self, index: int, image: np.ndarray) -> dict:
        s = self.samples[index]
        return {"path": str(s.image), "pair_id": s.pair_id, "age_group": s.age_group,
                "orig_height": image.shape[0], "orig_width": image.shape[1]}

    def _augment(self, rng: np.random.Generator, **targets) -> dict:
        self.transform.set_random_seed(int(rng.integers(2**31)))
        return self.transform(**targets)


class SegmentationDataset(_ImageDataset):
    """(image (1,H,W) normalised, target (1,H,W) float in [0, 1], meta with the sample's loss "weight").

    Masks are binary, held as 8-bit maps (0 or 255) so that a transform with `mask_resize="area"` gives
    soft targets at the edges. Samples whose pair id is in `soft` are pseudo-labelled: their "mask" is an 8-bit
    probability map (255 * p) used as a soft target, with loss weight `soft_weight`, and with `noise` their
    input also gets `strong_photometric` (a noisy student learns more than one that sees its teacher's view).
    """

    def __init__(self, samples: list[Sample], transform: A.Compose, *, soft: set[str] = frozenset(),
                 soft_weight: float = 1.0, noise: bool = False, **kwargs):
        unlabelled = [s.image for s in samples if s.mask is None]
        if unlabelled:
            raise ToothSegError(f"{unlabelled[0]}: has no mask; segmentation needs labelled pairs")
        super().__init__(samples, transform, **kwargs)
        self.soft, self.soft_weight, self.noise = set(soft), soft_weight, noise
        # Cached, a pair of unequal sizes is found here, by every process alike, not when one rank draws it.
        self._masks = SharedImages([self._read_target(i, self._images.shapes[i]) for i in range(len(self.samples))]) \
            if self._images is not None else None

    def _read_target(self, index: int, size: tuple[int, int]) -> np.ndarray:
        sample = self.samples[index]
        if sample.pair_id in self.soft:
            return check_same_size(to_uint8(read_image(sample.mask)), size, sample.mask, "pseudo-label",
                                   "write the pseudo-labels again with eval.py --split unlabelled --save-probs")
        return check_same_size(read_mask(sample.mask) * 255, size, sample.mask)

    def _mask(self, index: int, image: np.ndarray) -> np.ndarray:
        return self._masks[index] if self._masks is not None else self._read_target(index, image.shape)

    def _item(self, index: int, rng: np.random.Generator):
        image = self._image(index)
        out = self._augment(rng, image=image, mask=self._mask(index, image))
        soft = self.samples[index].pair_id in self.soft
        target = out["mask"].unsqueeze(0).float() / 255.0
        picture = strong_photometric(out["image"], rng) if soft and self.noise else out["image"]
        return picture, target, {**self._meta(index, image), "weight": self.soft_weight if soft else 1.0}


class TeethDataset(_ImageDataset):
    """(image (1,H,W) normalised, class indices (H,W) int64, meta) for the per-tooth task. `classes` lists the
    FDI number of each class (0 first); a tooth number outside it is IGNORE_INDEX (the model cannot name it,
    so it is neither rewarded nor punished there). With `mirror`, half the items are flipped left-right with
    their teeth renumbered to the other side (teeth.mirror_label_map): a plain flip would teach the model that
    a left tooth is a right one. The transform itself must not flip (build_train_transform(flip=False))."""

    def __init__(self, samples: list[Sample], transform: A.Compose, classes: list[int], *, mirror: bool = False,
                 **kwargs):
        missing = [s.image for s in samples if s.teeth is None]
        if missing:
            raise ToothSegError(f"{missing[0]}: has no per-tooth label map; add them with prepare_sts2d.py --teeth-dir")
        super().__init__(samples, transform, **kwargs)
        self.mirror = mirror
        self.lookup = class_lookup(classes, IGNORE_INDEX)
        self._labels = SharedImages([self._read_labels(i, self._images.shapes[i]) for i in range(len(self.samples))]) \
            if self._images is not None else None

    def _read_labels(self, index: int, size: tuple[int, int]) -> np.ndarray:
        return check_same_size(read_label_map(self.samples[index].teeth), size, self.samples[index].teeth, "label map")

    def _item(self, index: int, rng: np.random.Generator):
        image = self._image(index)
        labels = self._labels[index] if self._labels is not None else self._read_labels(index, image.shape)
        if self.mirror and rng.random() < 0.5:
            image, labels = np.ascontiguousarray(image[:, ::-1]), mirror_label_map(labels)
        out = self._augment(rng, image=image, mask=labels)
        return out["image"], torch.from_numpy(self.lookup[out["mask"].numpy()]), {**self._meta(index, image), "weight": 1.0}


class InferenceDataset(_ImageDataset):
    """(image, meta) for prediction; masks, if any, are read at full resolution by the caller. With
    `skip_bad`, an unreadable image gives a blank input and its one-line error in meta["error"] (empty
    for good images), so the caller can predict the rest and list what it skipped."""

    def __init__(self, samples: list[Sample], transform: A.Compose, *, skip_bad: bool = False, **kwargs):
        super().__init__(samples, transform, **kwargs)
        self.skip_bad = skip_bad

    def _item(self, index: int, rng: np.random.Generator):
        try:
            image, error = self._image(index), ""
        except ToothSegError as exc:
            if not self.skip_bad:
                raise
            image, error = np.zeros((1, 1), np.uint8), str(exc)
        return self._augment(rng, image=image)["image"], {**self._meta(index, image), "error": error}


class UnlabelledDataset(_ImageDataset):
    """(weak view, strong view, meta) of an unlabelled image: the weak view is the ordinary training
    augmentation, the strong view the same pixels after `strong_photometric`, so a teacher's label of
    the weak view lines up with the student's strong view pixel for pixel."""
    STREAM = 1  # not the labelled image's augmentation at the same draw

    def _item(self, index: int, rng: np.random.Generator):
        image = self._image(index)
        weak = self._augment(rng, image=image)["image"]
        return weak, strong_photometric(weak, rng), self._meta(index, image)


class EpochMix(Dataset):
    """An epoch of `length` draws from one or more datasets in fixed shares, whatever their sizes (nnU-Net's
    fixed number of iterations per epoch; labelled pairs beside many more pseudo-labelled images). Draws
    [0, n_0) come from the first part, the next n_1 from the second, and so on; the loader shuffles them, so a
    batch mixes the parts in about those shares. Within a part each epoch takes the next n_k items round-robin,
    so over the epochs every item is drawn equally often (within one), and an item drawn twice in one epoch is
    augmented anew each time. One part at its own length is that dataset unchanged. Everything follows from
    (seed, epoch, draw), so workers, processes and a resumed run see the same epoch."""

    def __init__(self, parts: list[_ImageDataset], shares: list[float], length: int):
        if len(parts) != len(shares) or min(shares) < 0 or sum(shares) <= 0 or length < 1:
            raise ToothSegError(f"an epoch needs a positive length and one non-negative share per part, got {length} "
                                f"draws and shares {shares}")
        bounds = np.round(np.cumsum(shares) / sum(shares) * length).astype(int)
        counts = np.diff([0, *bounds.tolist()]).tolist()
        for k, share in enumerate(shares):  # rounding must not starve a part of a small epoch, every epoch alike
            donor = counts.index(max(counts))
            if share > 0 and counts[k] == 0 and counts[donor] > 1:
                counts[k], counts[donor] = 1, counts[donor] - 1
        self.parts, self.counts = parts, counts
        self.starts = [0, *np.cumsum(counts).tolist()]
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.starts[-1]

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        part, count = self.parts[k], self.counts[k]
        return part.draw((int(self._epoch) * count + index - self.starts[k]) % len(part), index)


class SemiDataset(Dataset):
    """Pairs draw i of the labelled set with draw i of the unlabelled one, for the online method. An epoch is
    `length` draws of each (default: the larger set once), each set cycled round-robin by EpochMix, so the pairs
    are the same with any number of workers or processes and after a resume."""

    def __init__(self, labelled: SegmentationDataset, unlabelled: UnlabelledDataset, length: int | None = None):
        length = length or max(len(labelled), len(unlabelled))
        self.labelled, self.unlabelled = EpochMix([labelled], [1], length), EpochMix([unlabelled], [1], length)

    def __len__(self) -> int:
        return len(self.labelled)

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)
        self.unlabelled.set_epoch(epoch)

    def __getitem__(self, index: int):
        image, target, meta = self.labelled[index]
        weak, strong, _ = self.unlabelled[index]
        return image, target, meta, weak, strong


class MIMDataset(_ImageDataset):
    """(masked_img, target_img, mask, meta): `mask` is 1 on pixels hidden from the model."""

    def __init__(self, samples: list[Sample], transform: A.Compose, masker: "MaskGenerator", **kwargs):
        super().__init__(samples, transform, **kwargs)
        self.masker = masker

    def _item(self, index: int, rng: np.random.Generator):
        image = self._image(index)
        target = self._augment(rng, image=image)["image"]
        mask = torch.from_numpy(self.masker(rng, *target.shape[-2:])).unsqueeze(0)
        return target * (1.0 - mask), target, mask, self._meta(index, image)


class RestorationDataset(_ImageDataset):
    """(perturbed_img, target_img, meta) with the Models Genesis corruptions. `transform` must not
    normalise: the corruptions work on [0, 1] intensities, and both outputs are normalised after."""

    def __init__(self, samples: list[Sample], transform: A.Compose, genesis: "GenesisConfig", **kwargs):
        super().__init__(samples, transform, **kwargs)
        self.genesis = genesis

    def _item(self, index: int, rng: np.random.Generator):
        image = self._image(index)
        target = self._augment(rng, image=image)["image"][0].numpy()
        perturbed, target = models_genesis(target, rng, self.genesis)
        to_tensor = lambda a: normalize_tensor(torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(0))
        return to_tensor(perturbed), to_tensor(target), self._meta(index, image)


# ----------------------------------------------------------------------------------------------
# MIM masks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskGenerator:
    """`blocks`: random rectangles of min..max px per side until `ratio` of the image is covered
    (the seeds' style). `patches`: a random `ratio` of the patch_size grid cells (SimMIM/SparK style)."""
    mask_type: str = "blocks"
    ratio: float = 0.55
    min_block: int = 32
    max_block: int = 96
    patch_size: int = 32

    def __post_init__(self):
        if self.mask_type not in ("blocks", "patches"):
            raise ToothSegError(f"unknown mask type {self.mask_type!r}; valid: blocks, patches")
        if not 0 < self.ratio < 1:
            raise ToothSegError(f"--mask-ratio must be in (0, 1), got {self.ratio}")
        if not 1 <= self.min_block <= self.max_block:
            raise ToothSegError(f"need 1 <= --min-block-size <= --max-block-size, got {self.min_block}, {self.max_block}")

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        return self._patches(rng, height, width) if self.mask_type == "patches" else self._blocks(rng, height, width)

    def _patches(self, rng, height, width):
        p = self.patch_size
        gh, gw = -(-height // p), -(-width // p)
        cells = np.zeros(gh * gw, dtype=np.float32)
        cells[rng.permutation(gh * gw)[:max(1, round(gh * gw * self.ratio))]] = 1
        return np.kron(cells.reshape(gh, gw), np.ones((p, p), np.float32))[:height, :width]

    def _blocks(self, rng, height, width):
        mask = np.zeros((height, width), dtype=np.float32)
        target = self.ratio * height * width
        lo, hi = min(self.min_block, height, width), min(self.max_block, height, width)
        for _ in range(10_000):  # bounded; the ratio is reached long before this
            if mask.sum() >= target:
                break
            bh, bw = rng.integers(lo, hi + 1, size=2)
            y, x = rng.integers(0, height - bh + 1), rng.integers(0, width - bw + 1)
            mask[y:y + bh, x:x + bw] = 1
        return mask


# ----------------------------------------------------------------------------------------------
# Models Genesis (Zhou et al. 2019), in 2D on [0, 1] images
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenesisConfig:
    flip_prob: float = 0.4
    local_shuffle_prob: float = 0.5
    nonlinear_prob: float = 0.9
    paint_prob: float = 0.9
    inpaint_rate: float = 0.2  # when painting: in-painting this often, else out-painting


def models_genesis(image: np.ndarray, rng: np.random.Generator, cfg: GenesisConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return (perturbed, target). Flipping changes both; the other transforms only the input."""
    target = image.astype(np.float32, copy=True)
    if rng.random() < cfg.flip_prob:
        axis = int(rng.integers(2))
        target = np.flip(target, axis=axis).copy()
    x = target.copy()
    if rng.random() < cfg.local_shuffle_prob:
        x = local_pixel_shuffle(x, rng)
    if rng.random() < cfg.nonlinear_prob:
        x = bezier_intensity(x, rng)
    if rng.random() < cfg.paint_prob:
        x = inpaint(x, rng) if rng.random() < cfg.inpaint_rate else outpaint(x, rng)
    return x, target


def local_pixel_shuffle(x: np.ndarray, rng: np.random.Generator, n_windows: int = 1000) -> np.ndarray:
    """Shuffle pixels inside many small windows (up to 1/10 of each side), as Models Genesis does."""
    out = x.copy()
    h, w = x.shape
    for _ in range(n_windows):
        bh, bw = rng.integers(1, max(2, h // 10)), rng.integers(1, max(2, w // 10))
        y, z = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        window = x[y:y + bh, z:z + bw].ravel()
        out[y:y + bh, z:z + bw] = rng.permutation(window).reshape(bh, bw)
    return out


def bezier_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random monotone cubic Bezier intensity curve through (0,0) and (1,1), inverted half the time."""
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0, 1, 1000)
    bx = 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t ** 2 * p2[0] + t ** 3
    by = 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t ** 2 * p2[1] + t ** 3
    order = np.argsort(bx)
    bx, by = bx[order], by[order]
    if rng.random() < 0.5:
        by = 1 - by
    return np.interp(x, bx, by).astype(np.float32)


def _random_blocks(rng: np.random.Generator, h: int, w: int, lo: float, hi: float, max_blocks: int = 5):
    """Models Genesis draws up to `max_blocks` blocks, each with probability 0.95, sides in [lo, hi] of the image."""
    for _ in range(max_blocks):
        if rng.random() >= 0.95:
            return
        # At most the image: an input of one or two pixels a side drew a block of two (the draws are unchanged).
        bh = min(h, int(rng.integers(max(1, int(h * lo)), max(2, int(h * hi)) + 1)))
        bw = min(w, int(rng.integers(max(1, int(w * lo)), max(2, int(w * hi)) + 1)))
        yield int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw


def inpaint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fill random blocks (1/6..1/3 of each side) with uniform noise."""
    out = x.copy()
    for y, z, bh, bw in _random_blocks(rng, *x.shape, 1 / 6, 1 / 3):
        out[y:y + bh, z:z + bw] = rng.random((bh, bw), dtype=np.float32)
    return out


def outpaint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace the image with noise except random inner windows (3/7..4/7 of each side)."""
    out = rng.random(x.shape, dtype=np.float32)
    for y, z, bh, bw in _random_blocks(rng, *x.shape, 3 / 7, 4 / 7):
        out[y:y + bh, z:z + bw] = x[y:y + bh, z:z + bw]
    return out
