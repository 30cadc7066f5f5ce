"""Seconds per X-ray from file to mask, in sliding windows and in one whole-input pass (issue 13's
target: under 2 s for a base-16 model on a 1615x840 Tufts X-ray on the 2-core CPU).

Each image is timed from its file to the binary mask at its own size, as eval.py, the visualizer and the
notebook predict (predict.Predictor): decode, the checkpoint's eval transform, the network in the
checkpoint's windows blended into the whole input (or one pass without a window), optional flip TTA, the
probabilities resized back, threshold. The two ways run the same weights, interleaved image by image, so load
from other processes hits both alike. Reported: the best and median seconds per image of each way, and
windows / whole as the median of per-image ratios.

Without --checkpoint the model is a freshly initialised one shaped as the Tufts recipe (UNet base 16, input
320x640, 320x320 windows, overlap 0.5, area resize): the time does not depend on what the weights learnt.

Examples:
  python benchmarks/window_inference.py                                  # tufts-dev images, when present
  python benchmarks/window_inference.py --checkpoint runs/tufts_recipe --tta --images ../shared/data/tufts-dev/images
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmark sits in benchmarks/ but drives the repository's modules

import cv2  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.throughput import run_header  # noqa: E402
from checkpoints import Checkpoint, DataSpec, ModelSpec, TrainingState, plain  # noqa: E402
from data import NORM_MEAN, NORM_STD  # noqa: E402
from engine import memory_format, resolve_amp, run_precision, setup_runtime  # noqa: E402
from models import build_model, check_window  # noqa: E402
from phantom import generate_panoramic  # noqa: E402
from predict import Predictor, load_predictor  # noqa: E402
from utils import (ToothSegError, atomic_write_text, is_image_file, make_parser, output_file,  # noqa: E402
                   read_image, run_cli, to_uint8, write_png)

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "tufts-dev" / "images"
TUFTS_SIZE = (840, 1615)  # (H, W) of a Tufts Dental Database panoramic


def parse_args(argv=None):
    parser = make_parser(__doc__)
    work = parser.add_argument_group("workload")
    work.add_argument("--checkpoint", type=Path, metavar="PATH",
                      help="a segmentation checkpoint trained with --window (or its run folder); default: a fresh model "
                           "shaped by the flags below")
    work.add_argument("--images", default=str(DEFAULT_IMAGES) if DEFAULT_IMAGES.is_dir() else "phantom", metavar="DIR",
                      help="a folder of X-rays, or 'phantom' for synthetic ones at 1615x840")
    work.add_argument("--count", type=int, default=5, metavar="N", help="images timed (the folder's first N by name)")
    work.add_argument("--repeats", type=int, default=3, metavar="R", help="timed passes over the images")
    work.add_argument("--tta", action="store_true", help="also predict the flipped image, as eval.py --tta")
    fresh = parser.add_argument_group("the fresh model, without --checkpoint")
    fresh.add_argument("--model-type", default="unet", metavar="NAME")
    fresh.add_argument("--base-channels", type=int, default=16, metavar="C")
    fresh.add_argument("--input-size", type=int, nargs=2, default=(320, 640), metavar=("H", "W"))
    fresh.add_argument("--window", type=int, nargs=2, default=(320, 320), metavar=("H", "W"))
    fresh.add_argument("--window-overlap", type=float, default=0.5, metavar="F")
    output = parser.add_argument_group("device and output")
    output.add_argument("--threads", type=int, default=torch.get_num_threads(), metavar="N",
                        help="torch intra-op threads")
    output.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    output.add_argument("--out", type=output_file, metavar="FILE", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    for name in ("count", "repeats", "threads", "base_channels"):
        if getattr(args, name) < 1:
            raise ToothSegError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.window_overlap < 1:
        raise ToothSegError(f"--window-overlap must be in [0, 1), got {args.window_overlap}")
    check_window(args.window, args.input_size, f"--input-size {args.input_size[0]} {args.input_size[1]}")
    return args


def fresh_predictor(args, device: torch.device) -> Predictor:
    """A randomly initialised model in a checkpoint record shaped as the recipe's, through the same Predictor."""
    torch.manual_seed(0)
    model = build_model(args.model_type, base_channels=args.base_channels)
    data = DataSpec(input_size=tuple(args.input_size), norm_mean=NORM_MEAN, norm_std=NORM_STD,
                    window=tuple(args.window), window_overlap=args.window_overlap, image_resize="area")
    # Recorded as a run trained here with --amp auto, so it predicts in the dtype such a run would.
    record = Checkpoint(kind="segmentation", model=ModelSpec(model.name, plain(model.config)), data=data,
                        precision=run_precision("auto", resolve_amp("auto", device)),
                        state=TrainingState(model.state_dict()))
    return Predictor(model.to(device, memory_format=memory_format(device)).eval(), record, device)


