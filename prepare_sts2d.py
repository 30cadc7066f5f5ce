"""Build processed_2d/ and sts2d_index.csv from STS-2D-Tooth, a plain images/masks folder pair,
TG3K, or the built-in synthetic panoramic phantom, plus any folders of unlabelled images.

    python prepare_sts2d.py --zip-dir downloads/             # SD-Tooth.zip.001 ... .015, read in place
    python prepare_sts2d.py --raw-dir raw/                   # an extracted STS-2D-Tooth tree (or an ancestor)
    python prepare_sts2d.py --images-dir imgs --masks-dir masks
    python prepare_sts2d.py --images-dir imgs --masks-dir masks --teeth-dir teeth  # + per-tooth labels
    python prepare_sts2d.py --tg3k-dir tg3k/                 # thyroid ultrasound, stored as adult/labeled
    python prepare_sts2d.py --synthetic 60 --data-root runs/demo/data
    python prepare_sts2d.py --images-dir I --masks-dir M --unlabelled-dir tufts=../tufts/images more/

Output in --data-root: processed_2d/{adult,children}/{labeled,unlabeled}/{images,masks}/<pair_id>.png
(8-bit grey images, masks 0/255), with --teeth-dir (and for the phantom) per-tooth label maps in
{age_group}/labeled/teeth/<pair_id>.png (8-bit, each pixel its tooth's FDI number, 0 background), and
sts2d_index.csv, one row per image or mask (columns in index.INDEX_COLUMNS; a mask row's `teeth` names
its pair's label map).

Rules:
- Images are paired with masks by file stem inside the same age group and label status; a mask may
  also carry one of the suffixes in MASK_SUFFIXES (x_mask.png pairs with x.png) when that is
  unambiguous. Folder names match without regard to case.
- A mask pixel is tooth when its value > T. T is index.default_mask_threshold's rule: 127 for lossy
  (JPEG) masks, whose compression noise lies near 0 and 255 (TG3K, the Tufts Dental Database), and 0
  for lossless ones (PNG, BMP, TIFF), which may mark tooth with any non-zero value. --mask-threshold
  sets T for every mask; the index records it per mask (`mask_threshold`). 16-bit images are scaled
  to 8 bits.
- Splits: labelled pairs go to train/val/test (--val-ratio, --test-ratio), stratified by age group
  and deterministic in --seed; unlabelled images go to pretrain. Byte-identical images form a
  duplicate group (`dup_group`, the group's first labelled pair_id, else its first) that always
  lands in one split: an unlabelled copy of a labelled image takes that image's split, so it can't
  leak into pretraining when its twin is in val/test, and adding unlabelled copies never moves a
  labelled image to another split. Duplicate groups are listed in duplicates.csv, and groups whose
  masks disagree are printed.
- A stratum of n >= 3 duplicate groups gives at least one to val and one to test (when the ratio is
  > 0) and keeps at least one for train; smaller strata go to train.
- TG3K keeps its official split: tg3k-trainval.json's "val" becomes our test split, and val is
  carved from its "train" list by --val-ratio.
- --unlabelled-dir [NAME=]DIR ... adds to the source every image below each DIR (recursively,
  skipping folders named masks or teeth in any case) as adult/unlabeled, split pretrain, with source
  `unlabelled:NAME`. Adult because a bare image says nothing about the patient's age. NAME defaults
  to DIR's folder name, or its parent's when that is generic (images/, img/: tufts-dev/images is
  `tufts-dev`); two pools with one name must be told apart with NAME=. A pool image's pair_id is its
  path below DIR without the extension, made file-name safe (sub/1.jpg: sub_1); when the labelled
  source or an earlier pool already has that id, it becomes NAME_<id> (tufts-dev_1). Pool images
  take part in the duplicate rule below like any unlabelled image. A missing or image-less DIR, or
  --unlabelled-dir without a source, is a one-line error.
- Bad input (an undecodable image, a mask whose size differs from its image, an image without a
  mask or a mask without an image, an unsafe zip member path) stops the run with a one-line error
  naming the file, unless --skip-bad: then the files are left out and listed in rejected.csv.
- Per-tooth labels (--teeth-dir, and the phantom's): TEETH_RULES below, which --help prints.
- The output is rebuilt in a temporary folder and swapped in at the end, so a failed run leaves the
  previous output intact. A second run with the same source, pools and settings does nothing and
  says so (prepare_stamp.json records them); --force rebuilds. The source is only read.
"""
from __future__ import annotations

import bisect
import csv
import functools
import hashlib
import io
import json
import os
import re
import shutil
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable

import cv2
import numpy as np
from tqdm import tqdm

import phantom
import teeth
from index import (AGE_GROUPS, INDEX_NAME, LABEL_STATUSES, LOSSY_EXTENSIONS, PROCESSED_NAME, SPLITS, TEETH_FOLDERS,
                   binarise_mask, default_mask_threshold, files_below, label_folder, list_images, list_masks, read_index,
                   write_index)
from utils import (ToothSegError, atomic_write_bytes, atomic_write_text, cannot_read, check_output_dir, decode_image,
                   is_image_file, make_parser, run_cli, to_uint8)

STAMP_NAME = "prepare_stamp.json"
REJECTED_NAME = "rejected.csv"
DUPLICATES_NAME = "duplicates.csv"
STAMP_VERSION = 3  # bump when the output format changes, so older builds are redone
STS_FOLDER = "sts-2d-tooth"
AGE_FOLDERS = {"a-pxi": "adult", "c-pxi": "children"}
STATUS_FOLDERS = {"labeled": "labeled", "labelled": "labeled", "unlabeled": "unlabeled", "unlabelled": "unlabeled"}
KIND_FOLDERS = {"image": "image", "images": "image", "mask": "mask", "masks": "mask"}
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "_label", "-label", "_gt", "-gt", "_seg", "-seg")
ZIP_PART = re.compile(r"^(?P<prefix>.+\.zip)\.(?P<number>\d{3})$", re.IGNORECASE)
POOL_KIND = "unlabelled:"     # + the pool's name: the `source` of an --unlabelled-dir image
POOL_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)=(?P<folder>.+)$")
GENERIC_FOLDERS = {"images", "image", "imgs", "img"}  # a pool named after one of these is named after its parent
LABELME_EXTENSION = ".json"
TEETH_RULES = """Per-tooth labels (--teeth-dir DIR, files matched to --images-dir by file stem, as masks are):
- A lossless image (PNG, BMP, TIFF) whose pixels hold FDI numbers (11..48, 51..85), 0 for background.
  Another value, a colour image or a JPEG (its compression changes the numbers) is a bad file.
- A labelme 5.x .json file with one polygon per tooth, labelled with its FDI number first
  ("14 - 1st Premolar") or a primary tooth's Universal letter (A-E = 55..51, F-J = 61..65,
  K-O = 75..71, P-T = 81..85). Bad files: an unknown label, a shape other than a polygon, two polygons
  with one number, a polygon wholly outside the image, imageHeight/imageWidth other than the image's
  size. Counted and printed: a pixel inside two polygons goes to the smaller tooth; a polygon partly
  outside the image is clipped to it; a file without polygons labels no tooth, so its image gets no
  label map.
- With --masks-dir the given masks stay the masks of the binary task (the teeth' union may differ:
  the printed IoU says how much); without it each mask is the union of the teeth (label > 0), and an
  image without teeth (no teeth file, or one without polygons) is a bad file. With --masks-dir an
  image without a teeth file simply gets no label map.
- Bad files stop the run with a one-line error naming the file, or with --skip-bad leave their pair
  out (rejected.csv). The label maps go to {age_group}/labeled/teeth/<pair_id>.png, named in the
  mask row's `teeth` column; fbf.py copies teeth/ folders unfiltered and image listings skip them.
- --synthetic always writes label maps: the phantom numbers its teeth by quadrant and slot."""


