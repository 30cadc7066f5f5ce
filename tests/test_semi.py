"""Learning from unlabelled images on the phantom: soft probabilities written at each image's own size,
a student trained on pseudo-labels that records them, the online method's loss using unlabelled images,
its exact resume, and both under torchrun."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as eval_script
import finetune_seg
from checkpoints import open_checkpoint
from data import SegmentationDataset, SemiDataset, UnlabelledDataset, build_train_transform, strong_photometric
from index import Sample, read_index, segmentation_splits, unlabelled_pool
from models import build_model
from semi import MANIFEST, MeanTeacher, consistency_loss, mean_entropy, most_confident, read_pseudo_labels
from utils import ToothSegError, read_image, write_png

REPO = Path(__file__).resolve().parents[1]
NET = ["--img-height", "32", "--img-width", "64", "--base-channels", "4", "--batch-size", "4", "--num-workers", "0",
       "--cpu"]
# The teacher is larger and trains for 80 steps, so that it learns (validation Dice about 0.8): one that predicts
# nothing writes soft maps of noise around 0, which would pass for soft labels.
TEACHER_NET = ["--img-height", "64", "--img-width", "128", "--base-channels", "8", "--batch-size", "4",
               "--num-workers", "0", "--cpu"]


@pytest.fixture(scope="module")
def teacher(phantom_data_root, tmp_path_factory) -> Path:
    """A supervised model on half of the phantom's labelled training pairs: the other half joins the pool."""
    out = tmp_path_factory.mktemp("teacher")
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(out),
                       *TEACHER_NET, "--epochs", "10", "--steps-per-epoch", "8", "--lr", "1e-2",
                       "--label-fraction", "0.5"])
    return out


@pytest.fixture(scope="module")
def pseudo_labels(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pseudo")
    eval_script.main(["--checkpoint", str(teacher / "best.pth"), str(teacher / "last.pth"), "--split", "unlabelled",
                      "--save-probs", str(out / "probs"), "--out-dir", str(out / "eval"), "--cpu", "--workers", "0"])
    return out / "probs"


def test_the_pool_is_the_left_out_pairs_and_the_unlabelled_images(phantom_data_root, teacher):
    data = phantom_data_root / "processed_2d"
    splits = segmentation_splits(data)
    labelled = open_checkpoint(teacher).task["labelled_pairs"]
    pool = unlabelled_pool(data, None, splits["train"], labelled)
    unlabelled = {r["pair_id"] for r in read_index(phantom_data_root / "sts2d_index.csv")
                  if r["split"] == "pretrain" and not r["is_mask"]}
    left_out = {s.pair_id for s in splits["train"]} - set(labelled)
    assert left_out and {s.pair_id for s in pool} == left_out | unlabelled
    assert all(s.mask is None for s in pool)
    held_out = {s.pair_id for name in ("val", "test") for s in splits[name]}
    assert not held_out & {s.pair_id for s in pool}


def test_soft_probabilities_are_written_at_original_size_and_are_not_binary(teacher, pseudo_labels):
    assert open_checkpoint(teacher / "best.pth").metrics["val/dice"] > 0.5  # soft maps of a teacher that learnt
    labels, teachers = read_pseudo_labels(pseudo_labels)
    assert teachers == [str(teacher / "best.pth"), str(teacher / "last.pth")]  # a fused teacher of two
    assert len(labels) == len({label.pair_id for label in labels}) > 10
    values = set()
    for label in labels:
        probs, image = read_image(label.probs), read_image(label.image)
        assert probs.shape == image.shape and probs.dtype == np.uint8  # the image's own size, not 64x128
        values |= set(np.unique(probs).tolist())
        assert label.mean_entropy == pytest.approx(mean_entropy(probs / 255.0), abs=0.02)
    assert len(values - {0, 255}) > 100, "soft maps, not masks"


def test_a_student_trains_on_the_most_confident_pseudo_labels_and_records_them(phantom_data_root, pseudo_labels,
                                                                              tmp_path, capsys):
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(tmp_path), *NET,
                       "--epochs", "1", "--label-fraction", "0.5", "--pseudo-labels", str(pseudo_labels),
                       "--pseudo-keep", "0.5", "--pseudo-weight", "0.7", "--labelled-share", "0.5",
                       "--steps-per-epoch", "3"])
    labels, teachers = read_pseudo_labels(pseudo_labels)
    student = open_checkpoint(tmp_path)
    recorded = student.task["pseudo_labels"]
    kept = most_confident(labels, 0.5)
    assert recorded["dir"] == str(pseudo_labels) and recorded["teachers"] == teachers
    assert recorded["kept"] == len(kept) == round(len(labels) / 2) and recorded["weight"] == 0.7
    assert recorded["labelled_share"] == 0.5
    assert student.task["steps_per_epoch"] == student.state.global_step == 3  # an epoch of 3 batches, not one pass
    assert recorded["max_mean_entropy"] == max(label.mean_entropy for label in kept)
    assert max(label.mean_entropy for label in kept) <= min(label.mean_entropy for label in labels if label not in kept)
    assert f"+ {len(kept)} pseudo-labelled of {len(labels)} unlabelled" in capsys.readouterr().out


