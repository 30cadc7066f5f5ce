"""Window training and sliding-window prediction: the blend reproduces a whole-input forward pass where it
should, tiles cover every pixel, a --window run records its window and predicts in it (validation and
eval.py alike), checkpoints without a window predict as before, and bad windows are one-line errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import eval as eval_script
import finetune_seg
import tool
from checkpoints import Checkpoint, DataSpec, ModelSpec, Precision, TrainingState, open_checkpoint
from data import SegmentationDataset, build_eval_transform
from engine import autocast
from metrics import BCEDiceLoss, dice_per_image
from models import build_model
from predict import Predictor, blend_weights, load_predictor, network_logits, predict_probabilities, sliding_window, \
    window_starts
from utils import ToothSegError, read_image

REPO = Path(__file__).resolve().parents[1]
FORMAT1 = REPO / "tests" / "fixtures" / "format1_segmentation.pth"
NET = ["--img-height", "32", "--img-width", "64", "--batch-size", "4", "--num-workers", "0", "--cpu"]


# ----------------------------------------------------------------------------------------------
# The blend
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [(32, 64), (48, 96)])  # exactly the input, and larger (clamped to it)
def test_one_window_over_the_whole_input_is_the_forward_pass(window):
    torch.manual_seed(0)
    model, cpu = build_model("unet", base_channels=4, out_channels=1).eval(), torch.device("cpu")
    x = torch.randn(3, 1, 32, 64)
    with torch.inference_mode():
        torch.testing.assert_close(network_logits(model, x, window), model(x), rtol=1e-6, atol=1e-6)
    record = Checkpoint(kind="segmentation", model=ModelSpec("unet", model.config), precision=Precision("off"),
                        data=DataSpec(input_size=(32, 64), norm_mean=0.5, norm_std=0.25, window=window),
                        state=TrainingState(model.state_dict()))
    for tta in (False, True):
        torch.testing.assert_close(Predictor(model, record, cpu).probabilities(x, tta),
                                   predict_probabilities(model, x, tta, None, cpu), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, window, overlap", [((40, 72), (16, 32), 0.5), ((37, 101), (16, 48), 0.25),
                                                    ((64, 64), (32, 32), 0.75)])
def test_overlapping_windows_of_a_pointwise_model_equal_the_forward_pass(shape, window, overlap):
    """A per-pixel model sees nothing beyond its pixel, so every window agrees with the whole-input pass and
    the weighted blend of equal values must give that value back."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Tanh(), nn.Conv2d(3, 2, 1))
    x = torch.randn(2, 1, *shape)
    assert len(window_starts(shape[0], window[0], overlap)) * len(window_starts(shape[1], window[1], overlap)) > 2
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(model, x, window, overlap), model(x), rtol=1e-5, atol=1e-6)


def test_windows_cover_every_pixel_and_the_weights_never_sum_to_zero():
    for length in range(16, 120, 7):
        for window in range(16, length + 1, 16):
            for overlap in (0.1, 0.25, 0.5, 0.75, 0.9):
                starts = window_starts(length, window, overlap)
                covered = np.zeros(length, bool)
                for start in starts:
                    covered[start:start + window] = True
                assert covered.all() and starts[0] == 0 and starts[-1] == length - window
                assert starts == sorted(set(starts))
    for size in (16, 32, 320, 512):
        assert blend_weights(size, size, torch.device("cpu")).min() > 0
    # A forward pass of ones blends to ones everywhere: no pixel without a tile, no zero weight sum.
    calls = []
    ones = lambda tiles: calls.append(len(tiles)) or torch.ones(len(tiles), 1, *tiles.shape[-2:])
    blended = sliding_window(ones, torch.zeros(2, 1, 50, 90), (32, 32), 0.5)
    assert torch.isfinite(blended).all() and torch.allclose(blended, torch.ones_like(blended))
    # Tiles are batched: 2 images x (3 x 5) tiles, in passes of about the batch's pixel count (8 tiles of 32x32).
    assert calls == [8, 8, 8, 6]


# ----------------------------------------------------------------------------------------------
# A --window run, end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def windowed(phantom_data_root, tmp_path_factory):
    """UNet base 4 fine-tuned 1 epoch on 32x32 crops of a 32x64 input (the phantom images are 320x640)."""
    out = tmp_path_factory.mktemp("windowed")
    seen = {"train": [], "val": []}  # training inputs' sizes; validation's (input size, window, overlap)
    train_step = finetune_seg.SegmentationTask.train_step

    def recording_train_step(self, model, batch):
        seen["train"].append(tuple(batch[0].shape[-2:]))
        return train_step(self, model, batch)

    def recording_logits(model, batch, window=None, overlap=0.5):
        seen["val"].append((tuple(batch.shape[-2:]), window, overlap))
        return network_logits(model, batch, window, overlap)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_seg.SegmentationTask, "train_step", recording_train_step)
        patch.setattr(finetune_seg, "network_logits", recording_logits)
        finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(out), *NET,
                           "--base-channels", "4", "--epochs", "1", "--window", "32", "32", "--amp", "off"])
    return out, seen


