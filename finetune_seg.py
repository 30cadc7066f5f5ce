"""Tooth segmentation fine-tuning, from a pretrained checkpoint (MIM or full-image) or from scratch.

Loss: BCE + lambda * soft Dice. Splits come from sts2d_index.csv (found in or beside --images-dir,
or given with --index); without an index they are derived from file names (--val-ratio/--test-ratio,
fixed by --split-seed, so every --seed of a study is scored on the same test images). With --init-from
or --resume, the model type and width default to the checkpoint's. The best epoch is chosen by
validation Dice (at network resolution; eval.py scores at each image's own resolution).
Writes CHECKPOINT_DIR/best.pth and CHECKPOINT_DIR/last.pth.

--window H W trains on random H x W crops of the --img-height x --img-width input, so a step at a high
input resolution costs what a step at the window's size does. Validation, and eval.py after it (the
checkpoint records the window), predict the whole input in overlapping H x W windows (--window-overlap)
blended into one map.

--task teeth segments every tooth by its FDI number: a head with one class per FDI number in the training
label maps (and its mirror), cross-entropy + soft Dice, trained on the pairs that have per-tooth label maps
(prepare_sts2d.py --teeth-dir). A flipped training image gets its teeth renumbered to the other side. MIM,
full-image and binary checkpoints initialise it by parameter name (the head is new). The best epoch is the
one with the best mean per-tooth Dice on validation.

Unlabelled images (the index's, plus the training pairs --label-fraction leaves out) join in one of two
ways: --pseudo-labels DIR (a teacher's soft probabilities from eval.py --split unlabelled --save-probs),
or --semi (a mean teacher with weak-to-strong consistency, trained online).

Example:
  python finetune_seg.py --images-dir ./sts_tooth_data/processed_2d \\
      --init-from ./checkpoints/mim_unet/best.pth --checkpoint-dir ./checkpoints/finetune_mim_unet
  python finetune_seg.py --images-dir ./sts_tooth_data/processed_2d --pseudo-labels ./pseudo --pseudo-keep 0.3
  python finetune_seg.py --images-dir ./ufba_data/processed_2d --task teeth --checkpoint-dir ./checkpoints/teeth
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from checkpoints import Checkpoint, ModelSpec, SplitSpec, load_pretrained, open_checkpoint, read_weights, unwrap
from data import (AUGMENTATIONS, IMAGE_RESIZES, MASK_RESIZES, EpochMix, SegmentationDataset, SemiDataset, TeethDataset,
                  UnlabelledDataset, build_eval_transform, build_train_transform, denormalize, intensity_landmarks,
                  modality_of)
from engine import (add_training_args, build_trainer, cleanup_runtime, data_spec, make_loaders, parse_training_args,
                    prepare_model, setup_runtime)
from index import Sample, find_index, segmentation_splits, source_mask_threshold, subset_fraction, unlabelled_pool
from metrics import (BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss, dice_from_overlap, dice_per_image, overlap_per_image,
                     tooth_dice_per_image)
from models import ENCODER_PREFIXES, accepted_args, check_window, split_outputs
from overlay import overlay_mask, overlay_teeth
from predict import network_logits
from semi import ONLINE_FLAGS, PSEUDO_FLAGS, MeanTeacher, consistency_loss, most_confident, read_pseudo_labels
from teeth import mirror_closed, read_label_map
from utils import (ToothSegError, file_sha1, make_parser, non_negative_int, non_negative_number, positive_int,
                   positive_number, probability, recorded_path, run_cli, set_seed, share_below_one, share_of_all)


TASKS = ("binary", "teeth")


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
    model.add_argument("--freeze-encoder-epochs", type=non_negative_int, default=0, metavar="N",
                       help="keep encoder + bottleneck fixed (BatchNorm statistics too) for the first N epochs")
    model.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=None,
                       help="U-Nets: also supervise the 1/8, 1/4 and 1/2 decoder stages through 1x1 heads (nnU-Net's "
                            "weights 1/8, 1/4, 1/2 of the full-size loss's 1, normalised); prediction uses the full-size "
                            "head only; default: the --init-from checkpoint's, else off")
    data.add_argument("--masks-dir", type=Path, metavar="DIR",
                      help="masks with the images' file names (used only without an index; default: --images-dir)")
    data.add_argument("--val-ratio", type=share_below_one, default=0.1, metavar="F", help="without an index: share for validation")
    data.add_argument("--test-ratio", type=share_below_one, default=0.1, metavar="F", help="without an index: share for test")
    data.add_argument("--split-seed", type=int, default=0, metavar="S",
                      help="without an index: seed of the file-name split (kept apart from --seed, so runs with "
                           "different seeds share one test set)")
    data.add_argument("--label-fraction", type=share_of_all, default=1.0, metavar="F",
                      help="train on this share of the labelled training pairs (chosen by --label-seed; nested across "
                           "fractions)")
    data.add_argument("--label-seed", type=int, metavar="S",
                      help="the seed that draws the --label-fraction share; default: --seed. Teachers to fuse "
                           "(eval.py --save-probs with several checkpoints) share the labels and differ in --seed")
    data.add_argument("--train-subset-size", type=positive_int, metavar="N", help="then keep at most N training pairs")
    data.add_argument("--steps-per-epoch", type=positive_int, metavar="N",
                      help="an epoch is N optimiser steps drawn from the training set, whatever its size (each image "
                           "equally often, augmented anew each time), as nnU-Net's 250 iterations per epoch: the budget, "
                           "--epochs x N steps, is then the same at every label fraction and with pseudo-labels or "
                           "--semi; default: one pass over the training set")
    data.add_argument("--window", type=positive_int, nargs=2, metavar=("H", "W"),
                      help="train on random H x W crops of the input, and predict (validation, eval.py) with "
                           "overlapping H x W windows; multiples of 16, within the input; default: the whole input")
    data.add_argument("--window-overlap", type=probability, default=0.5, metavar="F",
                      help="with --window: the share of a window that its neighbours overlap when predicting")
    data.add_argument("--task", choices=TASKS, default="binary",
                      help="binary: one tooth mask; teeth: every tooth by its FDI number (needs per-tooth label maps, "
                           "prepare_sts2d.py --teeth-dir), one class per number in the training labels and its mirror")
    data.add_argument("--augment", choices=AUGMENTATIONS, default="standard",
                      help="standard: flips, rotations of ±5°, brightness, contrast, noise and blur; strong: also scale "
                           "±10 %%, shift ±5 %% and rotations of ±10° (ultrasound always has these)")
    data.add_argument("--mask-resize", choices=MASK_RESIZES,
                      help="how a binary mask (or pseudo-label) is taken to the network's size for training and "
                           "validation: area (each pixel's tooth share, a soft target at the edges; the binary task's "
                           "default), or nearest (one source pixel each, a fraction of a pixel off the image's grid; "
                           "the default before 2026-12-07, and always for --task teeth); --resume keeps the run's own")
    data.add_argument("--image-resize", choices=IMAGE_RESIZES, default="linear",
                      help="how each X-ray is taken to the network's size, in training and in every prediction "
                           "(recorded in the checkpoint): linear (bilinear), or area (every source pixel averaged in, "
                           "for inputs well below the X-ray's size)")
    data.add_argument("--standardize-intensity", action="store_true",
                      help="match each image's histogram to the training images' mean one (histogram standardisation, "
                           "recorded in the checkpoint, so eval.py and the notebook do the same): another clinic's "
                           "exposure and contrast curve then look like the training clinic's")
    optim.add_argument("--lambda-dice", type=non_negative_number, metavar="L",
                       help="loss = BCE + L * soft Dice (binary, default 0.2), or cross-entropy + L * soft Dice over the "
                            "tooth classes (teeth, default 1.0, as nnU-Net)")
    optim.add_argument("--patience", type=positive_int, metavar="N", help="stop after N epochs without a better val Dice")
    optim.add_argument("--select-by", choices=("dice", "dice_pooled"), default="dice",
                       help="the validation figure that picks best.pth: dice, the mean over images; dice_pooled, all "
                            "pixels at once (nnU-Net's pseudo-Dice), which a few images without teeth cannot dominate "
                            "(binary task)")

    unlabelled = parser.add_argument_group(
        "unlabelled images (the pool: training pairs left out by --label-fraction, and the index's unlabelled images)")
    unlabelled.add_argument("--pseudo-labels", type=Path, metavar="DIR",
                            help="offline: also train on the pool images a teacher labelled (eval.py --save-probs DIR), "
                                 "with its soft probabilities as targets")
    unlabelled.add_argument("--pseudo-weight", type=positive_number, default=1.0, metavar="W", help="loss weight of a pseudo-labelled image")
    unlabelled.add_argument("--pseudo-keep", type=share_of_all, default=1.0, metavar="F",
                            help="keep this share of the pseudo-labels, the most confident (lowest mean entropy)")
    unlabelled.add_argument("--labelled-share", type=probability, metavar="F",
                            help="--pseudo-labels: this share of the training draws are the truly labelled pairs, the "
                                 "rest pseudo-labelled images; default 0.5, half of each batch as --semi has (in "
                                 "proportion to their numbers, 26 UFBA labels would be 3 %% of a 772-image pool's draws)")
    unlabelled.add_argument("--student-noise", action=argparse.BooleanOptionalAction, default=True,
                            help="strongly perturb the inputs of pseudo-labelled images (noisy student)")
    unlabelled.add_argument("--semi", action="store_true",
                            help="online: a mean teacher labels a weak view of each pool image, the student learns it "
                                 "on a strong view where the teacher is confident (FixMatch/UniMatch style)")
    unlabelled.add_argument("--ema-decay", type=probability, default=0.99, metavar="D", help="--semi: teacher = EMA of the student")
    unlabelled.add_argument("--confidence", type=probability, default=0.95, metavar="T",
                            help="--semi: learn only pixels the teacher is this sure of")
    unlabelled.add_argument("--unlabelled-weight", type=non_negative_number, default=1.0, metavar="W", help="--semi: weight of the consistency loss")
    unlabelled.add_argument("--rampup-epochs", type=non_negative_int, default=2, metavar="N",
                            help="--semi: raise the consistency weight linearly over the first N epochs")
    args = parse_training_args(parser, argv)
    if args.semi and args.pseudo_labels is not None:
        parser.error("choose one way of using the unlabelled images: --pseudo-labels or --semi")
    # A flag of the other way (or of none) would be recorded as if it had been applied.
    for flags, way, given in ((PSEUDO_FLAGS, "--pseudo-labels DIR", args.pseudo_labels is not None),
                              (ONLINE_FLAGS, "--semi", args.semi)):
        idle = [flag for flag in flags if getattr(args, dest := flag[2:].replace("-", "_")) != parser.get_default(dest)]
        if idle and not given:
            parser.error(f"{idle[0]} is for {way}, which this run does not use; add {way} or drop {idle[0]}")
    if args.task == "teeth" and (args.semi or args.pseudo_labels is not None):
        parser.error("--task teeth learns from labelled images only; drop --semi/--pseudo-labels (or use them with --task binary)")
    if args.task == "teeth" and args.mask_resize == "area":
        parser.error("--mask-resize area is for the binary task; tooth numbers are labels that must not be blended")
    if args.task == "teeth" and args.select_by != "dice":
        parser.error("--select-by dice_pooled is for the binary task; the per-tooth task picks by its mean tooth Dice")
    if args.val_ratio + args.test_ratio >= 1:
        parser.error(f"--val-ratio and --test-ratio leave no training images (they sum to "
                     f"{args.val_ratio + args.test_ratio:g}); keep their sum below 1")
    if args.lambda_dice is None:
        args.lambda_dice = 1.0 if args.task == "teeth" else 0.2
    if args.window is not None:
        check_window(args.window, (args.img_height, args.img_width),
                     f"--img-height {args.img_height} --img-width {args.img_width}")
        args.window = tuple(args.window)
    return args


def resolve_mask_resize(args, resumed: Checkpoint | None) -> str:
    """A resumed run keeps the targets it started with (runs from before the flag: nearest); otherwise the flag,
    else area for the binary task and nearest for the per-tooth one, whose label maps must not be blended."""
    if resumed is not None:
        started = resumed.task.get("mask_resize", "nearest")
        if args.mask_resize not in (None, started):
            raise ToothSegError(f"{args.resume}: trained with --mask-resize {started}; resume it with that, or without "
                                f"the flag")
        return started
    if args.mask_resize is not None:
        return args.mask_resize
    return "nearest" if args.task == "teeth" else "area"


def resolve_model(args, out_channels: int = 1, resumed: Checkpoint | None = None) -> ModelSpec:
    """Explicit flags win; then the --resume or --init-from checkpoint's architecture; then defaults."""
    described = None
    if resumed is not None:
        described = resumed.model
    elif args.init_from is not None:
        record, _ = read_weights(args.init_from, "--init-from")
        described = record.model if record is not None else None
    name = args.model_type or (described.name if described else "unet")
    # Another architecture from the weights keeps their width (and what else both take, deep supervision too): --init-from
    # a UNet's MIM weights into a scag model matched nothing at the default width.
    kwargs = {} if described is None else dict(described.args) if described.name == name else \
        {k: v for k, v in described.args.items() if k in accepted_args(name)}
    kwargs["out_channels"] = out_channels
    if args.base_channels is not None:
        kwargs["base_channels"] = args.base_channels
    if args.no_bilinear is not None:
        kwargs["bilinear"] = not args.no_bilinear
    if args.encoder is not None:
        kwargs["encoder_name"] = args.encoder
    if args.deep_supervision:
        kwargs["deep_supervision"] = True
    elif args.deep_supervision is False:  # the model's default; the smp models do not take the argument
        kwargs.pop("deep_supervision", None)
    return ModelSpec(name, kwargs)


