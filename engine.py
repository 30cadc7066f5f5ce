"""The training core shared by every training script: distributed setup, mixed precision, data loaders,
the shared CLI flags and one training loop (`Trainer`), which writes checkpoints by the contract in
checkpoints.py.

Under `torchrun --nproc_per_node=N` the scripts run unchanged: `--batch-size` is per process, so the
global batch is N x batch size, and `--lr` is the learning rate for that global batch (no automatic
scaling). Only rank 0 logs and writes checkpoints, and validation sums are all-reduced so every
metric covers the whole validation set.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from checkpoints import (BEST, LAST, Checkpoint, DataSpec, ModelSpec, Precision, SplitSpec, TrainingState,
                         open_checkpoint, plain, resume_path, save_checkpoint, unwrap)
from data import NORM_MEAN, NORM_STD, denormalize
from models import check_trainable_size
from utils import (ToothSegError, atomic_path, check_output_dir, exit_with, non_negative_int, non_negative_number,
                   positive_int, probability, recorded_path, select_device)

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


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


def has_native_bf16(device: torch.device) -> bool:
    """bf16 computed in hardware on `device`, not emulated (a V100 or T4 GPU "supports" it slowly, as does a CPU
    without AVX512-BF16 or AMX)."""
    return torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else cpu_has_native_bf16()


def resolve_amp(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto: bf16 on GPUs that support it, else fp16 (with a GradScaler); on CPU bf16 where the CPU computes it
    natively (2.1x the fp32 train step for UNet at 160x320 on an AVX512-BF16 EPYC; docs/PROFILE.md), else fp32.
    """
    if requested == "off":
        return None
    if device.type == "cuda":  # GPUs that only emulate bf16 take fp16 with a GradScaler
        return torch.bfloat16 if requested == "bf16" or (requested == "auto" and has_native_bf16(device)) \
            else torch.float16
    if requested == "fp16":
        print("note: --amp fp16 is CUDA-only; on CPU use --amp bf16 or off. Training in fp32")
        return None
    if requested == "bf16" or has_native_bf16(device):
        return torch.bfloat16
    return None


def run_precision(requested: str, amp_dtype: torch.dtype | None) -> Precision:
    """What a checkpoint records of a run with --amp `requested` that resolved to `amp_dtype`: the setting, and the
    dtype it ran in (which checkpoint_amp runs it in later)."""
    return Precision(requested, str(amp_dtype or torch.float32).removeprefix("torch."))