def test_a_window_run_trains_on_crops_and_records_the_window(windowed, capsys):
    out, seen = windowed
    assert seen["train"] and set(seen["train"]) == {(32, 32)}
    ckpt = open_checkpoint(out / "best.pth")
    assert ckpt.data.input_size == (32, 64) and ckpt.data.window == (32, 32) and ckpt.data.window_overlap == 0.5
    assert torch.load(out / "best.pth", weights_only=True)["data"]["window"] == [32, 32]  # plain types on disk
    tool.main([str(out / "best.pth"), "--no-keys"])
    assert "trained on 32 x 32 crops, predicted in such windows overlapping 0.5" in capsys.readouterr().out


def test_validation_scores_the_sliding_window_prediction(windowed):
    """Training validates the whole input in the recorded windows, the prediction Predictor (and so eval.py)
    makes, and its val/loss and val/dice are that prediction's."""
    out, seen = windowed
    assert seen["val"] and set(seen["val"]) == {((32, 64), (32, 32), 0.5)}
    ckpt = open_checkpoint(out / "best.pth")
    p = load_predictor(out / "best.pth")
    val = SegmentationDataset(ckpt.data.labelled_splits()["val"],
                              build_eval_transform(32, 64, mask_resize=ckpt.task["mask_resize"]), fixed=True)
    assert len(val) <= 4  # one batch, as training's --batch-size 4 held it
    images, masks, _ = next(iter(DataLoader(val, batch_size=len(val))))
    with torch.inference_mode():
        logits = network_logits(p.model, images, (32, 32), 0.5)
        torch.testing.assert_close(p.probabilities(images), torch.sigmoid(logits), rtol=0, atol=0)
        loss = BCEDiceLoss(ckpt.task["lambda_dice"])(logits, masks).item()
    assert ckpt.metrics["val/loss"] == pytest.approx(loss, abs=1e-6)
    assert ckpt.metrics["val/dice"] == pytest.approx(dice_per_image(logits, masks).mean().item(), abs=1e-6)


def test_eval_of_a_window_run_scores_each_image_at_its_own_size(windowed, tmp_path):
    out = windowed[0]
    eval_script.main(["--checkpoint", str(out), "--out-dir", str(tmp_path / "eval"), "--save-preds",
                      str(tmp_path / "preds"), "--tta", "--cpu", "--workers", "0"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["window"] == [32, 32] and summary["window_overlap"] == 0.5 and summary["input_size"] == [32, 64]
    rows = list(csv.DictReader((tmp_path / "eval" / "per_image.csv").open()))
    assert len(rows) == summary["n_images"] > 0
    for row in rows:
        size = read_image(row["image"]).shape
        assert (int(row["height"]), int(row["width"])) == size == (320, 640)
        assert read_image(tmp_path / "preds" / f"{row['pair_id']}.png").shape == size


def test_checkpoints_without_a_window_predict_the_whole_input(windowed, tmp_path):
    """A format-2 file written before windows existed, and the format-1 fixture, read as no window and predict
    with one forward pass, as they always did."""
    out = windowed[0]
    raw = torch.load(out / "best.pth", weights_only=True)
    del raw["data"]["window"], raw["data"]["window_overlap"]
    torch.save(raw, tmp_path / "old.pth")
    for path in (tmp_path / "old.pth", FORMAT1):
        p = load_predictor(path)
        assert p.checkpoint.data.window is None and p.checkpoint.data.window_overlap == 0.5
        x = torch.randn(2, 1, *p.checkpoint.data.input_size)
        with torch.inference_mode(), autocast(p.device, p.amp_dtype):  # the prediction before windows existed
            whole = torch.sigmoid(p.model(x).float())
        torch.testing.assert_close(p.probabilities(x), whole, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Bad windows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window, expected", [
    (["40", "32"], "--window 40 32: both sides must be multiples of 16; try --window 32 32"),
    (["8", "32"], "--window 8 32: both sides must be multiples of 16; try --window 16 32"),
    (["32", "80"], "--window 32 80: larger than the input --img-height 32 --img-width 64"),
])
def test_a_bad_window_is_named_with_its_fix(window, expected):
    with pytest.raises(ToothSegError, match=expected):
        finetune_seg.parse_args([*NET, "--window", *window])


def test_a_bad_window_is_one_line_from_the_shell(tmp_path):
    result = subprocess.run([sys.executable, "finetune_seg.py", *NET, "--window", "48", "96", "--checkpoint-dir",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: --window 48 96: larger than the input")


def test_a_window_batchnorm_cannot_train_on_is_refused_before_the_first_step(phantom_data_root, tmp_path):
    """A 16x16 window at --batch-size 1 leaves the UNet's deepest layer one pixel: refused in one line, where it was
    a BatchNorm traceback at the first step."""
    with pytest.raises(ToothSegError, match=r"^--window 16 16 at --batch-size 1: unet's deepest layer would see one "
                                            r"pixel.*--batch-size 2$"):
        finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir",
                           str(tmp_path / "w16"), *NET, "--base-channels", "4", "--epochs", "1", "--window", "16", "16",
                           "--batch-size", "1", "--steps-per-epoch", "1", "--amp", "off"])
    # --semi stacks each batch with its unlabelled views in one forward pass: two images, which BatchNorm trains on
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(tmp_path / "semi"),
                       *NET, "--base-channels", "4", "--epochs", "1", "--window", "16", "16", "--batch-size", "1",
                       "--steps-per-epoch", "1", "--amp", "off", "--semi", "--label-fraction", "0.5"])
    assert open_checkpoint(tmp_path / "semi" / "last.pth").epoch == 1
