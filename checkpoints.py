"""The checkpoint contract: what one stage writes and the next reads, by named fields.

A checkpoint (format 2) is a dict of plain types and tensors, so it loads with torch.load(weights_only=True):

    format      2
    kind        mim | fullimage | segmentation
    model       {"name": registry name, "args": constructor arguments}
    data        input size, normalisation, modality, ground-truth mask threshold, the images/masks/index
                it trained on, where its labelled splits came from (`split`) or its pretraining hold-out
                share (`holdout`), the seed of its sample randomness, and the sliding window it trained
                on crops of and predicts with (`window`, `window_overlap`; absent in older files: none), and the
                grey levels each image is standardised to (`intensity_landmarks`; absent or None: raw intensities),
                and how each image is resized to the input (`image_resize`, linear or area; absent: linear)
    precision   {"amp": the --amp setting, "dtype": the autocast dtype it trained in, or "float32"}
    task        plain dicts: the MIM masking, the Models Genesis perturbations, or the segmentation loss and labels;
                a per-tooth model has task "teeth" and `classes`, the FDI number of each output channel (0 first)
    metrics     that epoch's metrics
    epoch       epochs completed
    state       weights, optimizer, scheduler, scaler, global_step, best, epochs_since_best
    run_args    the run's flags, for people to read (tool.py prints them); only --resume reads them back, to refuse
                another schedule or optimiser setting (no stage derives what it predicts or trains from them)

`open_checkpoint` opens a file once, checks it once and returns a `Checkpoint`. Format 1 (the files
written before this contract, which kept the flags as their schema) is upgraded on read into the same
record; `read_weights` also accepts a bare state_dict, for --init-from and tool.py.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from models import build_model
from utils import ToothSegError, atomic_path

FORMAT = 2
KINDS = ("mim", "fullimage", "segmentation")
BEST, LAST = "best.pth", "last.pth"
# What the scripts wrote before every stage used best.pth / last.pth; folders of older runs still open.
LEGACY_BEST = ("best_model.pth", "mim_best.pth", "fullimage_best.pth")


def plain(value: Any) -> Any:
    """Convert run arguments and settings to plain types, so the checkpoint loads with weights_only=True."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    args: dict

    def build(self) -> nn.Module:
        return build_model(self.name, **self.args)


@dataclass(frozen=True)
class SplitSpec:
    """Where labelled train/val/test came from: `index` (the sts2d_index.csv used; None = look in or beside
    the images folder, else split by file names), and the file-name split's ratios and seed."""
    index: str | None = None
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    input_size: tuple[int, int]        # network input (H, W)
    norm_mean: float
    norm_std: float
    modality: str = "xray"
    mask_threshold: int | None = None  # the training masks were tooth where > this (None: not one value)
    images_dir: str | None = None
    masks_dir: str | None = None
    split: SplitSpec = field(default_factory=SplitSpec)
    holdout: float | None = None       # pretraining: share of the pool held out for validation
    seed: int = 0                      # augmentation, MIM masks and Genesis perturbations
    window: tuple[int, int] | None = None  # trained on (H, W) crops, predicts in such windows; None: whole input
    window_overlap: float = 0.5        # share of a window that its neighbours overlap when predicting
    intensity_landmarks: tuple[float, ...] | None = None  # data.standardize_intensity's reference; None: raw images
    image_resize: str = "linear"       # data.IMAGE_RESIZES: how each image is taken to input_size

    def labelled_splits(self, images_dir: str | os.PathLike | None = None, masks_dir: str | os.PathLike | None = None,
                        index: str | os.PathLike | None = None) -> dict:
        """train/val/test samples, split as in training; other folders are split by their own index, or
        by file names with the training run's ratios and seed."""
        from index import segmentation_splits

        if images_dir is None:
            images_dir, masks_dir, index = self.recorded_images_dir(), self.masks_dir, self.split.index
        return segmentation_splits(images_dir, masks_dir, index=index, val_ratio=self.split.val_ratio,
                                   test_ratio=self.split.test_ratio, seed=self.split.seed)

    def pretraining_holdout(self) -> list:
        """The fixed validation images of a pretraining run (its own hold-out, chosen by pair id)."""
        from index import hold_out, pretraining_samples

        if self.images_dir is None or self.holdout is None:
            raise ToothSegError("this checkpoint records no pretraining hold-out; is it a pretraining checkpoint?")
        return hold_out(pretraining_samples(self.recorded_images_dir(), self.split.index), self.holdout, minimum=2)[1]

    def recorded_images_dir(self) -> str:
        """The images folder the run trained on. Checkpoints before absolute paths recorded it as typed,
        relative to the folder training ran in: from elsewhere that is named, not reported as a missing index."""
        if self.images_dir is None:
            raise ToothSegError("this checkpoint records no images folder; pass --images-dir")
        if not os.path.isabs(self.images_dir) and not os.path.isdir(self.images_dir):
            raise ToothSegError(f"{self.images_dir}: this checkpoint records its images folder relative to the folder it "
                                f"was trained in ({os.getcwd()} is not it); run from there, or pass --images-dir")
        return self.images_dir


