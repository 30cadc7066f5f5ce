"""Throughput of the ToothSeg training path against the seeds' naive loop, on this machine's device
(CPU, or CUDA when there is a GPU).

For each model it measures train-step, inference and data-pipeline images/s on two paths,
interleaved round by round so that load from other processes hits both alike:
  ours   what finetune_seg.py runs: engine.Trainer with its own flags' defaults (RAM cache of decoded
         images, persistent DataLoader workers, resolve_amp autocast, engine.memory_format, AdamW,
         fused on CUDA, zero_grad(set_to_none=True), cudnn.benchmark, optional torch.compile)
  naive  the seeds' loop: fp32, NCHW, PNG decode every step, num_workers=0, plain Adam,
         zero_grad(), loss.item() every step
It also counts the model's FLOPs (torch.utils.flop_counter) and reports the achieved TFLOP/s and, on a
GPU, the share of the device's bf16 peak. Prints a Markdown report; --out also writes it.

A block is warm-up + timed steps (+1: the clock stops at the start of the last step, after a device
sync, so the interval holds whole steps: data, copy and compute). Rates are those of the best round
(the least disturbed by other processes); speed-up = naive time / our time within a round, as the
median and range over rounds.

Examples:
  python benchmarks/throughput.py --height 160 --width 320 --batch-size 4 --steps 3 --warmup 1   # CPU
  python benchmarks/throughput.py --height 320 --width 640 --batch-size 16 --compile               # GPU
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmark sits in benchmarks/ but drives the repository's modules

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import SegmentationDataset, build_eval_transform, build_train_transform  # noqa: E402
from engine import (build_trainer, data_spec, make_loader, memory_format, prepare_model,  # noqa: E402
                    setup_runtime)
from finetune_seg import SegmentationTask, parse_args as finetune_args  # noqa: E402
from index import samples_from_folders  # noqa: E402
from metrics import BCEDiceLoss, dice_per_image  # noqa: E402
from models import MODELS, build_model  # noqa: E402
from phantom import generate_panoramic  # noqa: E402
from utils import ToothSegError, atomic_write_text, make_parser, output_file, run_cli, write_png  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "ufba425-dev"
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts unless named); first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def parse_args(argv=None):
    parser = make_parser(__doc__)
    work = parser.add_argument_group("workload")
    work.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="NAME",
                      help=f"models to measure ({', '.join(MODELS)})")
    work.add_argument("--height", type=int, default=320, metavar="H", help="network input height")
    work.add_argument("--width", type=int, default=640, metavar="W", help="network input width")
    work.add_argument("--batch-size", type=int, default=8, metavar="B")
    work.add_argument("--base-channels", type=int, default=32, metavar="C")
    work.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else "phantom", metavar="DIR",
                      help="a folder with images/ and masks/ (same file names), or 'phantom' for synthetic "
                           "320x640 PNGs written to a temporary folder")
    work.add_argument("--phantom-images", type=int, default=32, metavar="N",
                      help="with --data phantom: distinct images written (reused to fill the blocks)")

    measure = parser.add_argument_group("measurement")
    measure.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps per block")
    measure.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed steps at the start of each block")
    measure.add_argument("--repeats", type=int, default=3, metavar="R", help="interleaved rounds (best rate and median speed-up are reported)")
    measure.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                         help="DataLoader workers of our path")
    measure.add_argument("--threads", type=int, default=os.cpu_count() or 1, metavar="N", help="torch intra-op threads")
    measure.add_argument("--profile", action="store_true",
                         help="also run torch.profiler over one training block of our path (first model)")

    ours = parser.add_argument_group("our path's settings")
    ours.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                      help="as in the training scripts (engine.resolve_amp decides)")
    ours.add_argument("--memory-format", choices=("auto", *MEMORY_FORMATS), default="auto",
                      help="auto = engine.memory_format (what the scripts use); the others are experiments")
    ours.add_argument("--compile", action="store_true", help="torch.compile our model (compiles in the warm-up steps)")

    output = parser.add_argument_group("device and output")
    output.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    output.add_argument("--peak-tflops", type=float, metavar="TF",
                        help="device peak for the %%-of-peak column (default: bf16 dense peak of known GPUs; none on CPU)")
    output.add_argument("--out", type=output_file, metavar="FILE", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    for name in ("height", "width", "batch_size", "base_channels", "steps", "repeats", "threads", "phantom_images"):
        if getattr(args, name) < 1:
            raise ToothSegError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup", "workers"):
        if getattr(args, name) < 0:
            raise ToothSegError(f"--{name} must be at least 0, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------------------------
# Data: real labelled PNGs, or phantoms written to a temporary folder
# ----------------------------------------------------------------------------------------------
def benchmark_samples(source: str, count: int, tmp: Path, phantom_images: int):
    """`count` labelled samples (files reused in turn when there are fewer) and a description."""
    if source == "phantom":
        folder = tmp / "phantom"
        for i in range(phantom_images):
            image, mask = generate_panoramic(seed=i)
            write_png(folder / "images" / f"phantom_{i:03d}.png", image)
            write_png(folder / "masks" / f"phantom_{i:03d}.png", mask)
        described = f"{phantom_images} synthetic 320x640 phantom PNGs"
    else:
        folder = Path(source)
        if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
            raise ToothSegError(f"{folder}: needs images/ and masks/ subfolders; pass such a folder or --data phantom")
        described = str(folder)
    samples = samples_from_folders(folder / "images", folder / "masks")
    return [samples[i % len(samples)] for i in range(count)], f"{described} ({len(samples)} files)"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
class StepClock:
    """Read at the start of every step; marks the start of step `first` and of step `last` after a
    device sync, so the interval holds last - first whole steps."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.first, self.last = device, warmup, warmup + steps
        self.calls, self.marks = 0, []

    def tick(self) -> None:
        if self.calls in (self.first, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())
        self.calls += 1

    def images_per_second(self, batch_size: int) -> float:
        assert len(self.marks) == 2, f"the block ended after {self.calls} steps, before its last timed step"
        return (self.last - self.first) * batch_size / (self.marks[1] - self.marks[0])