class SegmentationTask:
    """Validation predicts as eval.py does: the whole input, in overlapping windows when trained on crops."""

    def __init__(self, lambda_dice: float, window: tuple[int, int] | None = None, overlap: float = 0.5):
        self.loss = DeepSupervisionLoss(BCEDiceLoss(lambda_dice))
        self.window, self.overlap = window, overlap

    def train_step(self, model, batch):
        image, mask, meta = batch
        logits, aux = split_outputs(model(image))
        return self.loss(logits, mask, meta["weight"], aux), logits

    def val_step(self, model, batch):
        image, mask, _ = batch
        logits = network_logits(model, image, self.window, self.overlap)
        n = torch.tensor(float(len(image)), device=image.device)
        overlap, volume = overlap_per_image(logits, mask)  # one thresholding for both Dice figures
        return {"loss": self.loss(logits, mask) * n, "dice": dice_from_overlap(overlap, volume).sum(),
                "overlap": overlap.sum(), "volume": volume.sum(), "count": n}

    @staticmethod
    def summarise(means: dict[str, float]) -> dict[str, float]:
        """dice_pooled: Dice of all validation pixels at once, which an image without teeth sways by its few
        stray pixels instead of by a whole image's 0 or 1 (the mean Dice)."""
        overlap, volume = means.pop("overlap"), means.pop("volume")
        return {**means, "dice_pooled": overlap / volume if volume > 0 else 1.0}

    def visuals(self, batch, logits):
        image, mask = batch[:2]
        gray = (denormalize(image[:4, 0].float()) * 255).round().byte().cpu().numpy()
        preds, gts = (logits[:4, 0] > 0).cpu().numpy(), (mask[:4, 0] > 0.5).cpu().numpy()
        overlays = np.stack([overlay_mask(g, p, t) for g, p, t in zip(gray, preds, gts)])
        return {"overlay": torch.from_numpy(overlays).permute(0, 3, 1, 2).float() / 255}


