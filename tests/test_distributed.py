"""The training scripts under real `torchrun --nproc_per_node=2` on CPU (gloo): they finish, only rank 0
logs and writes checkpoints, and the validation metric covers the whole validation set, so it equals a
single-process evaluation of the same weights."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import SegmentationDataset, build_eval_transform, segmentation_splits
from engine import (CheckpointNames, DistEnv, Trainer, build_model_from_checkpoint, make_loader, prepare_model,
                    resolve_amp)
from finetune_seg import SegmentationTask
from metrics import dice_per_image
from phantom import generate_panoramic
from utils import write_png

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = 15  # with --val-ratio 0.2 and --test-ratio 0.1: 10 train, 3 val (odd, so padding would show), 2 test
TINY = ["--img-height", "32", "--img-width", "64", "--base-channels", "4", "--num-workers", "0", "--cpu"]


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for i in range(N_PAIRS):
        # Drawn at 160x320 and resized by the transforms: below that the phantom's exposure saturates.
        image, mask = generate_panoramic(seed=i, height=160, width=320, age_group="children" if i % 4 == 0 else "adult")
        write_png(root / "images" / f"pair_{i:02d}.png", image)
        write_png(root / "masks" / f"pair_{i:02d}.png", mask)
    return root


def torchrun(script: str, *script_args: str) -> subprocess.CompletedProcess:
    """Two CPU processes through the real launcher; --standalone picks a free rendezvous port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script, *script_args]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, f"{script} under torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def epoch_log_lines(stdout: str, epoch: int) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"epoch {epoch}:")]


def assert_one_set_of_outputs(run_dir: Path, checkpoint_names: list[str]) -> None:
    assert sorted(p.name for p in run_dir.rglob("*.pth")) == sorted(checkpoint_names)
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1


def single_process_validation(checkpoint: Path, folder: Path, scratch: Path) -> tuple[dict, torch.Tensor]:
    """The run's validation loader and Trainer.evaluate, rebuilt from the checkpoint's own arguments, in one
    process; also each validation image's Dice."""
    model, ckpt = build_model_from_checkpoint(checkpoint, kinds=("segmentation",))
    args = ckpt["args"]
    device, dist = torch.device("cpu"), DistEnv()
    splits = segmentation_splits(folder / "images", folder / "masks", val_ratio=args["val_ratio"],
                                 test_ratio=args["test_ratio"], seed=args["seed"])
    val_set = SegmentationDataset(splits["val"], build_eval_transform(args["img_height"], args["img_width"]),
                                  seed=args["seed"], fixed=True, cache=True)
    loader = make_loader(val_set, batch_size=args["batch_size"], train=False, workers=0, dist=dist, device=device,
                         seed=args["seed"])
    model = prepare_model(model, device, dist)
    task = SegmentationTask(args["lambda_dice"])
    trainer = Trainer(task=task, model=model, optimizer=None, scheduler=None, device=device, dist=dist,
                      amp_dtype=resolve_amp(args["amp"], device), kind="segmentation", checkpoint_dir=scratch,
                      names=CheckpointNames("best_model.pth", "last.pth"), data_config={}, args=argparse.Namespace(**args))
    metrics = trainer.evaluate(loader)
    with torch.inference_mode():
        per_image = torch.cat([dice_per_image(model(image), mask) for image, mask, _ in loader])
    return metrics, per_image


def test_finetune_under_torchrun_matches_single_process(labelled_folder, tmp_path):
    save_dir = tmp_path / "finetune"
    # Batch 1 gives the ranks 2 and 1 validation batches; 15 steps at this rate move the BatchNorm
    # statistics far enough that eval-mode predictions (and so the Dice of each image) differ.
    result = torchrun("finetune_seg.py", "--images-dir", str(labelled_folder / "images"),
                      "--masks-dir", str(labelled_folder / "masks"), "--val-ratio", "0.2", "--test-ratio", "0.1",
                      "--epochs", "3", "--batch-size", "1", "--lr", "0.01", "--lambda-dice", "1",
                      "--save-dir", str(save_dir), *TINY)

    # Only rank 0 logs and writes: one line per epoch, one set of checkpoints, one TensorBoard file.
    assert [len(epoch_log_lines(result.stdout, epoch)) for epoch in (1, 2, 3)] == [1, 1, 1]
    assert_one_set_of_outputs(tmp_path, ["best_model.pth", "last.pth"])

    for name in ("best_model.pth", "last.pth"):
        recorded = torch.load(save_dir / name, map_location="cpu", weights_only=True)["metrics"]
        single, per_image = single_process_validation(save_dir / name, labelled_folder, tmp_path)
        assert len(per_image) % 2 == 1, "an odd validation set is what makes padding visible"
        # The images differ, so one rank's shard (or a padded set) would give another mean.
        assert per_image.max() - per_image.min() > 1e-3
        assert recorded["val/dice"] == pytest.approx(single["dice"], abs=1e-6)
        assert recorded["val/dice"] == pytest.approx(per_image.double().mean().item(), abs=1e-6)
        assert recorded["val/loss"] == pytest.approx(single["loss"], abs=1e-6)


@pytest.mark.parametrize("script, checkpoints, extra", [
    ("mim_pretrain.py", ["mim_best.pth", "mim_last.pth"], ["--min-block-size", "4", "--max-block-size", "16"]),
    ("fullimage_pretrain.py", ["fullimage_best.pth", "fullimage_last.pth"], []),
])
def test_pretraining_under_torchrun(labelled_folder, tmp_path, script, checkpoints, extra):
    run_dir = tmp_path / "pretrain"
    result = torchrun(script, "--images-dir", str(labelled_folder / "images"), "--epochs", "1", "--batch-size", "2",
                      "--checkpoint-dir", str(run_dir), *TINY, *extra)

    assert len(epoch_log_lines(result.stdout, 1)) == 1
    assert_one_set_of_outputs(tmp_path, checkpoints)
    last = torch.load(run_dir / checkpoints[1], map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and torch.isfinite(torch.tensor(last["metrics"]["val/loss"]))


def test_finetune_with_fewer_validation_images_than_processes(labelled_folder, tmp_path):
    save_dir = tmp_path / "finetune"
    torchrun("finetune_seg.py", "--images-dir", str(labelled_folder / "images"),
             "--masks-dir", str(labelled_folder / "masks"), "--val-ratio", "0.07", "--test-ratio", "0.1",
             "--epochs", "1", "--batch-size", "2", "--save-dir", str(save_dir), *TINY)

    recorded = torch.load(save_dir / "last.pth", map_location="cpu", weights_only=True)["metrics"]
    single, per_image = single_process_validation(save_dir / "last.pth", labelled_folder, tmp_path)
    assert len(per_image) == 1
    assert recorded["val/loss"] == pytest.approx(single["loss"], abs=1e-6)
