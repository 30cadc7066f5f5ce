"""visualizer.py: exact overlay colours, real PNGs on disk, saliency, TensorBoard curves, and figures
whose Dice values are eval.py's (on the tiny_study run folder)."""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import visualizer as vz
from checkpoints import open_checkpoint
from index import hold_out, pretraining_samples
from predict import ensemble_mask, get_saliency_map, load_predictor, predict_probabilities
from utils import ToothSegError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads spinning on a busy 2-core machine make these tiny models 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path, fig, dpi: int = 100) -> np.ndarray:
    """The file decodes as an image of the figure's size in pixels, and is not blank."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    width, height = (fig.get_size_inches() * dpi).round().astype(int)
    assert image.shape[:2] == (height, width)
    assert image.std() > 5
    return image


def dice_in(title: str) -> float:
    return float(re.search(r"Dice (\d\.\d+)", title).group(1))


# ----------------------------------------------------------------------------------------------
# Overlay and the single-sample plot
# ----------------------------------------------------------------------------------------------
def test_overlay_colours_exact():
    pred = np.array([[1, 1], [0, 0]], np.uint8)
    gt = np.array([[255, 0], [255, 0]], np.uint8)  # 0/255 masks work like 0/1
    # hit, false positive / missed, background
    opaque = vz.overlay_mask(np.zeros((2, 2), np.uint8), pred, gt, alpha=1.0)
    assert opaque[0, 0].tolist() == [40, 200, 60]
    assert opaque[0, 1].tolist() == [230, 40, 40]
    assert opaque[1, 0].tolist() == [40, 110, 255]
    assert opaque[1, 1].tolist() == [0, 0, 0]
    blended = vz.overlay_mask(np.full((2, 2), 100, np.uint8), pred, gt, alpha=0.5)
    assert blended[0, 0].tolist() == [70, 150, 80]  # (100 + colour) / 2
    assert blended[0, 1].tolist() == [165, 70, 70]
    assert blended[1, 1].tolist() == [100, 100, 100]
    alone = vz.overlay_mask(np.zeros((2, 2), np.uint8), pred, alpha=1.0)  # no truth: prediction in green
    assert alone[0, 1].tolist() == [40, 200, 60] and alone[1, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("dice, predicted, expected", [
    ({11: 0.8}, {11: 0.9}, "found"),
    ({11: 0.26}, {11: 0.9}, "poorly outlined"),      # its number only on it, too small: not misplaced
    ({11: 0.0}, {11: 0.9}, "misplaced or extra"),    # its number only elsewhere
    ({11: 0.0}, {}, "missed"),
    ({}, {11: 0.9}, "misplaced or extra"),           # no such tooth
    ({}, {}, "absent"),
])
def test_a_chart_box_says_what_became_of_its_tooth(dice, predicted, expected):
    assert vz.chart_status(11, predicted, dice) == expected


def test_sample_plot_shows_the_four_panels_with_dice(tmp_path):
    image = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))
    gt = np.zeros((32, 64), np.uint8)
    gt[8:24, 8:24] = 1                       # 256 pixels
    pred = np.zeros((32, 64), bool)
    pred[8:24, 16:32] = True                 # 256 pixels, 128 of them hits: Dice 0.5
    fig = vz.visualize_samples_in_one_plot(image, gt, pred, title="case 7", save_path=tmp_path / "out" / "sample.png")
    assert [ax.get_title() for ax in fig.axes] == ["input", "ground truth", "prediction", "overlay"]
    assert fig.get_suptitle() == "case 7  ·  Dice 0.5000"
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), vz.overlay_mask(image, pred, gt))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["hit", "false positive", "missed"]
    assert_png(tmp_path / "out" / "sample.png", fig)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["sample.png"]  # no temp file left behind


# ----------------------------------------------------------------------------------------------
# Saliency
# ----------------------------------------------------------------------------------------------
def test_saliency_of_a_known_model():
    """For logits = 2x, d(mean foreground logit)/dx is 2/n on the foreground and 0 elsewhere."""
    model = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 2.0)
    x = torch.zeros(1, 6, 8)
    x[0, 1:3, 2:5] = 1.0
    model.train()
    saliency = get_saliency_map(model, x)
    np.testing.assert_array_equal(saliency, (x[0] > 0).numpy().astype(np.float32))
    region = np.zeros((6, 8), bool)
    region[4:, :2] = True                    # explain a background corner instead
    np.testing.assert_array_equal(get_saliency_map(model, x, region), region.astype(np.float32))
    assert model.training and model.weight.grad is None  # mode restored, parameters untouched
    with pytest.raises(ToothSegError, match="region has shape"):
        get_saliency_map(model, x, np.ones((3, 3), bool))


def test_saliency_of_a_trained_cell(tiny_study, tmp_path):
    predictor = vz.load_predictor(tiny_study / "cells" / "unet_mim_f1_s0")
    row = read_rows(tiny_study / "cells" / "unet_mim_f1_s0" / "eval_test" / "per_image.csv")[0]
    image = vz.read_gray(row["image"])
    network_input = predictor.network_input(image)
    saliency = get_saliency_map(predictor.model, network_input)
    assert saliency.shape == network_input.shape[-2:] and saliency.dtype == np.float32
    assert saliency.min() >= 0 and saliency.max() == pytest.approx(1.0) and (saliency > 0).mean() > 0.5
    full = predictor.saliency(image)
    assert full.shape == image.shape and 0 <= full.min() and full.max() <= 1 and full.std() > 0
    fig = vz.plot_saliency(image, full, title="saliency", save_path=tmp_path / "saliency.png")
    assert_png(tmp_path / "saliency.png", fig)


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------
def test_curves_equal_the_scalars_written(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    log_a, log_b = tmp_path / "a", tmp_path / "b"
    with SummaryWriter(log_a) as writer:
        for epoch, dice in enumerate([0.25, 0.5, 0.625], start=1):
            writer.add_scalar("val/dice", dice, epoch)
            writer.add_scalar("val/loss", 1 - dice, epoch)
    with SummaryWriter(log_a) as writer:     # a resumed run rewrites epoch 3
        writer.add_scalar("val/dice", 0.75, 3)
    with SummaryWriter(log_b) as writer:
        writer.add_scalar("val/dice", 0.125, 1)

    scalars = vz.read_scalars(log_a)
    assert sorted(scalars) == ["val/dice", "val/loss"]
    np.testing.assert_array_equal(scalars["val/dice"][0], [1, 2, 3])
    np.testing.assert_array_equal(scalars["val/dice"][1], [0.25, 0.5, 0.75])
    fig = vz.plot_training_curves({"a": log_a, "b": log_b}, tags=("val/dice", "val/loss"),
                                  save_path=tmp_path / "curves.png")
    dice_ax, loss_ax = fig.axes
    lines = {line.get_label(): line for line in dice_ax.get_lines()}
    np.testing.assert_array_equal(lines["a"].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(lines["a"].get_ydata(), [0.25, 0.5, 0.75])
    np.testing.assert_array_equal(lines["b"].get_ydata(), [0.125])
    assert [line.get_label() for line in loss_ax.get_lines()] == ["a"]  # b has no val/loss
    assert dice_ax.get_title() == "val/dice" and dice_ax.get_xlabel() == "epoch"
    assert_png(tmp_path / "curves.png", fig)
    with pytest.raises(ToothSegError, match="no run has the scalar 'val/iou'; available: val/dice, val/loss"):
        vz.plot_training_curves({"a": log_a}, tags=("val/iou",))
    with pytest.raises(ToothSegError, match="no TensorBoard event files"):
        vz.read_scalars(tmp_path / "missing")


def test_curves_of_a_real_run_match_its_checkpoint(tiny_study):
    cell = tiny_study / "cells" / "unet_scratch_f1_s0"
    steps, values = vz.read_scalars(cell / "tensorboard")["val/dice"]
    last = open_checkpoint(cell / "last.pth")
    assert steps[-1] == last.epoch
    assert values[-1] == pytest.approx(last.metrics["val/dice"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Model comparison and best/worst gallery against eval.py's per-image results
# ----------------------------------------------------------------------------------------------
def test_compare_models_shows_the_dice_eval_reported(tiny_study, tmp_path):
    cells = vz.study_cells(tiny_study)
    inits = vz.cells_across_inits(cells, "unet_mim_f1_s0")
    assert sorted(inits) == ["fullimage", "mim", "scratch"]
    reported = {init: {r["image"]: float(r["dice"]) for r in read_rows(folder / "eval_test" / "per_image.csv")}
                for init, folder in inits.items()}
    images = sorted(reported["mim"])
    predictors = {init: vz.load_predictor(folder) for init, folder in inits.items()}

    for init, predictor in predictors.items():  # the figure's predictions are eval.py's, pixel for pixel
        for image_path in images:
            image = vz.read_gray(image_path)
            dice = vz.dice_score(predictor.predict(image), predictor.ground_truth(image_path))
            assert dice == pytest.approx(reported[init][image_path], abs=1e-6)

    fig = vz.compare_models(predictors, images, save_path=tmp_path / "compare.png")
    axes = np.array(fig.axes).reshape(len(images), 2 + len(predictors))
    for row, image_path in enumerate(images):
        assert axes[row, 0].get_title() == f"{Path(image_path).stem}\ninput"
        assert axes[row, 1].get_title() == "ground truth"
        for col, init in enumerate(predictors, start=2):
            title = axes[row, col].get_title()
            assert title.startswith(init)
            assert dice_in(title) == pytest.approx(reported[init][image_path], abs=5e-5)  # shown to 4 decimals
    assert_png(tmp_path / "compare.png", fig)


def test_predictions_equal_eval_pixel_for_pixel(tiny_study, tmp_path):
    """The tiny models call nearly every pixel a tooth at threshold 0.5, which would hide a resizing
    difference; at the median probability about half the pixels flip, so the masks must match exactly."""
    import eval as evaluate
    from index import read_mask

    cell = tiny_study / "cells" / "unet_mim_f1_s0"
    predictor = vz.load_predictor(cell)
    images = [r["image"] for r in read_rows(cell / "eval_test" / "per_image.csv")]
    probs = predict_probabilities(predictor.model, predictor.network_input(vz.read_gray(images[0])), False,
                                           None, predictor.device)
    threshold = float(probs.median())
    evaluate.main(["--checkpoint", str(cell / "best.pth"), "--out-dir", str(tmp_path / "eval"), "--threshold",
                   str(threshold), "--save-preds", str(tmp_path / "preds"), "--workers", "0", "--cpu"])
    reported = {r["image"]: float(r["dice"]) for r in read_rows(tmp_path / "eval" / "per_image.csv")}
    for image_path in images:
        pred = predictor.predict(vz.read_gray(image_path), threshold=threshold)
        assert 0.05 < pred.mean() < 0.95
        np.testing.assert_array_equal(pred, read_mask(tmp_path / "preds" / Path(image_path).name).astype(bool))
        assert vz.dice_score(pred, predictor.ground_truth(image_path)) == pytest.approx(reported[image_path], abs=1e-6)


def test_compare_models_with_explicit_masks_and_paths(tiny_study):
    cell = tiny_study / "cells" / "unet_scratch_f1_s0"
    row = read_rows(cell / "eval_test" / "per_image.csv")[0]
    mask = Path(row["image"]).parent.parent / "masks" / Path(row["image"]).name
    fig = vz.compare_models({"scratch": cell / "best.pth"}, [row["image"]], masks=[mask])
    assert dice_in(fig.axes[2].get_title()) == pytest.approx(float(row["dice"]), abs=5e-5)
    with pytest.raises(ToothSegError, match="give one mask per image"):
        vz.compare_models({"scratch": cell}, [row["image"]], masks=[mask, mask])
    with pytest.raises(ToothSegError, match="not one of the labelled images"):
        vz.compare_models({"scratch": cell}, [Path(row["image"]).parent.parent.parent / "unlabeled" / "nope.png"])


def test_best_worst_gallery(tiny_study, tmp_path):
    eval_dir = tiny_study / "cells" / "unet_fullimage_f1_s0" / "eval_test"
    rows = sorted(read_rows(eval_dir / "per_image.csv"), key=lambda r: float(r["dice"]))
    fig = vz.best_worst_gallery(eval_dir / "per_image.csv", k=5, save_path=tmp_path / "gallery.png")
    k = len(rows)  # k is capped at the number of test images
    axes = np.array(fig.axes).reshape(2, k)
    for col in range(k):
        best, worst = rows[::-1][col], rows[col]
        assert axes[0, col].get_title().startswith(f"best {col + 1}: {best['pair_id']}\n")
        assert axes[1, col].get_title().startswith(f"worst {col + 1}: {worst['pair_id']}\n")
        assert dice_in(axes[1, col].get_title()) == pytest.approx(float(worst["dice"]), abs=5e-5)
    assert_png(tmp_path / "gallery.png", fig)

    stale = tmp_path / "stale_eval"
    shutil.copytree(eval_dir, stale)
    text = (stale / "per_image.csv").read_text()
    (stale / "per_image.csv").write_text(text.replace(rows[0]["dice"], str(float(rows[0]["dice"]) + 0.3)))
    with pytest.raises(ToothSegError, match="no longer matches"):
        vz.best_worst_gallery(stale / "per_image.csv", k=1)
    with pytest.raises(ToothSegError, match="cannot read"):
        vz.best_worst_gallery(tmp_path / "nowhere" / "per_image.csv")
    # A per-tooth run is pointed to its own gallery (it was re-predicted from the background channel and
    # called stale), and a per-tooth model has no binary mask of its own.
    teeth_eval = tiny_study / "cells" / "unet_scratch_teeth_f1_s0" / "eval_test"
    with pytest.raises(ToothSegError, match="a per-tooth evaluation; show it with tooth_chart_gallery"):
        vz.best_worst_gallery(teeth_eval / "per_image.csv", k=1)
    with pytest.raises(ToothSegError, match="is a per-tooth model; its mask is the union of its teeth"):
        ensemble_mask([load_predictor(teeth_eval.parent / "best.pth", "cpu")], np.zeros((64, 128), np.uint8))


def test_best_worst_gallery_re_predicts_with_the_whole_ensemble(tiny_study, tmp_path, monkeypatch):
    import eval as eval_script

    cells = [tiny_study / "cells" / name for name in ("unet_scratch_f1_s0", "unet_fullimage_f1_s0")]
    eval_script.main(["--checkpoint", *map(str, cells), "--out-dir", str(tmp_path / "ev"), "--cpu", "--workers", "0",
                      "--top-k", "0"])
    members = []
    monkeypatch.setattr(vz, "ensemble_mask", lambda *args: members.append(args) or ensemble_mask(*args))
    vz.best_worst_gallery(tmp_path / "ev" / "per_image.csv", k=1)
    expected = [open_checkpoint(cell).path for cell in cells]
    assert len(members) == 2 and all([p.path for p in args[0]] == expected for args in members)


# ----------------------------------------------------------------------------------------------
# Pretraining reconstructions and run-folder helpers
# ----------------------------------------------------------------------------------------------
def test_reconstructions_reproduce_the_validation_setup(tiny_study, tmp_path):
    fullimage = tiny_study / "pretrain" / "fullimage_unet"
    ckpt = open_checkpoint(fullimage)
    _, val_samples = hold_out(pretraining_samples(ckpt.data.images_dir), ckpt.data.holdout, minimum=2)
    fig = vz.plot_reconstructions(fullimage, n=len(val_samples), save_path=tmp_path / "fullimage.png")
    axes = np.array(fig.axes).reshape(len(val_samples), 4)
    assert axes[0, 0].get_title() == f"{val_samples[0].pair_id}: perturbed input"
    # Same images and perturbations as validation: the per-image L1s average to the logged val/loss.
    losses = [float(re.search(r"L1 (\d+\.\d+)", ax.get_title()).group(1)) for ax in axes[:, 2]]
    assert np.mean(losses) == pytest.approx(ckpt.metrics["val/loss"], abs=1e-4)
    assert_png(tmp_path / "fullimage.png", fig)

    mim = open_checkpoint(tiny_study / "pretrain" / "mim_unet")
    fig = vz.plot_reconstructions(tiny_study / "pretrain" / "mim_unet" / "best.pth", n=1)
    masked_input = fig.axes[0].images[0].get_array()
    assert fig.axes[0].get_title().endswith("masked input")
    # Hidden pixels are 0 after normalisation, i.e. exactly mid-grey on the display scale.
    assert np.isclose(masked_input, 0.5).mean() >= mim.task["masking"]["ratio"]
    with pytest.raises(ToothSegError, match="needs a 'mim' or 'fullimage' checkpoint"):
        vz.plot_reconstructions(tiny_study / "cells" / "unet_mim_f1_s0" / "best.pth")


def test_run_folder_helpers(tiny_study, tmp_path):
    cells = vz.study_cells(tiny_study)
    assert sorted(cells) == ["unet_fullimage_f1_s0", "unet_mim_f1_s0", "unet_scratch_f1_s0"]
    assert cells["unet_mim_f1_s0"]["init"] == "mim" and cells["unet_mim_f1_s0"]["dir"].is_dir()
    assert sorted(vz.pretraining_runs(tiny_study)) == ["fullimage_unet", "mim_unet"]
    with pytest.raises(ToothSegError, match="cell=unet_x: no such finished cell; choose one of: unet_fullimage_f1_s0, "):
        vz.cells_across_inits(cells, "unet_x")
    assert vz.choose_cell(cells, "", "TOOTHSEG_CELL") == "unet_fullimage_f1_s0" and vz.choose_cell({}, None, "X") is None
    with pytest.raises(ToothSegError, match="TOOTHSEG_CELL=unet_scratch_teeth: no such finished cell; choose one of: "):
        vz.choose_cell(cells, "unet_scratch_teeth", "TOOTHSEG_CELL")  # a mistyped name, before any section runs
    with pytest.raises(ToothSegError, match="no finished study cells"):
        vz.study_cells(tmp_path)
    with pytest.raises(ToothSegError, match="no best.pth in this folder"):
        vz.load_predictor(tmp_path)
    with pytest.raises(ToothSegError, match="nope.pth: file not found"):
        vz.load_predictor(tmp_path / "nope.pth")