def checkpoint_amp(record: Checkpoint, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for running a checkpoint on `device`: the dtype it trained and was validated in, so a
    model trained in fp32 is not scored in bf16. Where `device` lacks that dtype (fp16 on a CPU, bf16 on a CPU or
    GPU that would only emulate it) it runs in fp32; a format-1 file, which recorded no dtype, resolves its --amp
    setting for `device`."""
    trained = record.precision.dtype
    if trained == "float32":
        return None
    if trained == "bfloat16":
        return torch.bfloat16 if has_native_bf16(device) else None
    if trained == "float16":
        return torch.float16 if device.type == "cuda" else None
    return resolve_amp(record.precision.amp, device)


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
# Shared command-line flags: one name per concept in every training script (older spellings are aliases)
# ----------------------------------------------------------------------------------------------
def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                      weight_decay: float, checkpoint_dir: str, scheduler: str = "cosine") -> dict[str, argparse._ArgumentGroup]:
    """Add the model, data, optimisation and runtime groups; return the groups so a script can add its own flags."""
    from models import MODELS

    model = parser.add_argument_group("model")
    model.add_argument("--model-type", choices=sorted(MODELS), default="unet", help="architecture from the models.py registry")
    model.add_argument("--base-channels", type=positive_int, default=32, metavar="C", help="channels of the first stage")
    model.add_argument("--no-bilinear", action="store_true", help="transposed convolutions instead of bilinear upsampling")
    model.add_argument("--encoder", metavar="NAME",
                       help="the smp models' (unetpp, fpn, manet) encoder, e.g. resnet34; default resnet18")

    data = parser.add_argument_group("data")
    data.add_argument("--images-dir", type=Path, default=Path("./sts_tooth_data/processed_2d"), metavar="DIR",
                      help="processed_2d from prepare_sts2d.py (or its fbf mirror), or a folder of images")
    data.add_argument("--index", type=Path, metavar="CSV", help="sts2d_index.csv (default: found in or beside --images-dir)")
    data.add_argument("--img-height", type=positive_int, default=320, metavar="H", help="network input height")
    data.add_argument("--img-width", type=positive_int, default=640, metavar="W", help="network input width")
    data.add_argument("--num-workers", "--workers", dest="num_workers", type=non_negative_int,
                      default=min(4, os.cpu_count() or 1), metavar="N", help="DataLoader worker processes (persist across epochs)")
    data.add_argument("--no-cache", dest="cache_images", action="store_false",
                      help="decode PNGs every step instead of keeping decoded uint8 images in shared RAM")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=epochs, metavar="N", help="training epochs (the schedule spans all of them)")
    optim.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="B", help="per process; global batch = B x processes")
    optim.add_argument("--lr", type=non_negative_number, default=lr, metavar="LR", help="AdamW learning rate for the global batch")
    optim.add_argument("--weight-decay", type=non_negative_number, default=weight_decay, metavar="WD",
                       help="AdamW decoupled weight decay (not on norms and biases)")
    optim.add_argument("--scheduler", choices=("cosine", "plateau", "none"), default=scheduler,
                       help="cosine: per-step decay to 1%% of --lr; plateau: halve on a stalled validation metric")
    optim.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                       help="autocast: auto = bf16 where the device computes it natively (recent GPUs; CPUs with "
                            "AVX512-BF16/AMX), else fp16 with a GradScaler on CUDA and fp32 on CPU; off = fp32")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model (slow first epoch)")

    runtime = parser.add_argument_group("runtime and logging")
    runtime.add_argument("--checkpoint-dir", "--save-dir", dest="checkpoint_dir", type=Path, metavar="DIR",
                         help=f"{BEST} (best validation) and {LAST} go here (default: the --resume run's folder, "
                              f"else {checkpoint_dir})")
    parser.set_defaults(new_run_dir=Path(checkpoint_dir))  # taken out again by parse_training_args
    runtime.add_argument("--log-dir", "--tensorboard-dir", dest="log_dir", type=Path, metavar="DIR",
                         help="TensorBoard folder (default: CHECKPOINT_DIR/tensorboard)")
    runtime.add_argument("--seed", type=int, default=42, metavar="S", help="seed for initialisation, data order, augmentation and masks")
    runtime.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is available")
    runtime.add_argument("--resume", type=resume_path, metavar="CKPT",
                         help=f"continue a run from its {LAST}, or a run folder's (same schedule)")
    runtime.add_argument("--log-interval", type=positive_int, default=10, metavar="STEPS", help="TensorBoard scalar interval")
    runtime.add_argument("--image-interval", type=positive_int, default=100, metavar="STEPS", help="TensorBoard image interval")
    return {"model": model, "data": data, "optim": optim, "runtime": runtime}


def add_pretraining_args(groups: dict) -> None:
    """The hold-out flag of the two pretraining scripts."""
    groups["data"].add_argument("--val-ratio", "--val-fraction", dest="val_ratio", type=probability, default=0.05,
                                metavar="F", help="share of the pretraining images held out for the validation loss "
                                                  "(2..64 images, fixed by their names)")


def parse_training_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then settle what argparse cannot: a resumed run goes on in its own folder unless told otherwise (it
    wrote into ./checkpoints/..., over whatever run was there), and the output folder must be a folder."""
    args = parser.parse_args(argv)
    new_run_dir = vars(args).pop("new_run_dir")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = args.resume.parent if args.resume is not None else new_run_dir
    check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    if args.log_dir is not None:
        check_output_dir(args.log_dir, "--log-dir")
        args.log_dir = args.log_dir.absolute()  # recorded in run_args: --resume from another folder finds it
    return args


def model_kwargs(args: argparse.Namespace) -> dict:
    """Constructor arguments from the model flags; `encoder_name` only when --encoder is given (the own U-Nets
    have no encoder choice, and reject it in one line)."""
    encoder = {"encoder_name": args.encoder} if args.encoder else {}
    return {"base_channels": args.base_channels, "bilinear": not args.no_bilinear, **encoder}


def data_spec(args: argparse.Namespace, *, modality: str = "xray", split: SplitSpec | None = None,
              holdout: float | None = None, mask_threshold: int | None = None,
              window: tuple[int, int] | None = None, window_overlap: float = 0.5,
              intensity_landmarks: tuple[float, ...] | None = None, image_resize: str = "linear") -> DataSpec:
    """The checkpoint's data section: what eval, predict and the notebook need to preprocess and predict
    exactly as in training, and to find the run's data and splits again."""
    return DataSpec(input_size=(args.img_height, args.img_width), norm_mean=NORM_MEAN, norm_std=NORM_STD,
                    modality=modality, mask_threshold=mask_threshold, images_dir=recorded_path(args.images_dir),
                    masks_dir=recorded_path(args.masks_dir) if getattr(args, "masks_dir", None) else None,
                    split=split or SplitSpec(index=recorded_path(args.index) if args.index else None), holdout=holdout,
                    seed=args.seed, window=window, window_overlap=window_overlap,
                    intensity_landmarks=intensity_landmarks, image_resize=image_resize)


# ----------------------------------------------------------------------------------------------
# Loaders and optimisation
# ----------------------------------------------------------------------------------------------
# Workers start from a fork server (a clean single-threaded process), never by forking this process: a
# fork while the tqdm monitor, the TensorBoard writer or another loader's feeder thread holds a lock can
# leave the child deadlocked inside os.fork() (seen as a torchrun run hanging at its first validation).
WORKER_START = "forkserver" if "forkserver" in torch.multiprocessing.get_all_start_methods() else "spawn"


def _exit_with_process(pid: int, worker_id: int) -> None:
    """A worker leaves when the process it loads for is killed (its parent is the forkserver, which torch's own
    check watches)."""
    exit_with(pid)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int, dist: DistEnv,
                device: torch.device, seed: int) -> DataLoader:
    """Train loaders shuffle per epoch through a DistributedSampler (also with one process, so the
    order depends only on seed and epoch); eval loaders shard without padding."""
    sampler = (DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=False)
               if train else ShardSampler(len(dataset), dist))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      multiprocessing_context=WORKER_START if workers > 0 else None,
                      worker_init_fn=partial(_exit_with_process, os.getpid()) if workers > 0 else None,
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

    # Optional: a task that learns beside the model (the mean teacher) also has
    #   after_step(model) after every optimiser step, and state_dict() / load_state_dict(state) for checkpoints;
    #   a task with figures pooled over the validation set (ratios of sums) has summarise(means) -> figures.


