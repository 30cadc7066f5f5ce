"""MIM and full-image pretraining: learning, exact resume, clear failures, TensorBoard read-back."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoints import open_checkpoint
import fullimage_pretrain
import mim_pretrain
from phantom import generate_panoramic
from utils import ToothSegError, write_png

REPO = Path(__file__).resolve().parents[1]
TINY = ["--img-height", "64", "--img-width", "128", "--base-channels", "8", "--batch-size", "4",
        "--num-workers", "0", "--cpu", "--min-block-size", "8", "--max-block-size", "24"]


@pytest.fixture(scope="module")
def phantom_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantom_images")
    for seed in range(14):
        image, _ = generate_panoramic(seed, 96, 192)
        write_png(folder / f"ph{seed:03d}.png", image)
    return folder


def mim_args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["--images-dir", str(images), "--checkpoint-dir", str(out), *TINY, "--val-ratio", "0.15", *extra]


def test_mim_learns_and_beats_mean_fill(phantom_images, tmp_path, capsys):
    out = tmp_path / "mim"
    mim_pretrain.main(mim_args(phantom_images, out, "--epochs", "12", "--lr", "3e-3", "--log-interval", "2"))
    best = open_checkpoint(out / "best.pth")
    history = EventAccumulator(str(out / "tensorboard")).Reload()
    val_loss = [e.value for e in history.Scalars("val/loss")]
    model_l1, mean_fill_l1 = best.metrics["val/masked_l1"], best.metrics["val/mean_fill_l1"]
    with capsys.disabled():
        print(f"\nMIM on phantom: val loss {val_loss[0]:.4f} -> {min(val_loss):.4f}; masked-pixel L1 "
              f"{model_l1:.4f} vs mean fill {mean_fill_l1:.4f}")
    assert min(val_loss) < 0.8 * val_loss[0]
    assert model_l1 < mean_fill_l1
    assert best.kind == "mim" and (out / "last.pth").is_file()


def test_tensorboard_has_scalars_and_images(phantom_images, tmp_path):
    out = tmp_path / "fi"
    fullimage_pretrain.main(["--images-dir", str(phantom_images), "--checkpoint-dir", str(out), *TINY[:10],
                             "--epochs", "2", "--log-interval", "1", "--image-interval", "2"])
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/batch_loss", "train/epoch_loss", "val/loss", "val/identity_l1"} <= set(tags["scalars"])
    assert {"input", "target", "recon", "abs_error"} <= set(tags["images"])
    assert len(events.Scalars("val/loss")) == 2
    assert {"best.pth", "last.pth"} <= {p.name for p in out.iterdir()}


def test_resume_matches_uninterrupted_run(phantom_images, tmp_path, interrupted_run):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mim_pretrain.main(mim_args(phantom_images, straight, "--epochs", "2"))
    interrupted_run(mim_pretrain.main, mim_args(phantom_images, resumed, "--epochs", "2"))
    assert open_checkpoint(resumed / "last.pth").epoch == 1
    with pytest.raises(ToothSegError, match=r"this run's masking \(--mask-type.*\), --norm-pix-loss differ from"):
        mim_pretrain.main(mim_args(phantom_images, resumed, "--epochs", "2", "--mask-ratio", "0.3", "--norm-pix-loss", "8",
                                   "--resume", str(resumed / "last.pth")))  # it resumed, learning another loss
    mim_pretrain.main(mim_args(phantom_images, resumed, "--epochs", "2", "--resume", str(resumed / "last.pth")))

    a, b = open_checkpoint(straight / "last.pth"), open_checkpoint(resumed / "last.pth")
    assert a.epoch == b.epoch == 2 and a.state.global_step == b.state.global_step
    mismatched = [k for k in a.state.weights if not torch.equal(a.state.weights[k], b.state.weights[k])]
    assert not mismatched, f"weights differ after resume: {mismatched[:5]}"
    assert a.metrics["val/loss"] == b.metrics["val/loss"]


@pytest.mark.parametrize("script, flags, expected", [
    (mim_pretrain, ["--patch-size", "0"], "--patch-size: must be at least 1, got 0"),  # a ZeroDivisionError mid-run
    (mim_pretrain, ["--norm-pix-loss", "0"], "--norm-pix-loss: must be at least 1, got 0"),
    (fullimage_pretrain, ["--flip-prob", "1.5"], "--flip-prob: must be between 0 and 1, got 1.5"),  # trained, recorded
    (fullimage_pretrain, ["--paint-prob", "nan"], "--paint-prob: must be between 0 and 1, got nan"),
])
def test_settings_out_of_range_are_refused_with_the_flags(tmp_path, capsys, script, flags, expected):
    with pytest.raises(SystemExit) as stopped:
        script.parse_args(["--images-dir", str(tmp_path), *flags])
    assert stopped.value.code == 2 and expected in capsys.readouterr().err


def test_fullimage_continues_from_mim_and_reports_transfer(phantom_images, tmp_path, capsys):
    mim_pretrain.main(mim_args(phantom_images, tmp_path / "mim", "--epochs", "1"))
    fullimage_pretrain.main(["--images-dir", str(phantom_images), "--checkpoint-dir", str(tmp_path / "fi"), *TINY[:10],
                             "--epochs", "1", "--init-from", str(tmp_path / "mim" / "best.pth")])
    assert "matched 92, missing 0, mismatched 0" in capsys.readouterr().out


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_wrong_checkpoint_kind_and_mismatched_weights_fail_in_one_line(phantom_images, tmp_path):
    mim_pretrain.main(mim_args(phantom_images, tmp_path / "mim", "--epochs", "1"))
    mim_ckpt = tmp_path / "mim" / "best.pth"

    wrong_kind = run_script("fullimage_pretrain.py", "--images-dir", str(phantom_images), "--checkpoint-dir",
                            str(tmp_path / "fi"), *TINY[:10], "--epochs", "1", "--resume", str(mim_ckpt))
    mismatched = run_script("fullimage_pretrain.py", "--images-dir", str(phantom_images), "--checkpoint-dir",
                            str(tmp_path / "fi2"), *TINY[:10], "--base-channels", "16", "--epochs", "1",
                            "--init-from", str(mim_ckpt))
    for result, expected in ((wrong_kind, "is a 'mim' checkpoint, but --resume needs a 'fullimage' checkpoint"),
                             (mismatched, "match by name and shape")):
        assert result.returncode == 2, result.stderr
        error_lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and expected in error_lines[0], result.stderr
        assert str(mim_ckpt) in error_lines[0]
    assert not (tmp_path / "fi2" / "last.pth").exists()


def test_checkpoints_are_self_describing_and_safe(phantom_images, tmp_path):
    mim_pretrain.main(mim_args(phantom_images, tmp_path / "mim", "--epochs", "1", "--model-type", "nac"))
    ckpt = open_checkpoint(tmp_path / "mim")  # a run folder opens its best.pth
    assert ckpt.model.name == "nac" and type(ckpt.build_model()).__name__ == "UNet2D_NAC"
    assert ckpt.task["masking"]["ratio"] == 0.55 and ckpt.data.input_size == (64, 128)
    assert ckpt.data.holdout == 0.15 and ckpt.data.images_dir == str(phantom_images)
    # Every section loads with weights_only=True: plain types and tensors only.
    raw = torch.load(tmp_path / "mim" / "best.pth", weights_only=True)
    assert raw["format"] == 2 and {"kind", "model", "data", "precision", "task", "metrics", "epoch", "state",
                                   "run_args"} <= set(raw)
    with pytest.raises(ToothSegError, match="is a 'mim' checkpoint"):
        open_checkpoint(tmp_path / "mim" / "best.pth", ("segmentation",), "eval.py")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ToothSegError, match="garbage.pth: cannot load"):
        open_checkpoint(tmp_path / "garbage.pth")
    # Nothing else is left beside the checkpoints: writes went through temp files and renames.
    assert sorted(p.name for p in (tmp_path / "mim").iterdir()) == ["best.pth", "last.pth", "tensorboard"]


@pytest.mark.parametrize("norm_pix", [None, 8])
def test_mim_validation_loss_does_not_depend_on_the_batching(norm_pix):
    """Two images hiding different areas: validating them as one batch gives the sums of validating each alone
    (a mean over the batch's hidden pixels weighed the image that hid more)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 16, 32, generator=generator)
    mask = torch.zeros(2, 1, 16, 32)
    mask[0, :, :4, :4] = 1
    mask[1, :, :, 8:] = 1
    masked = target * (1 - mask)
    task, model = mim_pretrain.MIMTask(norm_pix), lambda x: 0.5 * x + 0.25
    together = task.val_step(model, (masked, target, mask, None))
    alone = [task.val_step(model, (masked[i:i + 1], target[i:i + 1], mask[i:i + 1], None)) for i in range(2)]
    for key in ("loss", "masked_l1", "mean_fill_l1", "count"):
        assert together[key].item() == pytest.approx(sum(a[key].item() for a in alone), rel=1e-6), key