class TeethTask(SegmentationTask):
    """The per-tooth task: cross-entropy + soft Dice over the tooth classes; validation scores the mean Dice
    of each image's true teeth, as eval.py's per-tooth Dice (at network size), and the Dice of their union."""

    def __init__(self, classes: list[int], lambda_dice: float, window: tuple[int, int] | None = None,
                 overlap: float = 0.5):
        super().__init__(lambda_dice, window, overlap)
        self.classes = np.asarray(classes, np.uint8)
        self.loss = DeepSupervisionLoss(CEDiceLoss(lambda_dice))

    @staticmethod
    def summarise(means: dict[str, float]) -> dict[str, float]:
        return means  # its validation counts no pixels to pool (--select-by dice_pooled is refused for it)

    def val_step(self, model, batch):
        image, labels, _ = batch
        logits = network_logits(model, image, self.window, self.overlap)
        n = torch.tensor(float(len(image)), device=image.device)
        # The union eval scores: pixels whose most probable class is a tooth, against every labelled tooth
        # (one the model has no class for, IGNORE_INDEX to the loss, is still a tooth).
        teeth = torch.where(logits.argmax(1, keepdim=True) > 0, 1.0, -1.0)
        # Each image's loss alone: the Dice term is a batch Dice, and the validation loss must not depend on how
        # the set is batched or shared among processes.
        loss = sum(self.loss(logits[i:i + 1], labels[i:i + 1]) for i in range(len(image)))
        return {"loss": loss, "dice": tooth_dice_per_image(logits, labels).sum(),
                "binary_dice": dice_per_image(teeth, (labels != 0).unsqueeze(1).float()).sum(), "count": n}

    def visuals(self, batch, logits):
        image, labels = batch[:2]
        gray = (denormalize(image[:4, 0].float()) * 255).round().byte().cpu().numpy()
        preds, gts = self.classes[logits[:4].argmax(1).cpu().numpy()], self.classes[labels[:4].clamp_min(0).cpu().numpy()]
        overlays = np.stack([np.concatenate([overlay_teeth(g, p, numbers=False), overlay_teeth(g, t, numbers=False)])
                             for g, p, t in zip(gray, preds, gts)])
        return {"teeth (prediction above truth)": torch.from_numpy(overlays).permute(0, 3, 1, 2).float() / 255}