# ----------------------------------------------------------------------------------------------
# What a source yields: files with their place in the layout, read lazily
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFile:
    name: str                     # shown in messages: a path, or "<zip part>:<member>"
    read: Callable[[], bytes]
    stamp: str                    # identifies this version of the file for the up-to-date check


@dataclass(frozen=True)
class Found:
    age_group: str
    label_status: str
    kind: str                     # "image", "mask" or "teeth" (a per-tooth label file)
    stem: str
    file: SourceFile
    preset_split: str = ""        # TG3K: "test" or "trainval" from its json


@dataclass
class Source:
    kind: str                     # the index's `source` column
    description: str
    files: list[Found]
    rejects: list[tuple[str, str]]
    close: Callable[[], None] = lambda: None
    masks_from_teeth: bool = False  # no mask files: each labelled image's mask is the union of its teeth


class BadInput(Exception):
    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def _file_on_disk(path: Path) -> SourceFile:
    try:
        st = path.stat()
    except OSError as exc:  # a broken link, or a file removed while listing
        raise ToothSegError(f"{path}: {cannot_read(path, exc)}; restore it or remove it from the folder") from None
    return SourceFile(str(path), path.read_bytes, f"{st.st_size}:{st.st_mtime_ns}")


def _child_dirs(folder: Path, names: dict[str, str]) -> list[tuple[str, Path]]:
    """Sub-folders whose lower-cased name is a key of `names`, as (value, path); others are noted."""
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if child.name.lower() in names:
            found.append((names[child.name.lower()], child))
        elif not child.name.startswith((".", "__")):
            print(f"note: ignoring unexpected folder {child}")
    return found


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def find_sts_folder(raw_dir: Path) -> Path:
    """The STS-2D-Tooth folder: `raw_dir` itself or the single one below it (any case)."""
    if not raw_dir.is_dir():
        raise ToothSegError(f"{raw_dir}: folder not found; check --raw-dir")
    if raw_dir.name.lower() == STS_FOLDER:
        return raw_dir
    matches = []
    for root, dirs, _ in os.walk(raw_dir):
        dirs.sort()
        matches += [Path(root) / d for d in dirs if d.lower() == STS_FOLDER]
        dirs[:] = [d for d in dirs if d.lower() != STS_FOLDER]
    if not matches:
        raise ToothSegError(f"{raw_dir}: no STS-2D-Tooth folder inside; point --raw-dir at the extracted SD-Tooth tree")
    if len(matches) > 1:
        raise ToothSegError(f"{raw_dir}: several STS-2D-Tooth folders ({matches[0]}, {matches[1]}); point --raw-dir at one of them")
    return matches[0]


def source_from_raw(raw_dir: Path) -> Source:
    sts = find_sts_folder(raw_dir)
    files = []
    for age, age_dir in _child_dirs(sts, AGE_FOLDERS):
        for status, status_dir in _child_dirs(age_dir, STATUS_FOLDERS):
            for kind, kind_dir in _child_dirs(status_dir, KIND_FOLDERS):
                files += [Found(age, status, kind, p.stem, _file_on_disk(p))
                          for p in sorted(kind_dir.iterdir()) if p.is_file() and is_image_file(p)]
    return Source("raw", f"extracted tree {sts}", files, [])


def is_teeth_file(path: Path, below: Path, beside_images: bool) -> bool:
    """A labelme file, or a label map: beside the images (labelme's own layout, --teeth-dir = --images-dir) only
    one in a TEETH_FOLDERS folder, not the X-rays."""
    if path.suffix.lower() == LABELME_EXTENSION:
        return not path.name.startswith(".")
    return is_image_file(path) and (not beside_images or label_folder(path.relative_to(below), TEETH_FOLDERS) is not None)


def source_from_folders(images_dir: Path, masks_dir: Path | None, teeth_dir: Path | None = None,
                        not_images: Iterable[Path] = ()) -> Source:
    """A folder of images, with one of same-named masks and/or one of same-named per-tooth label files
    (label maps or labelme files), taken as adult/labeled. Each folder is read with its sub-folders, as eval
    reads it (index.list_images, index.list_masks), so an image in a sub-folder is paired, not left out; the
    other folders and `not_images` (pools, this preparation's outputs) are not read as images when inside it."""
    folders = {"image": ("--images-dir", images_dir), "mask": ("--masks-dir", masks_dir), "teeth": ("--teeth-dir", teeth_dir)}
    files, not_images = [], list(not_images)
    for kind, (flag, folder) in folders.items():
        if folder is None:
            continue
        if not folder.is_dir():
            raise ToothSegError(f"{folder}: folder not found; check {flag}")
        if kind == "image":
            paths = list_images(folder, [f for f in (masks_dir, teeth_dir, *not_images) if f is not None])
        elif kind == "teeth":
            beside_images = folder.resolve() == images_dir.resolve()
            paths = [p for p in files_below(folder, not_images) if is_teeth_file(p, folder, beside_images)]
        else:  # this preparation's outputs inside the masks folder are no masks either
            paths = list_masks(folder, same_tree=folder.resolve() == images_dir.resolve(), exclude=not_images)
        found = [Found("adult", "labeled", kind, p.stem, _file_on_disk(p)) for p in paths]
        if kind == "teeth" and not found:
            raise ToothSegError(f"{folder}: no label maps or labelme files found; check {flag}")
        files += found
    given = " + ".join(str(folder) for _, folder in folders.values() if folder is not None)
    return Source("folder", f"folders {given}", files, [], masks_from_teeth=masks_dir is None)


