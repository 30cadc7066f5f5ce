"""The training scripts under real `torchrun --nproc_per_node=2` on CPU (gloo): they finish, only rank 0
logs and writes checkpoints, and the validation metric covers the whole validation set, so it equals a
single-process evaluation of the same weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import open_checkpoint
from data import SegmentationDataset, build_eval_transform
from engine import DistEnv, Trainer, autocast, checkpoint_amp, make_loader, prepare_model
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


def run_limited(command: list[str], limit: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group; a hang past `limit` seconds kills the whole group (ranks and
    DataLoader workers too) and fails the test."""
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"hung for {limit:.0f} s: {' '.join(command)}\n{stdout[-2000:]}\n{stderr[-2000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"{command} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return result


def torchrun(script: str, *script_args: str, limit: float = 240) -> subprocess.CompletedProcess:
    """Two CPU processes through the real launcher; --standalone picks a free rendezvous port."""
    return run_limited([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", script,
                        *script_args], limit)


def epoch_log_lines(stdout: str, epoch: int) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"epoch {epoch}:")]


def assert_one_set_of_outputs(run_dir: Path, checkpoint_names: list[str]) -> None:
    assert sorted(p.name for p in run_dir.rglob("*.pth")) == sorted(checkpoint_names)
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1


def single_process_validation(checkpoint: Path, scratch: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The run's validation loader and Trainer.evaluate, rebuilt from the checkpoint's own record (its
    splits, input size, precision and loss), in one process; also each validation image's Dice and loss."""
    ckpt = open_checkpoint(checkpoint, ("segmentation",))
    device, dist = torch.device("cpu"), DistEnv()
    transform = build_eval_transform(*ckpt.data.input_size, mask_resize=ckpt.task["mask_resize"])
    val_set = SegmentationDataset(ckpt.data.labelled_splits()["val"], transform, seed=ckpt.data.seed, fixed=True,
                                  cache=True)
    loader = make_loader(val_set, batch_size=1, train=False, workers=0, dist=dist, device=device, seed=0)
    model = prepare_model(ckpt.build_model(), device, dist)
    task = SegmentationTask(ckpt.task["lambda_dice"])
    trainer = Trainer(task=task, model=model, optimizer=None, scheduler=None, device=device, dist=dist,
                      amp_dtype=checkpoint_amp(ckpt, device), record=ckpt, checkpoint_dir=scratch)
    metrics = trainer.evaluate(loader)
    dice, loss = [], []
    with torch.inference_mode(), autocast(device, trainer.amp_dtype):  # at the precision validation ran in
        for image, mask, _ in loader:
            logits = model(image)
            dice.append(dice_per_image(logits, mask))
            loss.append(task.loss(logits, mask).reshape(1))
    return metrics, torch.cat(dice), torch.cat(loss)


def test_finetune_under_torchrun_matches_single_process(labelled_folder, tmp_path):
    save_dir = tmp_path / "finetune"
    # Batch 1 gives the ranks 2 and 1 validation batches; 15 steps at this rate move the BatchNorm
    # statistics far enough that eval-mode predictions (and so the Dice of each image) differ.
    result = torchrun("finetune_seg.py", "--images-dir", str(labelled_folder / "images"),
                      "--masks-dir", str(labelled_folder / "masks"), "--val-ratio", "0.2", "--test-ratio", "0.1",
                      "--epochs", "3", "--batch-size", "1", "--lr", "0.01", "--lambda-dice", "1",
                      "--checkpoint-dir", str(save_dir), *TINY)

    # Only rank 0 logs and writes: one line per epoch, one set of checkpoints, one TensorBoard file.
    assert [len(epoch_log_lines(result.stdout, epoch)) for epoch in (1, 2, 3)] == [1, 1, 1]
    assert_one_set_of_outputs(tmp_path, ["best.pth", "last.pth"])

    for name in ("best.pth", "last.pth"):
        recorded = torch.load(save_dir / name, map_location="cpu", weights_only=True)["metrics"]
        single, dice, loss = single_process_validation(save_dir / name, tmp_path)
        assert len(loss) % 2 == 1, "an odd validation set is what makes padding visible"
        # The images differ, so their losses do, and one rank's shard (or a padded set) would give another mean.
        # (Their Dice may all be 0: after 15 steps some CPUs' kernels leave this tiny model predicting no tooth.)
        assert loss.max() - loss.min() > 1e-3
        assert recorded["val/loss"] == pytest.approx(single["loss"], abs=1e-6)
        assert recorded["val/loss"] == pytest.approx(loss.double().mean().item(), abs=1e-5)
        assert recorded["val/dice"] == pytest.approx(single["dice"], abs=1e-6)
        assert recorded["val/dice"] == pytest.approx(dice.double().mean().item(), abs=1e-6)


@pytest.mark.parametrize("script, checkpoints, extra", [
    ("mim_pretrain.py", ["best.pth", "last.pth"], ["--min-block-size", "4", "--max-block-size", "16"]),
    ("fullimage_pretrain.py", ["best.pth", "last.pth"], []),
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
             "--epochs", "1", "--batch-size", "2", "--checkpoint-dir", str(save_dir), *TINY)

    recorded = torch.load(save_dir / "last.pth", map_location="cpu", weights_only=True)["metrics"]
    single, _, loss = single_process_validation(save_dir / "last.pth", tmp_path)
    assert len(loss) == 1
    assert recorded["val/loss"] == pytest.approx(single["loss"], abs=1e-6)


def test_dataloader_workers_never_hang(labelled_folder, tmp_path):
    """DataLoader workers start while the tqdm monitor, the TensorBoard writer and the training loader's
    feeder threads run; forked from such a process, a worker could deadlock inside os.fork() (seen once in
    several runs as a torchrun fine-tune stuck at its first validation; workers now start from a fork server).
    A run with workers under torchrun and one alone, each with a time limit that turns a hang into a failure; one
    epoch, whose validation workers start beside the training loader's, as in the hang. (Three rounds of these
    took two minutes of the suite.)"""
    flags = ["--images-dir", str(labelled_folder / "images"), "--masks-dir", str(labelled_folder / "masks"),
             "--val-ratio", "0.2", "--epochs", "1", "--batch-size", "2", "--img-height", "32", "--img-width", "64",
             "--base-channels", "4", "--num-workers", "2", "--cpu", "--log-interval", "1", "--image-interval", "1"]
    torchrun("finetune_seg.py", *flags, "--checkpoint-dir", str(tmp_path / "ddp"), limit=180)
    run_limited([sys.executable, "finetune_seg.py", *flags, "--checkpoint-dir", str(tmp_path / "single")], limit=180)
    assert open_checkpoint(tmp_path / "ddp" / "last.pth").epoch == open_checkpoint(tmp_path / "single").epoch == 1