@dataclass(frozen=True)
class Precision:
    amp: str = "auto"          # the --amp setting; readers resolve it for their own device
    dtype: str = "float32"     # what the run trained in on its device


@dataclass
class TrainingState:
    weights: dict[str, torch.Tensor]
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    global_step: int = 0
    best: dict = field(default_factory=dict)
    epochs_since_best: int = 0
    task_state: dict | None = None  # what the task itself learns, e.g. the online method's mean teacher


@dataclass
class Checkpoint:
    kind: str
    model: ModelSpec
    data: DataSpec
    precision: Precision = field(default_factory=Precision)
    task: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    state: TrainingState | None = None
    run_args: dict = field(default_factory=dict)
    format: int = FORMAT
    torch_version: str = ""
    path: Path | None = None

    @property
    def tooth_classes(self) -> list[int] | None:
        """The FDI number of each output channel of a per-tooth model (0 = background); None for a binary one."""
        return self.task.get("classes") if self.task.get("task") == "teeth" else None

    def build_model(self) -> nn.Module:
        """The model this checkpoint describes, with its weights."""
        model = self.model.build()
        try:
            model.load_state_dict(self.state.weights)
        except RuntimeError as exc:  # weights edited or cut short: not the model the record describes
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise ToothSegError(f"{self.path}: its weights do not fit the {self.model.name} {self.model.args} it "
                                f"records ({first}); the file is damaged: train it again or use another") from None
        return model

    def with_state(self, *, epoch: int, metrics: dict, state: TrainingState) -> "Checkpoint":
        return replace(self, epoch=epoch, metrics=plain(metrics), state=state)

    def to_dict(self) -> dict:
        state = self.state or TrainingState({})
        return {"format": FORMAT, "kind": self.kind, "model": plain(asdict(self.model)), "data": plain(asdict(self.data)),
                "precision": asdict(self.precision), "task": plain(self.task), "metrics": plain(self.metrics),
                # Shallow: asdict would deep-copy every weight and optimiser tensor at each save.
                "epoch": self.epoch, "state": {**{f.name: getattr(state, f.name) for f in fields(state)},
                                               "best": plain(state.best)},
                "run_args": plain(self.run_args), "torch_version": str(torch.__version__)}

    @classmethod
    def from_dict(cls, raw: dict, path: Path | None = None) -> "Checkpoint":
        data = dict(raw["data"])
        data["input_size"] = tuple(data["input_size"])
        data["split"] = SplitSpec(**data.get("split") or {})
        for name in ("window", "intensity_landmarks"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(kind=raw["kind"], model=ModelSpec(**raw["model"]), data=DataSpec(**data),
                   precision=Precision(**raw.get("precision") or {}), task=raw.get("task") or {},
                   metrics=raw.get("metrics") or {}, epoch=raw.get("epoch", 0), state=TrainingState(**raw["state"]),
                   run_args=raw.get("run_args") or {}, format=raw["format"], torch_version=raw.get("torch_version", ""),
                   path=path)


def upgrade_format1(raw: dict, path: Path | None = None) -> Checkpoint:
    """A format-1 checkpoint as a record. Format 1 kept settings only as run flags, so this is the one place
    that reads flags back, by the names those scripts used."""
    args, data = raw.get("args") or {}, raw["data"]
    kind = raw["kind"]
    if kind == "mim":
        task = {"masking": {"mask_type": args.get("mask_type", "blocks"), "ratio": args.get("mask_ratio", 0.55),
                            "min_block": args.get("min_block_size", 32), "max_block": args.get("max_block_size", 96),
                            "patch_size": args.get("patch_size", 32)},
                "norm_pix_loss": args.get("norm_pix_loss")}
    elif kind == "fullimage":
        task = {"genesis": {name: args[name] for name in ("flip_prob", "local_shuffle_prob", "nonlinear_prob",
                                                          "paint_prob", "inpaint_rate") if name in args}}
    else:
        task = {"lambda_dice": args.get("lambda_dice", 0.2), "label_fraction": args.get("label_fraction", 1.0),
                "init_from": args.get("init_from")}
    spec = DataSpec(
        input_size=(data["img_height"], data["img_width"]), norm_mean=data["norm_mean"], norm_std=data["norm_std"],
        modality=data.get("modality", "xray"), images_dir=args.get("images_dir"), masks_dir=args.get("masks_dir"),
        split=SplitSpec(args.get("index"), args.get("val_ratio", 0.1), args.get("test_ratio", 0.1), args.get("seed", 0)),
        holdout=args.get("val_fraction") if kind != "segmentation" else None, seed=args.get("seed", 0))
    state = TrainingState(raw["model"], raw.get("optimizer"), raw.get("scheduler"), raw.get("scaler"),
                          raw.get("global_step", 0), raw.get("best") or {},
                          (raw.get("metrics") or {}).get("epochs_since_best", 0))
    return Checkpoint(kind=kind, model=ModelSpec(raw["model_name"], raw["model_args"]), data=spec,
                      precision=Precision(amp=args.get("amp", "auto"), dtype="not recorded"), task=task,
                      metrics={k: v for k, v in (raw.get("metrics") or {}).items() if k != "epochs_since_best"},
                      epoch=raw.get("epoch", 0), state=state, run_args=args, format=1,
                      torch_version=raw.get("torch_version", ""), path=path)


# ----------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, record: Checkpoint) -> None:
    """Write a checkpoint atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp:
        torch.save(record.to_dict(), tmp)


def _load(path: Path, what: str, flag: str = "the path") -> Any:
    """torch.load(weights_only=True) with the failure told in one line."""
    if not path.is_file():
        raise ToothSegError(f"{path}: file not found; check {flag}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        reason = ("it holds Python objects beyond tensors and plain types, which are unsafe to load"
                  if "Unsupported global" in str(exc) else f"corrupt or not a torch file: {type(exc).__name__}")
        raise ToothSegError(f"{path}: cannot load this {what} ({reason})") from None


def _as_record(obj: Any, path: Path) -> Checkpoint | None:
    """The record, when `obj` is a ToothSeg checkpoint of a known format; None when it is not one."""
    if not isinstance(obj, dict) or "kind" not in obj or "format" not in obj:
        return None
    if obj["format"] not in (1, FORMAT):
        raise ToothSegError(f"{path}: a ToothSeg checkpoint of format {obj['format']!r}, which this version reads "
                            f"only up to format {FORMAT}; use the ToothSeg version that wrote it, or a newer one")
    try:
        return upgrade_format1(obj, path) if obj["format"] == 1 else Checkpoint.from_dict(obj, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ToothSegError(f"{path}: a damaged ToothSeg checkpoint (format {obj['format']}, {type(exc).__name__}: "
                            f"{exc}); use another checkpoint of the run, e.g. last.pth") from None


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its best.pth; the older runs' best_model.pth, mim_best.pth ...)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (BEST, *LEGACY_BEST):
        if (path / name).is_file():
            return path / name
    raise ToothSegError(f"{path}: no {BEST} in this folder; pass the checkpoint file")


def resume_path(text: str) -> Path:
    """--resume's argument: a checkpoint file, or a run folder, which resumes from its last.pth (where the run
    stopped; its best.pth may be epochs earlier)."""
    path = Path(text)
    return path / LAST if path.is_dir() else path


def open_checkpoint(path: str | os.PathLike, kinds: Iterable[str] | None = None, purpose: str = "") -> Checkpoint:
    """Open a ToothSeg checkpoint (a file or a run folder) once, check it, and return its record."""
    path = resolve_checkpoint_path(path)
    record = _as_record(_load(path, "checkpoint"), path)
    if record is None:
        raise ToothSegError(f"{path}: not a ToothSeg checkpoint (a bare state_dict?); "
                            f"use it with --init-from, which accepts plain weights")
    if kinds is not None and record.kind not in tuple(kinds):
        want = " or ".join(repr(k) for k in kinds)
        raise ToothSegError(f"{path}: is a {record.kind!r} checkpoint, but {purpose or 'this'} needs a {want} checkpoint")
    return record


def read_weights(path: str | os.PathLike, flag: str = "the path") -> tuple[Checkpoint | None, dict[str, torch.Tensor]]:
    """(the record, or None for a bare state_dict; the state_dict) of a weights file."""
    path = resolve_checkpoint_path(path)
    obj = _load(path, "weights file", flag)
    record = _as_record(obj, path)
    state = record.state.weights if record is not None else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ToothSegError(f"{path}: holds neither a ToothSeg checkpoint nor a state_dict of tensors; "
                            f"pass a file written by a ToothSeg script or torch.save(model.state_dict())")
    return record, state


# ----------------------------------------------------------------------------------------------
# Weight transfer (--init-from): by name and shape
# ----------------------------------------------------------------------------------------------
MIN_TRANSFER_COVERAGE = 0.2  # share of the model's weight elements that --init-from must supply


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class TransferReport:
    matched: list[str]
    missing: list[str]      # in the model, not in the file
    mismatched: list[str]   # same name, different shape
    unused: list[str]       # in the file, not in the model
    # Per-tooth into per-tooth of other FDI numbers: the output layers matched by number (among `matched`),
    # and (teeth the file had, this model's teeth).
    by_number: list[str] = field(default_factory=list)
    shared_teeth: tuple[int, int] = (0, 0)

    def summary(self) -> str:
        def names(keys):
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            return f" ({shown})" if keys else ""
        renumbered = (f"; output channels matched by FDI number{names(self.by_number)}: {self.shared_teeth[0]} of "
                      f"this model's {self.shared_teeth[1]} teeth from the file, the others new") if self.by_number else ""
        return (f"matched {len(self.matched)}, missing {len(self.missing)}{names(self.missing)}, "
                f"mismatched {len(self.mismatched)}{names(self.mismatched)}, unused {len(self.unused)}{names(self.unused)}"
                f"{renumbered}")


def transferable_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as weight transfer matches them: DDP/compile prefixes stripped, and BatchNorm's step
    counters left out (0-d bookkeeping that would match between any two models)."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()
            if not k.endswith("num_batches_tracked")}


OUTPUT_LAYERS = ("head.", "aux_heads.")  # parameter names of the layers with one output channel per class


def by_fdi_number(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_classes: list[int],
                  classes: list[int]) -> dict[str, torch.Tensor]:
    """The output layers of a per-tooth model with `classes`, from a per-tooth file with `source_classes`:
    each channel of a number the file has takes that number's channel; the others keep their initialisation.
    (Matched by shape, a model of as many classes but other numbers would take tooth 18's channel for 21.)"""
    rows = [(row, source_classes.index(number)) for row, number in enumerate(classes) if number in source_classes]
    remapped = {}
    for key, value in target.items():
        if key.startswith(OUTPUT_LAYERS) and key in source and source[key].shape[1:] == value.shape[1:] \
                and len(source[key]) == len(source_classes) and len(value) == len(classes):
            remapped[key] = value.clone()
            for row, source_row in rows:
                remapped[key][row] = source[key][source_row]
    return remapped


def load_pretrained(model: nn.Module, path: str | os.PathLike, classes: list[int] | None = None) -> TransferReport:
    """Copy the tensors of a checkpoint (or a bare state_dict) that match `model` by name and shape; a per-tooth
    model's output layers (`classes`, its FDI numbers) from another per-tooth checkpoint by tooth number.
    Fails when they cover under MIN_TRANSFER_COVERAGE of the model (an encoder alone covers more)."""
    record, state = read_weights(path, "--init-from")
    source, target = transferable_state(state), transferable_state(unwrap(model).state_dict())
    source_classes = record.tooth_classes if record is not None else None
    remapped = by_fdi_number(source, target, source_classes, classes) \
        if classes is not None and source_classes is not None and source_classes != classes else {}
    source = {**source, **remapped}
    matched = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    report = TransferReport(
        matched=matched,
        missing=[k for k in target if k not in source],
        mismatched=[k for k, v in target.items() if k in source and source[k].shape != v.shape],
        unused=[k for k in source if k not in target],
        by_number=list(remapped),
        shared_teeth=(sum(1 for c in classes if c and c in source_classes), len(classes) - 1) if remapped else (0, 0),
    )
    coverage = sum(target[k].numel() for k in matched) / max(1, sum(v.numel() for v in target.values()))
    if coverage < MIN_TRANSFER_COVERAGE:
        described = f"{record.model.name!r} {record.model.args}" if record is not None else "weights"
        raise ToothSegError(f"{path}: only {coverage:.0%} of this model's weights match by name and shape "
                            f"(the file holds {described}); "
                            f"use the same --model-type and --base-channels as the pretraining run")
    unwrap(model).load_state_dict({k: source[k] for k in matched}, strict=False)
    return report
