"""The training core shared by every training script: distributed setup, mixed precision,
self-describing checkpoints, data loaders, the shared CLI flags and one training loop (`Trainer`).

Under `torchrun --nproc_per_node=N` the scripts run unchanged: `--batch-size` is per process, so the
global batch is N x batch size, and `--lr` is the learning rate for that global batch (no automatic
scaling). Only rank 0 logs and writes checkpoints, and validation sums are all-reduced so every
metric covers the whole validation set.
"""
from __future__ import annotations

import argparse
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from data import NORM_MEAN, NORM_STD, denormalize
from models import build_model
from utils import ToothSegError, atomic_path, select_device

CHECKPOINT_FORMAT = 1
MIN_TRANSFER_COVERAGE = 0.2  # share of the model's weight elements that --init-from must supply


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(force_cpu: bool = False) -> tuple[DistEnv, torch.device]:
    """Detect torchrun from the environment, start the process group, and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = select_device(force_cpu)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return DistEnv(), device
    dist = DistEnv(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        # N processes on one machine would otherwise each start one thread per core.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist, device


def cleanup_runtime(dist: DistEnv) -> None:
    if dist.enabled and torch_dist.is_initialized():
        # Wait for rank 0's last checkpoint write: a rank tearing down gloo early aborts the others.
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def all_reduce_sums(sums: dict[str, torch.Tensor], dist: DistEnv) -> dict[str, float]:
    """Sum each tensor over all ranks (one collective) and return plain floats."""
    keys = sorted(sums)
    if dist.enabled:  # a rank that saw no batch has no keys; every rank must reduce the same tensor
        every_rank = [None] * dist.world_size
        torch_dist.all_gather_object(every_rank, keys)
        keys = sorted(set().union(*every_rank))
    # Sums may live on the GPU or the CPU (a batch count); gather them on the CPU first.
    zero = torch.zeros((), dtype=torch.float64)
    stacked = torch.stack([sums[k].detach().to("cpu", torch.float64).reshape(()) if k in sums else zero for k in keys])
    if dist.enabled:
        # gloo cannot reduce CUDA tensors and nccl cannot reduce CPU ones: follow the backend.
        on_cuda = torch_dist.get_backend() == "nccl"
        stacked = stacked.cuda() if on_cuda else stacked
        torch_dist.all_reduce(stacked)
    return dict(zip(keys, stacked.cpu().tolist()))


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (rank r takes r, r+N, ...), unlike DistributedSampler,
    which pads with repeats; validation metrics then equal a single process's."""

    def __init__(self, length: int, dist: DistEnv):
        self.indices = list(range(dist.rank, length, dist.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------------------------
# Precision and memory format
# ----------------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions in hardware (AVX512-BF16 or AMX), not by emulation."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's bf16 query
        return False


def resolve_amp(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto: bf16 on GPUs that support it, else fp16 (with a GradScaler); on CPU bf16 where the CPU computes it
    natively (2.1x the fp32 train step for UNet at 160x320 on an AVX512-BF16 EPYC; docs/PROFILE.md), else fp32.
    """
    if requested == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if requested == "bf16" or (requested == "auto" and torch.cuda.is_bf16_supported()) \
            else torch.float16
    if requested == "fp16":
        print("note: --amp fp16 is CUDA-only; on CPU use --amp bf16 or off. Training in fp32")
        return None
    if requested == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def checkpoint_amp(ckpt: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for running a checkpoint: the precision it was trained and validated in (its --amp)."""
    return resolve_amp(ckpt["args"].get("amp", "auto"), device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last: cuDNN's tensor-core NHWC kernels on CUDA, oneDNN's NHWC convolutions on CPU (1.22x the
    NCHW fp32 train step there; docs/PROFILE.md). CPUs without oneDNN keep NCHW."""
    return torch.channels_last if device.type == "cuda" or torch.backends.mkldnn.is_available() \
        else torch.contiguous_format


def to_device(batch: Any, device: torch.device, fmt: torch.memory_format = torch.contiguous_format) -> Any:
    """Move every tensor in a (nested) batch to `device`; 4-D tensors get `fmt`."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=fmt) if batch.ndim == 4 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, fmt) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, fmt) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """Convert run arguments to plain types, so the checkpoint loads with weights_only=True."""
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: str | os.PathLike, *, kind: str, model: nn.Module, data_config: dict,
                    optimizer=None, scheduler=None, scaler=None, epoch: int = 0, global_step: int = 0,
                    metrics: dict | None = None, best: dict | None = None, args: Any = None) -> None:
    """Write a self-describing checkpoint atomically."""
    model = unwrap(model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "model_name": model.name,
        "model_args": plain(model.config),
        "model": model.state_dict(),
        "data": plain(data_config),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "global_step": global_step,
        "metrics": plain(metrics or {}),
        "best": plain(best or {}),
        "args": plain(args or {}),
        "torch_version": str(torch.__version__),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def safe_load(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) with the failure told in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        reason = ("it holds Python objects beyond tensors and plain types, which are unsafe to load"
                  if "Unsupported global" in str(exc) else f"corrupt or not a torch file: {type(exc).__name__}")
        raise ToothSegError(f"{path}: cannot load this {what} ({reason})") from None


def load_checkpoint(path: str | os.PathLike, kinds: Iterable[str] | None = None, purpose: str = "") -> dict:
    """Load a ToothSeg checkpoint safely (weights_only=True); check its kind when `kinds` is given."""
    path = Path(path)
    if not path.is_file():
        raise ToothSegError(f"{path}: checkpoint not found; check the path")
    ckpt = safe_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "kind" not in ckpt:
        raise ToothSegError(f"{path}: not a ToothSeg checkpoint (a bare state_dict?); "
                            f"use it with --init-from, which accepts plain weights")
    if kinds is not None and ckpt["kind"] not in tuple(kinds):
        want = " or ".join(repr(k) for k in kinds)
        raise ToothSegError(f"{path}: is a {ckpt['kind']!r} checkpoint, but {purpose or 'this'} needs a {want} checkpoint")
    return ckpt


def checkpoint_architecture(path: str | os.PathLike) -> tuple[str, dict] | None:
    """(model name, constructor args) of a ToothSeg checkpoint; None for a bare state_dict."""
    path = Path(path)
    if not path.is_file():
        raise ToothSegError(f"{path}: checkpoint not found; check the path")
    ckpt = safe_load(path, "checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt["model_name"], ckpt["model_args"]
    return None


def build_model_from_checkpoint(path: str | os.PathLike, kinds: Iterable[str] | None = None,
                                purpose: str = "") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights; nothing else is needed."""
    ckpt = load_checkpoint(path, kinds, purpose)
    model = build_model(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model, ckpt


@dataclass
class TransferReport:
    matched: list[str]
    missing: list[str]      # in the model, not in the file
    mismatched: list[str]   # same name, different shape
    unused: list[str]       # in the file, not in the model

    def summary(self) -> str:
        def names(keys):
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            return f" ({shown})" if keys else ""
        return (f"matched {len(self.matched)}, missing {len(self.missing)}{names(self.missing)}, "
                f"mismatched {len(self.mismatched)}{names(self.mismatched)}, unused {len(self.unused)}{names(self.unused)}")


def read_weights(path: str | os.PathLike, flag: str = "the path") -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(checkpoint metadata, or None for a bare state_dict; the state_dict) of a weights file."""
    path = Path(path)
    if not path.is_file():
        raise ToothSegError(f"{path}: file not found; check {flag}")
    obj = safe_load(path, "weights file")
    meta = obj if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT else None
    state = meta["model"] if meta is not None else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ToothSegError(f"{path}: holds neither a ToothSeg checkpoint nor a state_dict of tensors; "
                            f"pass a file written by a ToothSeg script or torch.save(model.state_dict())")
    return meta, state


def transferable_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as weight transfer matches them: DDP/compile prefixes stripped, and BatchNorm's step
    counters left out (0-d bookkeeping that would match between any two models)."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()
            if not k.endswith("num_batches_tracked")}


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> TransferReport:
    """Copy the tensors of a checkpoint (or a bare state_dict) that match `model` by name and shape.
    Fails when they cover under MIN_TRANSFER_COVERAGE of the model (an encoder alone covers more)."""
    meta, state = read_weights(path, "--init-from")
    source, target = transferable_state(state), transferable_state(unwrap(model).state_dict())
    matched = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    report = TransferReport(
        matched=matched,
        missing=[k for k in target if k not in source],
        mismatched=[k for k, v in target.items() if k in source and source[k].shape != v.shape],
        unused=[k for k in source if k not in target],
    )
    coverage = sum(target[k].numel() for k in matched) / max(1, sum(v.numel() for v in target.values()))
    if coverage < MIN_TRANSFER_COVERAGE:
        described = f"{meta['model_name']!r} {meta['model_args']}" if meta is not None else "weights"
        raise ToothSegError(f"{path}: only {coverage:.0%} of this model's weights match by name and shape "
                            f"(the file holds {described}); "
                            f"use the same --model-type and --base-channels as the pretraining run")
    unwrap(model).load_state_dict({k: source[k] for k in matched}, strict=False)
    return report


# ----------------------------------------------------------------------------------------------
# Shared command-line flags (seed names kept; the finetune spellings are aliases)
# ----------------------------------------------------------------------------------------------
def data_config(args: argparse.Namespace, modality: str = "xray") -> dict:
    """What eval and predict need to preprocess images exactly as in training."""
    return {"img_height": args.img_height, "img_width": args.img_width, "norm_mean": NORM_MEAN,
            "norm_std": NORM_STD, "modality": modality}


def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                      weight_decay: float, scheduler: str = "cosine") -> dict[str, argparse._ArgumentGroup]:
    """Add the model, data-loading, optimisation and runtime groups; return the groups so a script
    can add its own flags to them."""
    from models import MODELS

    model = parser.add_argument_group("model")
    model.add_argument("--model-type", choices=sorted(MODELS), default="unet", help="architecture from the models.py registry")
    model.add_argument("--base-channels", type=int, default=32, metavar="C", help="channels of the first stage")
    model.add_argument("--no-bilinear", action="store_true", help="transposed convolutions instead of bilinear upsampling")

    data = parser.add_argument_group("data")
    data.add_argument("--img-height", type=int, default=320, metavar="H", help="network input height")
    data.add_argument("--img-width", type=int, default=640, metavar="W", help="network input width")
    data.add_argument("--num-workers", "--workers", dest="num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      metavar="N", help="DataLoader worker processes (persist across epochs)")
    data.add_argument("--no-cache", dest="cache_images", action="store_false",
                      help="decode PNGs every step instead of keeping decoded uint8 images in RAM")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=epochs, metavar="N", help="training epochs (the schedule spans all of them)")
    optim.add_argument("--batch-size", type=int, default=batch_size, metavar="B", help="per process; global batch = B x processes")
    optim.add_argument("--lr", type=float, default=lr, metavar="LR", help="AdamW learning rate for the global batch")
    optim.add_argument("--weight-decay", type=float, default=weight_decay, metavar="WD", help="AdamW decoupled weight decay (not on norms and biases)")
    optim.add_argument("--scheduler", choices=("cosine", "plateau", "none"), default=scheduler,
                       help="cosine: per-step decay to 1%% of --lr; plateau: halve on a stalled validation metric")
    optim.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                       help="autocast: auto = bf16 where the device computes it natively (recent GPUs; CPUs with "
                            "AVX512-BF16/AMX), else fp16 with a GradScaler on CUDA and fp32 on CPU; off = fp32")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model (slow first epoch)")

    runtime = parser.add_argument_group("runtime and logging")
    runtime.add_argument("--seed", type=int, default=42, metavar="S", help="seed for initialisation, data order, augmentation and masks")
    runtime.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is available")
    runtime.add_argument("--resume", type=Path, metavar="CKPT", help="continue a run from its last checkpoint (same schedule)")
    runtime.add_argument("--log-interval", type=int, default=10, metavar="STEPS", help="TensorBoard scalar interval")
    runtime.add_argument("--image-interval", type=int, default=100, metavar="STEPS", help="TensorBoard image interval")
    return {"model": model, "data": data, "optim": optim, "runtime": runtime}


def add_pretraining_args(parser: argparse.ArgumentParser, groups: dict, default_checkpoint_dir: str) -> None:
    """Input and output flags shared by the two pretraining scripts."""
    groups["data"].add_argument("--images-dir", type=Path, default=Path("./sts_tooth_data/processed_2d"), metavar="DIR",
                                help="processed_2d from prepare_sts2d.py (or its fbf mirror), or any folder of images")
    groups["data"].add_argument("--index", type=Path, metavar="CSV",
                                help="sts2d_index.csv (default: found in or beside --images-dir); without one, every image is used")
    groups["data"].add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                                help="fixed share of the pretraining images held out for the validation loss (2..64 images)")
    groups["runtime"].add_argument("--checkpoint-dir", type=Path, default=Path(default_checkpoint_dir), metavar="DIR",
                                   help="best and last checkpoints go here")
    groups["runtime"].add_argument("--log-dir", "--tensorboard-dir", dest="log_dir", type=Path, metavar="DIR",
                                   help="TensorBoard folder (default: CHECKPOINT_DIR/tensorboard)")


def model_kwargs(args: argparse.Namespace) -> dict:
    return {"base_channels": args.base_channels, "bilinear": not args.no_bilinear}


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int, dist: DistEnv,
                device: torch.device, seed: int) -> DataLoader:
    """Train loaders shuffle per epoch through a DistributedSampler (also with one process, so the
    order depends only on seed and epoch); eval loaders shard without padding."""
    sampler = (DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=False)
               if train else ShardSampler(len(dataset), dist))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                      drop_last=train and len(sampler) > batch_size, prefetch_factor=4 if workers > 0 else None)


def make_loaders(train_set: Dataset, val_set: Dataset, args: argparse.Namespace, dist: DistEnv,
                 device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of a training script, from its shared flags."""
    common = dict(batch_size=args.batch_size, workers=args.num_workers, dist=dist, device=device, seed=args.seed)
    return make_loader(train_set, train=True, **common), make_loader(val_set, train=False, **common)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms and biases; fused kernels on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, mode: str):
    if name == "cosine":
        floor = 0.01
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5, patience=3)
    return None


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
class Task(Protocol):
    """What a training script supplies: the loss for a batch, validation sums, and images to log."""

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss, model output)."""

    def val_step(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """Return per-batch sums, including "count"; the trainer reports sum/count per key."""

    def visuals(self, batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return named (N,1,H,W) images in [0, 1] for TensorBoard."""


@dataclass
class CheckpointNames:
    best: str
    last: str


class Trainer:
    def __init__(self, *, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 device: torch.device, dist: DistEnv, amp_dtype: torch.dtype | None, kind: str,
                 checkpoint_dir: Path, names: CheckpointNames, data_config: dict, args: argparse.Namespace,
                 writer=None, monitor: str = "val/loss", mode: str = "min", patience: int | None = None,
                 frozen_prefixes: tuple[str, ...] = (), freeze_epochs: int = 0):
        self.task, self.model, self.optimizer, self.scheduler = task, model, optimizer, scheduler
        self.device, self.dist, self.amp_dtype, self.kind = device, dist, amp_dtype, kind
        self.checkpoint_dir, self.names, self.data_config, self.args = Path(checkpoint_dir), names, data_config, args
        self.writer, self.monitor, self.mode, self.patience = writer, monitor, mode, patience
        self.frozen = [p for n, p in unwrap(model).named_parameters() if n.startswith(frozen_prefixes)] if frozen_prefixes else []
        self.freeze_epochs = freeze_epochs
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.fmt = memory_format(device)
        self.start_epoch, self.global_step, self.epochs_since_best = 0, 0, 0
        self.best = {"metric": monitor, "value": None, "epoch": None}
        self.history: list[dict] = []

    # -- state ---------------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, (self.kind,), "--resume")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.best = ckpt["best"] or self.best
        self.epochs_since_best = ckpt["metrics"].get("epochs_since_best", 0)
        if self.dist.is_main:
            print(f"resumed {path} at epoch {self.start_epoch} (step {self.global_step})")

    def _save(self, name: str, epoch: int, metrics: dict) -> None:
        save_checkpoint(self.checkpoint_dir / name, kind=self.kind, model=self.model, data_config=self.data_config,
                        optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, epoch=epoch,
                        global_step=self.global_step, metrics={**metrics, "epochs_since_best": self.epochs_since_best},
                        best=self.best, args=self.args)

    def _improved(self, value: float) -> bool:
        best = self.best["value"]
        return best is None or (value < best if self.mode == "min" else value > best)

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, train_loader: DataLoader, val_loader: DataLoader, epochs: int) -> list[dict]:
        if self.dist.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(self.start_epoch, epochs):
            train_loss = self._train_epoch(train_loader, epoch, epochs)
            val = self.evaluate(val_loader)
            metrics = {"train/epoch_loss": train_loss, **{f"val/{k}": v for k, v in val.items()},
                       "lr": self.optimizer.param_groups[0]["lr"]}
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(metrics[self.monitor])
            improved = self._improved(metrics[self.monitor])
            if improved:
                self.best = {"metric": self.monitor, "value": metrics[self.monitor], "epoch": epoch + 1}
                self.epochs_since_best = 0
            else:
                self.epochs_since_best += 1
            self.history.append({"epoch": epoch + 1, **metrics})
            if self.dist.is_main:
                self._log_epoch(epoch + 1, metrics, improved)
                if improved:
                    self._save(self.names.best, epoch + 1, metrics)
                self._save(self.names.last, epoch + 1, metrics)
            if self.patience is not None and self.epochs_since_best >= self.patience:
                if self.dist.is_main:
                    print(f"early stop: {self.monitor} has not improved for {self.patience} epochs")
                break
        if self.dist.is_main and self.best["value"] is not None:
            print(f"best {self.monitor} {self.best['value']:.4f} at epoch {self.best['epoch']}; "
                  f"checkpoints in {self.checkpoint_dir}")
        return self.history

    def _train_epoch(self, loader: DataLoader, epoch: int, epochs: int) -> float:
        self.model.train()
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        frozen = epoch < self.freeze_epochs
        running = torch.zeros((), device=self.device)
        total, n_batches = torch.zeros((), device=self.device), 0
        # disable=None: no bar when stderr is not a terminal (logs stay readable); only rank 0 draws one.
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=None if self.dist.is_main else True,
                   dynamic_ncols=True, leave=False)
        for batch in bar:
            batch = to_device(batch, self.device, self.fmt)
            with autocast(self.device, self.amp_dtype):
                loss, output = self.task.train_step(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if frozen:  # a frozen encoder gets no update (and no AdamW state) while its gradients are dropped
                for p in self.frozen:
                    p.grad = None
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
                self.scheduler.step()
            self.global_step += 1
            n_batches += 1
            running += loss.detach()
            total += loss.detach()
            if self.global_step % self.args.log_interval == 0:
                value = (running / self.args.log_interval).item()  # one sync per interval, not per step
                running.zero_()
                if not math.isfinite(value):
                    raise ToothSegError(f"loss became {value} at epoch {epoch + 1}, step {self.global_step}; "
                                        f"lower --lr or try --amp off")
                bar.set_postfix(loss=f"{value:.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/batch_loss", value, self.global_step)
            if self.writer is not None and self.global_step % self.args.image_interval == 0:
                for tag, images in self.task.visuals(batch, output.detach()).items():
                    self.writer.add_images(tag, images[:4].float().cpu(), self.global_step)
        sums = all_reduce_sums({"loss": total, "count": torch.tensor(float(n_batches))}, self.dist)
        return sums["loss"] / max(1.0, sums["count"])

    @torch.inference_mode()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Mean of each validation quantity over the whole validation set (all ranks)."""
        self.model.eval()
        # Evaluate the bare module with rank 0's BatchNorm statistics (those it checkpoints), synced here
        # by every rank: DDP's own forward-time sync would hang when a rank's shard is empty.
        model = getattr(self.model, "module", self.model)
        if self.dist.enabled:
            for buffer in model.buffers():
                torch_dist.broadcast(buffer, src=0)
        sums: dict[str, torch.Tensor] = {}
        for batch in loader:
            batch = to_device(batch, self.device, self.fmt)
            with autocast(self.device, self.amp_dtype):
                out = self.task.val_step(model, batch)
            for k, v in out.items():
                sums[k] = sums.get(k, torch.zeros((), device=self.device, dtype=torch.float64)) + v.detach().double()
        totals = all_reduce_sums(sums, self.dist)
        count = totals.pop("count")
        if count == 0:
            raise ToothSegError("the validation set is empty; check the index splits or --val-ratio")
        return {k: v / count for k, v in totals.items()}

    def _log_epoch(self, epoch: int, metrics: dict, improved: bool) -> None:
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"epoch {epoch}: {shown}{'  *best*' if improved else ''}", flush=True)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, epoch)
            self.writer.flush()


def prepare_model(model: nn.Module, device: torch.device, dist: DistEnv, compile_model: bool = False) -> nn.Module:
    """Move to the device in its preferred memory format, then wrap for DDP (SyncBN on CUDA) and compile."""
    model = model.to(device, memory_format=memory_format(device))
    if dist.enabled:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def build_trainer(args: argparse.Namespace, *, task: Task, model: nn.Module, kind: str, names: CheckpointNames,
                  checkpoint_dir: Path, log_dir: Path | None, data_config: dict, steps_per_epoch: int,
                  device: torch.device, dist: DistEnv, monitor: str = "val/loss", mode: str = "min",
                  **trainer_kwargs) -> Trainer:
    """The optimiser, scheduler, TensorBoard writer and Trainer from the shared flags; resumes if asked."""
    optimizer = make_optimizer(unwrap(model), args.lr, args.weight_decay, device)
    scheduler = make_scheduler(args.scheduler, optimizer, args.epochs * steps_per_epoch, mode)
    trainer = Trainer(task=task, model=model, optimizer=optimizer, scheduler=scheduler, device=device, dist=dist,
                      amp_dtype=resolve_amp(args.amp, device), kind=kind, checkpoint_dir=checkpoint_dir, names=names,
                      data_config=data_config, args=args, writer=open_writer(log_dir, dist), monitor=monitor,
                      mode=mode, **trainer_kwargs)
    if args.resume is not None:
        trainer.resume(args.resume)
    return trainer


def reconstruction_visuals(inputs: torch.Tensor, target: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """TensorBoard images for the pretraining tasks, back on the [0, 1] scale."""
    recon, target = recon.float(), target.float()
    return {"input": denormalize(inputs.float()), "target": denormalize(target), "recon": denormalize(recon),
            "abs_error": (recon - target).abs().mul(NORM_STD).clamp(0, 1)}


def open_writer(log_dir: Path | None, dist: DistEnv):
    """A TensorBoard SummaryWriter on rank 0 (None elsewhere or when logging is off)."""
    if log_dir is None or not dist.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))
