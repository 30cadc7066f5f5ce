"""Plotting helpers for the scripts and the notebook: overlays, sample grids, saliency, training
curves, model comparisons, best/worst galleries and pretraining reconstructions.

Every plot returns a matplotlib `Figure` built without pyplot, so nothing depends on a display or
on global figure state: in Jupyter the returned figure shows as the cell's output, and `save_path=`
(or `save_figure`) writes it as a PNG atomically. Overlays colour pixels green (hit), red (false
positive) and blue (missed).

Predictions come from `load_predictor(cell_dir_or_checkpoint)` (predict.py), which preprocesses, runs and
thresholds exactly as eval.py does (network-size inference, logits resized back to each image's own
size, threshold 0.5), so a Dice shown here equals the Dice in eval.py's per_image.csv.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoints import open_checkpoint
from data import GenesisConfig, MaskGenerator, MIMDataset, RestorationDataset, build_eval_transform
from engine import autocast, checkpoint_amp, memory_format, reconstruction_visuals
from index import read_mask
from metrics import masked_l1_loss, segmentation_metrics, tooth_metrics
from overlay import FALSE_NEGATIVE, FALSE_POSITIVE, TRUE_POSITIVE, overlay_mask, overlay_teeth
from predict import Predictor, ensemble_chart, ensemble_mask, load_predictor
from teeth import read_label_map
from utils import ToothSegError, atomic_path, read_image, to_uint8

PANEL_WIDTH = 3.2  # inches per image panel; the height follows the image's aspect ratio


# ----------------------------------------------------------------------------------------------
# Figures: creation, saving, shared decorations
# ----------------------------------------------------------------------------------------------
def new_figure(rows: int, cols: int, aspect: float, extra_height: float = 0.6):
    """A Figure (no pyplot, so headless-safe) with a rows x cols grid of image axes; `aspect` = h / w."""
    fig = Figure(figsize=(PANEL_WIDTH * cols, (PANEL_WIDTH * aspect + extra_height) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:  # ticks off, frame kept: an all-white or all-black mask still shows its extent
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` as a PNG atomically (temp file, then rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _finish(fig, save_path: str | os.PathLike | None):
    if save_path is not None:
        save_figure(fig, save_path)
    return fig


def add_overlay_legend(fig, with_truth: bool = True) -> None:
    """The overlay colour key, below the panels."""
    colours = [("hit", TRUE_POSITIVE), ("false positive", FALSE_POSITIVE), ("missed", FALSE_NEGATIVE)]
    if not with_truth:
        colours = [("prediction", TRUE_POSITIVE)]
    handles = [Patch(color=np.asarray(c) / 255, label=name) for name, c in colours]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """The Dice eval.py reports (metrics.segmentation_metrics conventions, empty cases included)."""
    return segmentation_metrics(pred, gt)["dice"]


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """An image as grayscale uint8, as the datasets read it."""
    return to_uint8(read_image(path))


def _as_predictor(model: Predictor | str | os.PathLike, device: str) -> Predictor:
    return model if isinstance(model, Predictor) else load_predictor(model, device)


# ----------------------------------------------------------------------------------------------
# One sample: input, ground truth, prediction, overlay
# ----------------------------------------------------------------------------------------------
def visualize_samples_in_one_plot(image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray, title: str | None = None,
                                  save_path: str | os.PathLike | None = None):
    """Input, ground truth, prediction and overlay side by side; the Dice goes in the title when
    `gt` is given. `image` is grayscale uint8, masks are HxW (any non-zero pixel is foreground)."""
    panels = [("input", image)]
    if gt is not None:
        panels.append(("ground truth", (gt > 0).astype(np.uint8) * 255))
    panels += [("prediction", (pred > 0).astype(np.uint8) * 255), ("overlay", overlay_mask(image, pred, gt))]
    fig, axes = new_figure(1, len(panels), image.shape[0] / image.shape[1], extra_height=0.9)
    for ax, (name, shown) in zip(axes[0], panels):
        ax.imshow(shown, cmap="gray", vmin=0, vmax=255)
        ax.set_title(name)
    heading = [title] if title else []
    if gt is not None:
        heading.append(f"Dice {dice_score(pred, gt):.4f}")
    if heading:
        fig.suptitle("  ·  ".join(heading))
    add_overlay_legend(fig, with_truth=gt is not None)
    return _finish(fig, save_path)


# ----------------------------------------------------------------------------------------------
# Saliency
# ----------------------------------------------------------------------------------------------
def plot_saliency(image: np.ndarray, saliency: np.ndarray, title: str | None = None, alpha: float = 0.5,
                  save_path: str | os.PathLike | None = None):
    """The input beside the saliency map laid over it (inferno colour map, with a colour bar)."""
    fig, axes = new_figure(1, 2, image.shape[0] / image.shape[1], extra_height=0.9)
    axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title("input")
    axes[0, 1].imshow(image, cmap="gray", vmin=0, vmax=255)
    heat = axes[0, 1].imshow(saliency, cmap="inferno", vmin=0, vmax=1, alpha=alpha)
    axes[0, 1].set_title("saliency |∂ logit / ∂ input|")
    fig.colorbar(heat, ax=axes[0, 1], fraction=0.03, label="normalised gradient")
    if title:
        fig.suptitle(title)
    return _finish(fig, save_path)


# ----------------------------------------------------------------------------------------------
# Training curves from TensorBoard event files
# ----------------------------------------------------------------------------------------------
def read_scalars(log_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag in a TensorBoard folder as (steps, values), sorted by step. A resumed run
    logs some steps twice; the later value wins, as it is the one the run continued from."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir() or not any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir()):
        raise ToothSegError(f"{log_dir}: no TensorBoard event files there; pass a run's tensorboard folder")
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return scalars


def plot_training_curves(log_dirs: dict[str, str | os.PathLike], tags: Sequence[str] = ("val/dice",),
                         title: str | None = None, save_path: str | os.PathLike | None = None):
    """One panel per tag, one line per run (label -> TensorBoard folder). Epoch-level tags
    (val/*, train/epoch_loss, lr) are logged per epoch; train/batch_loss per optimiser step."""
    runs = {label: read_scalars(path) for label, path in log_dirs.items()}
    fig = Figure(figsize=(5 * len(tags), 3.6), layout="constrained")
    for ax, tag in zip(fig.subplots(1, len(tags), squeeze=False)[0], tags):
        plotted = [label for label, scalars in runs.items() if tag in scalars]
        if not plotted:
            available = sorted(set().union(*(s.keys() for s in runs.values())))
            raise ToothSegError(f"no run has the scalar {tag!r}; available: {', '.join(available) or 'none'}")
        for label in plotted:
            steps, values = runs[label][tag]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_title(tag)
        ax.set_xlabel("step" if tag == "train/batch_loss" else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _finish(fig, save_path)


# ----------------------------------------------------------------------------------------------
# Several models on the same images; best and worst cases of one evaluation
# ----------------------------------------------------------------------------------------------
def compare_models(models: dict[str, Predictor | str | os.PathLike], images: Iterable[str | os.PathLike],
                   masks: Iterable[str | os.PathLike] | None = None, tta: bool = False, device: str = "cpu",
                   save_path: str | os.PathLike | None = None):
    """Rows = images; columns = input, ground truth and each model's overlay with its Dice in the
    title. `models` maps a label to a Predictor, a study cell folder or a checkpoint. Masks default
    to the pairs the first model was trained and tested with."""
    predictors = {label: _as_predictor(m, device) for label, m in models.items()}
    if not predictors:
        raise ToothSegError("compare_models needs at least one model")
    images = [Path(p) for p in images]
    if not images:
        raise ToothSegError("compare_models needs at least one image")
    first = next(iter(predictors.values()))
    truths = [read_mask(Path(m)) for m in masks] if masks is not None else [first.ground_truth(p) for p in images]
    if len(truths) != len(images):
        raise ToothSegError(f"got {len(images)} images but {len(truths)} masks; give one mask per image")
    pixels = [read_gray(p) for p in images]
    aspect = max(img.shape[0] / img.shape[1] for img in pixels)
    fig, axes = new_figure(len(images), 2 + len(predictors), aspect, extra_height=0.7)
    for row, (path, image, gt) in enumerate(zip(images, pixels, truths)):
        if gt.shape != image.shape:
            raise ToothSegError(f"{path}: mask size {gt.shape[::-1]} differs from the image {image.shape[::-1]}; fix the pair")
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_title(f"{path.stem}\ninput")
        axes[row, 1].imshow(gt * 255, cmap="gray", vmin=0, vmax=255)
        axes[row, 1].set_title("ground truth")
        for col, (label, predictor) in enumerate(predictors.items(), start=2):
            pred = predictor.predict(image, tta=tta)
            axes[row, col].imshow(overlay_mask(image, pred, gt))
            axes[row, col].set_title(f"{label}\nDice {dice_score(pred, gt):.4f}")
    add_overlay_legend(fig)
    return _finish(fig, save_path)


def read_eval_run(per_image_csv: str | os.PathLike) -> tuple[list[dict], dict]:
    """The rows of an eval.py run's per_image.csv and the summary.json beside it."""
    per_image_csv = Path(per_image_csv)
    try:
        with per_image_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
        summary = json.loads(per_image_csv.with_name("summary.json").read_text())
    except OSError as exc:
        raise ToothSegError(f"{exc.filename}: cannot read ({exc.strerror}); pass the per_image.csv of an eval.py run") from None
    if not rows:
        raise ToothSegError(f"{per_image_csv}: no rows; re-run eval.py")
    return rows, summary


def evaluated_predictors(summary: dict, device: str) -> list[Predictor]:
    """The checkpoints an eval.py run averaged (its summary's `ensemble`; older summaries name one `checkpoint`)."""
    return [load_predictor(path, device) for path in summary.get("ensemble") or [summary["checkpoint"]]]


def checkpoint_names(predictors: list[Predictor]) -> str:
    """The checkpoints a gallery re-predicted with, for a staleness error: any of them may have been retrained."""
    return ", ".join(str(p.path) for p in predictors)


def best_worst_gallery(per_image_csv: str | os.PathLike, k: int = 3, device: str = "cpu",
                       save_path: str | os.PathLike | None = None):
    """The k best (top row) and k worst (bottom row) images of an eval.py run, by Dice, as overlays
    re-predicted with the evaluated checkpoints (an ensemble averaged) and eval's threshold, TTA and
    --min-component (from summary.json)."""
    rows, summary = read_eval_run(per_image_csv)
    if "tooth_dice" in rows[0]:
        raise ToothSegError(f"{per_image_csv}: a per-tooth evaluation; show it with tooth_chart_gallery (numbered "
                            f"teeth and their chart)")
    members = evaluated_predictors(summary, device)
    min_component = (summary.get("min_component") or {}).get("fraction", 0.0)  # older summaries have none
    ranked = sorted(rows, key=lambda r: float(r["dice"]), reverse=True)
    k = min(k, len(ranked))
    fig, axes = new_figure(2, k, max(int(r["height"]) / int(r["width"]) for r in rows), extra_height=0.7)
    for row, (label, chosen) in enumerate((("best", ranked[:k]), ("worst", ranked[::-1][:k]))):
        for col, record in enumerate(chosen):
            image = read_gray(record["image"])
            gt = read_mask(record["mask"]) if record.get("mask") else members[0].ground_truth(record["image"])
            pred = ensemble_mask(members, image, summary["threshold"], summary["tta"], min_component,
                                 tuple(summary.get("tta_rotate") or ()))
            if abs(dice_score(pred, gt) - float(record["dice"])) > 0.01:
                raise ToothSegError(f"{per_image_csv}: Dice of {record['pair_id']} no longer matches "
                                    f"{checkpoint_names(members)} (retrained since?); re-run eval.py")
            axes[row, col].imshow(overlay_mask(image, pred, gt))
            axes[row, col].set_title(f"{label} {col + 1}: {record['pair_id']}\n"
                                     f"Dice {float(record['dice']):.4f}  HD95 {float(record['hd95']):.1f} px")
    fig.suptitle(f"{summary['model']} on {summary['split']} ({summary['n_images']} images)")
    add_overlay_legend(fig)
    return _finish(fig, save_path)


# ----------------------------------------------------------------------------------------------
# Per-tooth models: numbered overlays beside the dental chart
# ----------------------------------------------------------------------------------------------
CHART_ROWS = (  # the dental chart as a dentist reads it: the patient's right on the left
    (18, 17, 16, 15, 14, 13, 12, 11, 21, 22, 23, 24, 25, 26, 27, 28),
    (48, 47, 46, 45, 44, 43, 42, 41, 31, 32, 33, 34, 35, 36, 37, 38),
)
PRIMARY_CHART_ROWS = ((55, 54, 53, 52, 51, 61, 62, 63, 64, 65), (85, 84, 83, 82, 81, 71, 72, 73, 74, 75))
CHART_COLOURS = {"found": TRUE_POSITIVE, "poorly outlined": (250, 170, 30), "misplaced or extra": FALSE_POSITIVE,
                 "missed": FALSE_NEGATIVE, "absent": (245, 245, 245)}


def chart_status(number: int, predicted: dict, dice: dict) -> str:
    """A chart box's colour key: a true tooth is found (its number predicted on it, Dice >= 0.5), poorly
    outlined (its number predicted partly on it, Dice below 0.5), misplaced (its number predicted only elsewhere,
    Dice 0) or missed; a predicted number without its tooth is extra."""
    if number in dice:
        if number not in predicted:
            return "missed"
        return "found" if dice[number] >= 0.5 else "poorly outlined" if dice[number] > 0 else "misplaced or extra"
    return "misplaced or extra" if number in predicted else "absent"


def draw_tooth_chart(ax, chart: list[dict], dice_by_fdi: dict[int, float] | None = None) -> None:
    """A dental chart on `ax`: one box per FDI number (primary rows only when a primary tooth occurs), with the
    predicted teeth's mean probability. With `dice_by_fdi` (metrics.tooth_metrics' Dice of each true tooth), a
    true tooth is green where its number was predicted on it (Dice >= 0.5), orange where partly (below 0.5), red
    where its number went only elsewhere, blue where it was not predicted; a predicted number with no such tooth is
    red. Without it, predicted teeth are green."""
    predicted = {t["fdi"]: t["mean_probability"] for t in chart}
    dice = {n: 1.0 for n in predicted} if dice_by_fdi is None else dice_by_fdi
    rows = CHART_ROWS + (PRIMARY_CHART_ROWS if any(n > 50 for n in set(predicted) | set(dice)) else ())
    for r, numbers in enumerate(rows):
        offset = (16 - len(numbers)) / 2
        for c, number in enumerate(numbers):
            status = chart_status(number, predicted, dice)
            ax.add_patch(Rectangle((offset + c, -r), 0.92, 0.92, color=np.asarray(CHART_COLOURS[status]) / 255))
            label = f"{number}\n{predicted[number]:.2f}" if number in predicted else str(number)
            ax.text(offset + c + 0.46, -r + 0.46, label, ha="center", va="center", fontsize=6.5)
    ax.set_xlim(0, 16)
    ax.set_ylim(-len(rows) + 1, 1)
    ax.set_aspect("equal")
    ax.axis("off")


def tooth_chart_gallery(per_image_csv: str | os.PathLike, k: int = 2, device: str = "cpu", xray: bool = True,
                        save_path: str | os.PathLike | None = None):
    """The k best and k worst images of a per-tooth eval.py run (by per-tooth Dice): each as the predicted teeth
    coloured and numbered over the X-ray (on black with `xray=False`, for a figure that must not carry the
    images), beside its dental chart against the true teeth. Re-predicted with the evaluated checkpoint and
    eval's ensemble, TTA, --one-region-per-tooth, --arch-order, --join-strays and --union-from; refuses a stale
    per_image.csv."""
    rows, summary = read_eval_run(per_image_csv)
    if "tooth_dice" not in rows[0]:
        raise ToothSegError(f"{per_image_csv}: not a per-tooth evaluation (no tooth_dice column); evaluate a "
                            f"finetune_seg.py --task teeth checkpoint")
    members = evaluated_predictors(summary, device)
    union_from = [load_predictor(path, device) for path in summary.get("union_from") or []]
    ranked = sorted(rows, key=lambda r: float(r["tooth_dice"]), reverse=True)
    k = min(k, len(ranked))
    chosen = [("best", r) for r in ranked[:k]] + [("worst", r) for r in ranked[::-1][:k]]
    aspect = max(int(r["height"]) / int(r["width"]) for r in rows)
    fig = Figure(figsize=(PANEL_WIDTH * 3, (PANEL_WIDTH * 1.2 * aspect + 0.5) * len(chosen)), layout="constrained")
    axes = fig.subplots(len(chosen), 2, squeeze=False, width_ratios=(1.2, 1.8))
    for (label, record), (image_ax, chart_ax) in zip(chosen, axes):
        image = read_gray(record["image"])
        truth = read_label_map(record["teeth"])
        labels, chart = ensemble_chart(members, image, summary["tta"], bool(summary.get("one_region_per_tooth")),
                                       tuple(summary.get("tta_rotate") or ()), bool(summary.get("arch_order")),
                                       bool(summary.get("join_strays")), union_from, summary["threshold"])
        scores = tooth_metrics(labels, truth)
        if abs(scores["tooth_dice"] - float(record["tooth_dice"])) > 0.01:
            raise ToothSegError(f"{per_image_csv}: per-tooth Dice of {record['pair_id']} no longer matches "
                                f"{checkpoint_names(members + union_from)} (retrained since?); re-run eval.py")
        image_ax.imshow(overlay_teeth(image, labels) if xray else overlay_teeth(np.zeros_like(image), labels, alpha=1.0))
        image_ax.set_xticks([])
        image_ax.set_yticks([])
        image_ax.set_title(f"{label}: {record['pair_id']}  per-tooth Dice {scores['tooth_dice']:.3f}  "
                           f"F1 {scores['detection_f1']:.3f}  numbering {scores['numbering_accuracy']:.3f}", fontsize=8)
        draw_tooth_chart(chart_ax, chart, scores["dice_by_fdi"])
    fig.suptitle(f"{summary['model']} per tooth on {summary['split']} ({summary['n_images']} images)")
    handles = [Patch(color=np.asarray(c) / 255, label=name) for name, c in CHART_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return _finish(fig, save_path)


# ----------------------------------------------------------------------------------------------
# Pretraining: what the model reconstructs on its own validation images
# ----------------------------------------------------------------------------------------------
def plot_reconstructions(checkpoint: str | os.PathLike, n: int = 3, device: str = "cpu",
                         save_path: str | os.PathLike | None = None):
    """A MIM or full-image pretraining checkpoint on the first n images of its own validation hold-out,
    with the same masks or perturbations it was validated with: columns input (masked / perturbed),
    target, reconstruction and |error|; the title gives the loss it was trained on (L1 over masked
    pixels for MIM, over the whole image for full-image)."""
    ckpt = open_checkpoint(checkpoint, ("mim", "fullimage"), "plot_reconstructions")
    device = torch.device(device)
    model = ckpt.build_model().to(device, memory_format=memory_format(device)).eval()
    data = ckpt.data
    val_samples = data.pretraining_holdout()[:n]
    if ckpt.kind == "mim":
        dataset = MIMDataset(val_samples, build_eval_transform(*data.input_size), MaskGenerator(**ckpt.task["masking"]),
                             seed=data.seed, fixed=True)
    else:
        dataset = RestorationDataset(val_samples, build_eval_transform(*data.input_size, normalize=False),
                                     GenesisConfig(**ckpt.task["genesis"]), seed=data.seed, fixed=True)
    items = [dataset[i] for i in range(len(dataset))]
    inputs, targets = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
    # The run's own precision, as its validation loss was computed (bf16 autocast changes it in the 4th digit).
    with torch.inference_mode(), autocast(device, checkpoint_amp(ckpt, device)):
        recon = model(inputs.to(device, memory_format=memory_format(device))).float().cpu()
    if ckpt.kind == "mim":
        hidden = torch.stack([it[2] for it in items])
        losses = [masked_l1_loss(recon[i:i + 1], targets[i:i + 1], hidden[i:i + 1]).item() for i in range(len(items))]
    else:
        losses = (recon - targets).abs().mean(dim=(1, 2, 3)).tolist()
    shown = reconstruction_visuals(inputs, targets, recon)
    names = {"input": "masked input" if ckpt.kind == "mim" else "perturbed input", "target": "target",
             "recon": "reconstruction", "abs_error": "|error|"}
    fig, axes = new_figure(len(items), len(names), data.input_size[0] / data.input_size[1], extra_height=0.5)
    for row, meta in enumerate(it[-1] for it in items):
        for col, (key, name) in enumerate(names.items()):
            axes[row, col].imshow(shown[key][row, 0].numpy(), cmap="magma" if key == "abs_error" else "gray", vmin=0, vmax=1)
            axes[row, col].set_title(f"{meta['pair_id']}: {name}" if col == 0 else
                                     f"{name} (L1 {losses[row]:.4f})" if key == "recon" else name)
    fig.suptitle(f"{ckpt.kind} pretraining, {ckpt.model.name}, epoch {ckpt.epoch}: validation images")
    return _finish(fig, save_path)


# ----------------------------------------------------------------------------------------------
# Finding things in a run_study.py folder
# ----------------------------------------------------------------------------------------------
def study_cells(run_dir: str | os.PathLike, task: str = "binary", required: bool = True) -> dict[str, dict]:
    """The finished cells of a run_study.py folder for one task (binary, or teeth: run_study.py --task teeth):
    name -> its cell.json record plus "dir". Without any, an error, or {} when not `required`."""
    run_dir = Path(run_dir)
    records = {p.parent.name: {**json.loads(p.read_text()), "dir": p.parent}
               for p in sorted((run_dir / "cells").glob("*/cell.json"))}
    cells = {name: r for name, r in records.items() if r.get("task", "binary") == task}
    if not cells and required:
        raise ToothSegError(f"{run_dir}: no finished study cells{' of the per-tooth task' if task == 'teeth' else ''} "
                            f"(cells/*/cell.json); run run_study.py{' --task teeth' if task == 'teeth' else ''} or `make demo`")
    return cells


def choose_cell(cells: dict[str, dict], name: str | None, setting: str) -> str | None:
    """`name` if it is one of `cells` (the first cell, or None without cells, when `name` is None or empty),
    else one line listing the valid names: a mistyped notebook `setting` once failed sections later as a bare
    KeyError."""
    if not name:
        return next(iter(cells), None)
    if name not in cells:
        raise ToothSegError(f"{setting}={name}: no such finished cell; choose one of: {', '.join(cells) or 'none'}")
    return name


def pretraining_runs(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The finished pretraining folders of a run_study.py folder: name (e.g. mim_unet) -> folder."""
    return {p.parent.name: p.parent for p in sorted((Path(run_dir) / "pretrain").glob("*/done.json"))}


def cells_across_inits(cells: dict[str, dict], cell: str) -> dict[str, Path]:
    """method -> folder of the cells sharing `cell`'s model, label fraction and seed: the initialisations
    (scratch, mim, ...) and, where the study ran them, the ways of using unlabelled images (scratch + pseudo, ...)."""
    ref = cells[choose_cell(cells, cell, "cell")]
    same = lambda r: (r["model"], r["label_fraction"], r["seed"]) == (ref["model"], ref["label_fraction"], ref["seed"])
    method = lambda r: r["init"] if r.get("semi", "none") == "none" else f"{r['init']} + {r['semi']}"
    return {method(r): r["dir"] for r in cells.values() if same(r)}
