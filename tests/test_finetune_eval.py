"""finetune_seg.py and eval.py on a phantom folder pair (images 96x192, network 64x128)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
import eval as eval_script
import finetune_seg
import mim_pretrain
from data import Sample, subset_fraction
from phantom import generate_panoramic
from utils import read_image, write_png

SIZE = (96, 192)
NET = ["--img-height", "64", "--img-width", "128", "--batch-size", "4", "--num-workers", "0", "--cpu"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for seed in range(20):
        image, mask = generate_panoramic(100 + seed, *SIZE)
        write_png(root / "images" / f"case{seed:02d}.png", image)
        write_png(root / "masks" / f"case{seed:02d}.png", mask)
    return root


@pytest.fixture(scope="module")
def finetuned(labelled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetuned")
    finetune_seg.main(["--images-dir", str(labelled / "images"), "--masks-dir", str(labelled / "masks"),
                       "--save-dir", str(out), *NET, "--base-channels", "8", "--epochs", "10", "--lr", "3e-3",
                       "--val-ratio", "0.15", "--test-ratio", "0.25"])
    return out


def data_flags(labelled: Path) -> list[str]:
    return ["--images-dir", str(labelled / "images"), "--masks-dir", str(labelled / "masks")]


def test_eval_scores_each_image_at_its_own_resolution(finetuned, labelled, tmp_path):
    out, preds = tmp_path / "eval", tmp_path / "preds"
    eval_script.main(["--checkpoint", str(finetuned / "best_model.pth"), "--out-dir", str(out),
                      "--save-preds", str(preds), "--top-k", "2", "--cpu", "--workers", "0"])
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == summary["n_images"] == 5  # 25% of 20, split by file name with the checkpoint's seed
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert summary["split"] == "test" and summary["model"] == "unet"
    for row in rows:
        pred = read_image(preds / f"{row['pair_id']}.png")
        gt = read_image(labelled / "masks" / f"{row['pair_id']}.png")
        assert pred.shape == SIZE and (int(row["height"]), int(row["width"])) == SIZE
        assert set(np.unique(pred)) <= {0, 255}
        inter = np.logical_and(pred > 0, gt > 0).sum()
        dice = 2 * inter / ((pred > 0).sum() + (gt > 0).sum()) if (pred > 0).any() or (gt > 0).any() else 1.0
        assert float(row["dice"]) == pytest.approx(dice)
    overlays = sorted((out / "best").glob("*.png")) + sorted((out / "worst").glob("*.png"))
    assert len(overlays) == 4 and all(read_image(p, grayscale=False).shape == (*SIZE, 3) for p in overlays)


def test_predict_mode_writes_masks_for_unlabelled_images(finetuned, labelled, tmp_path):
    new_images = tmp_path / "new"
    for i, size in enumerate([(80, 150), (120, 240)]):
        write_png(new_images / f"xray{i}.png", generate_panoramic(500 + i, *size)[0])
    eval_script.main(["--checkpoint", str(finetuned / "best_model.pth"), "--images-dir", str(new_images),
                      "--save-preds", str(tmp_path / "masks"), "--tta", "--cpu", "--workers", "0"])
    written = {p.name: read_image(p).shape for p in (tmp_path / "masks").glob("*.png")}
    assert written == {"xray0.png": (80, 150), "xray1.png": (120, 240)}


def test_finetune_learns_above_chance(finetuned):
    ckpt = torch.load(finetuned / "best_model.pth", weights_only=True)
    assert ckpt["kind"] == "segmentation" and ckpt["best"]["metric"] == "val/dice"
    # Teeth cover ~20% of the image, so all-foreground scores ~0.33 and all-background 0.
    assert ckpt["metrics"]["val/dice"] > 0.45


def test_init_from_mim_takes_the_checkpoint_architecture(labelled, tmp_path, capsys):
    mim_pretrain.main(["--images-dir", str(labelled / "images"), "--checkpoint-dir", str(tmp_path / "mim"), *NET,
                       "--model-type", "scag", "--base-channels", "4", "--epochs", "1"])
    finetune_seg.main([*data_flags(labelled), "--save-dir", str(tmp_path / "ft"), *NET, "--epochs", "1",
                       "--init-from", str(tmp_path / "mim" / "mim_best.pth")])
    ckpt = torch.load(tmp_path / "ft" / "last.pth", weights_only=True)
    assert ckpt["model_name"] == "scag" and ckpt["model_args"]["base_channels"] == 4
    assert "mismatched 0" in capsys.readouterr().out


def test_frozen_encoder_keeps_pretrained_weights(labelled, tmp_path):
    mim_pretrain.main(["--images-dir", str(labelled / "images"), "--checkpoint-dir", str(tmp_path / "mim"), *NET,
                       "--base-channels", "4", "--epochs", "1"])
    finetune_seg.main([*data_flags(labelled), "--save-dir", str(tmp_path / "ft"), *NET, "--epochs", "1",
                       "--init-from", str(tmp_path / "mim" / "mim_best.pth"), "--freeze-encoder-epochs", "1"])
    before = torch.load(tmp_path / "mim" / "mim_best.pth", weights_only=True)["model"]
    after = torch.load(tmp_path / "ft" / "last.pth", weights_only=True)["model"]
    weights = [k for k in after if k.endswith(".weight")]
    encoder = [k for k in weights if k.startswith(("encoder.", "bottleneck."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in weights if k.startswith("decoder."))


def test_patience_stops_a_stalled_run(labelled, tmp_path):
    finetune_seg.main([*data_flags(labelled), "--save-dir", str(tmp_path / "ft"), *NET, "--base-channels", "4",
                       "--epochs", "6", "--lr", "0", "--patience", "2"])
    assert torch.load(tmp_path / "ft" / "last.pth", weights_only=True)["epoch"] == 3


def test_label_fractions_are_deterministic_and_nested():
    samples = [Sample(Path(f"{i}.png"), Path(f"m{i}.png"), f"case{i}") for i in range(50)]
    small, large = subset_fraction(samples, 0.1, seed=3), subset_fraction(samples, 0.3, seed=3)
    assert len(small) == 5 and len(large) == 15
    assert {s.pair_id for s in small} <= {s.pair_id for s in large}
    assert small == subset_fraction(samples, 0.1, seed=3) and small != subset_fraction(samples, 0.1, seed=4)


@pytest.mark.parametrize("trained_amp", ["off", "bf16"])
def test_eval_runs_at_the_precision_the_model_was_trained_in(finetuned, tmp_path, monkeypatch, trained_amp):
    ckpt = torch.load(finetuned / "best_model.pth", weights_only=True)
    ckpt["args"]["amp"] = trained_amp
    torch.save(ckpt, tmp_path / "model.pth")
    requested = []
    monkeypatch.setattr(engine, "resolve_amp", lambda amp, device: requested.append(amp) or None)
    eval_script.main(["--checkpoint", str(tmp_path / "model.pth"), "--out-dir", str(tmp_path / "eval"), "--cpu",
                      "--workers", "0"])
    assert requested == [trained_amp]
