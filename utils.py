"""Small shared pieces every script uses: user-facing errors, image I/O, atomic writes, seeding,
devices, bootstrap CIs and CLI help formatting. Topic siblings hold the rest: `index.py` (the index, sample
discovery, splits, masks; no torch), `data.py` (datasets, transforms), `metrics.py` (metrics and
losses), `engine.py` (checkpoints, training loop, DDP).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

DICOM_EXTENSIONS = (".dcm", ".dicom")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", *DICOM_EXTENSIONS)
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


class ToothSegError(Exception):
    """An error in the user's input or environment. Scripts print it as one line, no traceback."""

    def __init__(self, message: str = ""):
        # A DataLoader worker re-raises it in the main process as ToothSegError("Caught ToothSegError in
        # DataLoader worker process 0.\nOriginal Traceback ...\nutils.ToothSegError: <the line>"): keep the line.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition("ToothSegError: ")[2] or message
        super().__init__(message)

    def _render_traceback_(self) -> list[str]:
        """What IPython (the notebook) shows for it: the one line the scripts print, not a traceback."""
        return [f"error: {self}"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a scheduler's, torchrun's): handled as Ctrl-C is, so workers and children are stopped
    and outputs left as an interrupt leaves them, where the default handler died on the spot."""


def _terminate(signum, frame):
    raise Terminated


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's `main`, turning a ToothSegError into `error: ...` on stderr and exit code 2, and Ctrl-C or
    SIGTERM into one line (exit 130 or 143)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        main(argv)
    except ToothSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:  # None: no handler or one set outside Python, which cannot be restored from here
            signal.signal(signal.SIGTERM, previous)


def exit_with(parent_pid: int, every: float = 2.0) -> None:
    """In a worker process: exit once `parent_pid` is gone. DataLoader workers started by a forkserver, and
    fbf's spawned pool, outlived a killed parent (their own parent is the forkserver or nothing that watches),
    holding memory and, for fbf, still writing outputs."""
    def gone() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, and not ours to signal
            return False
        try:  # killed but not yet reaped by its own parent (a notebook's Popen, say): a zombie answers os.kill
            return open(f"/proc/{parent_pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):  # no /proc (macOS), or reaped just now
            return not os.path.exists(f"/proc/{parent_pid}") and os.path.isdir("/proc/self")

    def watch():
        while not gone():
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows each option's default, except where the default
    says nothing (switches, and None for options whose help explains what happens without them)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 and bool(action.option_strings)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and self._shows_default(action):
            text += " (default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        # argparse prints no help line for an option without help text, so it would hide the default too.
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """A bad flag is told in one line (not the whole usage block), with where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(description: str) -> argparse.ArgumentParser:
    return Parser(description=description, formatter_class=HelpFormatter)


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def _number_where(accepts: Callable[[float], bool], wanted: str):
    """An argparse type for a finite number that `accepts` (NaN and infinities never pass)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (np.isfinite(value) and accepts(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value
    return parse


probability = _number_where(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")  # a threshold or a share
share_below_one = _number_where(lambda v: 0 <= v < 1, "at least 0 and below 1")      # a split's share of the images
share_of_all = _number_where(lambda v: 0 < v <= 1, "above 0 and at most 1")          # a share kept, up to all
zero_to_one = _number_where(lambda v: 0 <= v <= 1, "between 0 and 1")                # a chance, never or always too
positive_number = _number_where(lambda v: v > 0, "above 0")
non_negative_number = _number_where(lambda v: v >= 0, "at least 0")


def output_file(text: str) -> Path:
    """argparse type: a file to write at the end, checked at the start (a folder there, or a file where a folder
    above it should be, failed after the whole benchmark had run)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file path")
    existing = next(p for p in path.resolve().parents if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, where a folder of {path} should be")
    return path


def recorded_path(path: str | os.PathLike) -> str:
    """A path as checkpoints and summaries record it: absolute (links not resolved, so a linked folder keeps
    its place), so that a later stage or the notebook, run from another folder, finds it."""
    return os.path.abspath(os.fspath(path))


def check_output_dir(path: Path, flag: str) -> None:
    """Fail before any work when an output folder's path, or a folder above it, is taken by a file."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    if not existing.is_dir():
        raise ToothSegError(f"{existing}: exists and is not a folder; give {flag} a folder path")


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def decode_image(data: bytes, name: str | os.PathLike, *, grayscale: bool = True) -> np.ndarray:
    """Decode encoded image bytes as a viewer shows them: upright by the EXIF orientation (a phone or
    scanner JPEG stored on its side), keeping 8/16-bit depth. With `grayscale`, colour becomes grey and a
    transparent PNG is shown on black (a mask painted on a transparent layer is its paint). DICOM (by its
    "DICM" marker or a .dcm/.dicom name) becomes 8-bit grey (`decode_dicom`)."""
    if data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_EXTENSIONS:
        return decode_dicom(data, name)
    buf = np.frombuffer(data, dtype=np.uint8)
    if data[:8] == PNG_SIGNATURE and data.rfind(b"IEND") == -1:  # told here: libpng prints its own line before failing
        raise ToothSegError(f"{name}: a PNG cut short (it has no end chunk; the copy or download stopped); "
                            f"replace or remove it")
    # IMREAD_UNCHANGED would ignore the EXIF orientation; these flags apply it and keep depth, not alpha.
    alpha = data[:8] == PNG_SIGNATURE and data[25:26] in (b"\x04", b"\x06")  # IHDR colour type: grey or RGB + alpha
    flags = cv2.IMREAD_UNCHANGED if alpha else cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    # OpenCV warns on stderr about a truncated file before failing; the failure is told below, in one line.
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        img = cv2.imdecode(buf, flags) if buf.size else None
    finally:
        cv2.utils.logging.setLogLevel(level)
    if img is None:
        raise ToothSegError(f"{name}: cannot decode image (corrupt or not an image); replace or remove it")
    if alpha:  # so it is applied here, as the other flags apply it
        img = exif_upright(img, png_exif_orientation(data))
    if data[:4] in TIFF_SIGNATURES:
        _check_one_tiff_page(buf, img, name)
    if grayscale and img.ndim == 3:
        grey = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
        if img.shape[2] == 4:
            opacity = img[..., 3].astype(np.float64) / np.iinfo(img.dtype).max
            grey = np.rint(grey * opacity).astype(img.dtype)
        img = grey
    return img


def png_exif_orientation(data: bytes) -> int:
    """The EXIF Orientation (1-8; 1 when absent) in a PNG's eXIf chunk."""
    at = 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if kind == b"eXIf":
            exif = data[at + 8:at + 8 + length]
            order = "little" if exif[:2] == b"II" else "big"
            ifd = int.from_bytes(exif[4:8], order)
            for entry in range(int.from_bytes(exif[ifd:ifd + 2], order)):
                tag = exif[ifd + 2 + 12 * entry:ifd + 14 + 12 * entry]
                if len(tag) == 12 and int.from_bytes(tag[:2], order) == 0x0112:
                    value = int.from_bytes(tag[8:10], order)
                    return value if 1 <= value <= 8 else 1
            return 1
        if kind in (b"IDAT", b"IEND"):  # eXIf comes before the image data
            return 1
        at += 12 + length
    return 1


def exif_upright(img: np.ndarray, orientation: int) -> np.ndarray:
    """The image turned as a viewer (and cv2's default flags) shows a file of this EXIF Orientation."""
    turns = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
             6: lambda a: np.rot90(a, -1), 7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(turns[orientation](img)) if orientation in turns else img


def _check_one_tiff_page(buf: np.ndarray, first_page: np.ndarray, name: str | os.PathLike) -> None:
    """OpenCV reads a TIFF's first page. Smaller later pages are thumbnails, which viewers skip too; a page as
    large as the first (a stack of X-rays, or a thumbnail put first) leaves unclear which image is meant."""
    ok, pages = cv2.imdecodemulti(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    area = first_page.shape[0] * first_page.shape[1]
    if ok and any(page.shape[0] * page.shape[1] >= area for page in pages[1:]):
        raise ToothSegError(f"{name}: a TIFF of {len(pages)} full-size pages; save each X-ray as a one-page file")


def decode_dicom(data: bytes, name: str | os.PathLike) -> np.ndarray:
    """A single-frame DICOM image as 8-bit grey, as a viewer shows it: stored values through the modality
    rescale, then the file's first Window Center/Width (the whole range of values when it has none) onto
    0-255, MONOCHROME1 (or an INVERSE Presentation LUT Shape) inverted so that bone is bright. Colour becomes
    grey."""
    import pydicom  # only DICOM input needs it
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises several types for a file that is not DICOM
        raise ToothSegError(f"{name}: cannot read as DICOM ({_one_line(exc)}); replace or remove it") from None
    if "PixelData" not in ds:
        raise ToothSegError(f"{name}: a DICOM file without an image (no Pixel Data); remove it from the folder")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise ToothSegError(f"{name}: a DICOM file of {ds.NumberOfFrames} frames; export the panoramic as one frame")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # a compression pydicom has no decoder for (JPEG-LS, JPEG 2000) or broken data
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        fix = "for a compressed file install the decoders: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg" \
            if syntax is not None and syntax.is_compressed else "replace or remove it"
        raise ToothSegError(f"{name}: cannot decode its DICOM pixel data ({getattr(syntax, 'name', 'no transfer syntax')}"
                            f": {_one_line(exc)}); {fix}") from None
    if pixels.ndim == 3:  # colour: grey on the scale of its bits (a 12-bit one is not cut to 8 bits)
        values = cv2.cvtColor(pixels.astype(np.float32), cv2.COLOR_RGB2GRAY).astype(np.float64)
        low, high = 0.0, float(2 ** int(ds.get("BitsStored") or 8) - 1)
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        window = [ds.get(keyword) for keyword in ("WindowCenter", "WindowWidth")]
        if all(v not in (None, "") for v in window):  # an empty element is no window
            center, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v) for v in window)
            low, high = center - width / 2, center + width / 2
    shown = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    # Low values are bright in MONOCHROME1, and where the Presentation LUT Shape says INVERSE (which a DX file of
    # MONOCHROME1 carries too, for the same one inversion)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        shown = 1.0 - shown
    return np.rint(shown * 255.0).astype(np.uint8)


