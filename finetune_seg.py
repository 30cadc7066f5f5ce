"""Tooth segmentation fine-tuning, from a pretrained checkpoint (MIM or full-image) or from scratch.

Loss: BCE + lambda * soft Dice. Splits come from sts2d_index.csv (found in or beside --images-dir,
or given with --index); without an index they are derived from file names (--val-ratio/--test-ratio,
fixed by --split-seed, so every --seed of a study is scored on the same test images). With --init-from
or --resume, the model type and width default to the checkpoint's. The best epoch is chosen by
validation Dice (at network resolution; eval.py scores at each image's own resolution).
Writes CHECKPOINT_DIR/best.pth and CHECKPOINT_DIR/last.pth.

Example:
  python finetune_seg.py --images-dir ./sts_tooth_data/processed_2d \\
      --init-from ./checkpoints/mim_unet/best.pth --checkpoint-dir ./checkpoints/finetune_mim_unet
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from checkpoints import ModelSpec, SplitSpec, load_pretrained, open_checkpoint, read_weights
from data import SegmentationDataset, build_eval_transform, build_train_transform, denormalize, modality_of
from engine import (add_training_args, build_trainer, cleanup_runtime, data_spec, make_loaders, parse_training_args,
                    prepare_model, setup_runtime)
from index import find_index, segmentation_splits, source_mask_threshold, subset_fraction
from metrics import BCEDiceLoss, dice_per_image
from models import ENCODER_PREFIXES
from overlay import overlay_mask
from utils import ToothSegError, make_parser, run_cli, set_seed


def parse_args(argv=None):
    parser = make_parser(__doc__)
    groups = add_training_args(parser, epochs=100, batch_size=8, lr=1e-3, weight_decay=1e-4,
                               checkpoint_dir="./checkpoints/finetune")
    # None = take it from --resume/--init-from, else the registry defaults (unet, 32, bilinear).
    parser.set_defaults(model_type=None, base_channels=None, no_bilinear=None)
    for action in parser._actions:
        if action.dest in ("model_type", "base_channels"):
            action.help += "; default: the --init-from checkpoint's, else " + ("unet" if action.dest == "model_type" else "32")
    model, data, optim = groups["model"], groups["data"], groups["optim"]
    model.add_argument("--init-from", type=Path, metavar="CKPT",
                       help="pretrained weights (a MIM or full-image run's best.pth, or a bare state_dict); scratch if omitted")
    model.add_argument("--freeze-encoder-epochs", type=int, default=0, metavar="N",
                       help="keep encoder + bottleneck fixed for the first N epochs")
    data.add_argument("--masks-dir", type=Path, metavar="DIR",
                      help="masks with the images' file names (used only without an index; default: --images-dir)")
    data.add_argument("--val-ratio", type=float, default=0.1, metavar="F", help="without an index: share for validation")
    data.add_argument("--test-ratio", type=float, default=0.1, metavar="F", help="without an index: share for test")
    data.add_argument("--split-seed", type=int, default=0, metavar="S",
                      help="without an index: seed of the file-name split (kept apart from --seed, so runs with "
                           "different seeds share one test set)")
    data.add_argument("--label-fraction", type=float, default=1.0, metavar="F",
                      help="train on this share of the labelled training pairs (chosen by --seed; nested across fractions)")
    data.add_argument("--train-subset-size", type=int, metavar="N", help="then keep at most N training pairs")
    optim.add_argument("--lambda-dice", type=float, default=0.2, metavar="L", help="loss = BCE + L * soft Dice")
    optim.add_argument("--patience", type=int, metavar="N", help="stop after N epochs without a better val Dice")
    return parse_training_args(parser, argv)


def resolve_model(args) -> ModelSpec:
    """Explicit flags win; then the --resume or --init-from checkpoint's architecture; then defaults."""
    described = None
    if args.resume is not None:
        described = open_checkpoint(args.resume, ("segmentation",), "--resume").model
    elif args.init_from is not None:
        record, _ = read_weights(args.init_from, "--init-from")
        described = record.model if record is not None else None
    name = args.model_type or (described.name if described else "unet")
    kwargs = dict(described.args) if described and described.name == name else {}
    kwargs["out_channels"] = 1
    if args.base_channels is not None:
        kwargs["base_channels"] = args.base_channels
    if args.no_bilinear is not None:
        kwargs["bilinear"] = not args.no_bilinear
    return ModelSpec(name, kwargs)