class SemiTask(SegmentationTask):
    """The online method: the supervised loss on a labelled batch, plus the consistency of the student's
    prediction on a strong view of an unlabelled batch with the mean teacher's confident labels of its
    weak view. Both batches go through the student in one forward pass, so BatchNorm sees both."""

    def __init__(self, lambda_dice: float, teacher: MeanTeacher, confidence: float, weight: float, rampup_steps: int,
                 window: tuple[int, int] | None = None, overlap: float = 0.5):
        super().__init__(lambda_dice, window, overlap)
        self.teacher, self.confidence, self.weight, self.rampup_steps = teacher, confidence, weight, rampup_steps
        self.steps = 0

    def train_step(self, model, batch):
        image, mask, meta, weak, strong = batch
        logits, aux = split_outputs(model(torch.cat([image, strong])))
        n = len(image)
        labelled, unlabelled = logits[:n], logits[n:]
        ramp = min(1.0, (self.steps + 1) / self.rampup_steps) if self.rampup_steps else 1.0
        consistency = consistency_loss(unlabelled, self.teacher.probabilities(weak), self.confidence)
        supervised = self.loss(labelled, mask, meta["weight"], [a[:n] for a in aux])
        return supervised + self.weight * ramp * consistency, labelled

    def after_step(self, model) -> None:
        self.teacher.update(model)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.steps = state["steps"]