class ConcatenatedParts(io.RawIOBase):
    """The zip parts read as one seekable stream, so zipfile can open a split download without a
    merged copy. Parts are opened on first use and closed with the stream."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self.paths = paths
        sizes = [p.stat().st_size for p in paths]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.size = sum(sizes)
        self.pos = 0
        self.handles: dict[int, io.BufferedReader] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the zip")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0
        part = bisect.bisect_right(self.starts, self.pos) - 1
        if part not in self.handles:
            self.handles[part] = open(self.paths[part], "rb")
        handle = self.handles[part]
        handle.seek(self.pos - self.starts[part])
        n = handle.readinto(memoryview(buffer)[:min(len(buffer), self.size - self.pos)])
        self.pos += n
        return n

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
        super().close()


def find_zip_parts(zip_dir: Path) -> list[Path]:
    """SD-Tooth.zip.001, .002, ... in order (or a single .zip). A gap in the numbering is an error."""
    if not zip_dir.is_dir():
        raise ToothSegError(f"{zip_dir}: folder not found; check --zip-dir")
    numbered = defaultdict(dict)
    for p in zip_dir.iterdir():
        match = ZIP_PART.match(p.name)
        if match and p.is_file():
            numbered[match["prefix"]][int(match["number"])] = p
    if not numbered:
        whole = sorted(p for p in zip_dir.iterdir() if p.suffix.lower() == ".zip" and p.is_file())
        if len(whole) == 1:
            return whole
        raise ToothSegError(f"{zip_dir}: no zip parts (SD-Tooth.zip.001, .002, ...) found; check --zip-dir")
    if len(numbered) > 1:
        raise ToothSegError(f"{zip_dir}: parts of several zips ({', '.join(sorted(numbered))}); keep one set per folder")
    prefix, parts = next(iter(numbered.items()))
    for number in range(1, max(parts) + 1):
        if number not in parts:
            raise ToothSegError(f"{zip_dir / f'{prefix}.{number:03d}'}: zip part missing "
                                f"(found {len(parts)} of .001-.{max(parts):03d}); download it and run again")
    return [parts[n] for n in sorted(parts)]


def source_from_zip(zip_dir: Path) -> Source:
    parts = find_zip_parts(zip_dir)
    label = f"{parts[0]}" + (f" (+{len(parts) - 1} parts)" if len(parts) > 1 else "")
    stream = io.BufferedReader(ConcatenatedParts(parts), buffer_size=1 << 20)
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        stream.close()
        raise ToothSegError(f"{label}: not a readable zip ({exc}); the download is corrupt or a last part is missing") from None

    def reader(info: zipfile.ZipInfo, name: str) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return archive.read(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise BadInput(name, f"corrupt zip member ({exc})") from None
        return read

    files, rejects, skipped = [], [], 0
    for info in archive.infolist():
        parts_of_name = PurePosixPath(info.filename.replace("\\", "/")).parts
        lowered = [p.lower() for p in parts_of_name]
        if STS_FOLDER not in lowered or info.is_dir():
            continue  # only STS-2D-Tooth is extracted
        name = f"{parts[0].name}:{info.filename}"
        if info.filename.startswith(("/", "\\")) or ".." in parts_of_name or re.match(r"^[A-Za-z]:", info.filename):
            rejects.append((name, "zip member path escapes the target folder; refused"))
            continue
        layout = lowered[lowered.index(STS_FOLDER) + 1:]
        if len(layout) != 4 or layout[0] not in AGE_FOLDERS or layout[1] not in STATUS_FOLDERS or layout[2] not in KIND_FOLDERS:
            skipped += 1
            continue
        if not is_image_file(Path(parts_of_name[-1])):
            continue
        files.append(Found(AGE_FOLDERS[layout[0]], STATUS_FOLDERS[layout[1]], KIND_FOLDERS[layout[2]],
                           PurePosixPath(parts_of_name[-1]).stem,
                           SourceFile(name, reader(info, name), f"{info.CRC}:{info.file_size}")))
    if skipped:
        print(f"note: ignored {skipped} STS-2D-Tooth zip members outside {{A,C}}-PXI/{{Labeled,Unlabeled}}/{{Image,Mask}}/")

    def close() -> None:  # ZipFile leaves a stream it was given open
        archive.close()
        stream.close()

    return Source("zip", f"zip {label}", files, rejects, close=close)


def source_from_tg3k(tg3k_dir: Path) -> Source:
    """TG3K: thyroid-image/NNNN.jpg, thyroid-mask/NNNN.jpg and tg3k-trainval.json, whose integers
    index the numerically sorted image list. Stored as adult/labeled."""
    if not tg3k_dir.is_dir():
        raise ToothSegError(f"{tg3k_dir}: folder not found; check --tg3k-dir")
    candidates = [tg3k_dir] + [p for p in sorted(tg3k_dir.iterdir()) if p.is_dir() and p.name.lower() == "tg3k"]
    root = next((c for c in candidates if any(p.name.lower() == "thyroid-image" for p in c.iterdir() if p.is_dir())), None)
    if root is None:
        raise ToothSegError(f"{tg3k_dir}: no thyroid-image folder (looked in it and in tg3k/); point --tg3k-dir at the TG3K folder")
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "thyroid-mask" not in folders:
        raise ToothSegError(f"{root}: no thyroid-mask folder beside thyroid-image; the TG3K download is incomplete")
    split_json = next((p for p in root.iterdir() if p.name.lower() == "tg3k-trainval.json"), root / "tg3k-trainval.json")
    try:
        split = json.loads(split_json.read_text())
        train, val = [int(i) for i in split["train"]], [int(i) for i in split["val"]]
    except OSError as exc:
        raise ToothSegError(f"{split_json}: cannot read ({exc.strerror}); TG3K needs its train/val list") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ToothSegError(f"{split_json}: not a TG3K split file ({exc!r}); expected {{\"train\": [ints], \"val\": [ints]}}") from None

    def numeric(p: Path):
        return (int(p.stem), p.name) if p.stem.isdigit() else (float("inf"), p.name)

    images = sorted((p for p in folders["thyroid-image"].iterdir() if p.is_file() and is_image_file(p)), key=numeric)
    bad = [i for i in train + val if not 0 <= i < len(images)]
    if bad:
        raise ToothSegError(f"{split_json}: index {bad[0]} is outside the {len(images)} images in {folders['thyroid-image']}; "
                            "the json and the image folder don't match")
    if set(train) & set(val):
        raise ToothSegError(f"{split_json}: index {sorted(set(train) & set(val))[0]} is in both train and val; fix the json")
    preset = {i: "trainval" for i in train} | {i: "test" for i in val}
    files, rejects = [], []
    for i, p in enumerate(images):
        if i not in preset:
            rejects.append((str(p), f"not listed in {split_json.name}"))
            continue
        files.append(Found("adult", "labeled", "image", p.stem, _file_on_disk(p), preset[i]))
    files += [Found("adult", "labeled", "mask", p.stem, _file_on_disk(p))
              for p in sorted(folders["thyroid-mask"].iterdir()) if p.is_file() and is_image_file(p)]
    return Source("tg3k", f"TG3K {root}", files, rejects)


@functools.lru_cache(maxsize=32)  # an item's image, mask and label map come from one call
def _phantom_pngs(seed: int, age_group: str, height: int, width: int) -> tuple[bytes, bytes, bytes]:
    return tuple(_encode_png(a) for a in phantom.generate_panoramic_teeth(seed, height, width, age_group))


def _phantom_file(key: tuple, which: int) -> bytes:
    return _phantom_pngs(*key)[which]


def source_from_synthetic(n: int, seed: int, height: int, width: int) -> Source:
    """N phantom images in STS proportions, as in-memory PNG files fed through the same path; the
    labelled ones with their masks and per-tooth label maps."""
    version = hashlib.sha1(Path(phantom.__file__).read_bytes()).hexdigest()[:12]  # a changed phantom rebuilds
    files = []
    for item in phantom.synthetic_manifest(n, seed):
        key = (item["seed"], item["age_group"], height, width)
        kinds = ("image", "mask", "teeth") if item["label_status"] == "labeled" else ("image",)
        for i, kind in enumerate(kinds):
            files.append(Found(item["age_group"], item["label_status"], kind, item["name"],
                               SourceFile(f"phantom:{item['name']}:{kind}", functools.partial(_phantom_file, key, i),
                                          f"{version}:{key}")))
    return Source("synthetic", f"synthetic phantom, {n} images of {height}x{width}", files, [])


def pool_folders(specs: list[str]) -> list[tuple[str, Path]]:
    """(name, folder) of each --unlabelled-dir NAME=DIR or DIR. The name becomes the rows' `source`,
    so two pools may not share one."""
    pools = {}
    for spec in specs:
        match = POOL_SPEC.match(spec)
        folder = Path(match["folder"] if match else spec)
        name = match["name"] if match else None
        if name is None:
            absolute = Path(os.path.abspath(folder))  # "." and "x/.." have a name; symlinks keep theirs
            name = absolute.parent.name if absolute.name.lower() in GENERIC_FOLDERS else absolute.name
        if name in pools:
            raise ToothSegError(f"--unlabelled-dir: {pools[name]} and {folder} are both named {name!r}; "
                                f"name them apart with NAME=DIR (e.g. {name}-2={folder})")
        pools[name] = folder
    return list(pools.items())


def source_from_pool(name: str, folder: Path, data_root: Path) -> Source:
    """Every image below `folder` (as index.list_images lists them) as adult/unlabeled, except this preparation's own
    outputs when they lie inside it; the stem keeps the sub-folders, so same-named files in
    different sub-folders stay apart."""
    if not folder.is_dir():
        raise ToothSegError(f"{folder}: folder not found; check --unlabelled-dir")
    found = [p for p in files_below(folder, [data_root / PROCESSED_NAME]) if is_image_file(p)]  # one walk for both
    images = [p for p in found if label_folder(p.relative_to(folder)) is None]
    if not images:
        raise ToothSegError(f"{folder}: no images found below it (mask folders are skipped); check --unlabelled-dir")
    files = [Found("adult", "unlabeled", "image", p.relative_to(folder).with_suffix("").as_posix(), _file_on_disk(p))
             for p in images]
    # Said, so that a folder of X-rays that happens to bear a label folder's name (gt, labels) is noticed.
    labels = Counter(part for p in found if (part := label_folder(p.relative_to(folder))) is not None)
    skipped = f" (left out as labels: {', '.join(f'{n} in {part}/' for part, n in sorted(labels.items()))})" if labels else ""
    return Source(POOL_KIND + name, f"unlabelled pool {name!r}: {len(files)} images below {folder}{skipped}", files, [])


# ----------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------
@dataclass
class Entry:
    age_group: str
    label_status: str
    stem: str
    image: SourceFile
    mask: SourceFile | None
    preset_split: str
    teeth: SourceFile | None = None  # the per-tooth label file
    pair_id: str = ""
    source: str = ""              # the Source's kind


def strip_mask_suffix(stem: str) -> str | None:
    lowered = stem.lower()
    return next((stem[:-len(s)] for s in MASK_SUFFIXES if lowered.endswith(s) and len(stem) > len(s)), None)


def match_to_images(images: dict[str, list[Found]], labels: dict[str, list[Found]], what: str
                    ) -> tuple[dict[str, Found], list[tuple[str, str]]]:
    """Label files of one kind (`what`: mask, teeth file) matched to images by stem: exact stems first;
    then a stem with a known suffix, if exactly one such file claims the image. Returns (image stem ->
    label file, rejects)."""
    rejects = [(f.file.name, f"another {what} has the same name stem {stem!r} ({same[0].file.name})")
               for stem, same in labels.items() for f in same[1:]]
    label_of = {stem: same[0] for stem, same in labels.items() if stem in images}
    claims = defaultdict(list)
    for stem, same in labels.items():
        if stem in images:
            continue
        base = strip_mask_suffix(stem)
        if base in label_of:
            rejects.append((same[0].file.name, f"second {what} for image {base!r} (it already has {label_of[base].file.name})"))
        elif base in images:
            claims[base].append(same[0])
        else:
            rejects.append((same[0].file.name, f"{what} without an image (no image named {stem}.* among the source's images)"))
    for base, claimants in claims.items():
        if len(claimants) == 1:
            label_of[base] = claimants[0]
        else:
            rejects += [(f.file.name, f"one of several {what}s for image {base!r}; keep one") for f in claimants]
    return label_of, rejects


def pair_files(files: list[Found], masks_from_teeth: bool = False) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Pair images with their masks and teeth files by stem within each (age group, label status);
    everything that does not pair is returned as a reject with its reason. With `masks_from_teeth` a
    labelled image needs a teeth file instead of a mask."""
    groups = defaultdict(lambda: {"image": defaultdict(list), "mask": defaultdict(list), "teeth": defaultdict(list)})
    for f in files:
        groups[(f.age_group, f.label_status)][f.kind][f.stem].append(f)
    entries, rejects = [], []
    for (age, status), group in sorted(groups.items()):
        images = group["image"]
        for stem, same in images.items():
            rejects += [(f.file.name, f"another image has the same name stem {stem!r} ({same[0].file.name})") for f in same[1:]]
        mask_of, bad_masks = match_to_images(images, group["mask"], "mask")
        teeth_of, bad_teeth = match_to_images(images, group["teeth"], "teeth file")
        rejects += bad_masks + bad_teeth
        for stem, same in sorted(images.items()):
            image, mask, teeth_file = same[0], mask_of.get(stem), teeth_of.get(stem)
            if status == "unlabeled" and mask is not None:
                rejects.append((mask.file.name, "mask in an unlabelled folder; move the pair to Labeled"))
                mask = None
            if status == "labeled" and mask is None and not (masks_from_teeth and teeth_file):
                rejects.append((image.file.name, f"labelled image without a teeth file (no file named {stem}.* in --teeth-dir)"
                                if masks_from_teeth else f"labelled image without a mask (no mask named {stem}.*)"))
                continue
            entries.append(Entry(age, status, stem, image.file, mask.file if mask else None, image.preset_split,
                                 teeth_file.file if teeth_file else None))
    return entries, rejects


