"""The dataset index (sts2d_index.csv), sample discovery, splits and mask reading, without torch.

prepare_sts2d.py and fbf.py need these but no training stack, so this module imports only
utils.py (cv2, numpy): their --help and small runs do not wait seconds for torch and albumentations.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from utils import IMAGE_EXTENSIONS, ToothSegError, atomic_write_text, broken_link, is_image_file, read_image

INDEX_NAME = "sts2d_index.csv"
PROCESSED_NAME = "processed_2d"
# One row per file under processed_2d/. `rel_path` is relative to processed_2d and uses "/".
# `pair_id` is unique among image rows; a mask row carries its image's pair_id.
# `split` is train/val/test for labelled pairs and pretrain for unlabelled images.
# `sha1` is the file's content hash; `dup_group` is shared by all pairs whose image bytes are identical.
# `mask_threshold` (mask rows only) is T in "a source mask pixel is tooth when its value > T".
# `teeth` (mask rows only) is the rel_path of the pair's per-tooth label map (teeth.py), empty when it has none.
INDEX_COLUMNS = (
    "rel_path", "age_group", "label_status", "is_mask", "pair_id",
    "split", "width", "height", "sha1", "dup_group", "source", "mask_threshold", "teeth",
)
LATER_COLUMNS = ("mask_threshold", "teeth")  # added after the first indexes were written: those read as None
# Folders that hold labels, never images, under their usual names (STS-2D-Tooth's Mask, UFBA's teeth_fdi; any
# case): image listings skip them and fbf.py copies them unfiltered. A pool had taken their masks for X-rays.
MASK_FOLDERS = ("masks", "mask", "labels", "label", "gt", "ground_truth")
TEETH_FOLDERS = ("teeth", "teeth_fdi")
LABEL_FOLDERS = (*MASK_FOLDERS, *TEETH_FOLDERS)
AGE_GROUPS = ("adult", "children")
LABEL_STATUSES = ("labeled", "unlabeled")
SPLITS = ("train", "val", "test", "pretrain")


def read_index(path: str | os.PathLike) -> list[dict]:
    """Read sts2d_index.csv into dicts (is_mask as bool, width/height as int, mask_threshold as int or None,
    teeth as a rel_path or None)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = set(INDEX_COLUMNS) - set(LATER_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ToothSegError(
                    f"{path}: not a ToothSeg index (missing columns {sorted(missing)}); rebuild it with prepare_sts2d.py --force")
            rows = list(reader)
        for line, row in enumerate(rows, start=2):
            try:
                row["is_mask"] = row["is_mask"].strip().lower() in ("true", "1")
                row["width"], row["height"] = int(row["width"]), int(row["height"])
                row["mask_threshold"] = int(row["mask_threshold"]) if row.get("mask_threshold") else None
            except (AttributeError, ValueError):  # a short row (None) or a cell that is no number
                raise ToothSegError(f"{path}: line {line} is damaged (a short row, or a width, height or mask_threshold "
                                    f"that is no number); rebuild the index with prepare_sts2d.py --force") from None
            row["teeth"] = row.get("teeth") or None
    except OSError as exc:
        raise ToothSegError(f"{path}: cannot read index ({exc.strerror}); run prepare_sts2d.py first") from None
    except UnicodeDecodeError:
        raise ToothSegError(f"{path}: is not UTF-8 text; rebuild the index with prepare_sts2d.py --force") from None
    return rows


def write_index(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write the index atomically, in INDEX_COLUMNS order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in INDEX_COLUMNS})
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# Finding samples: from the index, or from bare folders
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None
    pair_id: str
    age_group: str = "adult"
    source: str = ""
    teeth: Path | None = None   # the per-tooth label map, where the index lists one


def find_index(images_dir: str | os.PathLike, index: str | os.PathLike | None = None,
               masks_dir: str | os.PathLike | None = None) -> Path | None:
    """The index given explicitly, else sts2d_index.csv inside `images_dir` or its parent (the parent of the
    folder a link points to too: a link to a data root's processed_2d has the data root's index), else None.
    A `masks_dir` given without an index means bare folders: no index is looked for (one beside the images
    folder took over and the masks given were ignored)."""
    if index is not None:
        index = Path(index)
        if not index.is_file():
            raise ToothSegError(f"{index}: index file not found; check --index or run prepare_sts2d.py")
        return index
    if masks_dir is not None:
        return None
    images_dir = Path(images_dir)
    for candidate in (images_dir / INDEX_NAME, images_dir.parent / INDEX_NAME, images_dir.resolve().parent / INDEX_NAME):
        if candidate.is_file():
            return candidate
    return None