def pseudo_labelled_samples(args, splits: dict, pool: list[Sample]) -> tuple[list[Sample], dict]:
    """The pool images with a teacher's soft label (the most confident --pseudo-keep share), and what the
    checkpoint records of them. A pseudo-label for a val/test image would leak evaluation: refused."""
    labels, teachers = read_pseudo_labels(args.pseudo_labels)
    held_out = {s.pair_id for name in ("val", "test") for s in splits[name]}
    leaking = [label.image for label in labels if label.pair_id in held_out]
    if leaking:
        raise ToothSegError(f"{args.pseudo_labels}: pseudo-labels {leaking[0]} ({len(leaking)} in all), a val/test "
                            f"image; label only the unlabelled pool (eval.py --split unlabelled)")
    in_pool = {s.pair_id: s for s in pool}
    usable = [label for label in labels if label.pair_id in in_pool]  # a truly labelled image keeps its mask
    if not usable:
        raise ToothSegError(f"{args.pseudo_labels}: none of its {len(labels)} pseudo-labels is an image of this run's "
                            f"unlabelled pool; write them with eval.py --split unlabelled on this data")
    # Matched by pair id, the label must be of this pool's image, not of another data root's or an older version's:
    # by content, or (a manifest written before it recorded the content) by path.
    other = [label for label in usable if (label.image_sha1 != file_sha1(in_pool[label.pair_id].image) if label.image_sha1
                                           else label.image.resolve() != in_pool[label.pair_id].image.resolve())]
    if other:
        raise ToothSegError(f"{args.pseudo_labels}: its pseudo-label {other[0].pair_id} was made from {other[0].image}, "
                            f"not from this pool's {in_pool[other[0].pair_id].image} ({len(other)} such); write them "
                            f"again with eval.py --split unlabelled --save-probs on this data")
    kept = most_confident(usable, args.pseudo_keep)
    record = {"dir": recorded_path(args.pseudo_labels), "teachers": teachers, "kept": len(kept), "usable": len(usable),
              "keep": args.pseudo_keep, "weight": args.pseudo_weight, "student_noise": args.student_noise,
              "labelled_share": 0.5 if args.labelled_share is None else args.labelled_share,
              "max_mean_entropy": max(label.mean_entropy for label in kept)}
    return [Sample(in_pool[label.pair_id].image, label.probs, label.pair_id, source="pseudo") for label in kept], record