def file_name_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip(".") or "image"


def assign_pair_ids(entries: list[Entry], taken: set[str] = frozenset(), prefix: str = "") -> None:
    """pair_id = the file stem made file-name safe; where stems of one source collide across groups,
    prefixed with age group and label status; where an id is `taken` (by an earlier source), with
    `prefix`_; any remaining clash gets a numeric suffix. A labelled pair's id depends on the labelled pairs
    only: its split is drawn by its id, and an unlabelled copy of the same name (STS-2D-Tooth repeats
    images) renamed it and moved it, a test image to train."""
    safe = [file_name_safe(e.stem) for e in entries]
    counts = Counter(safe)
    labelled_counts = Counter(s for e, s in zip(entries, safe) if e.label_status == "labeled")
    ids = [f"{e.age_group}_{e.label_status}_{s}" if (labelled_counts if e.label_status == "labeled" else counts)[s] > 1
           else s for e, s in zip(entries, safe)]
    ids = [f"{file_name_safe(prefix)}_{pid}" if pid in taken else pid for pid in ids]
    used = set(taken)
    for e, pid in sorted(zip(entries, ids), key=lambda t: (t[1], t[0].image.name)):
        e.pair_id, n = pid, 1
        while e.pair_id in used:
            n += 1
            e.pair_id = f"{pid}-{n}"
        used.add(e.pair_id)