def index_base_dir(images_dir: str | os.PathLike, index_path: Path) -> Path:
    """Where the index's rel_paths resolve: `images_dir` (processed_2d, or an fbf mirror of it), or
    `images_dir/processed_2d` when the user passed the data root."""
    images_dir = Path(images_dir)
    if index_path.parent == images_dir and (images_dir / PROCESSED_NAME).is_dir():
        return images_dir / PROCESSED_NAME
    return images_dir


def samples_from_index(index_path: Path, base_dir: Path, splits: Iterable[str],
                       labeled_only: bool = False) -> list[Sample]:
    """Image samples (with their masks where labelled) whose split is in `splits`, in index order."""
    rows = read_index(index_path)
    splits = set(splits)
    mask_rows = {r["pair_id"]: r for r in rows if r["is_mask"]}
    samples = []
    for r in rows:
        if r["is_mask"] or r["split"] not in splits:
            continue
        mask_row = mask_rows.get(r["pair_id"])
        if labeled_only and mask_row is None:
            continue
        mask = base_dir / mask_row["rel_path"] if mask_row else None
        teeth = base_dir / mask_row["teeth"] if mask_row and mask_row["teeth"] else None
        samples.append(Sample(base_dir / r["rel_path"], mask, r["pair_id"], r["age_group"], r["source"], teeth))
    missing = [s.image for s in samples[:1] if not s.image.is_file()]
    if missing:
        raise ToothSegError(f"{missing[0]}: listed in {index_path} but missing; "
                            f"pass the processed_2d folder as --images-dir, or rebuild with prepare_sts2d.py --force")
    return samples


def label_folder(relative: Path, names: Iterable[str] = LABEL_FOLDERS) -> str | None:
    """The first folder of a path below a data folder that is named one of `names` (any case), or None."""
    return next((part for part in relative.parts[:-1] if part.lower() in names), None)


