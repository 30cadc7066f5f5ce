"""Inspect checkpoints: what one file holds, and what two files share.

  python tool.py CKPT              kind, model and its arguments, the data, precision and task sections,
                                   epoch, metrics, best record, parameter count, run arguments
                                   and every key's shape
  python tool.py --diff A B        keys in both (equal shapes; equal values or the largest difference),
                                   only in A, only in B, shape mismatches, and how much of B
                                   `--init-from A` would fill

Reads ToothSeg checkpoints (best.pth, last.pth, or a run folder; older formats and names too) and bare
state_dicts (`torch.save(model.state_dict(), path)`), always with torch.load(weights_only=True).
The diff matches keys as --init-from does: DDP/compile prefixes ('module.', '_orig_mod.') are
stripped and BatchNorm step counters (num_batches_tracked) are left out.

Examples:
  python tool.py runs/demo/cells/unet_mim_f1_s0/best.pth --no-keys
  python tool.py --diff runs/demo/pretrain/mim_unet/best.pth runs/demo/cells/unet_mim_f1_s0/best.pth
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from checkpoints import FORMAT, MIN_TRANSFER_COVERAGE, Checkpoint, read_weights, resolve_checkpoint_path, transferable_state
from utils import make_parser, run_cli

BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    inspect = parser.add_argument_group("inspect one file")
    inspect.add_argument("checkpoint", nargs="?", type=Path, metavar="CKPT", help="checkpoint or bare state_dict")
    compare = parser.add_argument_group("compare two files")
    compare.add_argument("--diff", nargs=2, type=Path, metavar=("A", "B"),
                         help="what A and B share; read A as the pretrained source and B as the model it would initialise")
    output = parser.add_argument_group("output")
    output.add_argument("--keys", action=argparse.BooleanOptionalAction, default=True,
                        help="list every key with its shape (with --diff: its status in A and B); on by default")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.diff is None):
        parser.error("give one CKPT to inspect, or --diff A B to compare")
    return args


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def parameter_count(state: dict[str, torch.Tensor]) -> int:
    """Learnable elements: every tensor except BatchNorm running statistics (the only buffers ToothSeg models have)."""
    return sum(v.numel() for k, v in state.items() if not k.endswith(BATCHNORM_STATISTICS))


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list], indent: str = "  ") -> str:
    """A plain-text table; numbers are right-aligned."""
    cells = [[str(h) for h in headers]] + [[cell_text(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) if rows else False
               for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] and n else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(indent + "  ".join(parts).rstrip())
        if n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cell_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def shape_text(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def size_text(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def quartiles(landmarks) -> list[float]:
    """The grey levels at a quarter, half and three quarters of equally spaced quantile landmarks."""
    last = len(landmarks) - 1
    return [landmarks[round(last * share)] for share in (0.25, 0.5, 0.75)]


def describe(record: Checkpoint | None) -> str:
    if record is None:
        return "bare state_dict"
    model_args = " ".join(f"{k}={v}" for k, v in record.model.args.items())
    return f"{record.kind} checkpoint, {record.model.name} {model_args}"


def settings_text(settings: dict) -> str:
    def value(v):
        if isinstance(v, dict):
            return "{" + settings_text(v) + "}"
        return f"[{len(v)} items]" if isinstance(v, list) and len(v) > 4 else v
    return " ".join(f"{k}={value(v)}" for k, v in settings.items()) or "none"


# ----------------------------------------------------------------------------------------------
# The two commands
# ----------------------------------------------------------------------------------------------
def inspect_file(path: Path, show_keys: bool) -> None:
    path = resolve_checkpoint_path(path)
    record, state = read_weights(path)
    statistics = sum(1 for k in state if k.endswith(BATCHNORM_STATISTICS))
    facts = [["file", f"{path} ({size_text(path)})"]]
    if record is None:
        facts.append(["kind", "bare state_dict (no model name, epoch or input size recorded)"])
    else:
        data, saved, best = record.data, record.state, record.state.best
        resumable = [name for name in ("optimizer", "scheduler", "scaler") if getattr(saved, name) is not None]
        if saved.task_state is not None:  # --semi's mean teacher: without it the run cannot resume
            resumable.append(f"the task's own ({', '.join(saved.task_state)})")
        split = data.split
        facts += [
            ["kind", f"{record.kind} (checkpoint format {record.format}"
                     f"{', upgraded on read' if record.format != FORMAT else ''}, torch {record.torch_version or '?'})"],
            ["model", record.model.name],
            ["model args", " ".join(f"{k}={v}" for k, v in record.model.args.items())],
            ["input", f"{data.input_size[0]} x {data.input_size[1]} (H x W), {data.modality}, "
                      f"normalised (x - {data.norm_mean}) / {data.norm_std} on the [0, 1] scale"
                      + (f"; trained on {data.window[0]} x {data.window[1]} crops, predicted in such windows "
                         f"overlapping {data.window_overlap:g}" if data.window else "")
                      + ("; grey levels standardised to the training images' histogram (quartiles "
                         + "/".join(f"{quartile:.0f}" for quartile in quartiles(data.intensity_landmarks)) + ")"
                         if data.intensity_landmarks else "")
                      + (f"; images resized by {data.image_resize} interpolation"
                         if data.image_resize != "linear" else "")],
            ["data", f"{data.images_dir or '?'}" + (f", masks {data.masks_dir}" if data.masks_dir else "")
                     + (f", masks binarised at > {data.mask_threshold}" if data.mask_threshold is not None else "")],
            # a fine-tune records the index it found beside the images (from format 2); other files only --index
            ["splits", f"index {split.index}" if split.index else
                       ("index found in or beside the images, else "
                        if record.format < 2 or record.kind != "segmentation" else "") +
                       f"file names (val {split.val_ratio}, test {split.test_ratio}, seed {split.seed})"],
            ["precision", f"--amp {record.precision.amp} (trained in {record.precision.dtype})"],
            ["task", settings_text(record.task)],
            ["epoch", f"{record.epoch} (global step {saved.global_step})"],
            ["best", f"{best.get('metric')} = {best['value']:.6g} at epoch {best.get('epoch')}"
                     if best.get("value") is not None else "none recorded"],
            ["resume state", ", ".join(resumable) or "none (weights only)"],
        ]
        if data.holdout is not None:
            facts.insert(6, ["hold-out", f"{data.holdout:g} of the pretraining images (2..64), fixed by name"])
    facts.append(["parameters", f"{parameter_count(state):,} in {len(state) - statistics} tensors "
                                f"(+ {statistics} BatchNorm statistics)"])
    print("\n".join(f"{name:<13}{value}" for name, value in facts))
    if record is not None and record.metrics:
        print("\nmetrics at this epoch\n" + table(["name", "value"], [[k, v] for k, v in record.metrics.items()]))
    if record is not None and record.run_args:
        print("\nrun arguments (for reading; only --resume reads them back, to refuse another schedule)\n"
              + table(["name", "value"], [[k, v] for k, v in record.run_args.items()]))
    if show_keys:
        rows = [[k, shape_text(v), str(v.dtype).removeprefix("torch."), v.numel()] for k, v in state.items()]
        print(f"\nkeys ({len(state)})\n" + table(["key", "shape", "dtype", "elements"], rows))


def diff_files(path_a: Path, path_b: Path, show_keys: bool) -> None:
    (record_a, raw_a), (record_b, raw_b) = read_weights(path_a), read_weights(path_b)
    a, b = transferable_state(raw_a), transferable_state(raw_b)
    same_shape = [k for k in b if k in a and a[k].shape == b[k].shape]
    mismatched = [k for k in b if k in a and a[k].shape != b[k].shape]
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    equal = {k for k in same_shape if torch.equal(a[k], b[k])}
    largest = {k: (a[k].double() - b[k].double()).abs().max().item() for k in same_shape if a[k].numel()}
    elements = lambda keys, source: sum(source[k].numel() for k in keys)
    coverage = elements(same_shape, b) / max(1, elements(b, b))

    print(f"A  {path_a}: {describe(record_a)}")
    print(f"B  {path_b}: {describe(record_b)}\n")
    print(table(["", "keys", "elements"], [
        ["in both, same shape", len(same_shape), elements(same_shape, b)],
        ["  of which equal values", len(equal), elements(equal, b)],
        ["only in A", len(only_a), elements(only_a, a)],
        ["only in B", len(only_b), elements(only_b, b)],
        ["shape mismatch", len(mismatched), elements(mismatched, b)],
    ], indent=""))
    if same_shape and len(equal) < len(same_shape):
        key = max((k for k in same_shape if k in largest), key=largest.get)
        print(f"\nlargest difference among shared keys: max |A - B| = {largest[key]:.6g} ({key})")
    verdict = "enough" if coverage >= MIN_TRANSFER_COVERAGE else "too little: finetune_seg.py would refuse"
    print(f"\n--init-from A into B's model fills {coverage:.1%} of its weight elements "
          f"({verdict}; it needs {MIN_TRANSFER_COVERAGE:.0%})")
    if show_keys:
        rows = []
        for k in list(b) + only_a:
            if k in same_shape:
                status, diff = ("equal" if k in equal else "differs"), largest.get(k, 0.0)
            else:
                status = "only in B" if k not in a else "only in A" if k not in b else "shape mismatch"
                diff = ""
            rows.append([k, shape_text(a[k]) if k in a else "-", shape_text(b[k]) if k in b else "-", status, diff])
        print(f"\nkeys ({len(rows)})\n" + table(["key", "A shape", "B shape", "status", "max |A-B|"], rows))


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.diff is not None:
            diff_files(*args.diff, show_keys=args.keys)
        else:
            inspect_file(args.checkpoint, show_keys=args.keys)
    except BrokenPipeError:  # `python tool.py CKPT | head` closed the pipe early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    run_cli(main)