# ----------------------------------------------------------------------------------------------
# Converting one pair
# ----------------------------------------------------------------------------------------------
def _encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ToothSegError(f"PNG encoding failed for an array of shape {img.shape} and dtype {img.dtype}")
    return buf.tobytes()


def _read(file: SourceFile) -> bytes:
    try:
        return file.read()
    except OSError as exc:
        raise BadInput(file.name, cannot_read(file.name, exc)) from None


def _decode(file: SourceFile, grayscale: bool = True) -> np.ndarray:
    data = _read(file)
    try:
        return decode_image(data, file.name, grayscale=grayscale)
    except ToothSegError as exc:
        raise bad_input(file, exc) from None


def bad_input(file: SourceFile, exc: ToothSegError) -> BadInput:
    """A file's error as BadInput, keeping its reason (a DICOM or mask one names its own fix); fail_or_keep
    adds the file's name and the general fix back."""
    return BadInput(file.name, str(exc).removeprefix(f"{file.name}: ").removesuffix("; replace or remove it"))


@dataclass(frozen=True)
class TeethOutcome:
    """What one pair's teeth file gave, for the printed report."""
    numbers: tuple[int, ...]        # the FDI numbers in its label map; () when it has none
    polygons: int | None = None     # labelme files: the polygons read (0: no tooth labelled); None for label-map images
    overlap_pixels: int = 0         # labelme: pixels inside two polygons, given to the smaller tooth
    clipped: int = 0                # labelme: polygons partly outside the image, clipped to it
    union_iou: float | None = None  # the teeth' union against the given mask
    other_image: str = ""           # labelme: the imagePath it names when that is another image's (a mix-up?)


def read_teeth(file: SourceFile, height: int, width: int) -> tuple[np.ndarray | None, TeethOutcome]:
    """The label map of a teeth file at its image's size (None: a labelme file without polygons), by TEETH_RULES."""
    suffix = Path(file.name).suffix.lower()
    if suffix in LOSSY_EXTENSIONS:
        raise BadInput(file.name, "a JPEG label map: its compression changes pixel values and so the FDI numbers; "
                                  "save label maps as PNG")
    try:
        if suffix == LABELME_EXTENSION:
            found = teeth.rasterise_labelme(file.name, height, width, data=_read(file))
            label_map = found.label_map if found.polygons else None
            drawn_on = PureWindowsPath(found.image_path).name  # backslashes too: labelme on Windows
            other = drawn_on if drawn_on and Path(drawn_on).stem != Path(file.name).stem else ""
            return label_map, TeethOutcome(_numbers(label_map), found.polygons, found.overlap_pixels, found.clipped,
                                           other_image=other)
        label_map = teeth.as_label_map(_decode(file, grayscale=False), file.name)
    except teeth.LabelFileError as bad:
        raise BadInput(bad.name, bad.reason) from None
    if label_map.shape != (height, width):
        raise BadInput(file.name, f"label map size {label_map.shape[1]}x{label_map.shape[0]} differs from its image's "
                                  f"{width}x{height}")
    return label_map, TeethOutcome(_numbers(label_map))


def _numbers(label_map: np.ndarray | None) -> tuple[int, ...]:
    return () if label_map is None else tuple(int(v) for v in np.unique(label_map) if v)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def convert_pair(entry: Entry, out_dir: Path, mask_threshold: int | None) -> tuple[list[dict], TeethOutcome | None]:
    """Decode, check and write one image, its mask (binarised at `mask_threshold`, None: the default for
    its format; or the union of its teeth) and its per-tooth label map; return the index rows of the
    image and the mask, and what its teeth file gave (None without one)."""
    image = to_uint8(_decode(entry.image))
    height, width = image.shape[:2]
    arrays = {"images": image}
    label_map, outcome = read_teeth(entry.teeth, height, width) if entry.teeth else (None, None)
    threshold = None
    if entry.mask is not None:
        mask = _decode(entry.mask)
        if mask.shape[:2] != image.shape[:2]:
            raise BadInput(entry.mask.name, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
                                            f"{width}x{height} ({entry.image.name})")
        threshold = default_mask_threshold(entry.mask.name) if mask_threshold is None else mask_threshold
        try:
            arrays["masks"] = binarise_mask(mask, entry.mask.name, mask_threshold) * 255
        except ToothSegError as exc:
            raise bad_input(entry.mask, exc) from None
    elif entry.teeth is not None:  # no mask files (Source.masks_from_teeth): the mask is the teeth' union
        if label_map is None:
            raise BadInput(entry.teeth.name, "no polygons, so no tooth is labelled and there is no mask to derive; "
                                             "label its teeth, or give --masks-dir")
        threshold = 0
        arrays["masks"] = np.where(label_map > 0, 255, 0).astype(np.uint8)
    if label_map is not None:
        arrays["teeth"] = label_map
        if entry.mask is not None:
            outcome = replace(outcome, union_iou=_iou(label_map > 0, arrays["masks"] > 0))
    written = {}
    for folder, array in arrays.items():
        data = _encode_png(array)
        rel_path = f"{entry.age_group}/{entry.label_status}/{folder}/{entry.pair_id}.png"
        atomic_write_bytes(out_dir / rel_path, data)
        written[folder] = (rel_path, hashlib.sha1(data).hexdigest())
    teeth_path = written.pop("teeth", ("",))[0]  # no row of its own: the mask row names it
    rows = [{"rel_path": rel_path, "age_group": entry.age_group, "label_status": entry.label_status,
             "is_mask": folder == "masks", "pair_id": entry.pair_id, "split": "", "width": width, "height": height,
             "sha1": sha1, "dup_group": "", "source": "", "mask_threshold": threshold if folder == "masks" else None,
             "teeth": teeth_path if folder == "masks" else ""}
            for folder, (rel_path, sha1) in written.items()]
    return rows, outcome


