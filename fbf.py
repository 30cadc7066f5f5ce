"""Fast bilateral filter (FBF): denoise a dataset tree of X-rays while keeping tooth edges sharp.

    python fbf.py                                   # ./sts_tooth_data/processed_2d -> ./sts_tooth_data/processed_2d_fbf
    python fbf.py --input-dir D/processed_2d --output-dir D/processed_2d_fbf --sigma-space 6 --sigma-color 30

The default method is the bilateral grid (Paris & Durand 2006; Chen et al. 2007). Every pixel is
splatted into a coarse (y, x, intensity) grid whose cells are `sample_space` pixels by
`sample_color` grey levels (nearest cell in y and x, linear between intensity cells); the grid is
blurred with a 3D Gaussian whose width is corrected for what splatting and slicing add; each pixel
reads its result back by trilinear interpolation ("slicing") and is normalised by the sliced
weight. At the default sampling (the sigmas) it comes within about 50 dB PSNR of the exact filter.
Its cost is a few passes over the pixels plus a blur of a small grid, so it stays flat (or falls)
as sigma_space grows, while the exact filter (`--method exact`, or OpenCV's brute force with
`--method opencv`) costs O(sigma_space^2) per pixel. Unlike downsample-filter-upsample, it never
resamples the image itself: each pixel slices the grid at its own intensity, so edges stay sharp.

Units: `sigma_space` is in pixels and `sigma_color` in grey levels on the 0-255 scale for every
image depth (`grey_level`): a 16-bit image's is multiplied by the largest value of the bit depth its
values use over 255 (257 for 16 bits, about 16 for a 12-bit X-ray stored in a 16-bit file), so one
setting means the same thing for 8-, 12- and 16-bit copies of an image; a float image whose values
lie within 0-1 is on the 0-1 scale, any other on 0-255. The exact filter truncates the spatial
Gaussian to a disc of radius ceil(3 sigma_space) (the same window as `cv2.bilateralFilter` with
d = 2 ceil(3 sigma_space) + 1) and uses only pixels inside the image; OpenCV instead mirrors the
image at its border.

Folders: every image under `--input-dir` is filtered into the same relative path under
`--output-dir`; files under a label folder (index.LABEL_FOLDERS, any case: binary masks and per-tooth
label maps) are copied byte for byte, and the dataset index `sts2d_index.csv` (looked for in the
input dir, then its parent) is copied to `<output-dir>/sts2d_index.csv`. Its `rel_path`s are
relative to processed_2d, so they resolve inside the output dir, and the output dir can be given to
the training scripts as `--images-dir`.
The index is copied unchanged: its `sha1` column still describes the unfiltered images.
Existing outputs are kept unless `--overwrite`, and the settings are recorded in
`<output-dir>/fbf_settings.json`: a rerun with others is refused unless `--overwrite`; every write is
atomic. An image that cannot be decoded is named on its own line and skipped, the others are still
written, and the run ends with a one-line error counting the failures (exit status 2), so scripts notice.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from index import INDEX_NAME, files_below, find_index, label_folder
from utils import (DICOM_EXTENSIONS, ToothSegError, atomic_path, atomic_write_bytes, atomic_write_text, cannot_read,
                   check_output_dir, decode_image, exit_with, is_image_file, make_parser, positive_number, run_cli)

METHODS = ("grid", "opencv", "exact")
BACKENDS = ("numpy", "torch")
SPATIAL_TRUNCATE = 3.0  # Gaussians are cut at 3 sigma: the exact/OpenCV window and the grid blur
NEAREST_VARIANCE = 1.0 / 12.0  # variance, in cells^2, added by splatting to the nearest cell
LINEAR_VARIANCE = 1.0 / 6.0  # variance added by linear (tent) splatting or interpolation
GRID_MAX_CELLS = 1 << 27  # about 3 GB while splatting; far beyond any useful sampling rate
SETTINGS_NAME = "fbf_settings.json"  # the filter settings of a mirror, beside its index
OPENCV_MAX_CHANNELS = 128  # cv2.sepFilter2D refuses images with more channels
SLICE_BAND_PIXELS = 1 << 14  # pixels sliced per band: small enough for the band's grid to stay in cache


# ----------------------------------------------------------------------------------------------
# The filter
# ----------------------------------------------------------------------------------------------
def bilateral_filter(img: np.ndarray, sigma_space: float, sigma_color: float, method: str = "grid",
                     sample_space: float | None = None, sample_color: float | None = None,
                     backend: str = "numpy", device=None) -> np.ndarray:
    """Bilateral-filter a 2D grey image; returns an array of the input's dtype and shape.

    sigma_space is in pixels, sigma_color (and sample_color) in grey levels on the 0-255 scale
    (scaled to the image's depth by `grey_level`). sample_space/sample_color set the grid's cell size
    (default: the sigmas; smaller is more accurate and slower). backend "torch" runs the grid on `device`
    (default: CUDA when available, else CPU); the other methods ignore backend and device.
    """
    if img.ndim != 2 or img.size == 0:
        raise ToothSegError(f"bilateral_filter needs a non-empty 2D grey image, got shape {img.shape}; convert it to grey first")
    if img.dtype not in (np.uint8, np.uint16) and img.dtype.kind != "f":
        raise ToothSegError(f"bilateral_filter cannot filter dtype {img.dtype}; use uint8, uint16 or float")
    sample_space, sample_color = check_parameters(sigma_space, sigma_color, method, sample_space, sample_color, backend)
    color_scale = grey_level(img)
    if method == "exact":
        out = _exact_bilateral(img.astype(np.float64), sigma_space, sigma_color * color_scale)
    elif method == "opencv":
        out = _opencv_bilateral(img, sigma_space, sigma_color * color_scale)
    elif backend == "torch":
        out = _grid_bilateral_torch(img, sigma_space, sigma_color * color_scale,
                                    sample_space, sample_color * color_scale, device)
    else:
        out = _grid_bilateral_numpy(img.astype(np.float32), sigma_space, sigma_color * color_scale,
                                    sample_space, sample_color * color_scale)
    return _cast_like(out, img.dtype)


def grey_level(img: np.ndarray) -> float:
    """The image's values per grey level of the 0-255 scale: 1 for 8-bit; for 16-bit, the largest value of the
    bit depth its values use (8, 10, 12, 14 or 16 bits) over 255, where a fixed 257 made a 12-bit X-ray's
    sigma_color wider than its whole range (a plain Gaussian blur); for float, 1/255 when the finite values lie
    within 0-1."""
    if img.dtype == np.uint16:
        bits = max(8, -(-int(img.max()).bit_length() // 2) * 2)
        return (2 ** bits - 1) / 255.0
    if img.dtype.kind == "f":
        finite = img[np.isfinite(img)]
        return 1.0 / 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
    return 1.0


def check_parameters(sigma_space, sigma_color, method, sample_space, sample_color, backend) -> tuple[float, float]:
    """Raise a one-line error for a bad setting; returns the grid sampling rates (defaults: the sigmas)."""
    if method not in METHODS:
        raise ToothSegError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise ToothSegError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    sample_space = sigma_space if sample_space is None else sample_space
    sample_color = sigma_color if sample_color is None else sample_color
    for name, value in (("sigma_space", sigma_space), ("sigma_color", sigma_color),
                        ("sample_space", sample_space), ("sample_color", sample_color)):
        if not 0 < value < math.inf:
            raise ToothSegError(f"{name} must be a finite number > 0, got {value}")
    return sample_space, sample_color


def _cast_like(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return out.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(dtype)


def window_radius(sigma_space: float) -> int:
    return max(1, math.ceil(SPATIAL_TRUNCATE * sigma_space))


def _exact_bilateral(img: np.ndarray, sigma_space: float, sigma_color: float) -> np.ndarray:
    """Brute-force reference: loop over the window's offsets, each one vectorised over all pixels.

    The window is the disc of radius ceil(3 sigma_space); neighbours outside the image are left out
    and the weights renormalised. Cost is O(radius^2) image passes: fine for ~128x128 images.
    """
    height, width = img.shape
    radius = window_radius(sigma_space)
    padded = np.pad(img, radius)
    inside = np.pad(np.ones_like(img), radius)
    numerator = np.zeros_like(img)
    denominator = np.zeros_like(img)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            window = (slice(radius + dy, radius + dy + height), slice(radius + dx, radius + dx + width))
            neighbour = padded[window]
            weight = inside[window] * np.exp(-(dy * dy + dx * dx) / (2 * sigma_space ** 2)
                                             - (neighbour - img) ** 2 / (2 * sigma_color ** 2))
            numerator += weight * neighbour
            denominator += weight
    return numerator / denominator


def _opencv_bilateral(img: np.ndarray, sigma_space: float, sigma_color: float) -> np.ndarray:
    # cv2.bilateralFilter takes 8-bit or float32 only; a 16-bit image goes through float32.
    source = img if img.dtype == np.uint8 else img.astype(np.float32)
    return cv2.bilateralFilter(source, 2 * window_radius(sigma_space) + 1, sigma_color, sigma_space)


@dataclass(frozen=True)
class _GridPlan:
    """The coarse grid's size and blur, shared by the numpy and torch paths."""
    shape: tuple[int, int, int]  # (y, x, intensity) cells
    blur_sigmas: tuple[float, float, float]  # Gaussian sigmas in cells, per axis
    low: float  # the intensity of cell 0


def _plan_grid(img: np.ndarray, sigma_space, sigma_color, sample_space, sample_color) -> _GridPlan:
    """Grid coordinates are (y / sample_space, x / sample_space, (I - min I) / sample_color).

    Pixels splat to their nearest cell in (y, x) and linearly between the two intensity cells
    around them; slicing reads back trilinearly. Each of those steps widens the filter by its
    kernel's variance (1/12 cell^2 for nearest, 1/6 for linear), so the grid blur takes that off
    and the total matches the requested Gaussian; this is worth 5-10 dB of PSNR against the exact filter.
    """
    height, width = img.shape
    low, high = float(img.min()), float(img.max())
    # The last pixel's coordinates, in the float32 arithmetic both paths use, so that its cell agrees.
    last_y, last_x = (np.float32(size - 1) / np.float32(sample_space) for size in (height, width))
    last_z = (np.float32(high) - np.float32(low)) / np.float32(sample_color)
    # +2 cells: the last pixel's lower corner and the upper corner it interpolates towards.
    shape = (int(last_y) + 2, int(last_x) + 2, int(last_z) + 2)
    if math.prod(shape) > GRID_MAX_CELLS:
        raise ToothSegError(f"a {shape[0]}x{shape[1]}x{shape[2]} grid is too big for memory; raise sample_space "
                            f"({sample_space}) or sample_color ({sample_color})")
    blur_space = math.sqrt(max((sigma_space / sample_space) ** 2 - NEAREST_VARIANCE - LINEAR_VARIANCE, 0.0))
    blur_color = math.sqrt(max((sigma_color / sample_color) ** 2 - 2 * LINEAR_VARIANCE, 0.0))
    return _GridPlan(shape, (blur_space, blur_space, blur_color), low)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised taps to ceil(3 sigma); a single tap (no blur) when the cells are already too coarse."""
    radius = math.ceil(SPATIAL_TRUNCATE * sigma)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * max(sigma, 1e-6) ** 2))
    return (taps / taps.sum()).astype(np.float32)


def _grid_bilateral_numpy(img: np.ndarray, sigma_space, sigma_color, sample_space, sample_color) -> np.ndarray:
    plan = _plan_grid(img, sigma_space, sigma_color, sample_space, sample_color)
    height, width = img.shape
    cells_y, cells_x, cells_z = plan.shape
    coord_y = np.arange(height, dtype=np.float32) / np.float32(sample_space)
    coord_x = np.arange(width, dtype=np.float32) / np.float32(sample_space)
    coord_z = (img - np.float32(plan.low)) / np.float32(sample_color)
    cell_z, frac_z = _split(coord_z)

    # Splat with four bincounts over one index: each pixel adds (1 - frac_z) of itself to its cell
    # and frac_z to the next intensity cell (one step on in the flat index; never past the end).
    near_y, near_x = np.rint(coord_y).astype(np.intp), np.rint(coord_x).astype(np.intp)
    index = ((near_y[:, None] * cells_x + near_x) * cells_z + cell_z).ravel()
    values, upper = img.ravel(), frac_z.ravel()
    cells = math.prod(plan.shape)
    # (value, weight) pairs travel together as complex numbers so one gather reads both when slicing.
    grid = np.empty(plan.shape, np.complex64)
    for part, weights in ((grid.real, values), (grid.imag, None)):
        upper_part = np.bincount(index, upper if weights is None else weights * upper, cells)
        total = np.bincount(index, weights, cells) - upper_part
        total[1:] += upper_part[:-1]
        part[...] = total.reshape(plan.shape)

    _blur_grid(grid, plan.blur_sigmas)

    # Slice a band of rows at a time (it stays in cache): blend the two grid rows each image row lies
    # between, which is regular and cheap, then interpolate in intensity and x per pixel.
    (cell_y, frac_y), (cell_x, frac_x) = _split(coord_y), _split(coord_x)
    out = np.empty((height, width), np.float32)
    rows_per_band = max(1, SLICE_BAND_PIXELS // width)
    for top in range(0, height, rows_per_band):
        rows = slice(top, top + rows_per_band)
        band_height = len(cell_y[rows])
        weight_y = frac_y[rows, None, None]
        blended = (grid[cell_y[rows]] * (1 - weight_y) + grid[cell_y[rows] + 1] * weight_y).ravel()
        band_index = (np.arange(band_height)[:, None] * cells_x + cell_x) * cells_z + cell_z[rows]
        left = _lerp_next(blended, band_index, frac_z[rows])
        right = _lerp_next(blended, band_index + cells_z, frac_z[rows])
        sliced = left + (right - left) * frac_x
        out[rows] = sliced.real / sliced.imag
    return out


def _blur_grid(grid: np.ndarray, sigmas: tuple[float, float, float]) -> None:
    """Blur the complex grid in place with a separable Gaussian; cells beyond the grid are empty (zeros).

    OpenCV's sepFilter2D does the 1D passes (several times faster than scipy.ndimage here). For y and
    x the grid is an image whose channels are the (value, weight) pairs of every intensity cell, in
    blocks of at most 128 channels, OpenCV's limit; for intensity it is one row of pairs per (y, x) cell.
    """
    cells_y, cells_x, cells_z = grid.shape
    kernel_y, kernel_x, kernel_z = (_gaussian_kernel(sigma) for sigma in sigmas)
    channels = grid.view(np.float32).reshape(cells_y, cells_x, 2 * cells_z)
    for start in range(0, 2 * cells_z, OPENCV_MAX_CHANNELS):
        block = channels[:, :, start:start + OPENCV_MAX_CHANNELS]
        block[...] = cv2.sepFilter2D(np.ascontiguousarray(block), -1, kernel_x, kernel_y, borderType=cv2.BORDER_CONSTANT)
    pairs = grid.view(np.float32).reshape(cells_y * cells_x, cells_z, 2)
    pairs[...] = cv2.sepFilter2D(pairs, -1, kernel_z, np.ones(1, np.float32), borderType=cv2.BORDER_CONSTANT)


def _split(coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell and float32 fraction of non-negative float32 grid coordinates."""
    cell = np.floor(coord)
    return cell.astype(np.intp), coord - cell


def _lerp_next(flat: np.ndarray, index: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Linear interpolation between flat[index] and flat[index + 1]."""
    low = flat.take(index)
    return low + (flat.take(index + 1) - low) * frac


def _grid_bilateral_torch(img: np.ndarray, sigma_space, sigma_color, sample_space, sample_color, device) -> np.ndarray:
    """The same grid in torch: scatter_add_ splat, shifted-sum blur, grid_sample slice (CUDA when available)."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = _plan_grid(img, sigma_space, sigma_color, sample_space, sample_color)
    height, width = img.shape
    cells_y, cells_x, cells_z = plan.shape
    pixels = torch.from_numpy(img.astype(np.float32, copy=False)).to(device)
    coord_y = torch.arange(height, device=device, dtype=torch.float32) / sample_space
    coord_x = torch.arange(width, device=device, dtype=torch.float32) / sample_space
    coord_z = (pixels - plan.low) / sample_color
    cell_z = coord_z.long()
    frac_z = (coord_z - cell_z).ravel()

    near_y, near_x = torch.round(coord_y).long(), torch.round(coord_x).long()
    index = ((near_y[:, None] * cells_x + near_x) * cells_z + cell_z).ravel()
    volume = torch.zeros(2, math.prod(plan.shape), device=device)
    for channel, values in ((volume[0], pixels.ravel()), (volume[1], torch.ones_like(frac_z))):
        channel.scatter_add_(0, index, values * (1 - frac_z))
        channel.scatter_add_(0, index + 1, values * frac_z)

    # Blur by shifted sums: faster than conv3d on the CPU, and never TF32 (as cuDNN may run conv3d) on a GPU.
    volume = volume.reshape(2, *plan.shape)
    for axis, sigma in enumerate(plan.blur_sigmas):
        taps = _gaussian_kernel(sigma)
        padding = [0] * 6  # F.pad lists the last dimension first
        padding[4 - 2 * axis] = padding[5 - 2 * axis] = len(taps) // 2
        padded = F.pad(volume, padding)
        volume = torch.zeros_like(volume)
        for shift, tap in enumerate(taps):
            volume.add_(padded.narrow(1 + axis, shift, plan.shape[axis]), alpha=float(tap))

    # grid_sample reads (x, y, z) = (last, middle, first volume axis), scaled to [-1, 1] with align_corners.
    def normalised(coord, cells):
        return coord * (2.0 / (cells - 1)) - 1.0

    sample_at = torch.stack(torch.broadcast_tensors(
        normalised(coord_z, cells_z), normalised(coord_x[None, :], cells_x), normalised(coord_y[:, None], cells_y)), dim=-1)
    sliced = F.grid_sample(volume[None], sample_at[None, None], mode="bilinear",
                           padding_mode="zeros", align_corners=True)[0, :, 0]
    return (sliced[0] / sliced[1]).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The dataset tree
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    source: Path
    target: Path
    copy_only: bool  # masks and per-tooth label maps are copied byte for byte, never filtered


@dataclass(frozen=True)
class FilterSettings:
    sigma_space: float
    sigma_color: float
    method: str
    sample_space: float | None
    sample_color: float | None
    backend: str
    device: str | None


def find_jobs(input_dir: Path, output_dir: Path) -> tuple[list[Job], int, int]:
    """Every image under input_dir with its mirrored target; also how many DICOM and other files were left out."""
    jobs, dicom, others = [], 0, 0
    for source in files_below(input_dir):  # through linked folders too; a broken link is named when read
        relative = source.relative_to(input_dir)
        if source.suffix.lower() in DICOM_EXTENSIONS:  # a mirror keeps formats; prepare_sts2d.py makes DICOM PNG
            dicom += 1
        elif not is_image_file(source):
            others += relative.name not in (INDEX_NAME, SETTINGS_NAME)
        else:
            jobs.append(Job(source, output_dir / relative, label_folder(relative) is not None))
    return jobs, dicom, others


def check_same_settings(output_dir: Path, settings: FilterSettings, overwrite: bool, kept_outputs: bool) -> None:
    """A mirror is filtered with one setting: kept outputs of another run with other settings would be mixed with
    this run's (an interrupted run rerun with another --sigma-color), so a rerun with other settings is refused.
    A mirror of before the record keeps no record: what filtered its outputs is not known. An --overwrite run
    records its settings as unfinished until `finish_settings`: stopped halfway, it leaves files of the old filter
    that a rerun without --overwrite would keep beside the new ones."""
    record = output_dir / SETTINGS_NAME
    asked = {name: getattr(settings, name) for name in ("method", "sigma_space", "sigma_color", "sample_space", "sample_color")}
    if record.exists() and not overwrite:
        recorded = json.loads(record.read_text())
        if recorded.get("overwrite_unfinished"):
            raise ToothSegError(f"{output_dir}: an --overwrite run was stopped before it had filtered every file again "
                                f"(see {record}), so files of the earlier filter remain; rerun with --overwrite")
        changed = [name for name in asked if recorded.get(name) != asked[name]]
        if changed:
            raise ToothSegError(f"{output_dir}: filtered with --{changed[0].replace('_', '-')} {recorded.get(changed[0])}, "
                                f"this run asks {asked[changed[0]]}; rerun with the settings in {record}, or --overwrite "
                                f"to filter every file again")
    elif kept_outputs and not overwrite:
        print(f"note: {output_dir} has no {SETTINGS_NAME}, so the filter of the outputs kept there is not known "
              f"(--overwrite filters every file again and records it)")
    else:
        atomic_write_text(record, json.dumps({**asked, **({"overwrite_unfinished": True} if overwrite else {})}, indent=2))


def finish_settings(output_dir: Path) -> None:
    """The end of an --overwrite run: every file is filtered again, so the record stands on its own."""
    record = output_dir / SETTINGS_NAME
    recorded = json.loads(record.read_text())
    recorded.pop("overwrite_unfinished", None)
    atomic_write_text(record, json.dumps(recorded, indent=2))


def process(job: Job, settings: FilterSettings) -> str | None:
    """Filter or copy one file; returns the reason when the image cannot be decoded (it is then skipped)."""
    try:
        if job.copy_only:
            with atomic_path(job.target) as tmp:
                shutil.copyfile(job.source, tmp)
            return None
        try:
            img = decode_image(job.source.read_bytes(), job.source)
        except ToothSegError as exc:
            return str(exc)
        filtered = bilateral_filter(img, settings.sigma_space, settings.sigma_color, settings.method,
                                    settings.sample_space, settings.sample_color, settings.backend, settings.device)
        ok, encoded = cv2.imencode(job.target.suffix, filtered)
        if not ok:
            raise ToothSegError(f"{job.target}: cannot encode a {filtered.dtype} image as {job.target.suffix}")
        atomic_write_bytes(job.target, encoded.tobytes())
    except OSError as exc:
        if exc.filename == str(job.source):  # the input (a broken link, say), not the output
            raise ToothSegError(f"{job.source}: {cannot_read(job.source, exc)}; restore it or remove it") from None
        raise ToothSegError(f"{exc.filename or job.target}: {exc.strerror or exc}; check permissions and free space") from None
    return None


def _init_worker(parent_pid: int) -> None:
    exit_with(parent_pid)  # a killed fbf.py's workers went on writing its outputs
    # Parallel files already fill the cores; library threads inside each worker would only contend.
    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read when torch is first imported in this worker


def resolve_backend(backend: str, device: str | None) -> str:
    """`auto` means torch when a CUDA GPU is present (or a device is named), numpy otherwise."""
    if backend != "auto":
        return backend
    if device is not None:
        return "torch"
    # Importing torch takes about 2 s, more than the grid filter needs for a few images on the CPU,
    # so torch is only asked when a GPU may be there.
    if not gpu_may_be_present():
        return "numpy"
    import torch

    return "torch" if torch.cuda.is_available() else "numpy"


def check_device(device: str) -> None:
    """Fail once, before any file, when --device names no device torch can use here."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise ToothSegError(f"--device {device!r}: not a torch device ({exc}); e.g. cpu or cuda:0") from None
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise ToothSegError(f"--device {device}: no such CUDA device here; leave --device out, or use --device cpu")


def gpu_may_be_present() -> bool:
    """False only when no GPU can be visible: CUDA_VISIBLE_DEVICES hides them all, or there is no GPU
    device node (NVIDIA's, WSL's /dev/dxg, ROCm's /dev/kfd) and the NVIDIA driver lists no GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.split(",")[0].strip() in ("", "-1"):  # CUDA stops at the first invalid id
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or any(Path("/proc/driver/nvidia/gpus").glob("*")) \
        or Path("/dev/dxg").exists() or Path("/dev/kfd").exists()


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("\n\n".join(__doc__.split("\n\n")[:2]))
    folders = parser.add_argument_group("folders")
    folders.add_argument("--input-dir", type=Path, default=Path("sts_tooth_data/processed_2d"), metavar="DIR",
                         help="dataset tree to read (processed_2d from prepare_sts2d.py); never modified")
    folders.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                         help="mirrored output tree, usable as --images-dir; None means INPUT-DIR with _fbf appended")
    filtering = parser.add_argument_group("filter")
    filtering.add_argument("--method", choices=METHODS, default="grid",
                           help="grid: bilateral grid (fast); opencv: cv2.bilateralFilter; exact: brute-force reference (slow)")
    filtering.add_argument("--sigma-space", type=positive_number, default=3.0, metavar="PX", help="spatial Gaussian sigma in pixels")
    filtering.add_argument("--sigma-color", type=positive_number, default=20.0, metavar="LEVELS",
                           help="range Gaussian sigma in grey levels on the 0-255 scale (scaled to a 16-bit image's bit depth)")
    filtering.add_argument("--sample-space", type=positive_number, default=None, metavar="PX",
                           help="grid cell size in pixels; None means --sigma-space (smaller: more exact, slower)")
    filtering.add_argument("--sample-color", type=positive_number, default=None, metavar="LEVELS",
                           help="grid cell size in grey levels (0-255 scale); None means --sigma-color")
    filtering.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                           help="grid implementation; auto: torch on a CUDA GPU when present, numpy otherwise")
    filtering.add_argument("--device", default=None, metavar="DEV", help="torch device such as cuda:1 or cpu (torch backend)")
    running = parser.add_argument_group("run")
    running.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                         help="files processed in parallel (processes)")
    running.add_argument("--overwrite", action="store_true", help="redo outputs that already exist instead of keeping them")
    args = parser.parse_args(argv)

    input_dir = args.input_dir
    output_dir = args.output_dir or input_dir.with_name(input_dir.name + "_fbf")
    if not input_dir.is_dir():
        raise ToothSegError(f"{input_dir}: input folder not found; run prepare_sts2d.py first or pass --input-dir")
    check_output_dir(output_dir, "--output-dir")
    source, target = input_dir.resolve(), output_dir.resolve()
    if target.is_relative_to(source) or source.is_relative_to(target):
        raise ToothSegError(f"{output_dir}: the output folder must lie outside {input_dir} (and not contain it); "
                            f"pick a sibling such as {input_dir.name}_fbf")
    if args.workers < 1:
        raise ToothSegError(f"--workers must be at least 1, got {args.workers}")
    jobs, dicom, others = find_jobs(input_dir, output_dir)
    if not jobs:
        raise ToothSegError(f"{input_dir}: no images found; point --input-dir at processed_2d from prepare_sts2d.py")
    settings = FilterSettings(args.sigma_space, args.sigma_color, args.method, args.sample_space, args.sample_color,
                              resolve_backend(args.backend, args.device), args.device)
    check_parameters(settings.sigma_space, settings.sigma_color, settings.method, settings.sample_space,
                     settings.sample_color, settings.backend)  # fail once here rather than once per file
    if settings.backend == "torch" and args.device is not None:
        check_device(args.device)

    index = find_index(input_dir)
    mirrored = output_dir / INDEX_NAME
    if index is not None and mirrored.exists() and not args.overwrite and mirrored.read_bytes() != index.read_bytes():
        # The data was prepared again since: kept outputs may be of other images, and its splits have changed.
        raise ToothSegError(f"{mirrored}: differs from {index}, so {output_dir} mirrors an earlier preparation; "
                            f"rebuild it with --overwrite")
    check_same_settings(output_dir, settings, args.overwrite, any(job.target.exists() for job in jobs))
    if index is None:
        print(f"note: no {INDEX_NAME} in {input_dir} or its parent; only images and masks are written")
    elif args.overwrite or not mirrored.exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(mirrored) as tmp:
            shutil.copyfile(index, tmp)

    todo = [job for job in jobs if args.overwrite or not job.target.exists()]
    method = f"grid/{settings.backend}" if settings.method == "grid" else settings.method
    print(f"{input_dir} -> {output_dir}: {len(todo)} of {len(jobs)} files to do, {method}, "
          f"sigma_space {settings.sigma_space}, sigma_color {settings.sigma_color}")
    failures = []
    with ExitStack() as stack:
        if args.workers > 1 and len(todo) > 1:
            # spawn: a forked worker cannot use CUDA once the parent has touched it (resolve_backend may have)
            pool = stack.enter_context(ProcessPoolExecutor(args.workers, multiprocessing.get_context("spawn"), _init_worker,
                                                          (os.getpid(),)))
            results = pool.map(process, todo, [settings] * len(todo), chunksize=4)
        else:
            results = (process(job, settings) for job in todo)
        for job, failure in zip(todo, tqdm(results, total=len(todo), unit="file", desc="fbf")):
            if failure:
                failures.append(job.source)
                tqdm.write(f"skipped {failure}")
                if args.overwrite:  # its earlier output is of the old filter, which the record no longer names
                    job.target.unlink(missing_ok=True)

    if args.overwrite:  # every file was redone (one that could not be decoded is named below and has no output)
        finish_settings(output_dir)
    copied = sum(job.copy_only for job in todo)
    print(f"done: {len(todo) - copied - len(failures)} filtered, {copied} copied, {len(jobs) - len(todo)} already there"
          + ("" if args.overwrite else " (--overwrite redoes them)")
          + (f", {dicom} DICOM files left out (prepare_sts2d.py converts them; filter its processed_2d)" if dicom else "")
          + (f", {others} non-image files left out" if others else "")
          + (f", index at {output_dir / INDEX_NAME}" if index else ""))
    if failures:
        raise ToothSegError(f"{len(failures)} of {len(todo)} files could not be decoded and were skipped "
                            f"(named above); replace or remove them and rerun")


if __name__ == "__main__":
    run_cli(main)
