"""Cost of each registry architecture: parameters, forward GFLOPs and the time of one training step's
forward + backward (no optimiser step, no data loading), with ratios to `unet`.

Every model is built as the scripts build it at --base-channels (for the smp models that is the decoder
width and their encoder is the default resnet18), in train mode, in the memory format and autocast dtype
the training scripts choose on that device (engine.memory_format, engine.resolve_amp; --amp off for fp32).
The models take turns round by round, so load from other processes hits them alike. The time is that of
the best round (the median step of the least disturbed round, as benchmarks/throughput.py reports rates),
and the ratios use it; the median over all timed steps is shown beside it, to tell how loaded the machine was.
Prints a Markdown table per device (the CPU, and the GPU when there is one); --out also writes it.

Examples:
  python benchmarks/bench_architectures.py                      # batch 4 at 160x320, CPU (+ GPU)
  python benchmarks/bench_architectures.py --amp off --devices cpu --models unet fpn
"""
from __future__ import annotations

import datetime
import platform
import shlex
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmark sits in benchmarks/ but drives the repository's modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from engine import autocast, memory_format, resolve_amp  # noqa: E402
from models import MODELS, build_model, check_trainable_size  # noqa: E402
from utils import ToothSegError, atomic_write_text, make_parser, output_file, positive_int, run_cli  # noqa: E402


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="NAME",
                        help=f"models to measure ({', '.join(MODELS)}); ratios are to unet, which is always measured")
    parser.add_argument("--height", type=positive_int, default=160, metavar="H")
    parser.add_argument("--width", type=positive_int, default=320, metavar="W")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="B")
    parser.add_argument("--base-channels", type=positive_int, default=32, metavar="C")
    parser.add_argument("--steps", type=positive_int, default=3, metavar="N", help="timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed steps per model before the first round")
    parser.add_argument("--rounds", type=positive_int, default=3, metavar="R", help="rounds in which the models take turns")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="autocast as in the training scripts (engine.resolve_amp); off = fp32")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), metavar="DEV",
                        help="default: cpu, and cuda when a GPU is there")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--out", type=output_file, metavar="FILE", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if "unet" not in args.models:
        args.models = ["unet", *args.models]
    if args.devices is None:
        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in args.devices and not torch.cuda.is_available():
        raise ToothSegError("--devices cuda: no CUDA device here")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_gflops(model: torch.nn.Module, height: int, width: int) -> float:
    """Forward GFLOPs for one image (fp32 count; a multiply-add is 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, height, width, device=next(model.parameters()).device))
    return counter.get_total_flops() / 1e9


def measure_device(args, device: torch.device) -> tuple[list[dict], str]:
    fmt, dtype = memory_format(device), resolve_amp(args.amp, device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.height, args.width, device=device).contiguous(memory_format=fmt)
    target = (torch.rand(args.batch_size, 1, args.height, args.width, device=device) > 0.7).float()
    models, gflops = {}, {}
    for name in args.models:
        model = build_model(name, base_channels=args.base_channels).to(device, memory_format=fmt)
        check_trainable_size(model, (args.height, args.width), args.batch_size, f"--height {args.height} --width {args.width}")
        gflops[name] = forward_gflops(model.eval(), args.height, args.width)
        models[name] = model.train()

    def step(model):
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), target).backward()

    peak = {}
    for name, model in models.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step(model)
        sync(device)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    times = {name: [] for name in models}
    round_medians = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            this_round = []
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                step(model)
                sync(device)
                this_round.append(time.perf_counter() - start)
            times[name] += this_round
            round_medians[name].append(median(this_round))
    rows = []
    for name, model in models.items():
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "gflops": gflops[name],
                     "ms": 1e3 * min(round_medians[name]), "all": 1e3 * median(times[name]),
                     "peak_gib": peak.get(name)})
    if device.type == "cuda":
        described = torch.cuda.get_device_name(device)
    else:
        described = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    precision = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    fmt_name = "channels_last" if fmt == torch.channels_last else "contiguous"
    return rows, f"{described}; autocast {precision}, {fmt_name}"


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["model"] == "unet")
    gpu = rows[0]["peak_gib"] is not None
    head = ["model", "params (M)", "params / unet", "fwd GFLOPs / image", "fwd+bwd ms / step",
            "time / unet", "images / s", "median of all steps (ms)"] + (["peak GiB"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e6:.2f}", f"{r['params'] / base['params']:.2f}x", f"{r['gflops']:.2f}",
                 f"{r['ms']:.1f}", f"{r['ms'] / base['ms']:.2f}x", f"{r['batch'] / r['ms'] * 1e3:.1f}",
                 f"{r['all']:.1f}"] + ([f"{r['peak_gib']:.2f}"] if gpu else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_architectures.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    parts = ["# Architectures: parameters and training-step time", "",
             f"- torch: {torch.__version__}; date: {datetime.date.today().isoformat()}",
             f"- workload: batch {args.batch_size} x 1 x {args.height} x {args.width}, base channels {args.base_channels}, "
             f"{args.warmup} warm-up + {args.rounds} rounds x {args.steps} timed steps per model",
             f"- command: `{command}`"]
    for name in args.devices:
        device = torch.device(name)
        rows, described = measure_device(args, device)
        for r in rows:
            r["batch"] = args.batch_size
        parts += ["", f"## {name}: {described}", "", table(rows)]
    report = "\n".join(parts) + "\n"
    print(report, end="", flush=True)
    if args.out is not None:
        atomic_write_text(args.out, report)
    return report


if __name__ == "__main__":
    run_cli(main)