def test_pseudo_labels_of_test_images_are_refused(phantom_data_root, teacher, tmp_path):
    eval_script.main(["--checkpoint", str(teacher), "--split", "test", "--save-probs", str(tmp_path / "probs"),
                      "--out-dir", str(tmp_path / "eval"), "--cpu", "--workers", "0"])
    with pytest.raises(ToothSegError, match="a val/test image"):
        finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir",
                           str(tmp_path / "ft"), *NET, "--epochs", "1", "--pseudo-labels", str(tmp_path / "probs")])


def test_pseudo_labels_of_other_images_of_the_same_names_are_refused(phantom_data_root, pseudo_labels, tmp_path):
    """Matched by pair id only, another data root's pseudo-labels (or those of images changed since) trained the
    student, on that root's images."""
    shutil.copytree(pseudo_labels, tmp_path / "probs")
    manifest = json.loads((tmp_path / "probs" / MANIFEST).read_text())
    changed, older = sorted(manifest["images"])[1:3]
    other_pixels = {**manifest["images"][changed], "image_sha1": "0" * 40}  # this pool's image has other content
    # a manifest of before the hashes: compared by the image's path
    other_path = {k: v for k, v in manifest["images"][older].items() if k != "image_sha1"} | {"image": "/elsewhere/x.png"}
    for refused, entry in ((changed, other_pixels), (older, other_path)):
        (tmp_path / "probs" / MANIFEST).write_text(json.dumps({**manifest, "images": {**manifest["images"], refused: entry}}))
        with pytest.raises(ToothSegError, match=f"its pseudo-label {refused} was made from .*, not from this pool's .*"
                                                f"\\(1 such\\); write them again with eval.py --split unlabelled"):
            finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir",
                               str(tmp_path / "ft"), *NET, "--epochs", "1", "--label-fraction", "0.5",
                               "--pseudo-labels", str(tmp_path / "probs")])


@pytest.mark.parametrize("flags, expected", [
    (["--pseudo-keep", "0.3"], "--pseudo-keep is for --pseudo-labels DIR, which this run does not use"),
    (["--no-student-noise"], "--student-noise is for --pseudo-labels DIR"),
    (["--semi", "--pseudo-weight", "5"], "--pseudo-weight is for --pseudo-labels DIR"),
    (["--ema-decay", "0.5"], "--ema-decay is for --semi, which this run does not use; add --semi or drop --ema-decay"),
])
def test_flags_of_a_way_the_run_does_not_use_are_refused(tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit):  # they were ignored, and recorded as if applied
        finetune_seg.parse_args(["--images-dir", str(tmp_path), *flags])
    assert expected in capsys.readouterr().err


def test_soft_targets_and_weights_enter_the_loss(phantom_data_root, pseudo_labels):
    labels, _ = read_pseudo_labels(pseudo_labels)
    samples = [Sample(label.image, label.probs, label.pair_id) for label in labels[:2]]
    dataset = SegmentationDataset(samples, build_train_transform(32, 64), soft={s.pair_id for s in samples},
                                  soft_weight=0.3, noise=False)
    _, target, meta = dataset[0]
    assert meta["weight"] == 0.3 and 0 <= target.min() and target.max() <= 1
    assert ((target > 0.02) & (target < 0.98)).any(), "soft targets stay soft through the augmentation"
    loss = finetune_seg.SegmentationTask(0.2).loss
    logits = torch.zeros(1, *target.shape)
    assert loss(logits, target[None], torch.tensor([0.3])) == pytest.approx(0.3 * loss(logits, target[None]).item())


def test_a_labelled_and_an_unlabelled_draw_are_augmented_apart(phantom_data_root):
    """The online method's pairs: the same image in both sets still gets two augmentations at one draw (both
    once took their randomness from (seed, epoch, draw) alone, so every pair was flipped and cropped alike)."""
    one = segmentation_splits(phantom_data_root / "processed_2d")["train"][:1]
    transform = build_train_transform(32, 64)
    semi = SemiDataset(SegmentationDataset(one, transform), UnlabelledDataset(one, transform), length=8)
    assert not all(torch.equal(semi[i][0], semi[i][3]) for i in range(8))