def _one_line(exc: Exception) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def broken_link(path: str | os.PathLike) -> str | None:
    """For a link whose target does not exist, the words that say so and where it points; None otherwise."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a link to {os.readlink(path)}, which does not exist"
    return None


def cannot_read(path: str | os.PathLike, exc: OSError) -> str:
    """Why a file could not be read, for a one-line error; a broken link says where it points."""
    return broken_link(path) or f"cannot read ({exc.strerror or exc})"


def read_image(path: str | os.PathLike, *, grayscale: bool = True) -> np.ndarray:
    """Read an image file as a numpy array (grayscale by default), with a one-line error on failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToothSegError(f"{path}: {cannot_read(path, exc)}; check the path") from None
    return decode_image(data, path, grayscale=grayscale)


def file_sha1(path: str | os.PathLike) -> str:
    """The content hash of a file, as the index records it (`sha1`)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def to_uint8(img: np.ndarray) -> np.ndarray:
    """An 8-bit image passes through unchanged; a deeper one (16-bit, float) is stretched from its own lowest
    to its highest value onto 0-255. A fixed scale would lose it: a 12-bit X-ray (0-4095) in a 16-bit file
    divided by 257 keeps 17 grey levels, and a float TIFF in 0-1 clipped to 0-255 is black. A float image's
    range is that of its finite values (one NaN made the whole image black); NaN shows black, infinities at
    the ends."""
    if img.dtype == np.uint8:
        return img
    values = img.astype(np.float64)
    finite = values[np.isfinite(values)] if img.dtype.kind == "f" else values
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    share = np.nan_to_num(np.clip((values - low) / (high - low), 0.0, 1.0), nan=0.0) if high > low else np.zeros(img.shape)
    return np.rint(share * 255.0).astype(np.uint8)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes private files; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8/uint16 array as PNG atomically."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ToothSegError(f"{path}: PNG encoding failed for array of shape {img.shape} and dtype {img.dtype}")
    atomic_write_bytes(path, buf.tobytes())


# ----------------------------------------------------------------------------------------------
# Confidence intervals over images
# ----------------------------------------------------------------------------------------------
def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n_items: int, n: int,
                 rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap 95% CI. `statistic` maps an (n, n_items) array of indices, one resample of the
    items (images) with replacement per row, to the statistic of each resample."""
    samples = statistic(rng.integers(0, n_items, size=(n, n_items)))
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def decimals(*values: float, least: int = 4, most: int = 8) -> int:
    """Decimals that show each nonzero value as nonzero (4, or up to 8 for tiny ones), so that a CI that
    excludes zero never prints as [+0.0000, +0.0000] beside a verdict."""
    tiny = [abs(v) for v in values if v != 0 and round(abs(v), least) == 0]
    return min(most, max([least] + [math.floor(-math.log10(v)) + 2 for v in tiny]))


def mean_ci(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean over images (of a paired difference, for a paired CI)."""
    return bootstrap_ci(lambda rows: values[rows].mean(axis=1), len(values), n, rng)


# ----------------------------------------------------------------------------------------------
# Reproducibility and devices
# ----------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def select_device(force_cpu: bool = False):
    import torch

    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
