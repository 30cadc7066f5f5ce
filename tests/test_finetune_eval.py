"""finetune_seg.py and eval.py on a phantom folder pair (images 96x192, network 64x128)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import engine
import eval as eval_script
import finetune_seg
import mim_pretrain
from checkpoints import open_checkpoint
from index import Sample, segmentation_splits, subset_fraction
from models import build_model
from phantom import generate_panoramic
from predict import load_predictor, remove_small_components
from utils import ToothSegError, read_image, write_png

REPO = Path(__file__).resolve().parents[1]
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
                       "--checkpoint-dir", str(out), *NET, "--base-channels", "8", "--epochs", "10", "--lr", "3e-3",
                       "--val-ratio", "0.15", "--test-ratio", "0.25"])
    return out


def data_flags(labelled: Path) -> list[str]:
    return ["--images-dir", str(labelled / "images"), "--masks-dir", str(labelled / "masks")]


def test_eval_scores_each_image_at_its_own_resolution(finetuned, labelled, tmp_path):
    out, preds = tmp_path / "eval", tmp_path / "preds"
    eval_script.main(["--checkpoint", str(finetuned / "best.pth"), "--out-dir", str(out),
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


def test_predict_mode_writes_masks_for_unlabelled_images(finetuned, labelled, tmp_path, write_dicom):
    new_images = tmp_path / "new"
    for i, size in enumerate([(80, 150), (120, 240)]):
        write_png(new_images / f"xray{i}.png", generate_panoramic(500 + i, *size)[0])
    write_dicom(new_images / "xray2.dcm", generate_panoramic(502, 90, 180)[0].astype(np.uint16) * 16, BitsStored=12,
                HighBit=11)  # as a 12-bit X-ray unit exports it
    eval_script.main(["--checkpoint", str(finetuned / "best.pth"), "--images-dir", str(new_images),
                      "--save-preds", str(tmp_path / "masks"), "--tta", "--cpu", "--workers", "0"])
    written = {p.name: read_image(p).shape for p in (tmp_path / "masks").glob("*.png")}
    assert written == {"xray0.png": (80, 150), "xray1.png": (120, 240), "xray2.png": (90, 180)}
    record = json.loads((tmp_path / "masks" / "summary.json").read_text())  # what made the masks, beside them
    assert record["n_images"] == 3 and record["split"] == "predict" and record["tta"] is True
    assert record["preds_dir"] == str(tmp_path / "masks") and record["ensemble"] == [str(finetuned / "best.pth")]
    # The DICOM's mask is the one its 8-bit rendering gets: the same X-ray as a PNG.
    write_png(tmp_path / "as_png" / "xray2.png", read_image(new_images / "xray2.dcm"))
    eval_script.main(["--checkpoint", str(finetuned / "best.pth"), "--images-dir", str(tmp_path / "as_png"),
                      "--save-preds", str(tmp_path / "png_masks"), "--tta", "--cpu", "--workers", "0"])
    dicom_mask = read_image(tmp_path / "masks" / "xray2.png")
    assert dicom_mask.any() and np.array_equal(dicom_mask, read_image(tmp_path / "png_masks" / "xray2.png"))


def test_finetune_learns_above_chance(finetuned):
    ckpt = open_checkpoint(finetuned / "best.pth")
    assert ckpt.kind == "segmentation" and ckpt.state.best["metric"] == "val/dice"
    # Teeth cover ~20% of the image, so all-foreground scores ~0.33 and all-background 0.
    assert ckpt.metrics["val/dice"] > 0.45
    assert ckpt.data.mask_threshold == 0 and ckpt.data.masks_dir.endswith("masks")  # PNG masks: tooth > 0


def test_init_from_mim_takes_the_checkpoint_architecture(labelled, tmp_path, capsys):
    mim_pretrain.main(["--images-dir", str(labelled / "images"), "--checkpoint-dir", str(tmp_path / "mim"), *NET,
                       "--model-type", "scag", "--base-channels", "4", "--epochs", "1"])
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "ft"), *NET, "--epochs", "1",
                       "--init-from", str(tmp_path / "mim" / "best.pth")])
    ckpt = open_checkpoint(tmp_path / "ft" / "last.pth")
    assert ckpt.model.name == "scag" and ckpt.model.args["base_channels"] == 4
    assert "mismatched 0" in capsys.readouterr().out


def test_frozen_encoder_keeps_pretrained_weights(labelled, tmp_path):
    mim_pretrain.main(["--images-dir", str(labelled / "images"), "--checkpoint-dir", str(tmp_path / "mim"), *NET,
                       "--base-channels", "4", "--epochs", "1"])
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "ft"), *NET, "--epochs", "1",
                       "--init-from", str(tmp_path / "mim" / "best.pth"), "--freeze-encoder-epochs", "1"])
    before = open_checkpoint(tmp_path / "mim" / "best.pth").state.weights
    after = open_checkpoint(tmp_path / "ft" / "last.pth").state.weights
    weights = [k for k in after if k.endswith(".weight")]
    encoder = [k for k in after if k.startswith(("encoder.", "bottleneck.")) and not k.endswith("num_batches_tracked")]
    # (the BatchNorm statistics too: they moved; --init-from leaves the step counters behind)
    assert any(k.endswith("running_var") for k in encoder) and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in weights if k.startswith("decoder."))


def test_patience_stops_a_stalled_run(labelled, tmp_path):
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "ft"), *NET, "--base-channels", "4",
                       "--epochs", "6", "--lr", "0", "--patience", "2"])
    assert open_checkpoint(tmp_path / "ft" / "last.pth").epoch == 3


def test_select_by_pooled_dice_keeps_the_epoch_with_the_best_pooled_dice(labelled, tmp_path, monkeypatch):
    """Scripted validation figures that rank the epochs differently: mean Dice would keep epoch 3, pooled epoch 2."""
    scripted, summarise = iter([(0.9, 0.1), (0.1, 0.9), (0.95, 0.2), (0.2, 0.3)]), finetune_seg.SegmentationTask.summarise

    def scripted_summarise(means):
        figures = summarise(means)
        assert 0 <= figures["dice_pooled"] <= 1  # the real figure is there to replace
        figures["dice"], figures["dice_pooled"] = next(scripted)
        return figures

    monkeypatch.setattr(finetune_seg.SegmentationTask, "summarise", staticmethod(scripted_summarise))
    out = tmp_path / "ft"
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(out), *NET, "--base-channels", "4",
                       "--epochs", "4", "--select-by", "dice_pooled"])
    best, last = open_checkpoint(out / "best.pth"), open_checkpoint(out / "last.pth")
    assert best.epoch == 2 and best.metrics["val/dice_pooled"] == 0.9
    pooled = [e.value for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("val/dice_pooled")]
    assert pooled == pytest.approx([0.1, 0.9, 0.2, 0.3])  # logged beside the mean Dice
    with pytest.raises(ToothSegError, match="by val/dice_pooled, not val/dice"):  # resumed with the default
        finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(out), *NET, "--base-channels", "4",
                           "--epochs", "4", "--resume", str(out / "last.pth")])
    assert last.epoch == 4


def test_masks_resize_by_area_unless_a_resumed_run_started_otherwise(finetuned, labelled, tmp_path, interrupted_run):
    assert open_checkpoint(finetuned / "last.pth").task["mask_resize"] == "area"  # the binary task's default
    flags = [*data_flags(labelled), "--checkpoint-dir", str(tmp_path), *NET, "--base-channels", "4", "--epochs", "2"]
    interrupted_run(finetune_seg.main, [*flags, "--mask-resize", "nearest"])
    resume = ["--resume", str(tmp_path / "last.pth")]
    with pytest.raises(ToothSegError, match="trained with --mask-resize nearest; resume it with that"):
        finetune_seg.main([*flags, *resume, "--mask-resize", "area"])
    finetune_seg.main([*flags, *resume])  # without the flag it keeps nearest, not the default
    resumed = open_checkpoint(tmp_path / "last.pth")
    assert resumed.epoch == 2 and resumed.task["mask_resize"] == "nearest"


def test_a_run_interrupted_mid_epoch_resumes_elsewhere_with_its_best_and_one_curve(labelled, tmp_path, monkeypatch):
    """Resumed into another folder the run had no best.pth there (eval and --init-from of it failed); and the
    steps logged after the last checkpoint were logged again, so the curve doubled back."""
    flags = [*data_flags(labelled), *NET, "--base-channels", "4", "--epochs", "2", "--steps-per-epoch", "4",
             "--log-interval", "1"]
    train_step, calls = finetune_seg.SegmentationTask.train_step, []

    def stop_in_the_second_epoch(self, model, batch):
        calls.append(1)
        if len(calls) == 7:  # steps 5 and 6 of epoch 2 are logged, not saved
            raise KeyboardInterrupt
        return train_step(self, model, batch)

    monkeypatch.setattr(finetune_seg.SegmentationTask, "train_step", stop_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune_seg.main([*flags, "--checkpoint-dir", str(tmp_path / "a")])
    monkeypatch.setattr(finetune_seg.SegmentationTask, "train_step", train_step)
    finetune_seg.main([*flags, "--resume", str(tmp_path / "a")])
    steps = [e.step for e in EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload().Scalars("train/batch_loss")]
    assert steps == list(range(1, 9))

    # Resumed elsewhere (here with no epoch left, so no epoch of its own can write one) the folder gets the best.pth.
    finetune_seg.main([*flags, "--resume", str(tmp_path / "a"), "--checkpoint-dir", str(tmp_path / "b")])
    assert (tmp_path / "b" / "best.pth").read_bytes() == (tmp_path / "a" / "best.pth").read_bytes()
    # and the run's curves: its TensorBoard files are copied too, once (a second resume there adds no copies)
    finetune_seg.main([*flags, "--resume", str(tmp_path / "a"), "--checkpoint-dir", str(tmp_path / "b")])
    history = EventAccumulator(str(tmp_path / "b" / "tensorboard")).Reload()
    assert [e.step for e in history.Scalars("train/batch_loss")] == list(range(1, 9))
    assert [e.step for e in history.Scalars("val/dice")] == [1, 2]


def test_resume_refuses_another_model_or_other_data_in_one_line(labelled, tmp_path, interrupted_run, monkeypatch):
    run = tmp_path / "run"
    flags = ["--checkpoint-dir", str(run), *NET, "--base-channels", "4", "--epochs", "2"]
    interrupted_run(finetune_seg.main, [*data_flags(labelled), *flags])
    resume = ["--resume", str(run)]
    with pytest.raises(ToothSegError, match=r"holds a unet .*'base_channels': 4.*, not the unet .*'base_channels': 8"):
        finetune_seg.main([*data_flags(labelled), *flags, *resume, "--base-channels", "8"])  # once a size-mismatch traceback
    other = tmp_path / "other"
    shutil.copytree(labelled, other)
    with pytest.raises(ToothSegError, match="this run's images_dir, masks_dir differ from the checkpoint's"):
        finetune_seg.main([*data_flags(other), *flags, *resume])
    with pytest.raises(ToothSegError, match="this run's seed differs from"):
        finetune_seg.main([*data_flags(labelled), *flags, *resume, "--seed", "1"])
    with pytest.raises(ToothSegError, match="this run's --epochs differs from"):  # the cosine schedule would bend
        finetune_seg.main([*data_flags(labelled), *flags[:-1], "3", *resume])
    with pytest.raises(ToothSegError, match="this run's --lr differs from"):  # the optimiser state would ignore it
        finetune_seg.main([*data_flags(labelled), *flags, *resume, "--lr", "0.5"])
    with pytest.raises(ToothSegError, match=r"this run's labelled training images \(--label-fraction"):
        finetune_seg.main([*data_flags(labelled), *flags, *resume, "--label-fraction", "0.5"])
    (tmp_path / "same").symlink_to(labelled)  # the same data by another path is the same
    monkeypatch.chdir(tmp_path)  # without --checkpoint-dir the run goes on in its own folder, not ./checkpoints/
    finetune_seg.main([*data_flags(tmp_path / "same"), *flags[2:], *resume])
    assert open_checkpoint(run / "last.pth").epoch == 2 and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--patience", "0"], "--patience: must be at least 1, got 0"),  # it trained nothing and exited 0
    (["--train-subset-size", "-1"], "--train-subset-size: must be at least 1, got -1"),  # it dropped one pair
    (["--test-ratio", "-0.2"], "--test-ratio: must be at least 0 and below 1, got -0.2"),
    (["--lr", "nan"], "--lr: must be at least 0, got nan"),  # an AdamW traceback
    (["--lambda-dice", "-5"], "--lambda-dice: must be at least 0, got -5.0"),
    (["--pseudo-keep", "0"], "--pseudo-keep: must be above 0 and at most 1, got 0.0"),  # found only after the teacher's files were read
    (["--val-ratio", "0.95"], "--val-ratio and --test-ratio leave no training images (they sum to 1.05)"),
])
def test_numbers_out_of_range_are_refused_before_any_work(labelled, tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_info:
        finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path), *NET, *flags])
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and expected in stderr and len(stderr.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_masks_given_mean_bare_folders_even_beside_an_index(labelled, tmp_path):
    shutil.copytree(labelled, tmp_path / "data")
    (tmp_path / "data" / "sts2d_index.csv").write_text("rel_path,split\n")  # a stray index beside images/
    splits = segmentation_splits(tmp_path / "data/images", tmp_path / "data/masks")
    assert sum(len(part) for part in splits.values()) == 20  # the pairs given, not the index's (none)


def test_a_teachers_pool_is_the_same_with_its_training_folder_named(labelled, tmp_path):
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "teacher"), *NET, "--base-channels", "2",
                       "--epochs", "1", "--label-fraction", "0.5"])
    pools = []
    for named in ([], data_flags(labelled)):  # named, it once found no pool: the label fraction was forgotten
        eval_script.main(["--checkpoint", str(tmp_path / "teacher"), *named, "--split", "unlabelled", "--save-probs",
                          str(tmp_path / f"probs{len(pools)}"), "--cpu", "--workers", "0"])
        pools.append(sorted(p.name for p in (tmp_path / f"probs{len(pools)}").glob("*.png")))
    assert pools[0] == pools[1] != []


def test_label_fractions_are_deterministic_and_nested():
    samples = [Sample(Path(f"{i}.png"), Path(f"m{i}.png"), f"case{i}") for i in range(50)]
    small, large = subset_fraction(samples, 0.1, seed=3), subset_fraction(samples, 0.3, seed=3)
    assert len(small) == 5 and len(large) == 15
    assert {s.pair_id for s in small} <= {s.pair_id for s in large}
    assert small == subset_fraction(samples, 0.1, seed=3) and small != subset_fraction(samples, 0.1, seed=4)
    # --train-subset-size caps along the same random ranking: capped sets nest, and are not the first names
    capped_small, capped_large = subset_fraction(samples, 0.3, seed=3, limit=3), subset_fraction(samples, 1, seed=3, limit=6)
    assert len(capped_small) == 3 and {s.pair_id for s in capped_small} <= {s.pair_id for s in small}
    assert {s.pair_id for s in capped_small} <= {s.pair_id for s in capped_large}
    assert capped_large != sorted(samples, key=lambda s: s.pair_id)[:6]


def test_label_seed_keeps_the_labels_while_seed_changes_the_run(labelled, tmp_path):
    """Teachers to fuse: the same labelled pairs, another initialisation."""
    def run(name: str, *flags: str) -> tuple[list[str], torch.Tensor]:
        finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / name), *NET, "--base-channels", "4",
                           "--epochs", "1", "--steps-per-epoch", "1", "--label-fraction", "0.3", *flags])
        ckpt = open_checkpoint(tmp_path / name / "last.pth")
        return ckpt.task["labelled_pairs"], next(iter(ckpt.state.weights.values()))

    pairs0, weights0 = run("seed0", "--seed", "0")
    pairs1, weights1 = run("seed1", "--seed", "1", "--label-seed", "0")
    pairs_drawn_by_1, _ = run("seed1_default", "--seed", "1")
    assert pairs1 == pairs0 and not torch.equal(weights1, weights0)
    assert pairs_drawn_by_1 != pairs0


@pytest.mark.parametrize("task", [finetune_seg.SegmentationTask(0.2), finetune_seg.TeethTask([0, 11, 21], 1.0)])
def test_deep_supervision_trains_the_auxiliary_heads_through_the_loss(task):
    teeth = isinstance(task, finetune_seg.TeethTask)
    model = build_model("unet", base_channels=4, out_channels=3 if teeth else 1, deep_supervision=True).train()
    torch.manual_seed(0)
    image = torch.randn(2, 1, 32, 48)
    target = torch.randint(0, 3, (2, 32, 48)) if teeth else (torch.rand(2, 1, 32, 48) > 0.5).float()
    loss, logits = task.train_step(model, (image, target, {"weight": torch.ones(2)}))
    loss.backward()
    assert logits.shape[-2:] == image.shape[-2:]
    assert all(head.conv.weight.grad is not None and head.conv.weight.grad.abs().sum() > 0 for head in model.aux_heads)


def test_a_deeply_supervised_checkpoint_predicts_and_initialises_either_kind(labelled, tmp_path, capsys):
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "ds"), *NET, "--base-channels", "4",
                       "--epochs", "1", "--steps-per-epoch", "2", "--deep-supervision"])
    assert open_checkpoint(tmp_path / "ds" / "best.pth").model.args["deep_supervision"] is True
    eval_script.main(["--checkpoint", str(tmp_path / "ds" / "best.pth"), "--out-dir", str(tmp_path / "eval"), "--cpu",
                      "--workers", "0"])
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n_images"] > 0
    # kept into another own U-Net too (scag takes the argument; it was dropped there)
    for flag, kept in (([], True), (["--model-type", "scag"], True), (["--no-deep-supervision"], False)):
        out = tmp_path / f"from_ds_{len(flag)}"
        finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(out), *NET, "--epochs", "1", "--steps-per-epoch",
                           "1", "--init-from", str(tmp_path / "ds" / "best.pth"), *flag])
        weights = open_checkpoint(out / "last.pth").state.weights
        assert any(k.startswith("aux_heads.") for k in weights) is kept


@pytest.mark.parametrize("trained, expected", [("float32", None), ("bfloat16", torch.bfloat16)])
def test_eval_runs_in_the_dtype_the_model_was_trained_in(finetuned, tmp_path, monkeypatch, trained, expected):
    """On a CPU where --amp auto would pick bf16, a model trained in fp32 is still scored in fp32."""
    import predict

    ckpt = torch.load(finetuned / "best.pth", weights_only=True)
    ckpt["precision"] = {"amp": "auto", "dtype": trained}
    torch.save(ckpt, tmp_path / "model.pth")
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    used, original = [], predict.autocast
    monkeypatch.setattr(predict, "autocast", lambda device, dtype: used.append(dtype) or original(device, dtype))
    eval_script.main(["--checkpoint", str(tmp_path / "model.pth"), "--out-dir", str(tmp_path / "eval"), "--cpu",
                      "--workers", "0"])
    assert used and set(used) == {expected}


# ----------------------------------------------------------------------------------------------
# What eval scores, and bad input told in one line
# ----------------------------------------------------------------------------------------------
def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "error: " in lines[0] and "Traceback" not in result.stderr
    return lines[0]


def test_a_labelled_folder_without_an_index_is_scored_whole(finetuned, labelled, tmp_path, capsys):
    clinic = tmp_path / "clinic"  # a new clinic's labelled test set: another folder, no index
    shutil.copytree(labelled, clinic)
    eval_script.main(["--checkpoint", str(finetuned), "--images-dir", str(clinic / "images"), "--masks-dir",
                      str(clinic / "masks"), "--out-dir", str(tmp_path / "all"), "--cpu", "--workers", "0"])
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["split"] == "all" and summary["n_images"] == summary["n_found"] == 20
    assert "evaluating 20 of the 20 labelled images found" in capsys.readouterr().out
    # Naming a split gives that part of the file-name split, with the training run's ratios and seed: the
    # same 5 test images the training folder's test split holds.
    eval_script.main(["--checkpoint", str(finetuned), "--images-dir", str(clinic / "images"), "--masks-dir",
                      str(clinic / "masks"), "--split", "test", "--out-dir", str(tmp_path / "test"), "--cpu", "--workers", "0"])
    assert "evaluating 5 of the 20 labelled images found" in capsys.readouterr().out
    eval_script.main(["--checkpoint", str(finetuned), "--out-dir", str(tmp_path / "own"), "--cpu", "--workers", "0"])
    own = {r["pair_id"] for r in csv.DictReader((tmp_path / "own" / "per_image.csv").open())}
    assert own == {r["pair_id"] for r in csv.DictReader((tmp_path / "test" / "per_image.csv").open())}


def test_split_seed_is_apart_from_the_seed(labelled, tmp_path):
    """Without an index, fine-tunes with different --seed share one test set (the file-name split's seed)."""
    tests = []
    for seed in (0, 1):
        finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / f"s{seed}"), *NET, "--base-channels",
                           "2", "--epochs", "1", "--seed", str(seed), "--test-ratio", "0.25"])
        tests.append({s.pair_id for s in open_checkpoint(tmp_path / f"s{seed}").data.labelled_splits()["test"]})
    assert tests[0] == tests[1] and len(tests[0]) == 5
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "other"), *NET, "--base-channels",
                       "2", "--epochs", "1", "--split-seed", "3", "--test-ratio", "0.25"])
    assert {s.pair_id for s in open_checkpoint(tmp_path / "other").data.labelled_splits()["test"]} != tests[0]