# The flags that shape the learning-rate schedule and the optimiser; --resume continues the run's own (train longer:
# --init-from): the schedule is rebuilt from them, and the restored optimiser state would ignore a new --lr or
# --weight-decay that the checkpoint then recorded.
RESUME_FIXED_FLAGS = ("epochs", "steps_per_epoch", "batch_size", "scheduler", "lr", "weight_decay")
# What a run learns from and how, from its checkpoint's task settings (a setting of another kind of run is absent
# from both: equal).
RESUME_FIXED_TASK = {"masking": "masking (--mask-type, --mask-ratio, --min/max-block-size, --patch-size)",
                     "norm_pix_loss": "--norm-pix-loss", "genesis": "perturbations (--flip-prob ... --inpaint-rate)",
                     "task": "--task", "classes": "tooth classes", "labelled_pairs": "labelled training images "
                     "(--label-fraction, --label-seed, --train-subset-size, or the folder's images)",
                     "semi": "--semi", "pseudo_labels": "--pseudo-labels", "init_from": "--init-from",
                     "augment": "--augment", "mask_resize": "--mask-resize", "lambda_dice": "--lambda-dice",
                     "freeze_encoder_epochs": "--freeze-encoder-epochs"}


def task_field(task: dict, name: str):
    """A checkpoint's task setting as resume compares it: the --init-from and --pseudo-labels paths resolved."""
    value = task.get(name)
    if name == "init_from" and value:
        return Path(value).resolve()
    if name == "pseudo_labels" and value:
        return {**value, "dir": Path(value["dir"]).resolve()}
    return value


def data_field(spec: DataSpec, name: str):
    """A field of a checkpoint's data section as resume compares it: folders and the index resolved, so the same
    data given by another path is the same."""
    value = getattr(spec, name)
    if name == "split":
        return replace(value, index=data_field(value, "index")) if value.index else value
    if name in ("images_dir", "masks_dir", "index") and value is not None:
        return Path(value).resolve()
    return value