def files_below(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Every file below `folder`, sorted, through links to folders too (Path.rglob skips them before Python
    3.13: a linked sub-folder of X-rays went unread), but into no folder twice (a link loop; folders are
    visited in name order, so which path a file is listed by does not depend on the file system), and not
    into hidden folders or the `exclude` folders (another input, or outputs, that lie inside it)."""
    found, seen = [], {os.path.realpath(p) for p in exclude} - {os.path.realpath(folder)}
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            folders.clear()
            continue
        seen.add(os.path.realpath(root))
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        # A broken link is listed too: reading it names it, where leaving it out skipped an X-ray without a word.
        found += [path for path in (Path(root) / name for name in names) if path.is_file() or not path.exists()]
    return sorted(found)


def list_images(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files below `folder`, sorted, skipping anything inside a LABEL_FOLDERS folder or an `exclude`
    folder."""
    return [p for p in files_below(folder, exclude) if is_image_file(p) and label_folder(p.relative_to(folder)) is None]


def by_stem(paths: list[Path], flag: str) -> dict[str, Path]:
    """Files by name stem, the id a bare folder's images and masks are paired and saved by; two files with one
    stem (x.jpg and x.png, a/x.png and b/x.png) would silently share one id, so they are refused."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.stem in found:
            broken = next((p for p in (path, found[path.stem]) if broken_link(p)), None)
            if broken is not None:  # a leftover link beside the file it once pointed to
                raise ToothSegError(f"{broken}: {broken_link(broken)}, beside "
                                    f"{path if broken != path else found[path.stem]} of the same name stem; remove it")
            raise ToothSegError(f"{path}: has the same name stem as {found[path.stem]}, and files are paired and "
                                f"saved by stem; rename one, or move it out of {flag}")
        found[path.stem] = path
    return found


def list_masks(masks_dir: Path, same_tree: bool = False, exclude: Iterable[Path] = ()) -> list[Path]:
    """Mask files below `masks_dir`, sorted, none in an `exclude` folder; in `same_tree` (one folder holding
    images/ and masks/) only those in a MASK_FOLDERS folder, not the images beside them nor per-tooth label maps
    in 'teeth'."""
    return [p for p in files_below(masks_dir, exclude) if is_image_file(p) and not (
        same_tree and label_folder(p.relative_to(masks_dir), MASK_FOLDERS) is None)]


def samples_from_folders(images_dir: Path, masks_dir: Path | None = None) -> list[Sample]:
    """Bare folders: every image, paired by file stem with a mask in `masks_dir` when one is given."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ToothSegError(f"{images_dir}: images folder not found; check --images-dir")
    images = list_images(images_dir, exclude=[masks_dir] if masks_dir is not None else [])
    if not images:
        raise ToothSegError(f"{images_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); check --images-dir")
    by_stem(images, "--images-dir")
    if masks_dir is None:
        return [Sample(p, None, p.stem) for p in images]
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise ToothSegError(f"{masks_dir}: masks folder not found; check --masks-dir")
    masks = by_stem(list_masks(masks_dir, same_tree=masks_dir.resolve() == images_dir.resolve()), "--masks-dir")
    unpaired = [p for p in images if p.stem not in masks]
    if unpaired:
        raise ToothSegError(f"{unpaired[0]}: no mask named {unpaired[0].stem}.* in {masks_dir} "
                            f"({len(unpaired)} unpaired images); give matching --masks-dir or build an index with prepare_sts2d.py")
    orphans = sorted(set(masks) - {p.stem for p in images})
    if orphans:  # a subset of a set's X-rays is scored against its whole masks folder, so a note, not an error
        print(f"note: {len(orphans)} masks in {masks_dir} have no image in {images_dir} (first: "
              f"{masks[orphans[0]].name}); they are left out")
    return [Sample(p, masks[p.stem], p.stem) for p in images]


def split_by_name(samples: list[Sample], val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[Sample]]:
    """A deterministic train/val/test split from file names alone (used when there is no index)."""
    def key(s: Sample) -> str:
        return hashlib.sha1(f"{seed}:{s.pair_id}".encode()).hexdigest()

    ordered = sorted(samples, key=key)
    n_test = round(len(ordered) * test_ratio)
    n_val = round(len(ordered) * val_ratio)
    parts = {"test": ordered[:n_test], "val": ordered[n_test:n_test + n_val], "train": ordered[n_test + n_val:]}
    return {name: sorted(part, key=lambda s: s.pair_id) for name, part in parts.items()}


def pretraining_samples(images_dir: str | os.PathLike, index: str | os.PathLike | None = None) -> list[Sample]:
    """Every image except labelled val/test ones, so that nothing leaks into evaluation."""
    index_path = find_index(images_dir, index)
    if index_path is None:
        print(f"note: no {INDEX_NAME} in or beside {images_dir}: pretraining on every image there. If you will "
              f"evaluate on some of them, build an index with prepare_sts2d.py so val/test stay unseen.")
        return samples_from_folders(Path(images_dir))
    return samples_from_index(index_path, index_base_dir(images_dir, index_path), ("train", "pretrain"))


def segmentation_splits(images_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None, *,
                        index: str | os.PathLike | None = None, val_ratio: float = 0.1, test_ratio: float = 0.1,
                        seed: int = 0) -> dict[str, list[Sample]]:
    """Labelled train/val/test samples: from the index when there is one, else split by file name."""
    index_path = find_index(images_dir, index, masks_dir)
    if index_path is not None:
        base = index_base_dir(images_dir, index_path)
        splits = {name: samples_from_index(index_path, base, (name,), labeled_only=True) for name in ("train", "val", "test")}
    else:
        splits = split_by_name(samples_from_folders(Path(images_dir), Path(masks_dir or images_dir)), val_ratio, test_ratio, seed)
    if not splits["train"]:
        raise ToothSegError(f"{index_path or images_dir}: no labelled training pairs; check --images-dir/--masks-dir")
    return splits


def hold_out(samples: list[Sample], fraction: float, minimum: int = 1, maximum: int = 64) -> tuple[list[Sample], list[Sample]]:
    """A small fixed validation part of the pretraining pool, chosen by a hash of the pair id."""
    if len(samples) < 2:
        where = f" in {samples[0].image.parent}" if samples else ""
        raise ToothSegError(f"need at least 2 images to hold out a validation set, found {len(samples)}{where}; give "
                            f"--images-dir a folder with more")
    n_val = min(max(minimum, round(len(samples) * fraction)), maximum, len(samples) - 1)
    ranked = sorted(samples, key=lambda s: hashlib.sha1(s.pair_id.encode()).hexdigest())
    held = {s.pair_id for s in ranked[:n_val]}
    return [s for s in samples if s.pair_id not in held], [s for s in samples if s.pair_id in held]


def subset_fraction(samples: list[Sample], fraction: float, seed: int, limit: int | None = None) -> list[Sample]:
    """A deterministic subset of `fraction` of the samples (at least one, at most `limit`), for low-label
    studies. Smaller fractions and limits are nested inside larger ones for the same seed (the limit keeps the
    first of the same random ranking, not the first names)."""
    if not 0 < fraction <= 1:
        raise ToothSegError(f"label fraction must be in (0, 1], got {fraction}")
    ranked = sorted(samples, key=lambda s: hashlib.sha1(f"{seed}:{s.pair_id}".encode()).hexdigest())
    keep = {s.pair_id for s in ranked[:min(max(1, round(len(samples) * fraction)), limit or len(samples))]}
    return [s for s in samples if s.pair_id in keep]


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
# JPEG rings around edges, so a mask saved as JPEG has stray low values beside the tooth: `> 0` grows a
# Tufts mask by 10-20 % of its area, while the middle of the range keeps the drawn outline. Lossless
# masks may mark tooth with any non-zero value (1, 255, a label number), so there only 0 is background.
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")  # the (possibly) lossy ones among utils.IMAGE_EXTENSIONS
LOSSY_MASK_THRESHOLD = 127


def default_mask_threshold(path: str | os.PathLike) -> int:
    """T in "a mask pixel is tooth when its value > T", from the file name: 127 for lossy formats, 0 otherwise."""
    return LOSSY_MASK_THRESHOLD if Path(path).suffix.lower() in LOSSY_EXTENSIONS else 0


def read_mask(path: str | os.PathLike, threshold: int | None = None) -> np.ndarray:
    """A binary mask as uint8 0/1: pixels > `threshold` (None: default_mask_threshold(path)) are foreground."""
    return binarise_mask(read_image(path), path, threshold)


def binarise_mask(mask: np.ndarray, path: str | os.PathLike, threshold: int | None = None) -> np.ndarray:
    """`mask` > `threshold` as uint8 0/1 (None: default_mask_threshold(path)). A lossy mask that marks tooth
    with small values (1, 2, ...) would come out empty by the default > 127 rule: it is refused instead."""
    if threshold is None:
        threshold = default_mask_threshold(path)
        if threshold and mask.any() and mask.max() <= threshold:
            raise ToothSegError(f"{path}: a JPEG/WebP mask whose marked pixels are all at most {mask.max()}, so the rule "
                                f"for these lossy formats (tooth > {threshold}) leaves it empty; if it marks tooth with small values, "
                                f"prepare it with prepare_sts2d.py --mask-threshold 0 (--mask-threshold {threshold} "
                                f"keeps it empty)")
    return (mask > threshold).astype(np.uint8)


def source_mask_threshold(samples: list[Sample], index_path: Path | None) -> int | None:
    """The threshold that made the masks of `samples` binary, for the checkpoint's record: what the index
    recorded (prepare_sts2d.py applied it to the source masks), or the format rule of bare mask files;
    None when the samples mix thresholds or an older index did not record one."""
    if index_path is not None:
        wanted = {s.pair_id for s in samples}
        found = {r["mask_threshold"] for r in read_index(index_path) if r["is_mask"] and r["pair_id"] in wanted}
    else:
        found = {default_mask_threshold(s.mask) for s in samples if s.mask is not None}
    return found.pop() if len(found) == 1 else None


def unlabelled_pool(images_dir: str | os.PathLike, index: str | os.PathLike | None, train: list[Sample],
                    labelled: Iterable[str]) -> list[Sample]:
    """What a semi-supervised run may learn from without labels: the labelled training images its label
    fraction left out (masks dropped), then the index's unlabelled images (split pretrain). Never val/test."""
    labelled = set(labelled)
    pool = [replace(s, mask=None, teeth=None) for s in train if s.pair_id not in labelled]
    index_path = find_index(images_dir, index)
    if index_path is not None:
        pool += samples_from_index(index_path, index_base_dir(images_dir, index_path), ("pretrain",))
    return pool