class TimedTask:
    """The fine-tuning task with the clock read first: the Trainer calls its task once per step."""

    def __init__(self, task: SegmentationTask):
        self.task, self.clock = task, None

    def train_step(self, model, batch):
        self.clock.tick()
        return self.task.train_step(model, batch)

    def val_step(self, model, batch):
        self.clock.tick()
        return self.task.val_step(model, batch)

    def visuals(self, batch, output):
        return self.task.visuals(batch, output)


@contextmanager
def seed_cudnn_settings():
    """The seeds never turn on cudnn.benchmark (setup_runtime does, for our path)."""
    ours = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = ours


def naive_train(model, optimizer, loss_fn, loader, device, clock):
    """The seeds' training loop."""
    model.train()
    running_loss = 0.0
    for images, masks, _ in loader:
        images, masks = images.to(device), masks.to(device)
        clock.tick()
        optimizer.zero_grad()
        loss = loss_fn(model(images), masks)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return running_loss


@torch.no_grad()
def naive_inference(model, loader, device, clock):
    """The seeds' validation loop: fp32 forward and Dice, one sync per batch."""
    model.eval()
    dice_sum = 0.0
    for images, masks, _ in loader:
        images, masks = images.to(device), masks.to(device)
        clock.tick()
        dice_sum += dice_per_image(model(images), masks).sum().item()
    return dice_sum


def pipeline(loader, clock):
    """Decode + augment + collate alone, no model."""
    for _ in loader:
        clock.tick()


