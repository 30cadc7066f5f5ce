"""Masked image modelling (MIM) pretraining: a U-Net learns to fill in hidden parts of X-rays.

The loss is L1 on the hidden pixels only (optionally against per-patch normalised targets).
Blocks (the seeds' random rectangles) or patch-aligned masks (SimMIM/SparK style) are supported.
Writes CHECKPOINT_DIR/best.pth (lowest validation loss) and last.pth.

Example:
  python mim_pretrain.py --images-dir ./sts_tooth_data/processed_2d \\
      --checkpoint-dir ./checkpoints/mim_unet --model-type unet --mask-ratio 0.55
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from data import MIMDataset, MaskGenerator, build_eval_transform, build_train_transform
from engine import (add_pretraining_args, add_training_args, build_trainer, cleanup_runtime, data_spec, make_loaders,
                    model_kwargs, parse_training_args, prepare_model, reconstruction_visuals, setup_runtime)
from index import hold_out, pretraining_samples
from metrics import masked_l1_loss
from models import build_model
from utils import make_parser, positive_int, probability, run_cli, set_seed


def parse_args(argv=None):
    parser = make_parser(__doc__)
    groups = add_training_args(parser, epochs=100, batch_size=8, lr=1e-3, weight_decay=0.05, checkpoint_dir="./checkpoints/mim")
    add_pretraining_args(groups)
    mim = parser.add_argument_group("masking")
    mim.add_argument("--mask-type", choices=("blocks", "patches"), default="blocks",
                     help="random rectangles, or a random share of a patch grid")
    mim.add_argument("--mask-ratio", type=probability, default=0.55, metavar="R", help="share of pixels hidden")
    mim.add_argument("--min-block-size", type=positive_int, default=32, metavar="PX", help="blocks: smallest side")
    mim.add_argument("--max-block-size", type=positive_int, default=96, metavar="PX", help="blocks: largest side")
    mim.add_argument("--patch-size", type=positive_int, default=32, metavar="PX", help="patches: grid cell size")
    mim.add_argument("--norm-pix-loss", type=positive_int, default=None, metavar="PX",
                     help="compare against targets normalised per PX x PX patch (MAE/SimMIM); off by default")
    return parse_training_args(parser, argv)


class MIMTask:
    def __init__(self, norm_patch_size: int | None):
        self.norm_patch_size = norm_patch_size

    def train_step(self, model, batch):
        masked, target, mask, _ = batch
        recon = model(masked)
        return masked_l1_loss(recon.float(), target, mask, self.norm_patch_size), recon

    def val_step(self, model, batch):
        masked, target, mask, _ = batch
        recon = model(masked).float()
        # Baseline: fill the hidden pixels with the mean of the visible ones.
        visible = 1 - mask
        mean_fill = (target * visible).sum((1, 2, 3), keepdim=True) / visible.sum((1, 2, 3), keepdim=True).clamp_min(1)

        def per_image(pred, norm_patch_size=None):
            """Each image's own masked L1, summed (the trainer divides by the count): one mean over the batch's
            masked pixels weighed images by their hidden area, so the logged loss, and the best epoch, depended on
            the batch size."""
            return sum(masked_l1_loss(p[None], t[None], m[None], norm_patch_size)
                       for p, t, m in zip(pred, target, mask))

        return {"loss": per_image(recon, self.norm_patch_size), "masked_l1": per_image(recon),
                "mean_fill_l1": per_image(mean_fill.expand_as(target)),
                "count": torch.tensor(float(len(target)), device=target.device)}

    def visuals(self, batch, recon):
        masked, target, _, _ = batch
        return reconstruction_visuals(masked, target, recon)


def main(argv=None):
    args = parse_args(argv)
    dist, device = setup_runtime(args.cpu)
    set_seed(args.seed)

    # Data: every image but the labelled val/test ones; a fixed hold-out with fixed masks for validation.
    train_samples, val_samples = hold_out(pretraining_samples(args.images_dir, args.index), args.val_ratio, minimum=2)
    masker = MaskGenerator(args.mask_type, args.mask_ratio, args.min_block_size, args.max_block_size, args.patch_size)
    train_set = MIMDataset(train_samples, build_train_transform(args.img_height, args.img_width), masker,
                           seed=args.seed, cache=args.cache_images)
    val_set = MIMDataset(val_samples, build_eval_transform(args.img_height, args.img_width), masker,
                         seed=args.seed, fixed=True, cache=args.cache_images)
    train_loader, val_loader = make_loaders(train_set, val_set, args, dist, device)
    if dist.is_main:
        print(f"MIM pretraining on {len(train_set)} images, validating on {len(val_set)}; device {device}")

    # Model and loop.
    model = prepare_model(build_model(args.model_type, **model_kwargs(args)), device, dist, args.compile)
    trainer = build_trainer(args, task=MIMTask(args.norm_pix_loss), model=model, kind="mim",
                            data=data_spec(args, holdout=args.val_ratio),
                            task_settings={"masking": asdict(masker), "norm_pix_loss": args.norm_pix_loss},
                            steps_per_epoch=len(train_loader), device=device, dist=dist)
    trainer.fit(train_loader, val_loader, args.epochs)
    cleanup_runtime(dist)


if __name__ == "__main__":
    run_cli(main)
