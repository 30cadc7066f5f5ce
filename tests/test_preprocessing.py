"""How a model's images are prepared, recorded in the checkpoint and applied by eval and the Predictor as trained:
histogram standardisation (finetune_seg.py --standardize-intensity: each image's grey levels matched to the
training images' mean quantiles) and how each image is resized to the input (--image-resize)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as eval_script
import finetune_seg
import tool
from checkpoints import open_checkpoint
from data import LANDMARK_QUANTILES, build_eval_transform, intensity_landmarks, standardize_intensity
from index import Sample, segmentation_splits
from phantom import generate_panoramic
from predict import load_predictor
from utils import ToothSegError, write_png

NET = ["--img-height", "64", "--img-width", "128", "--batch-size", "4", "--num-workers", "0", "--cpu",
       "--base-channels", "4"]


def exposures(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A phantom X-ray on grey levels 0..127 and the same X-ray under another, strictly increasing contrast curve
    (brighter and stretched), so no two grey levels merge."""
    image = generate_panoramic(seed, 96, 192)[0] // 2
    curve = np.round(60 + 195 * (np.arange(128) / 127) ** 0.7).astype(np.uint8)
    assert np.all(np.diff(curve.astype(int)) > 0)
    return image, curve[image]


def test_standardizing_undoes_a_change_of_exposure():
    image, other = exposures()
    landmarks = np.quantile(image, LANDMARK_QUANTILES)
    restored = standardize_intensity(other, landmarks)
    assert restored.dtype == np.uint8 and restored.shape == image.shape
    assert np.abs(other.astype(int) - image).mean() > 40
    assert np.abs(restored.astype(int) - image).mean() < 1.5
    # Monotone: a brighter pixel never comes out darker.
    levels = np.unique(other)
    assert np.all(np.diff(standardize_intensity(levels[None], landmarks)[0].astype(int)) >= 0)


def test_landmarks_are_the_mean_of_each_images_quantiles(tmp_path):
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    images = {"dark": np.full((8, 8), 10, np.uint8), "ramp": ramp}
    samples = []
    for name, image in images.items():
        write_png(tmp_path / f"{name}.png", image)
        samples.append(Sample(tmp_path / f"{name}.png", None, name))
    expected = (10 + np.quantile(ramp, LANDMARK_QUANTILES)) / 2
    np.testing.assert_allclose(intensity_landmarks(samples), expected, atol=1e-3)


@pytest.fixture(scope="module")
def standardized(phantom_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standardized")
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(out), *NET,
                       "--epochs", "1", "--standardize-intensity"])
    return out


def test_a_run_records_its_training_images_landmarks(standardized, phantom_data_root):
    ckpt = open_checkpoint(standardized / "last.pth")
    train = segmentation_splits(phantom_data_root / "processed_2d")["train"]
    assert ckpt.data.intensity_landmarks == intensity_landmarks(train)
    assert len(ckpt.data.intensity_landmarks) == len(LANDMARK_QUANTILES)


def test_prediction_standardizes_as_the_model_trained(standardized):
    predictor = load_predictor(standardized)
    raw = replace(predictor, checkpoint=replace(predictor.checkpoint,
                                                data=replace(predictor.checkpoint.data, intensity_landmarks=None)))
    image, other = exposures()
    # Standardised, the two exposures are one input; raw, the model sees two different images.
    assert torch.equal(predictor.network_input(image), predictor.network_input(other))
    assert (raw.network_input(image) - raw.network_input(other)).abs().mean() > 0.5


@pytest.fixture(scope="module")
def area_resized(phantom_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("area_resized")
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(out), *NET,
                       "--epochs", "1", "--image-resize", "area"])
    return out


def test_prediction_resizes_images_as_the_model_trained(area_resized, capsys):
    predictor = load_predictor(area_resized)
    assert predictor.checkpoint.data.image_resize == "area"
    image = generate_panoramic(3, 256, 512)[0]  # 4x the input: bilinear and area disagree
    expected = {resize: build_eval_transform(64, 128, image_resize=resize)(image=image)["image"][None]
                for resize in ("linear", "area")}
    assert torch.equal(predictor.network_input(image), expected["area"])
    assert not torch.equal(expected["area"], expected["linear"])
    tool.main([str(area_resized / "last.pth")])
    assert "images resized by area interpolation" in capsys.readouterr().out


@pytest.mark.parametrize("prepared", ["standardized", "area_resized"])
def test_eval_refuses_an_ensemble_that_prepares_images_differently(prepared, request, phantom_data_root, tmp_path):
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir",
                       str(tmp_path / "raw"), *NET, "--epochs", "1"])
    with pytest.raises(ToothSegError, match="prepare images differently"):
        eval_script.main(["--checkpoint", str(request.getfixturevalue(prepared)), str(tmp_path / "raw"), "--cpu",
                          "--workers", "0", "--out-dir", str(tmp_path / "eval")])


@pytest.mark.parametrize("preparation, changed", [(["--standardize-intensity"], "intensity_landmarks"),
                                                  (["--image-resize", "area"], "image_resize")])
def test_resume_keeps_the_preparation(preparation, changed, phantom_data_root, tmp_path, interrupted_run):
    flags = ["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(tmp_path), *NET,
             "--epochs", "2", *preparation]
    interrupted_run(finetune_seg.main, flags)
    with pytest.raises(ToothSegError, match=f"{changed} differ"):
        finetune_seg.main([*flags[:-len(preparation)], "--resume", str(tmp_path / "last.pth")])
    finetune_seg.main([*flags, "--resume", str(tmp_path / "last.pth")])
    assert open_checkpoint(tmp_path / "last.pth").epoch == 2


def test_the_inspector_shows_the_standardization(standardized, capsys):
    tool.main([str(standardized / "last.pth")])
    landmarks = open_checkpoint(standardized / "last.pth").data.intensity_landmarks
    median = f"{landmarks[len(landmarks) // 2]:.0f}"
    assert re.search(rf"grey levels standardised to the training images' histogram \(quartiles \d+/{median}/\d+\)",
                     capsys.readouterr().out)