def image_files(source: str, count: int, tmp: Path) -> tuple[list[Path], str]:
    """The first `count` X-rays of a folder (or synthetic 1615x840 ones written to `tmp`) and a description."""
    if source == "phantom":
        files = []
        for i in range(count):
            image, _ = generate_panoramic(seed=i)
            files.append(tmp / f"phantom_{i:03d}.png")
            write_png(files[-1], cv2.resize(image, TUFTS_SIZE[::-1], interpolation=cv2.INTER_LINEAR))
        return files, f"{count} synthetic phantoms resized to {TUFTS_SIZE[1]}x{TUFTS_SIZE[0]}"
    folder = Path(source)
    files = sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []
    if not files:
        raise ToothSegError(f"{folder}: no images found; pass a folder of X-rays with --images, or --images phantom")
    files = files[:count]
    sizes = sorted({read_image(p).shape[:2] for p in files})
    return files, f"{folder}, first {len(files)} by name, sizes (HxW) {', '.join(f'{h}x{w}' for h, w in sizes)}"


def seconds_to_mask(predictor: Predictor, path: Path, tta: bool, device: torch.device) -> float:
    start = time.perf_counter()
    predictor.predict(to_uint8(read_image(path)), tta=tta)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist, device = setup_runtime(args.cpu)
    if dist.enabled:
        raise ToothSegError("run the benchmark as a single process, not under torchrun")
    windowed = load_predictor(args.checkpoint, device) if args.checkpoint else fresh_predictor(args, device)
    data = windowed.checkpoint.data
    if data.window is None:
        raise ToothSegError(f"{windowed.path}: was trained without --window; there are no windows to time")
    whole = replace(windowed, checkpoint=replace(windowed.checkpoint, data=replace(data, window=None)))
    ways = {"windows": windowed, "whole input": whole}

    with tempfile.TemporaryDirectory(prefix="toothseg_bench_") as tmp:
        files, images_note = image_files(args.images, args.count, Path(tmp))
        for predictor in ways.values():  # untimed: first-call allocations and oneDNN's kernel choice
            seconds_to_mask(predictor, files[0], args.tta, device)
        seconds = {name: [] for name in ways}
        ratios = []
        with tqdm(total=args.repeats * len(files), desc="images", disable=None) as bar:
            for repeat in range(args.repeats):
                for i, path in enumerate(files):
                    order = list(ways) if (repeat + i) % 2 == 0 else list(ways)[::-1]
                    timed = {name: seconds_to_mask(ways[name], path, args.tta, device) for name in order}
                    for name, value in timed.items():
                        seconds[name].append(value)
                    ratios.append(timed["windows"] / timed["whole input"])
                    bar.update()

    model = windowed.checkpoint.model
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[windowed.amp_dtype]
    header = {
        **run_header(device, "benchmarks/window_inference.py", argv),
        "model": (f"{args.checkpoint or 'fresh weights'}: {model.name} {model.args.get('base_channels', '')}, "
                  f"input {data.input_size[0]}x{data.input_size[1]}, window {data.window[0]}x{data.window[1]}, "
                  f"overlap {data.window_overlap}, {precision}, flip TTA {'on' if args.tta else 'off'}"),
        "images": f"{images_note}; {args.repeats} timed passes after one untimed image per way",
    }
    lines = ["# ToothSeg inference: file to mask at the image's own size", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["| way | best s/image | median s/image |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {min(values):.3f} | {median(values):.3f} |" for name, values in seconds.items()]
    lines += ["", f"windows / whole input, median of per-image ratios: {median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})"]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        atomic_write_text(args.out, report)


if __name__ == "__main__":
    run_cli(main)
