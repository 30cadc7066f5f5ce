"""Full-image restoration pretraining (Models Genesis): a U-Net learns to undo perturbations of X-rays.

Each sample is flipped (input and target together), then the input alone gets local pixel
shuffling, a random Bezier intensity curve (inverted half the time) and in- or out-painting, each
with its own probability. The L1 loss covers the whole image. `--init-from` continues from a MIM
checkpoint. Writes CHECKPOINT_DIR/best.pth (lowest validation loss) and last.pth.

Example:
  python fullimage_pretrain.py --images-dir ./sts_tooth_data/processed_2d \\
      --checkpoint-dir ./checkpoints/fullimage_unet --model-type unet
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoints import load_pretrained
from data import GenesisConfig, RestorationDataset, build_eval_transform, build_train_transform
from engine import (add_pretraining_args, add_training_args, build_trainer, cleanup_runtime, data_spec, make_loaders,
                    model_kwargs, parse_training_args, prepare_model, reconstruction_visuals, setup_runtime)
from index import hold_out, pretraining_samples
from models import build_model
from utils import make_parser, run_cli, set_seed, zero_to_one


def parse_args(argv=None):
    parser = make_parser(__doc__)
    groups = add_training_args(parser, epochs=100, batch_size=8, lr=1e-3, weight_decay=0.05,
                               checkpoint_dir="./checkpoints/fullimage")
    add_pretraining_args(groups)
    groups["model"].add_argument("--init-from", type=Path, metavar="CKPT",
                                 help="start from these weights (e.g. a MIM run's best.pth), matched by name and shape")
    defaults = GenesisConfig()
    genesis = parser.add_argument_group("Models Genesis perturbations (per-sample probabilities)")
    genesis.add_argument("--flip-prob", type=zero_to_one, default=defaults.flip_prob, metavar="P",
                         help="flip input and target together")
    genesis.add_argument("--local-shuffle-prob", type=zero_to_one, default=defaults.local_shuffle_prob, metavar="P",
                         help="shuffle pixels within small windows")
    genesis.add_argument("--nonlinear-prob", type=zero_to_one, default=defaults.nonlinear_prob, metavar="P",
                         help="a random Bezier intensity curve")
    genesis.add_argument("--paint-prob", type=zero_to_one, default=defaults.paint_prob, metavar="P",
                         help="in- or out-paint blocks with noise")
    genesis.add_argument("--inpaint-rate", type=zero_to_one, default=defaults.inpaint_rate, metavar="P",
                         help="when painting: share of in-painting (the rest is out-painting)")
    return parse_training_args(parser, argv)


class RestorationTask:
    def train_step(self, model, batch):
        perturbed, target, _ = batch
        recon = model(perturbed)
        return F.l1_loss(recon.float(), target), recon

    def val_step(self, model, batch):
        perturbed, target, _ = batch
        recon = model(perturbed).float()
        per_image = lambda x: (x - target).abs().mean((1, 2, 3)).sum()
        # Baseline: return the perturbed input unchanged.
        return {"loss": per_image(recon), "identity_l1": per_image(perturbed),
                "count": torch.tensor(float(len(target)), device=target.device)}

    def visuals(self, batch, recon):
        perturbed, target, _ = batch
        return reconstruction_visuals(perturbed, target, recon)


def main(argv=None):
    args = parse_args(argv)
    dist, device = setup_runtime(args.cpu)
    set_seed(args.seed)

    # Data: every image but the labelled val/test ones; a fixed hold-out with fixed perturbations.
    train_samples, val_samples = hold_out(pretraining_samples(args.images_dir, args.index), args.val_ratio, minimum=2)
    genesis = GenesisConfig(args.flip_prob, args.local_shuffle_prob, args.nonlinear_prob, args.paint_prob, args.inpaint_rate)
    # The corruptions act on [0, 1] intensities, so the transforms must not normalise.
    train_set = RestorationDataset(train_samples, build_train_transform(args.img_height, args.img_width, normalize=False),
                                   genesis, seed=args.seed, cache=args.cache_images)
    val_set = RestorationDataset(val_samples, build_eval_transform(args.img_height, args.img_width, normalize=False),
                                 genesis, seed=args.seed, fixed=True, cache=args.cache_images)
    train_loader, val_loader = make_loaders(train_set, val_set, args, dist, device)
    if dist.is_main:
        print(f"full-image pretraining on {len(train_set)} images, validating on {len(val_set)}; device {device}")

    # Model and loop.
    model = build_model(args.model_type, **model_kwargs(args))
    if args.init_from is not None and args.resume is None:
        report = load_pretrained(model, args.init_from)
        if dist.is_main:
            print(f"init from {args.init_from}: {report.summary()}")
    model = prepare_model(model, device, dist, args.compile)
    trainer = build_trainer(args, task=RestorationTask(), model=model, kind="fullimage",
                            data=data_spec(args, holdout=args.val_ratio),
                            task_settings={"genesis": asdict(genesis), "init_from": args.init_from},
                            steps_per_epoch=len(train_loader), device=device, dist=dist)
    trainer.fit(train_loader, val_loader, args.epochs)
    cleanup_runtime(dist)


if __name__ == "__main__":
    run_cli(main)