def tooth_classes(train_samples: list[Sample], resumed: Checkpoint | None) -> list[int]:
    """0 (background), then every FDI number in the training label maps together with its mirror (a flipped
    image shows it); a resumed run keeps its checkpoint's classes."""
    if resumed is not None:
        return resumed.tooth_classes
    numbers = set()
    for sample in train_samples:
        numbers.update(int(n) for n in np.unique(read_label_map(sample.teeth)))
    return [0] + mirror_closed(numbers - {0})


def epoch_draws(args, dist, natural: int) -> int:
    """Items per epoch (all processes together): --steps-per-epoch batches on each process, else `natural`."""
    return args.steps_per_epoch * args.batch_size * dist.world_size if args.steps_per_epoch else natural


def teeth_datasets(args, splits: dict, train_samples: list[Sample], modality: str, landmarks,
                   resumed: Checkpoint | None):
    """The per-tooth task's training and validation sets, and its classes."""
    classes = tooth_classes(train_samples, resumed)
    if not classes:
        raise ToothSegError(f"{args.resume}: is a binary model; resume it without --task teeth")
    transform = build_train_transform(args.img_height, args.img_width, modality, window=args.window, flip=False,
                                      augment=args.augment, landmarks=landmarks, image_resize=args.image_resize)
    train_set = TeethDataset(train_samples, transform, classes, mirror=True, seed=args.seed, cache=args.cache_images)
    val_transform = build_eval_transform(args.img_height, args.img_width, landmarks=landmarks,
                                         image_resize=args.image_resize)
    val_set = TeethDataset(splits["val"], val_transform, classes, seed=args.seed, fixed=True, cache=args.cache_images)
    return train_set, val_set, classes