class Trainer:
    """One loop for every training script. `record` is the checkpoint the run writes, without its state:
    each save adds the epoch, the metrics and the training state to it."""

    def __init__(self, *, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 device: torch.device, dist: DistEnv, amp_dtype: torch.dtype | None, record: Checkpoint,
                 checkpoint_dir: Path, writer=None, monitor: str = "val/loss", mode: str = "min",
                 patience: int | None = None, frozen_prefixes: tuple[str, ...] = (), freeze_epochs: int = 0,
                 log_interval: int = 10, image_interval: int = 100, fmt: torch.memory_format | None = None):
        self.task, self.model, self.optimizer, self.scheduler = task, model, optimizer, scheduler
        self.device, self.dist, self.amp_dtype, self.record = device, dist, amp_dtype, record
        self.checkpoint_dir, self.writer, self.monitor, self.mode, self.patience = Path(checkpoint_dir), writer, monitor, mode, patience
        self.frozen = [p for n, p in unwrap(model).named_parameters() if n.startswith(frozen_prefixes)] if frozen_prefixes else []
        self.frozen_norms = [m for n, m in unwrap(model).named_modules()
                             if frozen_prefixes and n.startswith(frozen_prefixes) and isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.freeze_epochs, self.log_interval, self.image_interval = freeze_epochs, log_interval, image_interval
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.fmt = fmt or memory_format(device)
        self.start_epoch, self.global_step, self.epochs_since_best = 0, 0, 0
        self.loss_since_log, self.steps_since_log = 0.0, 0  # train/batch_loss: the steps since it was last logged
        self.best = {"metric": monitor, "value": None, "epoch": None}
        self.history: list[dict] = []

    # -- state ---------------------------------------------------------------------------------
    def resume(self, path: Path, saved: Checkpoint | None = None) -> Checkpoint:
        """Go on from the checkpoint at `path` (`saved`, when the stage opened it already); returns it."""
        if saved is None:
            saved = open_checkpoint(path, (self.record.kind,), "--resume")
        # What preprocessing the weights learnt must not change halfway (eval reads it from the checkpoint).
        # Nor the data it learns from, or its best epoch would compare two validation sets (format-1 files kept
        # their data only as the flags of wherever they ran).
        compared = ("input_size", "window", "intensity_landmarks", "image_resize") + \
            (("images_dir", "masks_dir", "split", "holdout", "seed") if saved.format >= 2 else ())
        changed = [name for name in compared if data_field(saved.data, name) != data_field(self.record.data, name)]
        if saved.format >= 2:  # nor the schedule and optimiser, nor what and how it learns
            changed += [f"--{name.replace('_', '-')}" for name in RESUME_FIXED_FLAGS
                        if saved.run_args.get(name) != self.record.run_args.get(name)]
            changed += [label for name, label in RESUME_FIXED_TASK.items()
                        if task_field(saved.task, name) != task_field(self.record.task, name)]
        if changed:
            raise ToothSegError(f"{path}: this run's {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} "
                                f"from the checkpoint's; resume with the "
                                f"flags the run was started with (tool.py {path} lists them)")
        state = saved.state
        model = unwrap(self.model)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        if shapes != {k: v.shape for k, v in state.weights.items()}:
            raise ToothSegError(f"{path}: holds a {saved.model.name} {saved.model.args}, not the {self.record.model.name} "
                                f"{self.record.model.args} this run builds; resume with the model flags the run was "
                                f"started with, or none (fine-tuning then takes the checkpoint's)")
        model.load_state_dict(state.weights)
        if state.optimizer is None:
            raise ToothSegError(f"{path}: holds weights only, no optimiser state to resume; use --init-from instead")
        self.optimizer.load_state_dict(state.optimizer)
        if self.scheduler is not None and state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        if hasattr(self.task, "load_state_dict"):
            if state.task_state is None:
                raise ToothSegError(f"{path}: holds no {type(self.task).__name__} state to resume; resume with the "
                                    f"flags the run was started with")
            self.task.load_state_dict(state.task_state)
        self.start_epoch, self.global_step, self.epochs_since_best = saved.epoch, state.global_step, state.epochs_since_best
        if state.best and state.best["metric"] != self.monitor:
            raise ToothSegError(f"{path}: chose its best epoch by {state.best['metric']}, not {self.monitor}; resume with "
                                f"the flags the run was started with")
        self.best = state.best or self.best
        if self.dist.is_main:
            source_best = path.parent / BEST
            if self.checkpoint_dir.resolve() != path.parent.resolve() and source_best.is_file():
                # Going on in another folder: it must hold the run's best epoch too (or an earlier run's stale one).
                with atomic_path(self.checkpoint_dir / BEST) as tmp:
                    shutil.copyfile(source_best, tmp)
            print(f"resumed {path} at epoch {self.start_epoch} (step {self.global_step})")
        return saved

    def _save(self, name: str, epoch: int, metrics: dict) -> None:
        state = TrainingState(
            weights=unwrap(self.model).state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None, global_step=self.global_step,
            best=dict(self.best), epochs_since_best=self.epochs_since_best,
            task_state=self.task.state_dict() if hasattr(self.task, "state_dict") else None)
        save_checkpoint(self.checkpoint_dir / name, self.record.with_state(epoch=epoch, metrics=metrics, state=state))

    def _improved(self, value: float) -> bool:
        best = self.best["value"]
        return best is None or (value < best if self.mode == "min" else value > best)

    def _check_finite(self, metrics: dict, epoch: int) -> None:
        """A diverged run stops before it writes anything, so the last good checkpoints stay as they are."""
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise ToothSegError(f"training diverged: {shown} at epoch {epoch} (step {self.global_step}); "
                                f"lower --lr or try --amp off (the checkpoints of the last good epoch are kept)")

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, train_loader: DataLoader, val_loader: DataLoader, epochs: int) -> list[dict]:
        if self.dist.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if self.stopped_early():  # a resumed run that had already stopped
            return self.history
        for epoch in range(self.start_epoch, epochs):
            train_loss = self.train_epoch(train_loader, epoch, epochs)
            val = self.evaluate(val_loader)
            metrics = {"train/epoch_loss": train_loss, **{f"val/{k}": v for k, v in val.items()},
                       "lr": self.optimizer.param_groups[0]["lr"]}
            self._check_finite(metrics, epoch + 1)
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
                    self._save(BEST, epoch + 1, metrics)
                self._save(LAST, epoch + 1, metrics)
            if self.stopped_early():
                break
        if self.dist.is_main and self.best["value"] is not None:
            print(f"best {self.monitor} {self.best['value']:.4f} at epoch {self.best['epoch']}; "
                  f"checkpoints in {self.checkpoint_dir}")
        return self.history

    def stopped_early(self) -> bool:
        if self.patience is None or self.epochs_since_best < self.patience:
            return False
        if self.dist.is_main:
            print(f"early stop: {self.monitor} has not improved for {self.patience} epochs")
        return True

    def train_epoch(self, loader: DataLoader, epoch: int, epochs: int) -> float:
        """One pass over `loader` (epoch is 0-based; `epochs` only labels the progress bar); the mean loss."""
        self.model.train()
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        frozen = epoch < self.freeze_epochs
        if frozen:  # a frozen encoder keeps its function: its BatchNorm statistics neither move nor normalise the batch
            for module in self.frozen_norms:
                module.eval()
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
            if hasattr(self.task, "after_step"):
                self.task.after_step(unwrap(self.model))
            self.global_step += 1
            n_batches += 1
            self.loss_since_log = self.loss_since_log + loss.detach()
            self.steps_since_log += 1
            total += loss.detach()
            if self.global_step % self.log_interval == 0:
                # The mean of the steps since the last log, which may lie in the previous epoch (or, after a
                # resume, only since it); one sync per interval, not per step.
                value = (self.loss_since_log / self.steps_since_log).item()
                self.loss_since_log, self.steps_since_log = 0.0, 0
                self._check_finite({"train/batch_loss": value}, epoch + 1)
                bar.set_postfix(loss=f"{value:.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/batch_loss", value, self.global_step)
            if self.writer is not None and self.global_step % self.image_interval == 0:
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
        means = {k: v / count for k, v in totals.items()}
        return self.task.summarise(means) if hasattr(self.task, "summarise") else means

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