def test_the_online_loss_uses_the_unlabelled_images(phantom_data_root):
    """Changing only the unlabelled half of a batch changes the loss and its gradient: drop the unlabelled
    term and this fails."""
    data = phantom_data_root / "processed_2d"
    splits = segmentation_splits(data)
    pool = unlabelled_pool(data, None, splits["train"], [s.pair_id for s in splits["train"]])
    transform = build_train_transform(32, 64)
    semi = SemiDataset(SegmentationDataset(splits["train"], transform), UnlabelledDataset(pool, transform))
    assert len(semi) == len(pool) > len(splits["train"])
    torch.manual_seed(0)
    model = build_model("unet", base_channels=4)
    teacher = MeanTeacher(model, 0.99)
    with torch.no_grad():  # a confident teacher, so the confidence mask keeps pixels
        teacher.model.head.conv.bias.fill_(4.0)
    task = finetune_seg.SemiTask(0.2, teacher, confidence=0.9, weight=1.0, rampup_steps=0)
    items = [semi[i] for i in range(4)]
    image, target = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
    meta = {"weight": torch.ones(4)}
    weak, strong = torch.stack([it[3] for it in items]), torch.stack([it[4] for it in items])
    assert not torch.equal(weak, strong)  # the student sees a strongly perturbed view
    model.train()
    loss_a, _ = task.train_step(model, (image, target, meta, weak, strong))
    loss_b, _ = task.train_step(model, (image, target, meta, weak.flip(0), strong.flip(0) * 0.5))
    supervised = task.loss(model(image), target, meta["weight"])
    assert loss_a.item() != pytest.approx(loss_b.item(), rel=1e-4)
    assert loss_a.item() > supervised.item() + 1e-3
    strong.requires_grad_(True)
    loss, _ = task.train_step(model, (image, target, meta, weak, strong))
    (grad,) = torch.autograd.grad(loss, strong)
    assert grad.abs().sum() > 0


def test_consistency_ignores_unsure_pixels_and_the_teacher_follows_the_student():
    logits = torch.zeros(1, 1, 2, 2)
    probs = torch.tensor([[[[0.99, 0.6], [0.01, 0.5]]]])
    # Only the two sure pixels count, each log(2), averaged over all four.
    assert consistency_loss(logits, probs, 0.95).item() == pytest.approx(2 * np.log(2) / 4, rel=1e-5)
    student = torch.nn.Conv2d(1, 1, 1)
    teacher = MeanTeacher(student, decay=0.5)
    with torch.no_grad():
        student.weight.add_(2.0)
    before = teacher.model.weight.clone()
    teacher.update(student)
    assert torch.allclose(teacher.model.weight, 0.5 * before + 0.5 * student.weight)
    image = torch.rand(1, 16, 24)
    strong = strong_photometric((image - 0.5) / 0.25, np.random.default_rng(3))
    assert strong.shape == image.shape and not torch.equal(strong, (image - 0.5) / 0.25)


def test_online_method_resumes_exactly(phantom_data_root, tmp_path, interrupted_run):
    flags = ["--images-dir", str(phantom_data_root / "processed_2d"), *NET, "--epochs", "2", "--semi",
             "--label-fraction", "0.5", "--confidence", "0.6", "--rampup-epochs", "1"]
    finetune_seg.main([*flags, "--checkpoint-dir", str(tmp_path / "straight")])
    interrupted_run(finetune_seg.main, [*flags, "--checkpoint-dir", str(tmp_path / "resumed")])
    with pytest.raises(ToothSegError, match="this run's --semi differs"):  # it went on supervised, the teacher dropped
        finetune_seg.main([*flags[:flags.index("--semi")], "--label-fraction", "0.5", "--resume", str(tmp_path / "resumed")])
    finetune_seg.main([*flags, "--checkpoint-dir", str(tmp_path / "resumed"), "--resume",
                       str(tmp_path / "resumed" / "last.pth")])
    a, b = open_checkpoint(tmp_path / "straight" / "last.pth"), open_checkpoint(tmp_path / "resumed" / "last.pth")
    assert a.epoch == b.epoch == 2 and a.state.task_state["steps"] == b.state.task_state["steps"] > 0
    for name, weights in (("student", (a.state.weights, b.state.weights)),
                          ("teacher", (a.state.task_state["teacher"], b.state.task_state["teacher"]))):
        differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
        assert not differ, f"{name} weights differ after resume: {differ[:3]}"
    assert a.task["semi"]["unlabelled"] > 0 and a.metrics == b.metrics


