"""Evaluate a fine-tuned model on a split, or segment a folder of new X-rays (predict mode).

Metrics (Dice, IoU, precision, recall, HD95 and ASSD in pixels) are computed per image at the
image's own resolution: logits are resized back to the original size before thresholding. Means
are over images. Writes OUT_DIR/per_image.csv, OUT_DIR/summary.json and overlays of the top-k best
and worst images (green = hit, red = false positive, blue = missed).

Predict mode: when --images-dir has no masks (no --masks-dir and no index in or beside it), the
masks are written as PNGs at each image's original size to --save-preds (default OUT_DIR/preds).

Examples:
  python eval.py --checkpoint ./checkpoints/finetune_mim_unet/best_model.pth --split test
  python eval.py --checkpoint best_model.pth --images-dir ./my_xrays --save-preds ./my_xrays_masks
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import InferenceDataset, build_eval_transform, find_index, read_mask, samples_from_folders, \
    segmentation_splits
from engine import DistEnv, autocast, build_model_from_checkpoint, checkpoint_amp, make_loader, memory_format, setup_runtime
from metrics import METRIC_NAMES, segmentation_metrics, summarize
from utils import ToothSegError, atomic_write_text, make_parser, read_image, run_cli, to_uint8, write_png
from visualizer import overlay_mask


def parse_args(argv=None):
    parser = make_parser(__doc__)
    inputs = parser.add_argument_group("inputs (data flags default to those the checkpoint was trained with)")
    inputs.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="best_model.pth from finetune_seg.py")
    inputs.add_argument("--images-dir", type=Path, metavar="DIR", help="images to score or segment; default: the training data")
    inputs.add_argument("--masks-dir", type=Path, metavar="DIR", help="masks with the images' file names, for folders without an index")
    inputs.add_argument("--index", type=Path, metavar="CSV", help="sts2d_index.csv; default: found in or beside --images-dir")
    inputs.add_argument("--split", choices=("train", "val", "test"), default="test", help="which labelled split to score")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--out-dir", type=Path, metavar="DIR", help="default: CHECKPOINT_DIR/eval_SPLIT (or predict)")
    outputs.add_argument("--save-preds", type=Path, metavar="DIR", help="also write predicted masks (PNG, original size)")
    outputs.add_argument("--top-k", type=int, default=5, metavar="K", help="best and worst images to print and overlay")
    inference = parser.add_argument_group("inference")
    inference.add_argument("--threshold", type=float, default=0.5, metavar="P", help="probability threshold")
    inference.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    inference.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per forward pass")
    inference.add_argument("--workers", "--num-workers", dest="workers", type=int, default=2, metavar="N", help="DataLoader worker processes")
    inference.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    return parser.parse_args(argv)


def fill_from_checkpoint(args, ckpt: dict) -> None:
    """Without --images-dir, evaluate on the data the model was fine-tuned with (its masks and index too).
    The split ratios and seed always come from training, so a file-name split is the same one."""
    trained = ckpt.get("args", {})
    if args.images_dir is None:
        for key in ("images_dir", "masks_dir", "index"):
            if getattr(args, key) is None and trained.get(key):
                setattr(args, key, Path(trained[key]))
    if args.images_dir is None:
        raise ToothSegError(f"{args.checkpoint}: records no images folder; pass --images-dir")
    args.val_ratio, args.test_ratio, args.seed = (trained.get("val_ratio", 0.1), trained.get("test_ratio", 0.1),
                                                  trained.get("seed", 0))


@torch.inference_mode()
def predict_probabilities(model, batch: torch.Tensor, tta: bool, amp_dtype, device) -> torch.Tensor:
    with autocast(device, amp_dtype):
        probs = torch.sigmoid(model(batch).float())
        if tta:
            probs = 0.5 * (probs + torch.sigmoid(model(batch.flip(-1)).float()).flip(-1))
    return probs


def mask_at_size(probs: torch.Tensor, size: tuple[int, int], threshold: float) -> np.ndarray:
    """A (1, 1, h, w) probability map resized to the image's own (H, W) and thresholded: masks are
    scored, saved and shown at the original resolution, never at network size."""
    prob = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)[0, 0]
    return (prob > threshold).cpu().numpy()


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def main(argv=None):
    args = parse_args(argv)
    _, device = setup_runtime(args.cpu)
    model, ckpt = build_model_from_checkpoint(args.checkpoint, ("segmentation",), "eval.py")
    fill_from_checkpoint(args, ckpt)
    data_cfg = ckpt["data"]
    model = model.to(device, memory_format=memory_format(device)).eval()
    amp_dtype = checkpoint_amp(ckpt, device)

    # Data: a labelled split, or predict mode for a folder without masks.
    predict = args.masks_dir is None and find_index(args.images_dir, args.index) is None
    if predict:
        samples = samples_from_folders(args.images_dir)
        split_name = "predict"
    else:
        samples = segmentation_splits(args.images_dir, args.masks_dir, index=args.index, val_ratio=args.val_ratio,
                                      test_ratio=args.test_ratio, seed=args.seed)[args.split]
        split_name = args.split
        if not samples:
            raise ToothSegError(f"{args.images_dir}: the {args.split!r} split is empty; choose another --split")
    out_dir = args.out_dir or args.checkpoint.parent / f"eval_{split_name}"
    save_preds = args.save_preds or (out_dir / "preds" if predict else None)
    dataset = InferenceDataset(samples, build_eval_transform(data_cfg["img_height"], data_cfg["img_width"]))
    loader = make_loader(dataset, batch_size=args.batch_size, train=False, workers=args.workers, dist=DistEnv(),
                         device=device, seed=0)
    print(f"{'predicting' if predict else 'evaluating'} {len(samples)} images "
          f"({split_name}) with {ckpt['model_name']} from {args.checkpoint} on {device}")

    # Inference at network size, scoring at each image's own size.
    rows, packed_preds, started = [], {}, time.time()
    by_pair = {s.pair_id: s for s in samples}
    for images, meta in tqdm(loader, desc=split_name, disable=None):
        probs = predict_probabilities(model, images.to(device, memory_format=memory_format(device)), args.tta,
                                      amp_dtype, device)
        for i, pair_id in enumerate(meta["pair_id"]):
            size = (int(meta["orig_height"][i]), int(meta["orig_width"][i]))
            pred = mask_at_size(probs[i:i + 1], size, args.threshold)
            sample = by_pair[pair_id]
            if save_preds is not None:
                write_png(save_preds / f"{sample.image.stem}.png", pred.astype(np.uint8) * 255)
            if predict:
                continue
            gt = read_mask(sample.mask)
            if gt.shape != pred.shape:
                raise ToothSegError(f"{sample.mask}: mask size {gt.shape[::-1]} differs from its image "
                                    f"{pred.shape[::-1]}; fix the pair")
            packed_preds[pair_id] = np.packbits(pred)  # for the overlays, without predicting twice
            rows.append({"pair_id": pair_id, "image": str(sample.image), "age_group": sample.age_group,
                         **segmentation_metrics(pred, gt), "gt_pixels": int(gt.sum()), "pred_pixels": int(pred.sum()),
                         "height": size[0], "width": size[1]})
    if predict:
        print(f"wrote {len(samples)} masks to {save_preds}")
        return

    # Outputs: per-image table, summary, best and worst overlays.
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "per_image.csv", rows)
    summary = {
        "metrics": summarize(rows, METRIC_NAMES),
        "by_age_group": {g: summarize([r for r in rows if r["age_group"] == g], METRIC_NAMES)
                         for g in sorted({r["age_group"] for r in rows})},
        "n_images": len(rows), "split": args.split, "threshold": args.threshold, "tta": args.tta,
        "checkpoint": str(args.checkpoint), "checkpoint_epoch": ckpt["epoch"], "model": ckpt["model_name"],
        "model_args": ckpt["model_args"], "input_size": [data_cfg["img_height"], data_cfg["img_width"]],
        "images_dir": str(args.images_dir), "masks_dir": str(args.masks_dir) if args.masks_dir else None,
        "index": str(find_index(args.images_dir, args.index) or ""), "seconds": round(time.time() - started, 1),
        "hd_empty_penalty": "image diagonal in pixels when exactly one of prediction and truth is empty",
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    ranked = sorted(rows, key=lambda r: r["dice"], reverse=True)
    k = min(args.top_k, len(ranked))
    for label, chosen in (("best", ranked[:k]), ("worst", ranked[::-1][:k])):
        print(f"{label} {k}: " + ", ".join(f"{r['pair_id']} ({r['dice']:.3f})" for r in chosen))
        for rank, row in enumerate(chosen, 1):
            image = to_uint8(read_image(row["image"]))
            pred = np.unpackbits(packed_preds[row["pair_id"]], count=image.size).reshape(image.shape)
            write_png(out_dir / label / f"{rank:02d}_{row['pair_id']}.png",
                      overlay_mask(image, pred, read_mask(by_pair[row["pair_id"]].mask))[..., ::-1])
    means = summary["metrics"]
    print("  ".join(f"{m}={means[m]['mean']:.4f}±{means[m]['std']:.4f}" for m in METRIC_NAMES) + f"  (n={len(rows)})")
    print(f"wrote {out_dir / 'per_image.csv'} and {out_dir / 'summary.json'}")


if __name__ == "__main__":
    run_cli(main)