def build_trainer(args: argparse.Namespace, *, task: Task, model: nn.Module, kind: str, data: DataSpec,
                  task_settings: dict, steps_per_epoch: int, device: torch.device, dist: DistEnv,
                  monitor: str = "val/loss", mode: str = "min", tensorboard: bool = True,
                  resumed: Checkpoint | None = None, images_per_forward: int = 1, **trainer_kwargs) -> Trainer:
    """The optimiser, scheduler, TensorBoard writer, checkpoint record and Trainer from the shared flags;
    resumes if asked (from `resumed`, the --resume checkpoint, when the stage opened it already). A task whose
    training forward pass stacks several views of each batch says how many (`images_per_forward`)."""
    optimizer = make_optimizer(unwrap(model), args.lr, args.weight_decay, device)
    scheduler = make_scheduler(args.scheduler, optimizer, args.epochs * steps_per_epoch, mode)
    amp_dtype = resolve_amp(args.amp, device)
    bare = unwrap(model)
    # The batch BatchNorm sees: SyncBatchNorm (CUDA under torchrun) pools every process's
    check_trainable_size(bare, data.window or data.input_size,
                         args.batch_size * images_per_forward * (dist.world_size if device.type == "cuda" else 1),
                         f"--window {data.window[0]} {data.window[1]}" if data.window
                         else f"--img-height {data.input_size[0]} --img-width {data.input_size[1]}")
    record = Checkpoint(kind=kind, model=ModelSpec(bare.name, plain(bare.config)), data=data,
                        precision=run_precision(args.amp, amp_dtype),
                        task=task_settings, run_args=plain(args))
    trainer = Trainer(task=task, model=model, optimizer=optimizer, scheduler=scheduler, device=device, dist=dist,
                      amp_dtype=amp_dtype, record=record, checkpoint_dir=args.checkpoint_dir,
                      monitor=monitor,
                      mode=mode, log_interval=args.log_interval, image_interval=args.image_interval, **trainer_kwargs)
    log_dir = args.log_dir or args.checkpoint_dir / "tensorboard"
    if args.resume is not None:
        resumed = trainer.resume(args.resume, resumed)
        if tensorboard and dist.is_main:
            carry_events(resumed, log_dir)
    if tensorboard:  # opened after resuming: what the interrupted run logged after its checkpoint is hidden
        trainer.writer = open_writer(log_dir, dist, trainer.global_step + 1 if args.resume is not None else None)
    return trainer


