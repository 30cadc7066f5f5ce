"""Evaluate a fine-tuned model on a split or a labelled folder, or segment a folder of new X-rays.

Metrics (Dice, IoU, precision, recall, HD95 and ASSD in pixels) are computed per image at the
image's own resolution: probabilities are resized back to the original size before thresholding.
Means are over images. Writes OUT_DIR/per_image.csv, OUT_DIR/summary.json and overlays of the top-k
best and worst images (green = hit, red = false positive, blue = missed).

What is scored:
  no --images-dir                   the data the model was fine-tuned on, its --split (default test)
  --images-dir with an index        that index's --split (default test)
  --images-dir + --masks-dir        every pair in the folder (a new clinic's test set), unless --split
                                    names a part of its file-name split (the training run's ratios and seed)
  --images-dir without masks        predict mode: masks written to --save-preds (default OUT_DIR/preds),
                                    with summary.json (the model and settings that made them) beside them
  --split unlabelled                the unlabelled pool of the training data (or of --images-dir's index):
                                    the index's unlabelled images plus the training pairs the model's
                                    --label-fraction left out; predict mode
Every run prints how many images it scored out of how many it found.

A checkpoint trained on crops (finetune_seg.py --window) predicts its whole input in overlapping windows,
blended into one map, as its training validated. Several --checkpoint files (same input size) average
their probabilities: a fused teacher or an ensemble. --save-probs DIR writes each image's tooth probability
at its own size (8-bit PNG, 255 * p, named by pair id) and DIR/pseudo_labels.json, which finetune_seg.py
--pseudo-labels reads.

--min-component F drops the predicted connected components (8-connected) smaller than F of the image's area,
at the image's own size, before masks are scored and saved (probabilities are left as they are). A share
of the area, not a pixel count, so one value means the same on 512x512 and 1615x840 images. With
--min-component auto, F is the value of a small grid with the best mean Dice on the checkpoint's own
validation split (with --split val, the very images scored: eval.py says so, and that score is in-sample).

A per-tooth model (finetune_seg.py --task teeth) gives each pixel its most probable FDI number (0 background)
at the image's own size, and is scored on the images with per-tooth label maps: the Dice of each true tooth
with the predicted pixels of its number (the mean over all true teeth), tooth detection precision, recall
and F1 (a predicted tooth matches a true one at IoU >= 0.5, whatever its number), numbering accuracy (the
share of matched teeth with the right number), and the binary metrics of the union of the teeth. It also
writes OUT_DIR/per_tooth.csv (each FDI number's mean Dice). --save-preds (and predict mode) writes a label
map PNG (pixel = FDI number) and a tooth chart JSON per image: each tooth's number, area, bounding box and
mean probability. Best and worst overlays show the prediction above the truth, each tooth numbered.
With --union-from, binary checkpoints (averaged, at --threshold, at each image's own size) draw the teeth's
union and the per-tooth model numbers each of its pixels: a binary model at a higher resolution outlines the
teeth better than a per-tooth model at its smaller input.

Examples:
  python eval.py --checkpoint ./checkpoints/finetune_mim_unet/best.pth --split test
  python eval.py --checkpoint best.pth --images-dir ./clinic_b/images --masks-dir ./clinic_b/masks
  python eval.py --checkpoint best.pth --images-dir ./my_xrays --save-preds ./my_xrays_masks --skip-bad
  python eval.py --checkpoint teacher_a/best.pth teacher_b/best.pth --split unlabelled --save-probs ./pseudo
  python eval.py --checkpoint best.pth --split test --min-component auto
  python eval.py --checkpoint ./checkpoints/teeth --images-dir ./new_xrays --save-preds ./tooth_charts
  python eval.py --checkpoint ./checkpoints/teeth --union-from ./checkpoints/binary_256x512 --split test --tta
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data import InferenceDataset, check_same_size
from engine import DistEnv, make_loader, setup_runtime
from index import find_index, read_mask, samples_from_folders, unlabelled_pool
from metrics import (ASSD_DEFINITION, METRIC_NAMES, overlap_metrics, segmentation_metrics, summarize,
                     summarize_teeth, tooth_metrics)
from overlay import overlay_mask, overlay_teeth
from predict import (clean_mask, load_predictor, mask_at_size, mean_probabilities, prob_at_size, teeth_at_size,
                     tooth_chart)
from semi import MANIFEST, PseudoLabel, mean_entropy, write_manifest
from teeth import read_label_map
from utils import (ToothSegError, atomic_write_text, check_output_dir, file_sha1, is_image_file, make_parser,
                   non_negative_int, positive_int, probability, read_image, recorded_path, run_cli, to_uint8, write_png)

SPLIT_CHOICES = ("train", "val", "test", "all", "unlabelled")
# --min-component auto tries these shares of the image area. They reach past the smallest true tooth components
# (0.0017 of the area in 30 ufba425-dev masks), since validation Dice decides: for a UNet base 16 trained on 26
# ufba425-dev images it chose 0.003 (test HD95 23.9 -> 20.3 px), and 0.01 cost 0.008 of validation Dice.
MIN_COMPONENT_GRID = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3)


def min_component_type(text: str) -> float | str:
    """--min-component: `auto`, or a share of the image area between 0 and 1."""
    return text if text == "auto" else probability(text)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    inputs = parser.add_argument_group("inputs (default: the data the checkpoint was fine-tuned on)")
    inputs.add_argument("--checkpoint", type=Path, nargs="+", required=True, metavar="CKPT",
                        help="a fine-tuning run's best.pth, or its folder; several average their probabilities")
    inputs.add_argument("--images-dir", type=Path, metavar="DIR", help="images to score or segment")
    inputs.add_argument("--masks-dir", type=Path, metavar="DIR", help="masks with the images' file names, for folders without an index")
    inputs.add_argument("--index", type=Path, metavar="CSV", help="sts2d_index.csv; default: found in or beside --images-dir")
    inputs.add_argument("--split", choices=SPLIT_CHOICES, metavar="SPLIT",
                        help="train, val, test, all or unlabelled; default: test of an index or of the training "
                             "data, all of a labelled folder given with --masks-dir")
    inputs.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable images (and masks), list them in OUT_DIR/skipped.csv, go on with the rest")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--out-dir", type=Path, metavar="DIR",
                         help="default: CHECKPOINT_DIR/eval_SPLIT; in predict mode the --save-preds (or --save-probs) "
                              "folder, else CHECKPOINT_DIR/eval_predict")
    outputs.add_argument("--save-preds", type=Path, metavar="DIR", help="also write predicted masks (PNG, original size)")
    outputs.add_argument("--save-probs", type=Path, metavar="DIR",
                         help="also write tooth probabilities (8-bit PNG 255*p, original size) and pseudo_labels.json")
    outputs.add_argument("--top-k", type=non_negative_int, default=5, metavar="K", help="best and worst images to print and overlay")
    inference = parser.add_argument_group("inference")
    inference.add_argument("--threshold", type=probability, default=0.5, metavar="P", help="probability threshold, in (0, 1)")
    inference.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    inference.add_argument("--tta-rotate", type=float, nargs="+", default=[], metavar="DEG",
                           help="also average with the image rotated by each angle (degrees, e.g. -5 5; with --tta "
                                "flipped too), each prediction rotated back")
    inference.add_argument("--min-component", type=min_component_type, metavar="F|auto",
                           help="drop predicted components (8-connected) smaller than F of the image's area, e.g. "
                                "0.0005; auto: the best of " + ", ".join(f"{f:g}" for f in MIN_COMPONENT_GRID)
                                + " by mean Dice on the checkpoint's validation split; default: keep every component")
    inference.add_argument("--one-region-per-tooth", action="store_true",
                           help="per-tooth models: keep each tooth number on its largest region only")
    inference.add_argument("--arch-order", action="store_true",
                           help="per-tooth models: also renumber each jaw's permanent teeth so their numbers run in "
                                "order along the arch (the most probable such numbering)")
    inference.add_argument("--join-strays", action="store_true",
                           help="per-tooth models, with --one-region-per-tooth or --arch-order: a stray region joins "
                                "the tooth it borders most instead of becoming background")
    inference.add_argument("--union-from", type=Path, nargs="+", metavar="CKPT",
                           help="per-tooth models: binary checkpoints (any input size; several average) whose mask "
                                "at --threshold is the teeth's union, each of its pixels numbered by the per-tooth model")
    inference.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="images per forward pass")
    inference.add_argument("--workers", "--num-workers", dest="workers", type=non_negative_int, default=2, metavar="N",
                           help="DataLoader worker processes")
    inference.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    args = parser.parse_args(argv)
    if args.images_dir is None and (args.index is not None or args.masks_dir is not None):
        flag = "--index" if args.index is not None else "--masks-dir"
        raise ToothSegError(f"{flag} says where the labels of another folder are; give that folder with --images-dir "
                            f"too (without it eval scores the data the checkpoint was fine-tuned on)")
    for path, flag in ((args.out_dir, "--out-dir"), (args.save_preds, "--save-preds"), (args.save_probs, "--save-probs")):
        if path is not None:
            check_output_dir(path, flag)
    return args


def reads_training_data(args, data) -> bool:
    """Whether this run reads the images the checkpoint (its `data` record) trained on: no --images-dir, or
    that same folder; only there do its recorded labelled training pairs name these images."""
    return args.images_dir is None or data.images_dir is not None and \
        Path(args.images_dir).resolve() == Path(data.images_dir).resolve()


def choose_samples(args, ckpt, index: Path | None) -> tuple[list, str, str, int]:
    """(samples, split name, where they came from, how many images were found there), `index` being --images-dir's
    (None: none, or no --images-dir); split "predict" or "unlabelled" means there are no masks to score against."""
    data = ckpt.data
    if args.images_dir is None:
        splits, where = data.labelled_splits(), f"the training data ({data.images_dir})"
    elif args.masks_dir is None and index is None:
        if args.split is not None:
            raise ToothSegError(f"{args.images_dir}: has neither masks nor an index, so it has no {args.split!r} split; "
                                f"leave out --split to segment every image, or give --masks-dir")
        samples = samples_from_folders(args.images_dir)
        return samples, "predict", str(args.images_dir), len(samples)
    else:
        splits, where = data.labelled_splits(args.images_dir, args.masks_dir, args.index), str(args.images_dir)
    training_data = reads_training_data(args, data)
    if args.split == "unlabelled":
        # The teacher's own pool: what its label fraction left out of training, and the unlabelled images.
        labelled = ckpt.task.get("labelled_pairs") if training_data else None
        labelled = labelled if labelled is not None else [s.pair_id for s in splits["train"]]
        pool = unlabelled_pool(args.images_dir or data.images_dir, args.index if args.images_dir else data.split.index,
                               splits["train"], labelled)
        if not pool:
            raise ToothSegError(f"{where}: has no unlabelled images (prepare_sts2d.py --unlabelled-dir adds some)")
        return pool, "unlabelled", where, len(pool)
    # A labelled folder without an index is scored whole, unless it is the folder the model trained on.
    bare_folder = args.images_dir is not None and index is None and not training_data
    split = args.split or ("all" if bare_folder else "test")
    found = sum(len(part) for part in splits.values())
    samples = [s for part in splits.values() for s in part] if split == "all" else splits[split]
    if not samples:
        raise ToothSegError(f"{where}: the {split!r} split is empty; choose another --split")
    return sorted(samples, key=lambda s: s.pair_id) if split == "all" else samples, split, where, found


def check_apart_from_inputs(samples: list, args, index: Path | None, save_preds: Path | None) -> None:
    """Refuse a --save-preds/--save-probs folder among the run's inputs: its PNGs, named after the images, would
    overwrite X-rays or masks there, or be taken for X-rays by the next run on a folder read whole (no `index`)."""
    holding_inputs = {p.parent.resolve() for s in samples for p in (s.image, s.mask, s.teeth) if p is not None}
    read_whole = [Path(d).resolve() for d in (args.images_dir, args.masks_dir) if d is not None and index is None]
    for folder, flag in ((save_preds, "--save-preds"), (args.save_probs, "--save-probs")):
        if folder is None:
            continue
        target = Path(folder).resolve()
        if target in holding_inputs or any(target.is_relative_to(d) for d in read_whole):
            raise ToothSegError(f"{folder}: {flag} lies among the images (or masks) this run reads, and its PNGs would "
                                f"overwrite or join them; choose a folder outside them")


PREDICTIONS_RECORD = "predictions.json"  # in a --save-preds/--save-probs folder: eval.py writes there, and with what


def written_by_eval(folder: Path, out_dir: Path) -> bool:
    """Whether eval.py wrote `folder`: its record there, a pseudo-label manifest, or (runs before the record) an
    evaluation's summary.json naming it as its preds_dir: beside it, above it (predict mode's OUT_DIR/preds) or
    in this run's --out-dir."""
    if any((folder / name).is_file() for name in (PREDICTIONS_RECORD, MANIFEST)):
        return True
    for summary in (folder / "summary.json", folder.parent / "summary.json", out_dir / "summary.json"):
        try:
            recorded = json.loads(summary.read_text()).get("preds_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded and Path(recorded).resolve() == folder.resolve():
            return True
    return False


def claim_output_folders(args, save_preds: Path | None, out_dir: Path, checkpoints: list[str]) -> None:
    """Refuse a --save-preds/--save-probs folder that holds images eval.py did not write (the ground-truth masks,
    say): its PNGs, named after the X-rays, would overwrite them. Otherwise record, before the first PNG, that
    eval.py writes there and with which checkpoints, so that a rerun (or the rest of a run that failed halfway)
    may write there again and the folder says which model made its files."""
    for folder, flag in ((save_preds, "--save-preds"), (args.save_probs, "--save-probs")):
        if folder is None:
            continue
        folder = Path(folder)
        others = sorted(p.name for p in folder.iterdir() if is_image_file(p)) \
            if folder.is_dir() and not written_by_eval(folder, out_dir) else []
        if others:
            given = flag if getattr(args, flag[2:].replace("-", "_")) is not None else "the predictions folder"
            raise ToothSegError(f"{folder}: {given} holds {len(others)} images that eval.py did not write (first: "
                                f"{others[0]}), which its PNGs would overwrite; choose a new or empty folder (one that an "
                                f"evaluation of eval.py before 2026-12-07 wrote: delete it first)")
        atomic_write_text(folder / PREDICTIONS_RECORD, json.dumps(
            {"written_by": "eval.py", "checkpoints": checkpoints, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


def load_ensemble(paths: list[Path], device) -> list:
    """Predictors of one or more checkpoints; an ensemble must share the input size to average at it, and the
    intensity standardisation and image resizing, since its members see one transformed image."""
    predictors = [load_predictor(path, device) for path in paths]
    sizes = {p.checkpoint.data.input_size for p in predictors}
    if len(sizes) > 1:
        raise ToothSegError(f"{paths[0]}: the checkpoints have different input sizes {sorted(sizes)}; "
                            f"average only models trained at one size")
    if len({str(p.classes) for p in predictors}) > 1:
        raise ToothSegError(f"{paths[0]}: the checkpoints predict different classes (binary, or other tooth numbers); "
                            f"average only models of one task and class list")
    if len({(p.checkpoint.data.intensity_landmarks, p.checkpoint.data.image_resize) for p in predictors}) > 1:
        raise ToothSegError(f"{paths[0]}: the checkpoints prepare images differently (finetune_seg.py "
                            f"--standardize-intensity or --image-resize, or their training images); average only "
                            f"models that share both")
    return predictors


def predictions(predictors: list, samples: list, args, device, desc: str):
    """(sample, read error or "", its (H, W), its (1, 1, h, w) probabilities at network size) per image. An
    ensemble averages at network size: resizing is linear, so that equals averaging at each image's size."""
    dataset = InferenceDataset(samples, predictors[0].transform(), skip_bad=args.skip_bad)
    loader = make_loader(dataset, batch_size=args.batch_size, train=False, workers=args.workers, dist=DistEnv(),
                         device=device, seed=0)
    by_pair = {s.pair_id: s for s in samples}
    for images, meta in tqdm(loader, desc=desc, disable=None):
        probs = mean_probabilities(predictors, images, args.tta, tuple(args.tta_rotate))
        for i, pair_id in enumerate(meta["pair_id"]):
            size = (int(meta["orig_height"][i]), int(meta["orig_width"][i]))
            yield by_pair[pair_id], meta["error"][i], size, probs[i:i + 1]


def ground_truth(sample, size: tuple[int, int]) -> np.ndarray:
    """The sample's mask, which must have its image's size."""
    return check_same_size(read_mask(sample.mask), size, sample.mask)


class BinaryOutputs:
    """What eval does with a binary model's probabilities: a thresholded, cleaned mask per image, scored with
    segmentation_metrics against the image's mask, saved as a 0/255 PNG."""
    rank_by = "dice"

    def __init__(self, args, min_component: float):
        self.threshold, self.min_component = args.threshold, min_component

    def predict(self, probs, size: tuple[int, int], union_probs=None) -> tuple[np.ndarray, None]:
        """The mask and its confidence map (None) at the image's own size; `union_probs` is for per-tooth models."""
        return mask_at_size(probs, size, self.threshold, self.min_component), None

    def truth(self, sample, size: tuple[int, int]) -> np.ndarray:
        return ground_truth(sample, size)

    def score(self, sample, pred: np.ndarray, gt: np.ndarray) -> dict:
        return {"mask": str(sample.mask), **segmentation_metrics(pred, gt), "gt_pixels": int(gt.sum()),
                "pred_pixels": int(pred.sum())}

    def save(self, folder: Path, sample, pred: np.ndarray, confidence) -> None:
        write_png(folder / f"{sample.image.stem}.png", pred.astype(np.uint8) * 255)

    def pack(self, pred: np.ndarray):
        return np.packbits(pred)

    def overlay(self, image: np.ndarray, packed, row: dict) -> np.ndarray:
        pred = np.unpackbits(packed, count=image.size).reshape(image.shape)
        return overlay_mask(image, pred, read_mask(row["mask"]))

    def summary(self, rows: list[dict]) -> dict:
        return {}

    def report(self, rows: list[dict], summary: dict) -> str:
        means = summary["metrics"]
        return "  ".join(f"{m}={means[m]['mean']:.4f}±{means[m]['std']:.4f}" for m in METRIC_NAMES)


class TeethOutputs(BinaryOutputs):
    """A per-tooth model's: an FDI label map per image (most probable class at the image's size), scored per
    tooth (metrics.tooth_metrics) and, as a binary mask, by the union of its teeth against the union of the
    true ones; saved as a label map PNG and a tooth chart JSON (number, area, box, mean probability)."""
    rank_by = "tooth_dice"

    def __init__(self, args, classes: list[int]):
        self.classes, self.one_region, self.arch_order = classes, args.one_region_per_tooth, args.arch_order
        self.join_strays, self.threshold = args.join_strays, args.threshold

    def predict(self, probs, size, union_probs=None):
        """The label map and each pixel's probability of its label; `union_probs`, the --union-from models'
        probabilities at their network size, draw the teeth's union."""
        union = None if union_probs is None else mask_at_size(union_probs, size, self.threshold)
        return teeth_at_size(probs, size, self.classes, self.one_region, self.arch_order, self.join_strays, union)

    def truth(self, sample, size):
        return check_same_size(read_label_map(sample.teeth), size, sample.teeth, "label map")

    def score(self, sample, pred, gt):
        teeth = tooth_metrics(pred, gt)
        return {"teeth": str(sample.teeth), **segmentation_metrics(pred > 0, gt > 0), **teeth}

    def save(self, folder, sample, pred, confidence):
        write_png(folder / f"{sample.image.stem}.png", pred)
        chart = {"image": str(sample.image), "height": pred.shape[0], "width": pred.shape[1],
                 "teeth": tooth_chart(pred, confidence)}
        atomic_write_text(folder / f"{sample.image.stem}.json", json.dumps(chart, indent=1))

    def pack(self, pred):
        return cv2.imencode(".png", pred)[1]  # lossless and small: label maps are mostly runs of one value

    def overlay(self, image, packed, row):
        """The prediction above the truth, each tooth coloured and numbered."""
        pred = cv2.imdecode(packed, cv2.IMREAD_UNCHANGED)
        return np.concatenate([overlay_teeth(image, pred), overlay_teeth(image, read_label_map(row["teeth"]))])

    def summary(self, rows):
        return {"teeth": summarize_teeth(rows)}

    def report(self, rows, summary):
        teeth = summary["teeth"]
        return (f"per-tooth Dice={teeth['tooth_dice']:.4f} ({teeth['true_teeth']} teeth)  detection "
                f"P={teeth['detection_precision']:.4f} R={teeth['detection_recall']:.4f} F1={teeth['detection_f1']:.4f}"
                f"  numbering={teeth['numbering_accuracy']:.4f}  union " + super().report(rows, summary))


def choose_min_component(predictors: list, args, device, scored_images: list) -> dict:
    """--min-component auto: the MIN_COMPONENT_GRID value with the best mean Dice on the first checkpoint's
    validation split (ties go to the smaller value), whatever split is being scored; says so when the
    scored images are among those it chose on."""
    ckpt = predictors[0].checkpoint
    try:
        samples = ckpt.data.labelled_splits()["val"]
    except ToothSegError as exc:
        raise ToothSegError(f"--min-component auto chooses on {ckpt.path}'s validation split, which cannot be read "
                            f"({exc}); give a fixed --min-component") from None
    if not samples:
        raise ToothSegError(f"{ckpt.path}: its validation split is empty; give a fixed --min-component")
    dice = np.zeros(len(MIN_COMPONENT_GRID))
    scored = 0
    for sample, error, size, probs in predictions(predictors, samples, args, device, "val (--min-component)"):
        if error:  # an unreadable image, left out under --skip-bad
            continue
        try:
            gt = ground_truth(sample, size)
        except ToothSegError:
            if not args.skip_bad:
                raise
            continue
        pred = mask_at_size(probs, size, args.threshold)
        dice += [overlap_metrics(clean_mask(pred, f), gt)["dice"] for f in MIN_COMPONENT_GRID]
        scored += 1
    if not scored:
        raise ToothSegError(f"{ckpt.path}: no validation image could be read; give a fixed --min-component")
    dice /= scored
    best = int(np.argmax(dice))
    choice = {"fraction": MIN_COMPONENT_GRID[best], "chosen": "auto", "val_images": scored,
              "val_dice": {f"{f:g}": round(float(d), 6) for f, d in zip(MIN_COMPONENT_GRID, dice)}}
    chosen = f"dropping components under {choice['fraction']:g} of the image area, val Dice {dice[best]:.4f} " \
             f"(keeping every one: {dice[0]:.4f})" if best else f"keeping every component, val Dice {dice[0]:.4f}"
    print(f"--min-component auto: {choice['fraction']:g}, {chosen}, on {scored} images of the validation split")
    chosen_on = {Path(s.image).resolve() for s in samples}
    overlap = sum(Path(s.image).resolve() in chosen_on for s in scored_images)
    if overlap:
        print(f"note: {overlap} of the {len(scored_images)} images scored are among those --min-component auto chose "
              f"on, so their score is not an unseen-data figure; score the test split for one")
    choice["scored_images_chosen_on"] = overlap
    return choice


def how_predicted(args, predictors: list, union_predictors: list, min_component: dict | None) -> dict:
    """The models, data and settings behind a run's masks, for its summary.json (scored or predicted). Each
    checkpoint of an ensemble is a `members` entry; the top-level model fields hold what they share (None where
    they differ), and `model` names every architecture."""
    ckpt, per_tooth = predictors[0].checkpoint, bool(predictors[0].classes)
    members = [{"checkpoint": recorded_path(p.path), "epoch": p.checkpoint.epoch, "model": p.checkpoint.model.name,
                "model_args": p.checkpoint.model.args,
                "window": list(p.checkpoint.data.window) if p.checkpoint.data.window else None,
                "window_overlap": p.checkpoint.data.window_overlap} for p in predictors]
    shared = lambda key: members[0][key] if all(m[key] == members[0][key] for m in members) else None  # noqa: E731
    return {
        "threshold": args.threshold, "tta": args.tta, "tta_rotate": args.tta_rotate, "min_component": min_component,
        "one_region_per_tooth": args.one_region_per_tooth if per_tooth else None,
        "arch_order": args.arch_order if per_tooth else None,
        "join_strays": args.join_strays if per_tooth else None,
        "union_from": [recorded_path(p.path) for p in union_predictors] or None,
        "checkpoint": recorded_path(ckpt.path), "checkpoint_epoch": ckpt.epoch,
        "ensemble": [m["checkpoint"] for m in members], "members": members,
        "model": " + ".join(dict.fromkeys(m["model"] for m in members)), "model_args": shared("model_args"),
        "input_size": list(ckpt.data.input_size), "window": shared("window"), "window_overlap": shared("window_overlap"),
        "images_dir": recorded_path(images_dir) if (images_dir := args.images_dir or ckpt.data.images_dir) else None,
        "masks_dir": recorded_path(args.masks_dir) if args.masks_dir else None,
    }


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """`rows` as CSV; `columns` names them when there may be none (a header-only file)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def main(argv=None):
    args = parse_args(argv)
    _, device = setup_runtime(args.cpu)
    predictors = load_ensemble(args.checkpoint, device)
    ckpt = predictors[0].checkpoint  # the first one's data is the default data
    classes = predictors[0].classes  # a per-tooth model's FDI numbers, None for a binary one
    if classes and (args.min_component is not None or args.save_probs is not None):
        raise ToothSegError(f"{ckpt.path}: is a per-tooth model; --min-component and --save-probs apply to binary "
                            f"models (use --one-region-per-tooth to clean per-tooth predictions)")
    if (args.one_region_per_tooth or args.arch_order) and not classes:
        flag = "--arch-order" if args.arch_order else "--one-region-per-tooth"
        raise ToothSegError(f"{ckpt.path}: is a binary model; {flag} applies to per-tooth models (use --min-component)")
    if args.union_from and not classes:
        raise ToothSegError(f"{ckpt.path}: is a binary model; --union-from gives a per-tooth model the union of its teeth")
    union_predictors = load_ensemble(args.union_from, device) if args.union_from else []
    if union_predictors and union_predictors[0].classes:
        raise ToothSegError(f"{union_predictors[0].path}: is a per-tooth model; --union-from takes binary checkpoints "
                            f"(finetune_seg.py --task binary)")
    if args.join_strays and not (args.one_region_per_tooth or args.arch_order):
        raise ToothSegError("--join-strays says what becomes of the strays that --one-region-per-tooth or --arch-order "
                            "removes; add one of them")

    # Data: a labelled split or folder, or predict mode for a folder without masks (or the unlabelled pool).
    index = find_index(args.images_dir, args.index, args.masks_dir) if args.images_dir is not None else None
    samples, split, where, found = choose_samples(args, ckpt, index)
    # Absolute paths in per_image.csv, charts and pseudo-label manifests: the notebook and a student read them.
    samples = [replace(s, **{k: Path(recorded_path(getattr(s, k))) for k in ("image", "mask", "teeth") if getattr(s, k)})
               for s in samples]
    predict = split in ("predict", "unlabelled")
    trained_on = sorted({s.pair_id for s in samples} & set(ckpt.task.get("labelled_pairs") or ())) \
        if reads_training_data(args, ckpt.data) and split in ("val", "test") else []
    if trained_on:  # the index, or the folder's file-name split, changed since training
        print(f"warning: {len(trained_on)} of the {len(samples)} images scored as {split!r} trained this model "
              f"({', '.join(trained_on[:5])}{', ...' if len(trained_on) > 5 else ''}): the splits changed since it "
              f"trained, so this is not a held-out score (summary.json lists them)")
    if classes and not predict:
        labelled = len(samples)
        samples = [s for s in samples if s.teeth is not None]
        if not samples:
            raise ToothSegError(f"{where}: none of the {labelled} images of split {split!r} has a per-tooth label map; "
                                f"prepare the data with prepare_sts2d.py --teeth-dir")
        where += f" ({len(samples)} of the split's {labelled} have per-tooth labels)" if len(samples) < labelled else ""
    # Predictions keep their record (summary.json, skipped.csv) beside them, not in the checkpoint's folder.
    out_dir = args.out_dir or (predict and (args.save_preds or args.save_probs)) or ckpt.path.parent / f"eval_{split}"
    save_preds = args.save_preds or (out_dir / "preds" if predict and args.save_probs is None else None)
    check_apart_from_inputs(samples, args, index, save_preds)
    what = f"{len(samples)} images from {where}" if predict else \
        f"{len(samples)} of the {found} labelled images found in {where} (split {split})"
    windows = [p.checkpoint.data.window for p in predictors]
    models = ", ".join(f"{p.checkpoint.model.name} from {p.path}" + (f" (in {w[0]}x{w[1]} windows)" if w else "")
                       for p, w in zip(predictors, windows))
    if union_predictors:
        models += "; the teeth's union from " + ", ".join(str(p.path) for p in union_predictors)
    print(f"{'predicting' if predict else 'evaluating'} {what} with {models} on {device}")
    started = time.time()
    min_component = choose_min_component(predictors, args, device, samples) if args.min_component == "auto" else \
        {"fraction": args.min_component, "chosen": "fixed"} if args.min_component else None
    outputs = TeethOutputs(args, classes) if classes else \
        BinaryOutputs(args, min_component["fraction"] if min_component else 0.0)

    # Inference at network size, masks (or label maps) and scores at each image's own size.
    rows, skipped, kept_preds, pseudo = [], [], {}, []
    claim_output_folders(args, save_preds, out_dir, [str(p.path) for p in predictors])
    if args.save_probs is not None:  # an earlier manifest must not describe the maps this run overwrites, if it fails
        (args.save_probs / MANIFEST).unlink(missing_ok=True)
    for name in ("summary.json", "per_image.csv", "per_tooth.csv", "skipped.csv"):  # nor an earlier run's record
        (out_dir / name).unlink(missing_ok=True)
    # Both loaders keep the samples' order and yield unreadable images too, so the pairs stay aligned.
    unions = (probs for *_, probs in predictions(union_predictors, samples, args, device, f"{split} (--union-from)")) \
        if union_predictors else itertools.repeat(None)
    for (sample, error, size, probs), union_probs in zip(predictions(predictors, samples, args, device, split), unions):
        pair_id = sample.pair_id
        if error:
            skipped.append({"image": str(sample.image), "reason": error})
            continue
        pred, confidence = outputs.predict(probs, size, union_probs)
        if args.save_probs is not None:
            prob = prob_at_size(probs, size)
            write_png(args.save_probs / f"{pair_id}.png", np.round(prob * 255).astype(np.uint8))
            pseudo.append(PseudoLabel(pair_id, sample.image, args.save_probs / f"{pair_id}.png", mean_entropy(prob),
                                      file_sha1(sample.image)))
        if not predict:
            try:
                gt = outputs.truth(sample, size)
            except ToothSegError as exc:
                if not args.skip_bad:
                    raise
                skipped.append({"image": str(sample.image), "reason": str(exc)})
                continue
            kept_preds[pair_id] = outputs.pack(pred)  # for the overlays, without predicting twice
            rows.append({"pair_id": pair_id, "image": str(sample.image), "age_group": sample.age_group,
                         **outputs.score(sample, pred, gt), "height": size[0], "width": size[1]})
        if save_preds is not None:
            outputs.save(save_preds, sample, pred, confidence)
    if args.save_probs is not None:
        write_manifest(args.save_probs, pseudo, [recorded_path(p.path) for p in predictors], args.tta, args.tta_rotate)
        print(f"wrote {len(pseudo)} probability maps and {args.save_probs / 'pseudo_labels.json'}")
    if skipped:
        write_csv(out_dir / "skipped.csv", skipped)
        print(f"skipped {len(skipped)} bad files, unreadable or a mask that does not fit its image (listed in "
              f"{out_dir / 'skipped.csv'}); first: {skipped[0]['reason']}")
    if predict:
        summary = {"n_images": len(samples) - len(skipped), "n_found": found, "n_skipped": len(skipped), "split": split,
                   "preds_dir": recorded_path(save_preds) if save_preds is not None else None,
                   "probs_dir": recorded_path(args.save_probs) if args.save_probs is not None else None,
                   **how_predicted(args, predictors, union_predictors, min_component), "seconds": round(time.time() - started, 1)}
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        if save_preds is not None:
            print(f"wrote {len(samples) - len(skipped)} of {len(samples)} {'label maps and tooth charts' if classes else 'masks'} "
                  f"to {save_preds}")
        print(f"wrote {out_dir / 'summary.json'} (the model and settings that made them)")
        return
    if not rows:
        raise ToothSegError(f"{where}: no image could be scored; see {out_dir / 'skipped.csv'}")

    # Outputs: per-image table, summary, best and worst overlays.
    write_csv(out_dir / "per_image.csv", [{k: v for k, v in row.items() if k != "dice_by_fdi"} for row in rows])
    summary = {
        # The per-tooth figures are in "teeth", pooled over teeth as the README defines them; their per-image
        # means under the same names here read differently.
        "metrics": summarize(rows, METRIC_NAMES),
        "preds_dir": recorded_path(save_preds) if save_preds is not None else None,
        **outputs.summary(rows),
        "by_age_group": {g: summarize([r for r in rows if r["age_group"] == g], METRIC_NAMES)
                         for g in sorted({r["age_group"] for r in rows})},
        "n_images": len(rows), "n_found": found, "n_skipped": len(skipped), "split": split,
        "trained_on": trained_on,  # scored images that trained the model (splits changed since): not held out
        **how_predicted(args, predictors, union_predictors, min_component), "seconds": round(time.time() - started, 1),
        "hd_empty_penalty": "image diagonal in pixels when exactly one of prediction and truth is empty",
        "assd": ASSD_DEFINITION,
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    if classes:
        # header only for images without a labelled tooth (toothless X-rays), where it was an IndexError
        write_csv(out_dir / "per_tooth.csv", [{"fdi": n, **v} for n, v in summary["teeth"]["by_fdi"].items()],
                  ["fdi", "dice", "teeth"])
    ranked = sorted(rows, key=lambda r: r[outputs.rank_by], reverse=True)
    k = min(args.top_k, len(ranked))
    for label, chosen in (("best", ranked[:k]), ("worst", ranked[::-1][:k])) if k else ():
        print(f"{label} {k}: " + ", ".join(f"{r['pair_id']} ({r[outputs.rank_by]:.3f})" for r in chosen))
        for rank, row in enumerate(chosen, 1):
            image = to_uint8(read_image(row["image"]))
            write_png(out_dir / label / f"{rank:02d}_{row['pair_id']}.png",
                      outputs.overlay(image, kept_preds[row["pair_id"]], row)[..., ::-1])
    print(outputs.report(rows, summary) + f"  (scored {len(rows)} of {found} found)")
    print(f"wrote {out_dir / 'per_image.csv'}{', ' + str(out_dir / 'per_tooth.csv') if classes else ''} "
          f"and {out_dir / 'summary.json'}")


if __name__ == "__main__":
    run_cli(main)