def profile(run, device: torch.device) -> str:
    """torch.profiler over one block: the top operators, and how long the loop waited for data."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    waited = sum(e.cpu_time_total for e in events if e.key.startswith("enumerate(DataLoader)")) / 1e6
    table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15)
    return f"{table.strip()}\nwaiting for the DataLoader: {waited:.3f} s of {wall:.3f} s ({100 * waited / wall:.1f}%)"


# ----------------------------------------------------------------------------------------------
# Compute use
# ----------------------------------------------------------------------------------------------
def flops_per_image(name: str, base_channels: int, height: int, width: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one image, counted on the meta device (shapes only).
    The counter covers convolutions and matmuls, which is nearly all of a U-Net's arithmetic."""
    with torch.device("meta"):
        model = build_model(name, base_channels=base_channels)
        image = torch.empty(1, 1, height, width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(image).sum().backward()
    return forward, counter.get_total_flops()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{names[0] if names else platform.processor() or platform.machine()} (CPU, {torch.get_num_threads()} threads)"


def run_header(device: torch.device, script: str, argv: list[str] | None) -> dict[str, str]:
    """The first lines of a benchmark report: where, with what and when it ran, and the command that repeats it."""
    args = sys.argv[1:] if argv is None else argv
    return {"device": device_name(device), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"`python {' '.join(shlex.quote(a) for a in [script, *args])}`"}


def device_peak_tflops(requested: float | None, device: torch.device) -> float | None:
    if requested is not None or device.type != "cuda":
        return requested
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def render_report(args, *, header: dict, rates: dict, ratios: dict, flops: dict, peak: float | None,
                  profile_table: str | None) -> str:
    lines = ["# ToothSeg throughput", ""] + [f"- {k}: {v}" for k, v in header.items()] + [""]
    lines += ["## Throughput (images/s of the best round; speed-up = naive time / our time in the same round, "
              "median and range over rounds)", "",
              "| model | train ours | train naive | train speed-up | inference ours | inference naive | inference speed-up |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.models:
        cells = []
        for kind in ("train", "inference"):
            spread = ratios[name, kind]
            cells += [f"{max(rates[name, 'ours', kind]):.2f}", f"{max(rates[name, 'naive', kind]):.2f}",
                      f"{median(spread):.2f}x ({min(spread):.2f}-{max(spread):.2f})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    peak_note = f"{peak:g} TFLOP/s" if peak else "no peak known for this device (give --peak-tflops)"
    lines += ["", f"## Compute use of our path (peak: {peak_note})", "",
              "| model | GFLOP/image forward | GFLOP/image train step | train TFLOP/s | inference TFLOP/s | train % of peak |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.models:
        forward, train = flops[name]
        train_tflops = train * max(rates[name, "ours", "train"]) / 1e12
        infer_tflops = forward * max(rates[name, "ours", "inference"]) / 1e12
        share = f"{100 * train_tflops / peak:.1f}" if peak else "n/a"
        lines.append(f"| {name} | {forward / 1e9:.4g} | {train / 1e9:.4g} | {train_tflops:.4g} | {infer_tflops:.4g} | {share} |")

    fastest_train = max(max(rates[name, "ours", "train"]) for name in args.models)
    lines += ["", "## Data pipeline (decode + augment + collate, no model)", "",
              f"The pipeline keeps up when its rate is at least the fastest training rate ({fastest_train:.2f} images/s).", "",
              "| pipeline | images/s | pipeline / fastest train |", "| --- | ---: | ---: |"]
    for path, described in (("ours", f"RAM cache, workers: {args.workers}"), ("naive", "PNG decode every step, 0 workers")):
        rate = max(rates["data", path, "pipeline"])
        lines.append(f"| {path}: {described} | {rate:.1f} | {rate / fastest_train:.1f}x |")
    if profile_table is not None:
        lines += ["", "## Profile of one training block of our path", "", "```", profile_table.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist, device = setup_runtime(args.cpu)  # also turns on cudnn.benchmark on CUDA, as for every training script
    if dist.enabled:
        raise ToothSegError("run the benchmark as a single process, not under torchrun")
    steps_per_block = args.warmup + args.steps + 1
    new_clock = lambda: StepClock(device, args.warmup, args.steps)  # noqa: E731

    # Our path's settings come from finetune_seg.py's own argument parser, so its defaults are the scripts'.
    script_args = finetune_args(["--img-height", str(args.height), "--img-width", str(args.width),
                                 "--batch-size", str(args.batch_size), "--num-workers", str(args.workers),
                                 "--amp", args.amp, "--epochs", str(args.repeats)] + (["--compile"] if args.compile else []))

    with tempfile.TemporaryDirectory(prefix="toothseg_bench_") as tmp:
        samples, data_note = benchmark_samples(args.data, steps_per_block * args.batch_size, Path(tmp), args.phantom_images)
        height, width, seed = args.height, args.width, script_args.seed

        # Data: ours caches decoded images and overlaps augmentation in workers; naive decodes in the loop.
        train_set = SegmentationDataset(samples, build_train_transform(height, width), seed=seed, cache=script_args.cache_images)
        val_set = SegmentationDataset(samples, build_eval_transform(height, width), seed=seed, fixed=True,
                                      cache=script_args.cache_images)
        loader_args = dict(batch_size=args.batch_size, workers=args.workers, dist=dist, device=device, seed=seed)
        loaders = {"ours": {"train": make_loader(train_set, train=True, **loader_args),
                            "inference": make_loader(val_set, train=False, **loader_args)}}
        pin = device.type == "cuda"
        loaders["naive"] = {
            "train": DataLoader(SegmentationDataset(samples, build_train_transform(height, width), seed=seed),
                                batch_size=args.batch_size, shuffle=True, num_workers=0, pin_memory=pin),
            "inference": DataLoader(SegmentationDataset(samples, build_eval_transform(height, width), seed=seed, fixed=True),
                                    batch_size=args.batch_size, num_workers=0, pin_memory=pin)}

        # Models: the same initial weights on both paths.
        trainers, naive = {}, {}
        for name in args.models:
            torch.manual_seed(seed)
            fresh = build_model(name, base_channels=args.base_channels)
            naive_model = copy.deepcopy(fresh).to(device)
            naive[name] = (naive_model, torch.optim.Adam(naive_model.parameters(), lr=script_args.lr))
            model = prepare_model(fresh, device, dist, args.compile)
            fmt = MEMORY_FORMATS[args.memory_format] if args.memory_format != "auto" else memory_format(device)
            model.to(memory_format=fmt)
            trainers[name] = build_trainer(script_args, task=TimedTask(SegmentationTask(script_args.lambda_dice)), model=model,
                                           kind="segmentation", data=data_spec(script_args), task_settings={},
                                           steps_per_epoch=len(loaders["ours"]["train"]), device=device, dist=dist,
                                           monitor="val/dice", mode="max", tensorboard=False, fmt=fmt)
        loss_fn = BCEDiceLoss(script_args.lambda_dice)

        def run_block(name: str, path: str, kind: str, epoch: int) -> float:
            clock = new_clock()
            if kind == "pipeline":
                pipeline(loaders[path]["train"], clock)
            elif path == "ours":
                trainers[name].task.clock = clock
                if kind == "train":  # the Trainer's own epoch loop, without validation or checkpoints
                    trainers[name].train_epoch(loaders["ours"]["train"], epoch, args.repeats)
                else:
                    trainers[name].evaluate(loaders["ours"]["inference"])
            else:
                with seed_cudnn_settings():
                    if kind == "train":
                        naive_train(*naive[name], loss_fn, loaders["naive"]["train"], device, clock)
                    else:
                        naive_inference(naive[name][0], loaders["naive"]["inference"], device, clock)
            return clock.images_per_second(args.batch_size)

        # Interleave: every round runs every block on both paths, alternating which path goes first.
        blocks = [(name, kind) for name in args.models for kind in ("train", "inference")] + [("data", "pipeline")]
        rates, ratios = defaultdict(list), defaultdict(list)
        with tqdm(total=args.repeats * len(blocks), desc="benchmark blocks", disable=None) as bar:
            for round_index in range(args.repeats):
                for name, kind in blocks:
                    order = ("ours", "naive") if round_index % 2 == 0 else ("naive", "ours")
                    for path in order:
                        rates[name, path, kind].append(run_block(name, path, kind, round_index))
                    ratios[name, kind].append(rates[name, "ours", kind][-1] / rates[name, "naive", kind][-1])
                    bar.update()

        profile_table = profile(lambda: run_block(args.models[0], "ours", "train", args.repeats), device) \
            if args.profile else None

        first = trainers[args.models[0]]
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[first.amp_dtype]
        fmt = "channels_last" if first.fmt == torch.channels_last else "NCHW"
        fused = "fused " if first.optimizer.defaults.get("fused") else ""
        header = {
            **run_header(device, "benchmarks/throughput.py", argv),
            "workload": (f"{height}x{width} px, batch {args.batch_size}, base channels {args.base_channels}, data {data_note}; "
                         f"each block {args.warmup} warm-up + {args.steps} timed steps; {args.repeats} interleaved rounds"),
            "ours": (f"{precision}, {fmt}{' (--memory-format override)' if args.memory_format != 'auto' else ''}, "
                     f"RAM cache, persistent workers: {args.workers}, {fused}AdamW, zero_grad(set_to_none=True), "
                     f"cudnn.benchmark {'on' if device.type == 'cuda' else 'n/a'}, compile {'on' if args.compile else 'off'}"),
            "naive": "fp32, NCHW, PNG decode every step, 0 workers, Adam, zero_grad(), loss.item() every step",
        }
        flops = {name: flops_per_image(name, args.base_channels, height, width) for name in args.models}
        report = render_report(args, header=header, rates=rates, ratios=ratios, flops=flops,
                               peak=device_peak_tflops(args.peak_tflops, device), profile_table=profile_table)
    print(report, end="")
    if args.out is not None:
        atomic_write_text(args.out, report)


if __name__ == "__main__":
    run_cli(main)