class SegmentationTask:
    def __init__(self, lambda_dice: float):
        self.loss = BCEDiceLoss(lambda_dice)

    def train_step(self, model, batch):
        image, mask, _ = batch
        logits = model(image)
        return self.loss(logits, mask), logits

    def val_step(self, model, batch):
        image, mask, _ = batch
        logits = model(image).float()
        n = torch.tensor(float(len(image)), device=image.device)
        return {"loss": self.loss(logits, mask) * n, "dice": dice_per_image(logits, mask).sum(), "count": n}

    def visuals(self, batch, logits):
        image, mask, _ = batch
        gray = (denormalize(image[:4, 0].float()) * 255).round().byte().cpu().numpy()
        preds, gts = (logits[:4, 0] > 0).cpu().numpy(), mask[:4, 0].cpu().numpy()
        overlays = np.stack([overlay_mask(g, p, t) for g, p, t in zip(gray, preds, gts)])
        return {"overlay": torch.from_numpy(overlays).permute(0, 3, 1, 2).float() / 255}


def main(argv=None):
    args = parse_args(argv)
    dist, device = setup_runtime(args.cpu)
    set_seed(args.seed)

    # Data: the index's splits (or a file-name split); optionally fewer labels for low-label studies.
    index = find_index(args.images_dir, args.index)
    splits = segmentation_splits(args.images_dir, args.masks_dir, index=index, val_ratio=args.val_ratio,
                                 test_ratio=args.test_ratio, seed=args.split_seed)
    train_samples = subset_fraction(splits["train"], args.label_fraction, args.seed)[:args.train_subset_size]
    if not splits["val"]:
        raise ToothSegError(f"{index or args.images_dir}: the validation split is empty; "
                            f"rebuild the index with a larger --val-ratio")
    modality = modality_of(train_samples)
    train_set = SegmentationDataset(train_samples, build_train_transform(args.img_height, args.img_width, modality),
                                    seed=args.seed, cache=args.cache_images)
    val_set = SegmentationDataset(splits["val"], build_eval_transform(args.img_height, args.img_width),
                                  seed=args.seed, fixed=True, cache=args.cache_images)
    train_loader, val_loader = make_loaders(train_set, val_set, args, dist, device)

    # Model: architecture from the flags or the checkpoint, then the pretrained weights.
    spec = resolve_model(args)
    model = spec.build()
    if dist.is_main:
        print(f"fine-tuning {spec.name} {spec.args} on {len(train_set)} pairs ({modality}), "
              f"validating on {len(val_set)}; device {device}")
    if args.init_from is not None and args.resume is None:
        report = load_pretrained(model, args.init_from)
        if dist.is_main:
            print(f"init from {args.init_from}: {report.summary()}")
    model = prepare_model(model, device, dist, args.compile)

    # Loop: best by validation Dice, optional early stopping and encoder freezing.
    split = SplitSpec(str(index) if index else None, args.val_ratio, args.test_ratio, args.split_seed)
    settings = {"lambda_dice": args.lambda_dice, "label_fraction": args.label_fraction, "train_pairs": len(train_set),
                "init_from": args.init_from, "freeze_encoder_epochs": args.freeze_encoder_epochs}
    trainer = build_trainer(args, task=SegmentationTask(args.lambda_dice), model=model, kind="segmentation",
                            data=data_spec(args, modality=modality, split=split,
                                           mask_threshold=source_mask_threshold(train_samples, index)),
                            task_settings=settings,
                            steps_per_epoch=len(train_loader), device=device, dist=dist, monitor="val/dice", mode="max",
                            patience=args.patience, frozen_prefixes=ENCODER_PREFIXES if args.freeze_encoder_epochs else (),
                            freeze_epochs=args.freeze_encoder_epochs)
    trainer.fit(train_loader, val_loader, args.epochs)
    cleanup_runtime(dist)


if __name__ == "__main__":
    run_cli(main)