@pytest.mark.parametrize("way", ["online", "pseudo"])
def test_both_ways_run_under_torchrun(phantom_data_root, pseudo_labels, tmp_path, way):
    from test_distributed import torchrun

    extra = ["--semi"] if way == "online" else ["--pseudo-labels", str(pseudo_labels)]
    result = torchrun("finetune_seg.py", "--images-dir", str(phantom_data_root / "processed_2d"), *NET, "--epochs", "2",
                      "--label-fraction", "0.5", "--checkpoint-dir", str(tmp_path), *extra)
    assert sum(line.startswith("epoch 2:") for line in result.stdout.splitlines()) == 1  # rank 0 alone logs
    record = open_checkpoint(tmp_path / "last.pth")
    assert record.epoch == 2 and np.isfinite(record.metrics["val/loss"])
    assert (record.task["semi"] if way == "online" else record.task["pseudo_labels"]) is not None


def test_study_runs_pseudo_and_online_cells(phantom_data_root, tmp_path):
    import run_study

    flags = ["--images-dir", str(phantom_data_root / "processed_2d"), "--out-dir", str(tmp_path), "--models", "unet",
             "--inits", "scratch", "--label-fractions", "0.5", "--seeds", "0", "--img-height", "32", "--img-width", "64",
             "--base-channels", "4", "--batch-size", "4", "--finetune-epochs", "1", "--steps-per-epoch", "2",
             "--workers", "0", "--cpu", "--bootstrap", "100"]
    run_study.main([*flags, "--semi", "none"])
    (tmp_path / "study.md").unlink()
    run_study.main([*flags, "--semi", "online", "pseudo", "none", "--pseudo-rounds", "2"])  # the second part
    cells = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*/cell.json")}
    assert sorted(cells) == ["unet_scratch_f0.5_s0", "unet_scratch_online_f0.5_s0", "unet_scratch_pseudo_f0.5_s0"]
    # One log per cell, named in full (a fraction's dot is not a suffix to replace).
    assert sorted(p.name for p in (tmp_path / "cells").glob("*.log")) == [f"{name}.log" for name in sorted(cells)]
    # Two rounds: the supervised twin teaches round 1, whose student teaches the cell's own student.
    cell = tmp_path / "cells" / "unet_scratch_pseudo_f0.5_s0"
    first, student = open_checkpoint(cell / "round1"), open_checkpoint(cell)
    assert first.task["pseudo_labels"]["teachers"] == [str(tmp_path / "cells" / "unet_scratch_f0.5_s0" / "best.pth")]
    assert student.task["pseudo_labels"]["teachers"] == [str(cell / "round1" / "best.pth")]
    assert all(open_checkpoint(tmp_path / "cells" / name).state.global_step == 2 for name in cells)  # --steps-per-epoch
    table = (tmp_path / "study.md").read_text()
    assert "| unet | 0.5 | scratch + pseudo |" in table and "| unet | 0.5 | scratch + online |" in table
    run_study.main([*flags, "--semi", "none"])  # the tables cover every finished cell of the folder
    rows = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    assert rows((tmp_path / "study.md").read_text()) == rows(table)

    # Another clinic's test split: every finished cell is scored on it once, and study.md and the plot get their own
    # tables and panel.
    import prepare_sts2d
    one_panel = read_image(tmp_path / "study_dice.png").shape
    other = tmp_path / "other_clinic"
    prepare_sts2d.main(["--synthetic", "12", "--seed", "99", "--data-root", str(other)])
    run_study.main([*flags, "--semi", "none", "--external-test", str(other / "processed_2d")])
    for name in cells:
        summary = json.loads((tmp_path / "cells" / name / "eval_external" / "summary.json").read_text())
        assert summary["images_dir"] == str(other / "processed_2d") and summary["split"] == "test"
    external = (tmp_path / "study.md").read_text().split("## On the external test set")[1]
    assert rows(table)[:2] == rows(external)[:2] and "| unet | 0.5 | scratch + pseudo |" in external
    assert rows(external) != rows(table)  # other images, other scores
    assert read_image(tmp_path / "study_dice.png").shape == (one_panel[0], 2 * one_panel[1])
    result = subprocess.run([sys.executable, "run_study.py", "--images-dir", "x", "--semi", "pseudo"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "add none to --semi" in result.stderr