def carry_events(resumed: Checkpoint, log_dir: Path) -> None:
    """Going on in another log folder: the run's earlier TensorBoard files are copied there first (each one once,
    by name), so the folder holds the whole run's curves as it holds its best.pth; the writer's purge step then
    hides what they hold after the checkpoint. A source folder that is gone is said, not an error."""
    recorded = resumed.run_args.get("log_dir")
    if recorded is not None and not Path(recorded).is_absolute():  # older files: relative to a folder not recorded
        print(f"note: the resumed run's TensorBoard folder is recorded as {recorded}, relative to where it ran; "
              f"its files are not copied, and {log_dir} starts at the resumed epoch")
        return
    source = Path(recorded or Path(resumed.path).parent / "tensorboard")
    if source.resolve() == Path(log_dir).resolve():
        return
    events = sorted(source.glob("events.out.tfevents.*")) if source.is_dir() else []
    if not events:
        print(f"note: no TensorBoard files of the resumed run in {source}; {log_dir} starts at the resumed epoch")
        return
    for event in events:
        if not (Path(log_dir) / event.name).exists():
            with atomic_path(Path(log_dir) / event.name) as tmp:
                shutil.copyfile(event, tmp)


def reconstruction_visuals(inputs: torch.Tensor, target: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """TensorBoard images for the pretraining tasks, back on the [0, 1] scale."""
    recon, target = recon.float(), target.float()
    return {"input": denormalize(inputs.float()), "target": denormalize(target), "recon": denormalize(recon),
            "abs_error": (recon - target).abs().mul(NORM_STD).clamp(0, 1)}


def open_writer(log_dir: Path, dist: DistEnv, purge_step: int | None = None):
    """A TensorBoard SummaryWriter on rank 0 (None elsewhere). With `purge_step`, TensorBoard hides the events
    of earlier files in the folder at that step or later, so a resumed run's per-step curves do not double back
    (per-epoch series, logged at their epoch, lie below it)."""
    if not dist.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