# ----------------------------------------------------------------------------------------------
# Splits and duplicates
# ----------------------------------------------------------------------------------------------
def split_sizes(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """(n_val, n_test) for a stratum of n units: rounded ratios, at least one each when n >= 3 and
    the ratio is > 0, and at least one unit left for train."""
    n_val, n_test = round(n * val_ratio), round(n * test_ratio)
    if n >= 3:
        n_val, n_test = max(n_val, int(val_ratio > 0)), max(n_test, int(test_ratio > 0))
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def assign_splits(pairs: list[dict], val_ratio: float, test_ratio: float, seed: int) -> dict[str, dict]:
    """pairs: {pair_id, age_group, labeled, sha1, mask_sha1, preset_split}. Returns pair_id ->
    {split, dup_group}. Units of splitting are duplicate groups (identical image bytes)."""
    groups = defaultdict(list)
    for p in sorted(pairs, key=lambda p: p["pair_id"]):
        groups[p["sha1"]].append(p)
    strata = defaultdict(list)
    result = {}
    for members in groups.values():
        labeled = [m for m in members if m["labeled"]]
        dup_group = (labeled or members)[0]["pair_id"]  # a labelled name: unlabelled copies move nothing
        if not labeled:
            split = "pretrain"
        elif any(m["preset_split"] == "test" for m in labeled):
            split = "test"  # TG3K's official val list is our test set
        else:
            split = None
            strata[labeled[0]["age_group"]].append(dup_group)
        for m in members:
            result[m["pair_id"]] = {"split": split, "dup_group": dup_group}
    # A source with a preset test set (TG3K) only has val carved from the rest.
    preset = any(p["preset_split"] for p in pairs)
    chosen = {}
    for age, units in sorted(strata.items()):
        units.sort(key=lambda u: hashlib.sha1(f"{seed}:{u}".encode()).hexdigest())
        n_val, n_test = split_sizes(len(units), val_ratio, 0.0 if preset else test_ratio)
        for i, unit in enumerate(units):
            chosen[unit] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    for info in result.values():
        if info["split"] is None:
            info["split"] = chosen[info["dup_group"]]
    return result


def duplicate_report(pairs: list[dict], assigned: dict[str, dict]) -> tuple[list[dict], list[list[str]]]:
    """(rows for duplicates.csv, the pair_ids of each group whose masks disagree)."""
    members = defaultdict(list)
    for p in pairs:
        members[assigned[p["pair_id"]]["dup_group"]].append(p)
    rows, conflicts = [], []
    for group, ms in sorted(members.items()):
        if len(ms) < 2:
            continue
        masks = {m["mask_sha1"] for m in ms if m["labeled"]}
        conflict = len(masks) > 1
        if conflict:
            conflicts.append(sorted(m["pair_id"] for m in ms if m["labeled"]))
        rows += [{"dup_group": group, "pair_id": m["pair_id"], "image": m["image_rel_path"], "label_status":
                  "labeled" if m["labeled"] else "unlabeled", "mask_sha1": m["mask_sha1"],
                  "split": assigned[m["pair_id"]]["split"], "conflicting_masks": conflict}
                 for m in sorted(ms, key=lambda m: m["pair_id"])]
    return rows, conflicts


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_or_remove(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A report file exists exactly when it has rows, so a stale one never outlives its build."""
    if rows:
        write_csv(path, rows, columns)
    elif path.exists():
        path.unlink()


def print_statistics(rows: list[dict], teeth_numbers: dict[int, int]) -> None:
    """Counts of the index's rows; `teeth_numbers`: FDI number -> how many label maps hold it."""
    def line(label, key, values):
        counts = Counter(r[key] for r in rows)
        print(f"{label}: " + " / ".join(f"{v} {counts.get(v, 0)}" for v in values))

    line("age_group", "age_group", AGE_GROUPS)
    line("label_status", "label_status", LABEL_STATUSES)
    line("is_mask", "is_mask", (False, True))
    thresholds = Counter(r["mask_threshold"] for r in rows if r["is_mask"])
    if thresholds:
        print("masks binarised at: " + " / ".join(f"> {t} {n}" for t, n in sorted(thresholds.items())))
    images = [r for r in rows if not r["is_mask"]]
    by_split = Counter((r["split"], r["age_group"]) for r in images)
    print("split (images): " + " / ".join(
        f"{s} {sum(by_split[(s, a)] for a in AGE_GROUPS)} ({', '.join(f'{a} {by_split[(s, a)]}' for a in AGE_GROUPS)})"
        for s in SPLITS))
    by_source = defaultdict(Counter)
    for r in images:
        by_source[r["source"]][r["split"]] += 1
    print("source (images): " + " / ".join(
        f"{name} {sum(splits.values())} ({', '.join(f'{s} {splits[s]}' for s in SPLITS if splits[s])})"
        for name, splits in sorted(by_source.items())))
    masks = [r for r in rows if r["is_mask"]]
    with_teeth = sum(bool(r["teeth"]) for r in masks)
    if with_teeth:
        print(f"per-tooth label maps: {with_teeth} of {len(masks)} labelled pairs; FDI numbers (label maps holding each):")
        for quadrant in sorted({n // 10 for n in teeth_numbers}):
            print(f"  {quadrant}x: " + ", ".join(f"{n} {c}" for n, c in sorted(teeth_numbers.items()) if n // 10 == quadrant))


def print_teeth_report(converted: list[tuple[Entry, TeethOutcome | None]]) -> None:
    """The counts of TEETH_RULES' labelme rules, the labelled images left without a label map, and how
    well the teeth agree with the given masks."""
    outcomes = [(entry, outcome) for entry, outcome in converted if outcome is not None]
    if not outcomes:
        return
    labelme = [outcome for _, outcome in outcomes if outcome.polygons is not None]
    if labelme:
        overlapping, clipped = [o for o in labelme if o.overlap_pixels], [o for o in labelme if o.clipped]
        print(f"labelme: {sum(o.polygons for o in labelme)} polygons in {len(labelme)} files; "
              f"{sum(o.overlap_pixels for o in overlapping)} pixels in {len(overlapping)} files lay inside two teeth's "
              f"polygons and went to the smaller tooth; {sum(o.clipped for o in clipped)} polygons in {len(clipped)} files "
              f"reached outside their image and were clipped to it")
    unlabelled = [entry for entry, outcome in outcomes if outcome.polygons == 0]
    if unlabelled:
        print(f"note: {len(unlabelled)} labelme files have no polygons (no tooth labelled), so their images get no "
              f"per-tooth label map, e.g. {unlabelled[0].teeth.name}")
    elsewhere = [(entry, outcome) for entry, outcome in outcomes if outcome.other_image]
    if elsewhere:
        print(f"note: {len(elsewhere)} labelme files name another image in their imagePath, e.g. "
              f"{elsewhere[0][0].teeth.name} ({elsewhere[0][1].other_image}); each was used for the image of its own "
              f"name: check that they were not mixed up")
    without = [entry for entry, outcome in converted if outcome is None and entry.label_status == "labeled"]
    if without:
        print(f"note: {len(without)} labelled images have no teeth file, so no per-tooth label map, e.g. {without[0].image.name}")
    ious = [outcome.union_iou for _, outcome in outcomes if outcome.union_iou is not None]
    if ious:
        print(f"teeth vs masks: the union of a label map's teeth agrees with the pair's mask at IoU {np.mean(ious):.3f} "
              f"on average (min {min(ious):.3f}, {len(ious)} pairs); the masks stay the masks of the binary task")


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------
def build_parser():
    parser = make_parser("\n\n".join(__doc__.split("\n\n")[:3]))  # summary, usage and output; the rules stay in the source
    parser.epilog = TEETH_RULES
    source = parser.add_argument_group("source (give exactly one)")
    source.add_argument("--zip-dir", type=Path, metavar="DIR", help="folder with the Zenodo parts SD-Tooth.zip.001, .002, ...")
    source.add_argument("--raw-dir", type=Path, metavar="DIR", help="an extracted STS-2D-Tooth folder, or any folder above it")
    source.add_argument("--images-dir", type=Path, metavar="DIR",
                        help="a flat folder of images (adult/labeled); needs --masks-dir, --teeth-dir or both")
    source.add_argument("--masks-dir", type=Path, metavar="DIR", help="masks with the same file stems as --images-dir")
    source.add_argument("--teeth-dir", type=Path, metavar="DIR",
                        help="per-tooth labels with the same file stems as --images-dir: label maps of FDI numbers (PNG) "
                             "or labelme .json polygons (rules below); without --masks-dir the masks are their union")
    source.add_argument("--tg3k-dir", type=Path, metavar="DIR", help="TG3K folder (thyroid-image/, thyroid-mask/, tg3k-trainval.json)")
    source.add_argument("--synthetic", type=int, metavar="N", help="N images from the built-in panoramic phantom")
    source.add_argument("--synthetic-size", default="320x640", metavar="HxW", help="phantom image size")
    pools = parser.add_argument_group("unlabelled pools (added to the source)")
    pools.add_argument("--unlabelled-dir", "--unlabeled-dir", dest="unlabelled_dirs", nargs="+", metavar="[NAME=]DIR",
                       help="every image below DIR (skipping masks/ and teeth/ folders) as adult/unlabeled, split pretrain, "
                            f"source {POOL_KIND}NAME; NAME defaults to DIR's name, or its parent's for images/, img/ ...")
    output = parser.add_argument_group("output")
    output.add_argument("--data-root", type=Path, default=Path("./sts_tooth_data"), metavar="DIR",
                        help=f"receives {PROCESSED_NAME}/, {INDEX_NAME} and the reports")
    output.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    output.add_argument("--skip-bad", action="store_true", help=f"leave bad files out (listed in {REJECTED_NAME}) instead of failing")
    output.add_argument("--mask-threshold", type=int, default=None, metavar="T",
                        help="a mask pixel is tooth when its value > T (0-254), for every mask; without it 127 for lossy "
                             "JPEG masks (their compression noise would grow them) and 0 for lossless PNG/BMP/TIFF ones")
    output.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N", help="decoding threads")
    splits = parser.add_argument_group("splits")
    splits.add_argument("--seed", type=int, default=0, metavar="INT", help="seed for the split (and the phantom)")
    splits.add_argument("--val-ratio", type=float, default=0.1, metavar="F", help="share of labelled pairs for val")
    splits.add_argument("--test-ratio", type=float, default=0.1, metavar="F", help="share of labelled pairs for test (TG3K: its json decides)")
    return parser


def load_source(args, pool_dirs: list[Path]) -> Source:
    """The labelled source the flags name; a folder source leaves `pool_dirs` (the --unlabelled-dir folders) and
    this preparation's outputs out of its images when they lie inside it."""
    given = [name for name in ("zip_dir", "raw_dir", "images_dir", "tg3k_dir", "synthetic") if getattr(args, name) is not None]
    if not given and args.unlabelled_dirs:
        raise ToothSegError("--unlabelled-dir adds unlabelled images to a labelled source; give one as well: "
                            "--zip-dir, --raw-dir, --images-dir/--masks-dir, --tg3k-dir or --synthetic")
    if len(given) != 1:
        raise ToothSegError("give exactly one source: --zip-dir, --raw-dir, --images-dir/--masks-dir, --tg3k-dir or --synthetic"
                            + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
    if args.images_dir is None and (args.masks_dir is not None or args.teeth_dir is not None):
        raise ToothSegError("--masks-dir and --teeth-dir go with --images-dir (per-tooth labels only come from image "
                            "folders, and the phantom has its own); give --images-dir")
    if args.images_dir is not None and args.masks_dir is None and args.teeth_dir is None:
        raise ToothSegError("--images-dir needs its labels: give --masks-dir, --teeth-dir or both")
    if args.zip_dir is not None:
        return source_from_zip(args.zip_dir)
    if args.raw_dir is not None:
        return source_from_raw(args.raw_dir)
    if args.images_dir is not None:
        return source_from_folders(args.images_dir, args.masks_dir, args.teeth_dir, [args.data_root / PROCESSED_NAME, *pool_dirs])
    if args.tg3k_dir is not None:
        return source_from_tg3k(args.tg3k_dir)
    match = re.fullmatch(r"(\d+)x(\d+)", args.synthetic_size)
    if args.synthetic < 1 or not match or int(match[1]) < 32 or int(match[2]) < 64:
        raise ToothSegError(f"--synthetic needs N >= 1 and --synthetic-size HxW of at least 32x64 "
                            f"(got {args.synthetic}, {args.synthetic_size!r})")
    return source_from_synthetic(args.synthetic, args.seed, int(match[1]), int(match[2]))


def fingerprint(source: Source, pools: list[Source], args) -> str:
    settings = {"version": STAMP_VERSION, "source": source.kind, "seed": args.seed, "val_ratio": args.val_ratio,
                "test_ratio": args.test_ratio, "skip_bad": args.skip_bad, "mask_threshold": args.mask_threshold,
                "files": sorted((f.file.name, f.file.stamp, f.preset_split) for f in source.files),
                "teeth_dir": None if args.teeth_dir is None else os.path.abspath(args.teeth_dir),
                "rejects": sorted(source.rejects)}
    if pools:  # only then, so that builds from before the pools stay up to date
        settings["pools"] = [(p.kind, sorted((f.file.name, f.file.stamp) for f in p.files)) for p in pools]
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def read_stamp(data_root: Path) -> dict:
    """prepare_stamp.json: the fingerprint of the build, and the FDI numbers of its label maps."""
    return json.loads((data_root / STAMP_NAME).read_text())


def is_up_to_date(data_root: Path, stamp: str) -> bool:
    try:
        recorded = read_stamp(data_root)["fingerprint"]
        rows = read_index(data_root / INDEX_NAME)
    except (OSError, ValueError, KeyError, ToothSegError):
        return False
    processed = data_root / PROCESSED_NAME
    return recorded == stamp and all((processed / path).is_file() for r in rows for path in (r["rel_path"], r["teeth"])
                                     if path)


def moved_labelled_images(old_index: Path, rows: list[dict]) -> list[str]:
    """The labelled images (by content) whose split differs from the index a rebuild replaces, as 'id: old -> new'.
    Another id rule, other ratios or a changed source can move them; a model's test images must not be trained on."""
    try:
        before = {r["sha1"]: r["split"] for r in read_index(old_index) if r["label_status"] == "labeled" and not r["is_mask"]}
    except ToothSegError:  # a first build, or an index this version cannot read
        return []
    return [f"{r['pair_id']}: {before[r['sha1']]} -> {r['split']}" for r in rows if r["label_status"] == "labeled"
            and not r["is_mask"] and before.get(r["sha1"], r["split"]) != r["split"]]


def fail_or_keep(rejects: list[tuple[str, str]], skip_bad: bool) -> None:
    if rejects and not skip_bad:
        name, reason = rejects[0]
        more = f" ({len(rejects)} bad files in all)" if len(rejects) > 1 else ""
        raise ToothSegError(f"{name}: {reason}{more}; fix or remove it, or pass --skip-bad to leave bad files out")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not (0 <= args.val_ratio < 1 and 0 <= args.test_ratio < 1 and args.val_ratio + args.test_ratio < 1):
        raise ToothSegError(f"--val-ratio and --test-ratio must be in [0, 1) with a sum below 1 "
                            f"(got {args.val_ratio}, {args.test_ratio})")
    if args.workers < 1:
        raise ToothSegError(f"--workers must be at least 1, got {args.workers}")
    if args.mask_threshold is not None and not 0 <= args.mask_threshold <= 254:
        raise ToothSegError(f"--mask-threshold must be in 0..254 (a mask pixel is tooth when its value > T), "
                            f"got {args.mask_threshold}; or leave it out for the default of each mask's format")
    check_output_dir(args.data_root, "--data-root")
    pools = pool_folders(args.unlabelled_dirs or [])
    source = load_source(args, [folder for _, folder in pools])
    try:
        prepare(source, [source_from_pool(name, folder, args.data_root) for name, folder in pools], args)
    finally:
        source.close()


def prepare(source: Source, pools: list[Source], args) -> None:
    data_root = args.data_root
    print(f"source: {source.description}")
    for pool in pools:
        print(f"source: {pool.description}")
    if not source.files:
        where = next(str(getattr(args, n)) for n in ("zip_dir", "raw_dir", "images_dir", "tg3k_dir", "synthetic")
                     if getattr(args, n) is not None)
        raise ToothSegError(f"{where}: no images found in the source; check the path and its folder layout")

    stamp = fingerprint(source, pools, args)
    if not args.force and is_up_to_date(data_root, stamp):
        rows = read_index(data_root / INDEX_NAME)
        print(f"up to date: {data_root / INDEX_NAME} already matches this source and these settings "
              f"({len(rows)} files); nothing to do (--force rebuilds)")
        print_statistics(rows, {int(n): c for n, c in read_stamp(data_root)["teeth_numbers"].items()})
        return

    entries, rejects = [], []
    for src in (source, *pools):  # pools after the source, in the order given: the first to claim an id keeps it
        paired, bad = pair_files(src.files, src.masks_from_teeth)
        assign_pair_ids(paired, {e.pair_id for e in entries}, src.kind.removeprefix(POOL_KIND))
        for entry in paired:
            entry.source = src.kind
        entries += paired
        rejects += src.rejects + bad
    fail_or_keep(rejects, args.skip_bad)

    # Build into a fresh folder that replaces processed_2d only when everything has succeeded.
    (data_root / STAMP_NAME).unlink(missing_ok=True)
    processed = data_root / PROCESSED_NAME
    staging = data_root / f".{PROCESSED_NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    def convert(entry: Entry):
        try:
            return entry, *convert_pair(entry, staging, args.mask_threshold), None
        except BadInput as bad:
            return entry, [], None, (bad.name, bad.reason)

    rows, pairs, converted = [], [], []
    pool = ThreadPoolExecutor(args.workers)
    try:
        for entry, entry_rows, teeth_outcome, bad in tqdm(pool.map(convert, entries), total=len(entries), unit="pair",
                                                          desc="prepare", disable=None):
            if bad:
                fail_or_keep([bad], args.skip_bad)
                rejects.append(bad)
                continue
            for row in entry_rows:
                row["source"] = entry.source
            rows += entry_rows
            converted.append((entry, teeth_outcome))
            mask_rows = [r for r in entry_rows if r["is_mask"]]  # the mask given, or the union of the teeth
            pairs.append({"pair_id": entry.pair_id, "age_group": entry.age_group, "labeled": bool(mask_rows),
                          "sha1": entry_rows[0]["sha1"], "mask_sha1": mask_rows[0]["sha1"] if mask_rows else "",
                          "image_rel_path": entry_rows[0]["rel_path"], "preset_split": entry.preset_split})
        if not rows:
            name, reason = rejects[0]
            raise ToothSegError(f"{source.description}: no usable images (all {len(rejects)} files were rejected; "
                                f"first {name}: {reason})")

        assigned = assign_splits(pairs, args.val_ratio, args.test_ratio, args.seed)
        for row in rows:
            row.update(assigned[row["pair_id"]])
        rows.sort(key=lambda r: r["rel_path"])
        old = data_root / f".{PROCESSED_NAME}.old"
        shutil.rmtree(old, ignore_errors=True)
        if processed.exists():
            processed.rename(old)
        staging.rename(processed)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    moved = moved_labelled_images(data_root / INDEX_NAME, rows)
    write_index(data_root / INDEX_NAME, rows)

    duplicates, conflicts = duplicate_report(pairs, assigned)
    write_or_remove(data_root / DUPLICATES_NAME, duplicates,
                    ("dup_group", "pair_id", "image", "label_status", "mask_sha1", "split", "conflicting_masks"))
    write_or_remove(data_root / REJECTED_NAME, [{"file": f, "reason": r} for f, r in sorted(rejects)], ("file", "reason"))
    teeth_numbers = Counter(n for _, outcome in converted if outcome for n in outcome.numbers)
    atomic_write_text(data_root / STAMP_NAME, json.dumps({"fingerprint": stamp, "files": len(rows), "teeth_numbers":
                                                          dict(sorted(teeth_numbers.items()))}, indent=1) + "\n")

    label_maps = sum(1 for row in rows if row["teeth"])
    print(f"wrote {len(rows)} images and masks{f' and {label_maps} per-tooth label maps' if label_maps else ''} "
          f"to {processed} and {data_root / INDEX_NAME}")
    if duplicates:
        groups = len({d["dup_group"] for d in duplicates})
        print(f"duplicates: {groups} groups of identical images ({len(duplicates)} images), each kept in one split; "
              f"listed in {data_root / DUPLICATES_NAME}")
    for ids in conflicts:
        print(f"conflicting masks for one image: {', '.join(ids)}")
    if conflicts:
        print(f"{len(conflicts)} duplicate groups have conflicting masks (conflicting_masks=True in {DUPLICATES_NAME})")
    if rejects:
        print(f"skipped {len(rejects)} bad files; listed with reasons in {data_root / REJECTED_NAME}")
    if moved:
        print(f"note: {len(moved)} labelled images lie in another split than in the index this one replaces, e.g. "
              f"{moved[0]}; a model trained on the earlier splits must not be scored on the new val/test ones")
    print_teeth_report(converted)
    print_statistics(rows, teeth_numbers)


if __name__ == "__main__":
    run_cli(main)