def main(argv=None):
    args = parse_args(argv)
    # Opened once: a resumed run's targets, architecture and classes all follow its checkpoint.
    resumed = open_checkpoint(args.resume, ("segmentation",), "--resume") if args.resume is not None else None
    if resumed is not None and resumed.tooth_classes and args.task != "teeth":
        raise ToothSegError(f"{args.resume}: is a per-tooth model; resume it with --task teeth")
    args.mask_resize = resolve_mask_resize(args, resumed)
    dist, device = setup_runtime(args.cpu)
    set_seed(args.seed)

    # Data: the index's splits (or a file-name split); optionally fewer labels for low-label studies.
    index = find_index(args.images_dir, args.index, args.masks_dir)
    splits = segmentation_splits(args.images_dir, args.masks_dir, index=index, val_ratio=args.val_ratio,
                                 test_ratio=args.test_ratio, seed=args.split_seed)
    teeth = args.task == "teeth"
    if teeth:  # the pairs with per-tooth labels
        splits = {name: [s for s in part if s.teeth is not None] for name, part in splits.items()}
        if not splits["train"]:
            raise ToothSegError(f"{index or args.images_dir}: no training pair has a per-tooth label map; add them with "
                                f"prepare_sts2d.py --teeth-dir (PNG label maps or labelme files)")
    train_samples = subset_fraction(splits["train"], args.label_fraction,
                                    args.seed if args.label_seed is None else args.label_seed, args.train_subset_size)
    if not splits["val"]:
        fix = "rebuild the index with prepare_sts2d.py --val-ratio larger" if index else "give a larger --val-ratio"
        raise ToothSegError(f"{index or args.images_dir}: the validation split is empty; {fix}")
    modality = modality_of(train_samples)
    # The labelled training images set the reference, so a student of the same labels shares its teacher's.
    landmarks = intensity_landmarks(train_samples) if args.standardize_intensity else None
    train_transform = build_train_transform(args.img_height, args.img_width, modality, window=args.window,
                                            augment=args.augment, landmarks=landmarks, mask_resize=args.mask_resize,
                                            image_resize=args.image_resize)
    pool = unlabelled_pool(args.images_dir, index, splits["train"], (s.pair_id for s in train_samples))
    if (args.semi or args.pseudo_labels is not None) and not pool:
        raise ToothSegError(f"{index or args.images_dir}: no unlabelled images to learn from; add some with "
                            f"prepare_sts2d.py --unlabelled-dir, or train on a --label-fraction below 1")
    pseudo, pseudo_record = pseudo_labelled_samples(args, splits, pool) \
        if args.pseudo_labels is not None else ([], None)
    classes = None
    if teeth:
        labelled, val_set, classes = teeth_datasets(args, splits, train_samples, modality, landmarks, resumed)
    else:
        labelled = SegmentationDataset(train_samples, train_transform, seed=args.seed, cache=args.cache_images)
        val_transform = build_eval_transform(args.img_height, args.img_width, landmarks=landmarks,
                                             mask_resize=args.mask_resize, image_resize=args.image_resize)
        val_set = SegmentationDataset(splits["val"], val_transform, seed=args.seed, fixed=True, cache=args.cache_images)
    if args.semi:  # a labelled and an unlabelled item per draw
        unlabelled = UnlabelledDataset(pool, train_transform, seed=args.seed, cache=args.cache_images)
        train_set = SemiDataset(labelled, unlabelled, epoch_draws(args, dist, max(len(labelled), len(unlabelled))))
    elif pseudo:  # soft targets, their own loss weight, and (noisy student) strongly perturbed inputs
        pseudo_set = SegmentationDataset(pseudo, train_transform, soft={s.pair_id for s in pseudo},
                                         soft_weight=args.pseudo_weight, noise=args.student_noise, seed=args.seed,
                                         cache=args.cache_images)
        share = 0.5 if args.labelled_share is None else args.labelled_share
        train_set = EpochMix([labelled, pseudo_set], [share, 1 - share],
                             epoch_draws(args, dist, len(labelled) + len(pseudo)))
    else:
        train_set = EpochMix([labelled], [1], epoch_draws(args, dist, len(labelled)))
    train_loader, val_loader = make_loaders(train_set, val_set, args, dist, device)

    # Model: architecture from the flags or the checkpoint, then the pretrained weights.
    spec = resolve_model(args, len(classes) if teeth else 1, resumed)
    model = spec.build()
    if dist.is_main:
        extra = f" + {len(pseudo)} pseudo-labelled of {len(pool)} unlabelled" if pseudo else \
            f" + {len(pool)} unlabelled (online, mean teacher)" if args.semi else \
            f", per tooth: {len(classes) - 1} FDI numbers" if teeth else ""
        crops = f", {args.window[0]}x{args.window[1]} crops of the input" if args.window else ""
        # The share asked for, beside what it rounds to: 0.05 and 0.1 of 8 pairs are both 1 (at least one is kept)
        asked = " ".join([f"--label-fraction {args.label_fraction:g}"] * (args.label_fraction < 1) +
                         [f"--train-subset-size {args.train_subset_size}"] * (args.train_subset_size is not None))
        share = f" ({len(train_samples)} of {len(splits['train'])}: {asked})" if len(train_samples) < len(splits["train"]) else ""
        print(f"fine-tuning {spec.name} {spec.args} on {len(train_samples)} labelled pairs{share}{extra} ({modality}{crops}), "
              f"{len(train_loader)} steps an epoch, validating on {len(val_set)}; device {device}")
    if args.init_from is not None and args.resume is None:
        report = load_pretrained(model, args.init_from, classes if teeth else None)
        if dist.is_main:
            print(f"init from {args.init_from}: {report.summary()}")
    model = prepare_model(model, device, dist, args.compile)

    # Loop: best by validation Dice, optional early stopping and encoder freezing.
    split = SplitSpec(recorded_path(index) if index else None, args.val_ratio, args.test_ratio, args.split_seed)
    settings = {"task": args.task, "classes": classes, "lambda_dice": args.lambda_dice, "label_fraction": args.label_fraction,
                "labelled_pairs": sorted(s.pair_id for s in train_samples), "augment": args.augment,
                "mask_resize": args.mask_resize,
                "init_from": recorded_path(args.init_from) if args.init_from else None, "steps_per_epoch": len(train_loader),
                "freeze_encoder_epochs": args.freeze_encoder_epochs, "pseudo_labels": pseudo_record,
                "semi": {"method": "mean teacher, weak-to-strong consistency", "unlabelled": len(pool),
                         "ema_decay": args.ema_decay, "confidence": args.confidence, "weight": args.unlabelled_weight,
                         "rampup_epochs": args.rampup_epochs} if args.semi else None}
    task = SemiTask(args.lambda_dice, MeanTeacher(unwrap(model), args.ema_decay), args.confidence, args.unlabelled_weight,
                    args.rampup_epochs * len(train_loader), args.window, args.window_overlap) if args.semi \
        else TeethTask(classes, args.lambda_dice, args.window, args.window_overlap) if teeth \
        else SegmentationTask(args.lambda_dice, args.window, args.window_overlap)
    trainer = build_trainer(args, task=task, model=model, kind="segmentation",
                            data=data_spec(args, modality=modality, split=split,
                                           mask_threshold=source_mask_threshold(train_samples, index),
                                           window=args.window, window_overlap=args.window_overlap,
                                           intensity_landmarks=landmarks, image_resize=args.image_resize),
                            task_settings=settings,
                            steps_per_epoch=len(train_loader), device=device, dist=dist, resumed=resumed,
                            images_per_forward=2 if args.semi else 1,  # the labelled batch and its strong views
                            monitor=f"val/{args.select_by}", mode="max",
                            patience=args.patience, frozen_prefixes=ENCODER_PREFIXES if args.freeze_encoder_epochs else (),
                            freeze_epochs=args.freeze_encoder_epochs)
    trainer.fit(train_loader, val_loader, args.epochs)
    cleanup_runtime(dist)


if __name__ == "__main__":
    run_cli(main)
