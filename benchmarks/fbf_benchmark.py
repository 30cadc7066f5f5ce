"""Benchmark fbf.py's bilateral grid against OpenCV's brute-force bilateral filter, side by side.

    python benchmarks/fbf_benchmark.py                  # phantoms at 320x640 and 1280x2560, plus a real X-ray
    python benchmarks/fbf_benchmark.py --sizes 320x640 --sigma-space 6 --repeats 5

For each image and sigma_space it times the grid (numpy; torch on the CPU; torch on CUDA when there
is a GPU) and cv2.bilateralFilter with d = 2 ceil(3 sigma_space) + 1, taking the best of --repeats
runs (interleaved) after one warm-up. All times are numpy array in, numpy array out (CUDA times include the copies).
Fidelity is PSNR of each 8-bit output against the exact bilateral filter (fbf's brute-force
reference, float64, window radius ceil(3 sigma_space)). The exact filter is too slow for whole
large images, so it is computed for a central window only, with its full neighbourhood around it,
and PSNR is measured on that window; the window is away from the border, where OpenCV (mirrored
border) and the grid (no pixels outside) legitimately differ.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fbf  # noqa: E402
from phantom import MIN_SIZE as MIN_PHANTOM_SIZE, generate_panoramic  # noqa: E402
from utils import ToothSegError, atomic_write_text, make_parser, output_file, read_image, run_cli, to_uint8  # noqa: E402

REAL_IMAGES = REPO.parent / "shared" / "data" / "ufba425-dev" / "images"


def best_times_ms(runs: dict, repeats: int) -> dict:
    """Best wall time of each run, with the runs interleaved so that load from other processes hits them alike."""
    for run in runs.values():
        run()  # warm-up: imports, allocations, CUDA kernels
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1000 for name, seconds in best.items()}


def psnr(test: np.ndarray, reference: np.ndarray) -> float:
    error = np.mean((test.astype(np.float64) - reference) ** 2)
    return float(10 * np.log10(255.0 ** 2 / error))


def exact_window(image: np.ndarray, sigma_space: float, sigma_color: float, window: tuple[slice, slice]) -> np.ndarray:
    """The exact filter on `window` only: filter the window plus its neighbourhood, keep the window."""
    margin = fbf.window_radius(sigma_space)
    rows, cols = window
    padded = image[rows.start - margin:rows.stop + margin, cols.start - margin:cols.stop + margin]
    exact = fbf.bilateral_filter(padded.astype(np.float64), sigma_space, sigma_color, method="exact")
    return exact[margin:-margin, margin:-margin]


def central_window(shape: tuple[int, int], size: tuple[int, int], margin: int) -> tuple[slice, slice]:
    height, width = (min(size[0], shape[0] - 2 * margin), min(size[1], shape[1] - 2 * margin))
    if height <= 0 or width <= 0:
        raise ToothSegError(f"a {shape[0]}x{shape[1]} image is too small for a PSNR window {margin} px from its border")
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    return slice(top, top + height), slice(left, left + width)


def parse_size(text: str, flag: str, smallest: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ToothSegError(f"{flag}: {text!r} is not HEIGHTxWIDTH, e.g. 320x640") from None
    if height < smallest[0] or width < smallest[1]:
        raise ToothSegError(f"{flag}: {text!r} is smaller than {smallest[0]}x{smallest[1]}; give a larger HEIGHTxWIDTH")
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    images = parser.add_argument_group("images")
    images.add_argument("--sizes", nargs="+", default=["320x640", "1280x2560"], metavar="HxW",
                        help="phantom image sizes (phantom.generate_panoramic, adult)")
    images.add_argument("--real-image", type=Path, default=None, metavar="PNG",
                        help="a real X-ray to add, resized to 320x640; None means the first ufba425-dev image when present")
    images.add_argument("--seed", type=int, default=0, help="phantom seed")
    filtering = parser.add_argument_group("filter")
    filtering.add_argument("--sigma-space", type=float, nargs="+", default=[3.0, 6.0, 12.0], metavar="PX")
    filtering.add_argument("--sigma-color", type=float, default=30.0, metavar="LEVELS")
    measuring = parser.add_argument_group("measurement")
    measuring.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per method; the best counts")
    measuring.add_argument("--threads", type=int, default=os.cpu_count(), metavar="N",
                           help="threads for OpenCV and torch on the CPU (the numpy grid is single-threaded)")
    measuring.add_argument("--psnr-window", default="128x256", metavar="HxW", help="central window where PSNR is measured")
    measuring.add_argument("--no-torch", action="store_true", help="skip the torch backend")
    measuring.add_argument("--output", type=output_file, default=None, metavar="MD", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise ToothSegError("--repeats and --threads must be at least 1")

    psnr_window = parse_size(args.psnr_window, "--psnr-window")
    test_images = [(f"phantom {h}x{w}", generate_panoramic(args.seed, h, w, age_group="adult")[0])
                   for h, w in (parse_size(size, "--sizes", MIN_PHANTOM_SIZE) for size in args.sizes)]
    real = args.real_image
    if real is None and REAL_IMAGES.is_dir():
        real = next(iter(sorted(REAL_IMAGES.glob("*.png"))), None)
    if real is not None:
        resized = cv2.resize(to_uint8(read_image(real)), (640, 320), interpolation=cv2.INTER_AREA)
        test_images.append((f"real 320x640 ({real.stem})", resized))

    cv2.setNumThreads(args.threads)
    torch_devices = []
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        torch_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    sigma_color = args.sigma_color
    rows = []
    settings = [(name, image, sigma_space) for name, image in test_images for sigma_space in args.sigma_space]
    for name, image, sigma_space in tqdm(settings, desc="benchmark", unit="setting"):
        filter_image = functools.partial(fbf.bilateral_filter, image, sigma_space, sigma_color)
        runs = {"grid numpy": filter_image}
        for device in torch_devices:
            runs[f"grid torch {device}"] = functools.partial(filter_image, backend="torch", device=device)
        runs["opencv"] = functools.partial(filter_image, method="opencv")
        timings = best_times_ms(runs, args.repeats)

        window = central_window(image.shape, psnr_window, fbf.window_radius(sigma_space))
        exact = exact_window(image, sigma_space, sigma_color, window)
        grid_psnr = psnr(filter_image()[window], exact)
        opencv_psnr = psnr(runs["opencv"]()[window], exact)
        rows.append((name, sigma_space, timings, grid_psnr, opencv_psnr, window))

    table = markdown_table(rows, sigma_color, args)
    print(table)
    if args.output:
        atomic_write_text(args.output, table + "\n")


def markdown_table(rows, sigma_color, args) -> str:
    timed = list(rows[0][2])
    header = (["image", "σs"] + [f"{method} (ms)" for method in timed]
              + ["OpenCV / grid numpy", "PSNR grid (dB)", "PSNR OpenCV (dB)", "PSNR window"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, sigma_space, timings, grid_psnr, opencv_psnr, window in rows:
        window_text = f"{window[0].stop - window[0].start}x{window[1].stop - window[1].start}"
        cells = ([name, f"{sigma_space:g}"] + [f"{timings[method]:.1f}" for method in timed]
                 + [f"{timings['opencv'] / timings['grid numpy']:.1f}x", f"{grid_psnr:.1f}", f"{opencv_psnr:.1f}", window_text])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"σr = {sigma_color:g} (0-255 scale), grid sampling = (σs, σr), OpenCV d = 2·ceil(3σs)+1; "
                 f"best of {args.repeats} runs; {args.threads} thread(s) for OpenCV and torch CPU, numpy grid single-threaded; "
                 f"PSNR of the 8-bit outputs against the exact filter (float64) on a central window.")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