@pytest.mark.parametrize("where, flag", [("new", "--save-preds"), ("new/masks_out", "--save-preds"),
                                         ("labelled/masks", "--save-preds"), ("new", "--save-probs")])
def test_predictions_are_never_written_among_the_inputs(finetuned, labelled, tmp_path, cli_error, where, flag):
    folder = tmp_path / "new"
    write_png(folder / "case00.png", generate_panoramic(700, 80, 160)[0])  # the name of a labelled image too
    shutil.copytree(labelled, tmp_path / "labelled")
    inputs = ["--images-dir", str(tmp_path / "labelled/images"), "--masks-dir", str(tmp_path / "labelled/masks")] \
        if where.startswith("labelled") else ["--images-dir", str(folder)]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    line = cli_error(eval_script.main, ["--checkpoint", str(finetuned), *inputs, flag, str(tmp_path / where), "--cpu",
                                        "--workers", "0", "--out-dir", str(tmp_path / "out")])
    assert f"{tmp_path / where}: {flag} lies among the images (or masks) this run reads" in line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png")} == before  # nothing overwritten or added


@pytest.mark.parametrize("flag", ["--save-preds", "--save-probs"])
def test_predictions_never_overwrite_images_eval_did_not_write(finetuned, labelled, tmp_path, cli_error, flag):
    """A folder of other images (the ground truth of another set, named as these X-rays are) is refused; a folder
    eval.py wrote is written again, and says which checkpoint wrote it."""
    other = tmp_path / "their_masks"
    shutil.copytree(labelled / "masks", other)
    before = {p: p.read_bytes() for p in other.iterdir()}
    argv = ["--checkpoint", str(finetuned), "--images-dir", str(labelled / "images"), "--masks-dir",
            str(labelled / "masks"), "--split", "all", "--cpu", "--workers", "0", "--out-dir", str(tmp_path / "out")]
    line = cli_error(eval_script.main, [*argv, flag, str(other)])
    assert f"{other}: {flag} holds {len(before)} images that eval.py did not write (first: case00.png)" in line
    assert {p: p.read_bytes() for p in other.iterdir()} == before
    for _ in range(2):  # a rerun into its own folder
        eval_script.main([*argv, flag, str(tmp_path / "mine")])
    record = json.loads((tmp_path / "mine" / "predictions.json").read_text())
    assert record["written_by"] == "eval.py" and record["checkpoints"] == [str(finetuned / "best.pth")]
    if flag == "--save-preds":  # a folder an older eval.py wrote (no record) is known by its summary's preds_dir
        (tmp_path / "mine" / "predictions.json").unlink()
        eval_script.main([*argv, flag, str(tmp_path / "mine")])
        predict = ["--checkpoint", str(finetuned), "--images-dir", str(labelled / "images"), "--cpu", "--workers", "0"]
        for folder in (finetuned / "eval_predict" / "preds", tmp_path / "predicted"):  # predict mode's default, and
            flags = [] if folder.name == "preds" else ["--save-preds", str(folder), "--out-dir", str(tmp_path / "o")]
            eval_script.main([*predict, *flags])
            (folder / "predictions.json").unlink()
            eval_script.main([*predict, *flags])


def test_a_run_made_with_relative_paths_is_evaluated_from_any_folder(labelled, tmp_path, monkeypatch, cli_error):
    shutil.copytree(labelled, tmp_path / "work" / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    finetune_seg.main(["--images-dir", "data/images", "--masks-dir", "data/masks", "--checkpoint-dir", "run", *NET,
                       "--base-channels", "2", "--epochs", "1"])
    data = open_checkpoint("run").data
    assert (data.images_dir, data.masks_dir) == (str(tmp_path / "work/data/images"), str(tmp_path / "work/data/masks"))
    monkeypatch.chdir(tmp_path / "elsewhere")  # eval, and what reads its outputs, from another folder
    eval_script.main(["--checkpoint", str(tmp_path / "work/run"), "--out-dir", "out", "--cpu", "--workers", "0"])
    rows = list(csv.DictReader(open("out/per_image.csv")))
    summary = json.loads(Path("out/summary.json").read_text())
    assert rows and all(Path(r["image"]).is_absolute() and Path(r["mask"]).is_file() for r in rows)
    assert summary["ensemble"] == [str(tmp_path / "work/run/best.pth")]

    # A checkpoint from before absolute paths says where its data was meant to be, not "index file not found".
    old = torch.load(tmp_path / "work/run/best.pth", weights_only=True)
    old["data"]["images_dir"], old["data"]["masks_dir"] = "data/images", "data/masks"
    torch.save(old, tmp_path / "old.pth")
    line = cli_error(eval_script.main, ["--checkpoint", str(tmp_path / "old.pth"), "--cpu", "--workers", "0"])
    assert "data/images: this checkpoint records its images folder relative to the folder it was trained in" in line


def test_predictions_beside_a_data_root_read_by_its_index_are_allowed(finetuned, phantom_data_root, tmp_path):
    shutil.copytree(phantom_data_root, tmp_path / "root")  # read through its index: root/preds is never an input
    eval_script.main(["--checkpoint", str(finetuned), "--images-dir", str(tmp_path / "root"), "--save-preds",
                      str(tmp_path / "root" / "preds"), "--cpu", "--workers", "0", "--out-dir", str(tmp_path / "out")])
    assert list((tmp_path / "root" / "preds").glob("*.png"))


def test_predict_mode_names_a_corrupt_image_or_skips_it(finetuned, tmp_path):
    folder = tmp_path / "new"
    for i in range(3):
        write_png(folder / f"xray{i}.png", generate_panoramic(700 + i, 80, 160)[0])
    (folder / "xray1.png").write_bytes(b"\x89PNG broken")
    # Two workers: the error raised in a worker process still reaches the user as its own one line.
    line = one_error_line(run_script("eval.py", "--checkpoint", finetuned, "--images-dir", folder, "--out-dir",
                                     tmp_path / "out", "--cpu", "--workers", "2"))
    assert f"{folder / 'xray1.png'}: cannot decode image" in line
    result = run_script("eval.py", "--checkpoint", finetuned, "--images-dir", folder, "--out-dir", tmp_path / "out",
                        "--cpu", "--workers", "2", "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "preds").glob("*.png")) == ["xray0.png", "xray2.png"]
    skipped = list(csv.DictReader((tmp_path / "out" / "skipped.csv").open()))
    assert [Path(r["image"]).name for r in skipped] == ["xray1.png"] and "cannot decode" in skipped[0]["reason"]
    assert "wrote 2 of 3 masks" in result.stdout


@pytest.mark.parametrize("script, flags, expected", [
    ("eval.py", ["--threshold", "2"], "--threshold: must be between 0 and 1"),
    ("finetune_seg.py", ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    ("finetune_seg.py", ["--label-fraction", "1.5"], "--label-fraction: must be above 0 and at most 1, got 1.5"),
    ("finetune_seg.py", ["--task", "teeth", "--mask-resize", "area"], "--mask-resize area is for the binary task"),
    ("finetune_seg.py", ["--checkpoint-dir", str(REPO / "README.md")], "README.md: exists and is not a folder"),
    ("mim_pretrain.py", ["--log-dir", str(REPO / "README.md")], "README.md: exists and is not a folder"),
    ("eval.py", ["--out-dir", str(REPO / "README.md")], "README.md: exists and is not a folder"),
])
def test_bad_flags_are_one_line(finetuned, capsys, script, flags, expected):
    """As the command line runs them (utils.run_cli), in this process: argparse's errors and the scripts' own."""
    from utils import run_cli

    main = {"eval.py": eval_script.main, "finetune_seg.py": finetune_seg.main, "mim_pretrain.py": mim_pretrain.main}[script]
    extra = ["--checkpoint", str(finetuned)] if script == "eval.py" else []
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as stopped:
            run_cli(main, [*extra, *flags])
    finally:
        torch.set_num_threads(threads)
    stderr = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(stderr.splitlines()) == 1 and "error: " in stderr and expected in stderr


def test_eval_refuses_flags_it_would_ignore(finetuned, labelled, tmp_path, capsys):
    checkpoint = ["--checkpoint", str(finetuned), "--cpu", "--workers", "0"]
    for flags, message in ((["--index", str(tmp_path / "other.csv")], "--index says where the labels of another folder"),
                           (["--masks-dir", str(labelled / "masks")], "--masks-dir says where the labels of another"),
                           (["--images-dir", str(labelled / "images"), "--split", "val"],
                            "has neither masks nor an index, so it has no 'val' split")):
        with pytest.raises(ToothSegError, match=message):  # each once scored or segmented something else, exit 0
            eval_script.main([*checkpoint, *flags, "--out-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    eval_script.main([*checkpoint, "--top-k", "0", "--out-dir", str(tmp_path / "none")])
    assert "best 0" not in capsys.readouterr().out and not (tmp_path / "none" / "best").exists()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(labelled, tmp_path, monkeypatch):
    result = run_script("finetune_seg.py", *data_flags(labelled), "--checkpoint-dir", tmp_path / "lr", *NET,
                        "--base-channels", "2", "--epochs", "2", "--lr", "1e8")
    line = one_error_line(result)
    assert "training diverged" in line and "lower --lr or try --amp off" in line
    assert re.search(r"at epoch \d+ \(step \d+\)", line)
    for saved in (tmp_path / "lr").glob("*.pth"):  # a NaN epoch is never saved, as best or as last
        assert all(np.isfinite(v) for v in open_checkpoint(saved).metrics.values())

    original = finetune_seg.SegmentationTask.val_step
    calls = []

    def nan_from_the_second_epoch(self, model, batch):
        sums = original(self, model, batch)
        calls.append(1)
        return {**sums, "loss": sums["loss"] * float("nan")} if len(calls) > 1 else sums

    monkeypatch.setattr(finetune_seg.SegmentationTask, "val_step", nan_from_the_second_epoch)
    with pytest.raises(ToothSegError, match=r"val/loss=nan at epoch 2 \(step \d+\)"):
        finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path / "ft"), *NET, "--base-channels", "2",
                           "--epochs", "3", "--batch-size", "16"])
    assert open_checkpoint(tmp_path / "ft" / "best.pth").epoch == open_checkpoint(tmp_path / "ft" / "last.pth").epoch == 1


# ----------------------------------------------------------------------------------------------
# Post-processing: small components dropped, their size chosen on validation
# ----------------------------------------------------------------------------------------------
def components(mask: np.ndarray) -> list[set]:
    """8-connected components by flood fill, independent of scipy."""
    seen, found = np.zeros_like(mask, bool), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, part = True, [start], set()
        while stack:
            y, x = stack.pop()
            part.add((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        found.append(part)
    return found


def test_post_processing_only_removes_small_components():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.3
    sizes = sorted({len(c) for c in components(mask)})
    assert len(sizes) > 3  # components of many sizes
    for min_pixels in (0, 1, 2, 3, 5, 10, sizes[-1], sizes[-1] + 1):
        kept = remove_small_components(mask, min_pixels)
        assert kept.dtype == bool and not (kept & ~mask).any()  # a subset: nothing added
        expected = np.zeros_like(mask)
        for part in components(mask):
            if len(part) >= min_pixels:
                expected[tuple(np.array(sorted(part)).T)] = True
        np.testing.assert_array_equal(kept, expected)  # large ones pixel for pixel, small ones gone
    diagonal = np.eye(6, dtype=bool)  # 8-connected: one component of 6, not six of 1
    np.testing.assert_array_equal(remove_small_components(diagonal, 6), diagonal)


def eval_pred_masks(finetuned, tmp_path, name, *flags):
    """eval.py's saved masks at a threshold that leaves ~20% of the first test image as tooth (at 0.5 the tiny
    model calls nearly every pixel a tooth)."""
    predictor = load_predictor(finetuned)
    image = read_image(predictor.checkpoint.data.labelled_splits()["test"][0].image)
    threshold = float(predictor.probabilities(predictor.network_input(image)).quantile(0.8))
    eval_script.main(["--checkpoint", str(finetuned), "--out-dir", str(tmp_path / name), "--save-preds",
                      str(tmp_path / name / "preds"), "--threshold", str(threshold), "--cpu", "--workers", "0", *flags])
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return summary, {p.stem: read_image(p) > 0 for p in (tmp_path / name / "preds").glob("*.png")}


def test_a_fixed_min_component_drops_only_the_small_components(finetuned, tmp_path):
    summary, plain = eval_pred_masks(finetuned, tmp_path, "plain")
    assert summary["min_component"] is None
    sizes = sorted(len(c) for mask in plain.values() for c in components(mask))
    min_pixels = sizes[len(sizes) // 2]  # the median component: some go, some stay
    assert sizes[0] < min_pixels <= sizes[-1]
    fraction = (min_pixels - 0.5) / (SIZE[0] * SIZE[1])  # a share of the area; it rounds up to min_pixels
    summary, cleaned = eval_pred_masks(finetuned, tmp_path, "cleaned", "--min-component", str(fraction))
    assert summary["min_component"] == {"fraction": fraction, "chosen": "fixed"}
    for pair_id, mask in plain.items():
        np.testing.assert_array_equal(cleaned[pair_id], remove_small_components(mask, min_pixels))
    rows = {r["pair_id"]: r for r in csv.DictReader((tmp_path / "cleaned" / "per_image.csv").open())}
    assert all(int(rows[k]["pred_pixels"]) == int(m.sum()) for k, m in cleaned.items())  # scored as saved


def test_min_component_auto_chooses_on_the_validation_split(finetuned, tmp_path, monkeypatch, capsys):
    predicted = {}
    original = eval_script.predictions

    def recording(predictors, samples, args, device, desc):
        predicted[desc] = {s.pair_id for s in samples}
        return original(predictors, samples, args, device, desc)

    monkeypatch.setattr(eval_script, "predictions", recording)
    summary, _ = eval_pred_masks(finetuned, tmp_path, "auto", "--min-component", "auto")
    splits = open_checkpoint(finetuned).data.labelled_splits()
    val, test = {s.pair_id for s in splits["val"]}, {s.pair_id for s in splits["test"]}
    assert predicted == {"val (--min-component)": val, "test": test} and not val & test
    choice = summary["min_component"]
    assert choice["chosen"] == "auto" and choice["val_images"] == len(val)
    assert list(choice["val_dice"]) == [f"{f:g}" for f in eval_script.MIN_COMPONENT_GRID]
    best = max(choice["val_dice"].values())
    assert choice["fraction"] == next(f for f in eval_script.MIN_COMPONENT_GRID if choice["val_dice"][f"{f:g}"] == best)
    out = capsys.readouterr().out
    assert f"--min-component auto: {choice['fraction']:g}, " in out
    assert choice["scored_images_chosen_on"] == 0 and "note:" not in out
    # Scoring the validation split itself: the same choice, said to be in-sample.
    summary, _ = eval_pred_masks(finetuned, tmp_path, "auto_val", "--min-component", "auto", "--split", "val")
    assert summary["min_component"]["scored_images_chosen_on"] == len(val)
    assert f"note: {len(val)} of the {len(val)} images scored are among those --min-component auto chose on" \
        in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--one-region-per-tooth", "--arch-order"])
def test_per_tooth_cleaning_is_refused_for_a_binary_model(finetuned, flag):
    from utils import ToothSegError

    with pytest.raises(ToothSegError, match=f"is a binary model; {flag} applies to per-tooth models"):
        eval_script.main(["--checkpoint", str(finetuned), flag, "--cpu"])


def test_scoring_images_that_trained_the_model_says_so(finetuned, tmp_path, capsys):
    """When the splits changed since training (an index edited, images added to a bare folder), images the model
    trained on can land in the scored split: eval says which, and summary.json lists them, where it said nothing."""
    from dataclasses import replace

    from checkpoints import save_checkpoint

    ckpt = open_checkpoint(finetuned / "best.pth")
    test_ids = sorted(s.pair_id for s in ckpt.data.labelled_splits()["test"])
    save_checkpoint(tmp_path / "run" / "best.pth", replace(ckpt, task={
        **ckpt.task, "labelled_pairs": sorted([*ckpt.task["labelled_pairs"], test_ids[0]])}))
    capsys.readouterr()
    eval_script.main(["--checkpoint", str(tmp_path / "run"), "--out-dir", str(tmp_path / "ev"), "--cpu", "--workers", "0",
                      "--top-k", "0"])
    assert f"warning: 1 of the {len(test_ids)} images scored as 'test' trained this model ({test_ids[0]})" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["trained_on"] == [test_ids[0]]
    eval_script.main(["--checkpoint", str(finetuned), "--out-dir", str(tmp_path / "ev0"), "--cpu", "--workers", "0",
                      "--top-k", "0"])
    assert "warning" not in capsys.readouterr().out  # the run's own splits: nothing to say
    assert json.loads((tmp_path / "ev0" / "summary.json").read_text())["trained_on"] == []
    eval_script.main(["--checkpoint", str(finetuned), "--out-dir", str(tmp_path / "all"), "--cpu", "--workers", "0",
                      "--top-k", "0", "--split", "all"])
    assert "warning" not in capsys.readouterr().out  # all holds the training images by definition


def test_a_csv_without_rows_is_its_header(tmp_path):
    """per_tooth.csv of a split whose images have no labelled tooth: its header, where it was an IndexError."""
    eval_script.write_csv(tmp_path / "per_tooth.csv", [], ["fdi", "dice", "teeth"])
    assert (tmp_path / "per_tooth.csv").read_text() == "fdi,dice,teeth\n"


def test_a_label_fraction_says_how_many_pairs_it_kept(labelled, tmp_path, capsys):
    """0.01 of a dozen pairs rounds to none and is raised to one: the line says 1 of N beside the share asked."""
    finetune_seg.main([*data_flags(labelled), "--checkpoint-dir", str(tmp_path), *NET, "--base-channels", "4",
                       "--epochs", "1", "--steps-per-epoch", "1", "--label-fraction", "0.01"])
    n_train = len(open_checkpoint(tmp_path / "last.pth").data.labelled_splits()["train"])
    assert f"on 1 labelled pairs (1 of {n_train}: --label-fraction 0.01)" in capsys.readouterr().out


def test_an_interrupted_eval_leaves_no_earlier_record_beside_its_outputs(finetuned, tmp_path, monkeypatch):
    """The earlier run's summary.json named its checkpoint beside predictions the interrupted run had overwritten."""
    flags = ["--checkpoint", str(finetuned), "--out-dir", str(tmp_path / "ev"), "--cpu", "--workers", "0", "--top-k", "0"]
    eval_script.main(flags)
    assert (tmp_path / "ev" / "summary.json").is_file() and (tmp_path / "ev" / "per_image.csv").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(eval_script, "predictions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_script.main(flags)
    assert not (tmp_path / "ev" / "summary.json").exists() and not (tmp_path / "ev" / "per_image.csv").exists()
