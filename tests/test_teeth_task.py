"""The per-tooth task's pieces: metrics against a brute-force scorer, the loss, the flip that renumbers
teeth, flip TTA in class space, post-processing and the tooth chart."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics import (IGNORE_INDEX, TOOTH_SUMMARY_NAMES as TOOTH_KEYS, CEDiceLoss, segmentation_metrics, summarize_teeth,
                     tooth_dice_per_image, tooth_metrics)
from predict import (keep_largest_region, mirror_channels, order_along_arch, ordered_assignment, predict_probabilities,
                     teeth_at_size, tooth_chart)
from teeth import FDI_NUMBERS as FDI_ALL, mirror_closed, mirror_label_map


def brute_force(pred: np.ndarray, gt: np.ndarray) -> dict:
    """The definitions in metrics.py, pixel by pixel and pair by pair."""
    true_teeth = sorted({int(v) for v in gt.ravel()} - {0})
    pred_teeth = sorted({int(v) for v in pred.ravel()} - {0})
    pixels = list(itertools.product(range(gt.shape[0]), range(gt.shape[1])))
    dice = {}
    for n in true_teeth:
        both = sum(1 for y, x in pixels if gt[y, x] == n and pred[y, x] == n)
        dice[n] = 2 * both / (sum(1 for y, x in pixels if gt[y, x] == n) + sum(1 for y, x in pixels if pred[y, x] == n))
    matches = []
    for g in true_teeth:
        for p in pred_teeth:
            inter = sum(1 for y, x in pixels if gt[y, x] == g and pred[y, x] == p)
            union = sum(1 for y, x in pixels if gt[y, x] == g or pred[y, x] == p)
            if inter / union >= 0.5:
                matches.append((g, p))
    assert len({g for g, _ in matches}) == len(matches)  # disjoint teeth: a match above 0.5 is unique
    return {"dice": dice, "matched": len(matches), "numbered_right": sum(g == p for g, p in matches),
            "true": len(true_teeth), "pred": len(pred_teeth)}


def hand_made():
    """Four true teeth: 11 found, 21 found under number 22 (swapped), 31 missed, and an extra predicted 41;
    46 predicted too small to match (IoU 0.25) but overlapping."""
    gt = np.zeros((12, 16), np.uint8)
    gt[0:4, 0:4], gt[0:4, 5:9], gt[6:10, 0:3], gt[6:10, 8:12] = 11, 21, 31, 46
    pred = np.zeros_like(gt)
    pred[0:4, 0:4] = 11
    pred[0:4, 5:9] = 22
    pred[6:8, 8:10] = 46
    pred[10:12, 12:16] = 41
    return pred, gt


def test_tooth_metrics_match_brute_force():
    pred, gt = hand_made()
    ours, truth = tooth_metrics(pred, gt), brute_force(pred, gt)
    assert ours["dice_by_fdi"] == pytest.approx(truth["dice"])
    assert ours["dice_by_fdi"] == pytest.approx({11: 1.0, 21: 0.0, 31: 0.0, 46: 0.4})
    assert (ours["matched"], ours["numbered_right"], ours["true_teeth"], ours["pred_teeth"]) == \
        (truth["matched"], truth["numbered_right"], truth["true"], truth["pred"]) == (2, 1, 4, 4)
    assert ours["detection_precision"] == ours["detection_recall"] == ours["detection_f1"] == 0.5
    assert ours["numbering_accuracy"] == 0.5
    assert ours["tooth_dice"] == pytest.approx(1.4 / 4)


def test_tooth_metrics_random_maps_match_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = np.kron(rng.choice([0, 11, 12, 21, 36], size=(3, 4)), np.ones((3, 3), np.int64)).astype(np.uint8)
        pred = gt.copy()
        flips = rng.random(gt.shape) < 0.2
        pred[flips] = rng.choice([0, 11, 12, 22], size=int(flips.sum()))
        ours, truth = tooth_metrics(pred, gt), brute_force(pred, gt)
        assert ours["dice_by_fdi"] == pytest.approx(truth["dice"])
        assert (ours["matched"], ours["numbered_right"]) == (truth["matched"], truth["numbered_right"])


@pytest.mark.parametrize("case", ["nothing predicted", "nothing true", "both empty"])
def test_one_image_is_summarised_as_it_is_scored(case):
    """The pooled figures of a single image are its own: a model that finds no tooth where there are some has
    detection precision 0 in summary.json as in per_image.csv (the summary once said 1)."""
    _, gt = hand_made()
    empty = np.zeros_like(gt)
    pred, truth = {"nothing predicted": (empty, gt), "nothing true": (gt, empty), "both empty": (empty, empty)}[case]
    row, summary = tooth_metrics(pred, truth), summarize_teeth([tooth_metrics(pred, truth)])
    for name in ("tooth_dice", "detection_precision", "detection_recall", "detection_f1", "numbering_accuracy"):
        assert summary[name] == row[name], name  # per-tooth Dice of an image without teeth predicted empty: once 0
    # Nothing matched numbers nothing right (it once read a vacuous 1); only an empty image predicted empty is 1.
    assert row["numbering_accuracy"] == (1.0 if case == "both empty" else 0.0)


def test_summary_pools_teeth_over_images():
    pred, gt = hand_made()
    perfect = tooth_metrics(gt, gt)
    summary = summarize_teeth([tooth_metrics(pred, gt), perfect])
    assert summary["tooth_dice"] == pytest.approx((1.4 + 4) / 8)  # each tooth counts once
    assert summary["detection_recall"] == pytest.approx(6 / 8) and summary["detection_precision"] == pytest.approx(6 / 8)
    assert summary["numbering_accuracy"] == pytest.approx(5 / 6)
    assert summary["by_fdi"][21] == {"dice": 0.5, "teeth": 2}


def test_empty_images_follow_the_binary_convention():
    empty = np.zeros((4, 4), np.uint8)
    assert tooth_metrics(empty, empty)["tooth_dice"] == 1.0 and tooth_metrics(empty, empty)["detection_f1"] == 1.0
    stray = empty.copy()
    stray[0, 0] = 11
    assert tooth_metrics(stray, empty)["tooth_dice"] == 0.0 and tooth_metrics(stray, empty)["detection_precision"] == 0.0


def test_validation_score_equals_eval_per_tooth_dice():
    pred, gt = hand_made()
    classes = [0, 11, 21, 22, 31, 41, 46]
    index = {n: i for i, n in enumerate(classes)}
    logits = torch.nn.functional.one_hot(torch.from_numpy(np.vectorize(index.get)(pred)), len(classes)).permute(2, 0, 1)[None]
    targets = torch.from_numpy(np.vectorize(index.get)(gt))[None]
    assert tooth_dice_per_image(logits.float(), targets).item() == pytest.approx(tooth_metrics(pred, gt)["tooth_dice"])


def test_loss_is_small_when_right_and_ignores_unknown_teeth():
    targets = torch.randint(0, 4, (2, 8, 8))
    right = torch.nn.functional.one_hot(targets, 4).permute(0, 3, 1, 2).float() * 20
    loss = CEDiceLoss(1.0)
    assert loss(right, targets).item() < 1e-3 < loss(-right, targets).item()
    ignored = targets.clone()
    ignored[0, :4] = IGNORE_INDEX
    wrong_there = right.clone()
    wrong_there[0, :, :4] = -wrong_there[0, :, :4]  # wrong only where the truth is unknown
    assert loss(wrong_there, ignored).item() == pytest.approx(loss(right, ignored).item(), abs=1e-4)


def test_mirror_label_map_swaps_quadrants_with_the_pixels():
    labels = np.array([[18, 11, 21, 28], [48, 41, 31, 38], [55, 0, 0, 65]], np.uint8)
    assert mirror_label_map(labels).tolist() == [[18, 11, 21, 28], [48, 41, 31, 38], [55, 0, 0, 65]]
    assert mirror_label_map(labels[:, :2]).tolist() == [[21, 28], [31, 38], [0, 65]]


def test_flip_tta_renumbers_the_flipped_view():
    """A model that knows anatomy (tooth 11 on the image's left, 21 on its right) predicts the same with flip
    TTA, once the flipped view's teeth are renumbered; averaging the raw flipped view would blur 11 into 21."""
    classes = [0, 11, 21]

    def model(x):
        width = x.shape[-1]
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        logits[:, 1, :, : width // 2] = 5
        logits[:, 2, :, width // 2:] = 5
        return logits

    batch = torch.zeros(1, 1, 4, 8)
    plain = predict_probabilities(model, batch, False, None, torch.device("cpu"), mirror=mirror_channels(classes))
    tta = predict_probabilities(model, batch, True, None, torch.device("cpu"), mirror=mirror_channels(classes))
    assert torch.allclose(plain, tta)
    naive = predict_probabilities(model, batch, True, None, torch.device("cpu"), mirror=[0, 1, 2])
    assert not torch.allclose(plain, naive)


def test_keep_largest_region_only_removes_strays():
    labels = np.zeros((6, 10), np.uint8)
    labels[0:3, 0:3], labels[5, 9], labels[0:2, 6:8] = 11, 11, 21
    kept = keep_largest_region(labels)
    assert kept[5, 9] == 0 and (kept[0:3, 0:3] == 11).all() and (kept[0:2, 6:8] == 21).all()
    assert ((kept == labels) | (kept == 0)).all()


def test_join_strays_gives_each_stray_the_tooth_it_borders_most():
    labels = np.zeros((8, 14), np.uint8)
    labels[0:4, 0:4], labels[0:4, 4:6] = 11, 12  # tooth 11, and tooth 12 beside it
    labels[1:3, 1:3] = 21  # a fragment numbered 21 inside tooth 11 (21's tooth is larger, at the right)
    labels[0:5, 9:14] = 21
    labels[3, 6] = 21  # a fragment touching tooth 12 only
    labels[7, 0] = 12  # a stray that touches no tooth
    dropped, joined = keep_largest_region(labels), keep_largest_region(labels, join_strays=True)
    assert (dropped[1:3, 1:3] == 0).all() and dropped[3, 6] == 0 and dropped[7, 0] == 0
    assert (joined[1:3, 1:3] == 11).all() and joined[3, 6] == 12 and joined[7, 0] == 0
    assert ((joined == labels) | (dropped != labels)).all()  # only the strays change
    assert (keep_largest_region(joined) == joined).all()  # every number is one region again


@pytest.mark.parametrize("seed", range(6))
def test_ordered_assignment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 5))
    score = rng.normal(size=(rows, int(rng.integers(rows, 7))))
    best = max(itertools.combinations(range(score.shape[1]), rows), key=lambda ks: score[range(rows), list(ks)].sum())
    assert ordered_assignment(score) == list(best)


def arch_probabilities(label_map: np.ndarray, classes: list[int], second: dict[int, int]) -> np.ndarray:
    """(C, H, W) probabilities: 0.5 on each pixel's label; where second[label] is given, 0.4 on that number."""
    probs = np.full((len(classes),) + label_map.shape, 0.1 / len(classes), np.float32)
    for number in np.unique(label_map):
        where = label_map == number
        probs[classes.index(int(number)), where] = 0.5
        if int(number) in second:
            probs[classes.index(second[int(number)]), where] = 0.4
    return probs


def test_arch_order_renumbers_teeth_out_of_order():
    classes = [0] + mirror_closed([14, 15, 16, 17, 46, 55])
    labels = np.zeros((12, 20), np.uint8)
    labels[1:5, 1:4], labels[1:5, 5:8], labels[1:5, 9:12] = 16, 14, 15  # left to right: 16, then 15 and 14 swapped
    labels[7:11, 1:4], labels[7:11, 5:8] = 46, 55  # a lower tooth and a primary tooth, alone in their rows
    labels[0, 19] = 14  # a stray
    probs = arch_probabilities(labels, classes, second={14: 15, 15: 14})
    ordered = order_along_arch(labels, probs, classes)
    assert (ordered[1:5, 5:8] == 15).all() and (ordered[1:5, 9:12] == 14).all() and (ordered[1:5, 1:4] == 16).all()
    assert (ordered[7:11, 1:4] == 46).all() and (ordered[7:11, 5:8] == 55).all() and ordered[0, 19] == 0


def test_arch_order_keeps_teeth_in_order_and_follows_the_probabilities():
    classes = [0] + mirror_closed([14, 15, 16, 17])
    labels = np.zeros((6, 20), np.uint8)
    labels[1:5, 1:4], labels[1:5, 5:8], labels[1:5, 9:12] = 16, 15, 14
    probs = arch_probabilities(labels, classes, second={16: 17, 15: 16, 14: 15})
    assert (order_along_arch(labels, probs, classes) == labels).all()
    # A stray, the only region of its number, out of order: it neither moves the teeth nor is itself a tooth.
    strayed = labels.copy()
    strayed[5, 18] = 17
    probs = arch_probabilities(strayed, classes, second={16: 17, 15: 16, 14: 15})
    assert (order_along_arch(strayed, probs, classes) == strayed).all()
    # Two teeth given one number: the right one is renumbered where its probability points, not dropped.
    swapped = labels.copy()
    swapped[1:5, 9:12] = 16
    probs = arch_probabilities(labels, classes, second={})
    probs[classes.index(16), 1:5, 9:12], probs[classes.index(14), 1:5, 9:12] = 0.5, 0.3
    assert (order_along_arch(swapped, probs, classes) == labels).all()


def test_teeth_at_size_gives_the_probability_of_each_final_label():
    classes = [0] + mirror_closed([14, 15])
    labels = np.zeros((4, 12), np.uint8)
    labels[:, 1:4], labels[:, 6:9] = 14, 15  # 15 left of 14 in the upper row: out of order
    probs = torch.from_numpy(arch_probabilities(labels, classes, second={14: 15, 15: 14}))[None]
    ordered, confidence = teeth_at_size(probs, labels.shape, classes, arch_order=True)
    assert (ordered[:, 1:4] == 15).all() and (ordered[:, 6:9] == 14).all()
    assert np.allclose(confidence[:, 1:4], 0.4) and np.allclose(confidence[:, 0], probs[0, 0, :, 0])
    plain, confidence = teeth_at_size(probs, labels.shape, classes)
    assert (plain == labels).all() and np.allclose(confidence[:, 1:4], 0.5)


def test_a_union_mask_decides_tooth_or_background_and_the_teeth_decide_the_number():
    classes = [0] + mirror_closed([14, 15])
    probs = torch.zeros(1, len(classes), 4, 6)
    probs[0, 0] = 0.6  # background most probable everywhere
    probs[0, classes.index(14), :, :3], probs[0, classes.index(15), :, 3:] = 0.3, 0.3
    union = np.zeros((4, 6), bool)
    union[1:3, 1:5] = True
    labels, confidence = teeth_at_size(probs, union.shape, classes, union=union)
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 1:3], expected[1:3, 3:5] = 14, 15
    assert (labels == expected).all()
    assert np.allclose(confidence[union], 0.3) and np.allclose(confidence[~union], 0.6)
    assert (teeth_at_size(probs, union.shape, classes)[0] == 0).all()  # without the union: all background


def test_tooth_chart_gives_area_box_and_probability():
    labels = np.zeros((6, 10), np.uint8)
    labels[1:3, 2:6] = 36
    confidence = np.full(labels.shape, 0.5, np.float32)
    confidence[1, 2:6] = 0.9
    assert tooth_chart(labels, confidence) == [{"fdi": 36, "area_px": 8, "bbox": [2, 1, 5, 2], "mean_probability": 0.7}]


# ----------------------------------------------------------------------------------------------
# End to end on the phantom, whose teeth carry FDI numbers
# ----------------------------------------------------------------------------------------------
TEETH_NET = ["--img-height", "64", "--img-width", "128", "--batch-size", "4", "--num-workers", "0", "--cpu",
             "--base-channels", "8"]


def test_validation_binary_dice_scores_the_union_eval_scores():
    """A pixel whose classes are [background 0.4, 11 0.3, 21 0.3] is background to eval's argmax, though its tooth
    probabilities add up to 0.6; a tooth the model has no class for (IGNORE_INDEX) is still a tooth."""
    import finetune_seg

    probs = torch.tensor([[[0.4, 0.1], [0.1, 0.8]], [[0.3, 0.8], [0.1, 0.1]], [[0.3, 0.1], [0.8, 0.1]]])
    labels = torch.tensor([[[0, 1], [IGNORE_INDEX, 0]]])
    task = finetune_seg.TeethTask([0, 11, 21], lambda_dice=1.0)
    out = task.val_step(lambda image: probs.log()[None], (torch.zeros(1, 1, 2, 2), labels, {}))
    eval_union = segmentation_metrics(probs.argmax(0).numpy() > 0, labels[0].numpy() != 0)["dice"]
    assert out["binary_dice"].item() == pytest.approx(eval_union) == 1.0  # once 0.5


def test_validation_loss_does_not_depend_on_the_batching():
    """The loss's Dice term is a batch Dice: validation sums each image's own, so one batch of three, three of
    one and two processes' shares record the same val/loss."""
    import finetune_seg

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 3, 8, 8), torch.randint(0, 3, (3, 8, 8))
    task = finetune_seg.TeethTask([0, 11, 21], lambda_dice=1.0)

    def loss(index: list[int]) -> float:
        return task.val_step(lambda image: logits[index], (torch.zeros(len(index), 1, 8, 8), labels[index], {}))["loss"].item()

    assert loss([0, 1, 2]) == pytest.approx(loss([0]) + loss([1]) + loss([2]), rel=1e-6)
    assert loss([0, 1, 2]) == pytest.approx(loss([0, 2]) + loss([1]), rel=1e-6)


def test_a_per_tooth_run_resumes_only_as_one(teeth_run, phantom_data_root, tmp_path):
    import finetune_seg
    from utils import ToothSegError

    with pytest.raises(ToothSegError, match="is a per-tooth model; resume it with --task teeth"):
        finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(tmp_path),
                           "--epochs", "3", "--resume", str(teeth_run), *TEETH_NET])


@pytest.fixture(scope="module")
def teeth_run(phantom_data_root, tmp_path_factory):
    import finetune_seg

    out = tmp_path_factory.mktemp("teeth_run")
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--task", "teeth",
                       "--checkpoint-dir", str(out), "--epochs", "2", "--augment", "strong", *TEETH_NET])
    return out


def test_the_checkpoint_records_mirror_closed_classes(teeth_run):
    from checkpoints import open_checkpoint

    ckpt = open_checkpoint(teeth_run)
    classes = ckpt.tooth_classes
    assert classes[0] == 0 and classes == sorted(classes) and len(classes) == ckpt.model.args["out_channels"]
    assert set(mirror_channels(classes)) == set(range(len(classes)))  # closed: every class has its mirror
    assert ckpt.task["task"] == "teeth" and 11 in classes and 21 in classes
    assert ckpt.task["augment"] == "strong"
    assert ckpt.task["mask_resize"] == "nearest"  # label maps are never blended, whatever the binary default


def test_eval_scores_per_tooth_as_the_predictor_predicts(teeth_run, tmp_path):
    import csv
    import json

    import eval as eval_script
    from teeth import read_label_map
    from predict import load_predictor
    from utils import read_image, to_uint8

    eval_script.main(["--checkpoint", str(teeth_run), "--out-dir", str(tmp_path / "ev"), "--cpu", "--workers", "0",
                      "--top-k", "1"])
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    teeth = summary["teeth"]
    assert 0 <= teeth["tooth_dice"] <= 1 and teeth["true_teeth"] > 0 and set(TOOTH_KEYS) <= set(teeth)
    assert not set(TOOTH_KEYS) & set(summary["metrics"])  # per-image means under the same names read differently
    rows = list(csv.DictReader((tmp_path / "ev" / "per_image.csv").open()))
    per_tooth = list(csv.DictReader((tmp_path / "ev" / "per_tooth.csv").open()))
    assert sum(int(r["teeth"]) for r in per_tooth) == teeth["true_teeth"] == sum(int(r["true_teeth"]) for r in rows)
    predictor = load_predictor(teeth_run)
    row = rows[0]
    labels = predictor.predict(to_uint8(read_image(row["image"])))
    assert tooth_metrics(labels, read_label_map(row["teeth"]))["tooth_dice"] == pytest.approx(float(row["tooth_dice"]))
    overlay = read_image(next((tmp_path / "ev" / "worst").glob("*.png")))
    assert overlay.shape[0] == 2 * int(row["height"])  # prediction above truth


def test_predict_mode_writes_label_maps_and_tooth_charts(teeth_run, phantom_data_root, tmp_path):
    import json
    import shutil

    import eval as eval_script
    from utils import read_image

    folder = tmp_path / "new_xrays"
    folder.mkdir()
    for image in sorted((phantom_data_root / "processed_2d" / "adult" / "unlabeled" / "images").glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    eval_script.main(["--checkpoint", str(teeth_run), "--images-dir", str(folder), "--save-preds", str(tmp_path / "charts"),
                      "--cpu", "--workers", "0"])
    for image in folder.iterdir():
        labels = read_image(tmp_path / "charts" / image.name)
        chart = json.loads((tmp_path / "charts" / f"{image.stem}.json").read_text())
        assert labels.shape == read_image(image).shape and (chart["height"], chart["width"]) == labels.shape
        assert [t["fdi"] for t in chart["teeth"]] == sorted(int(n) for n in np.unique(labels) if n)
        for tooth in chart["teeth"]:
            x0, y0, x1, y1 = tooth["bbox"]
            assert tooth["area_px"] == int((labels == tooth["fdi"]).sum()) == int((labels[y0:y1 + 1, x0:x1 + 1] == tooth["fdi"]).sum())
            assert 0 < tooth["mean_probability"] <= 1


@pytest.mark.parametrize("flags, options", [(["--arch-order"], {"arch_order": True}),
                                            (["--one-region-per-tooth", "--join-strays"],
                                             {"one_region": True, "join_strays": True})])
def test_eval_with_cleaning_scores_what_the_predictor_predicts(teeth_run, tmp_path, flags, options):
    import csv
    import json

    import eval as eval_script
    from predict import load_predictor
    from teeth import read_label_map
    from utils import read_image, to_uint8

    eval_script.main(["--checkpoint", str(teeth_run), "--out-dir", str(tmp_path / "ev"), "--cpu", "--workers", "0",
                      "--top-k", "0", *flags])
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["arch_order"] is ("--arch-order" in flags) and summary["join_strays"] is ("--join-strays" in flags)
    row = next(csv.DictReader((tmp_path / "ev" / "per_image.csv").open()))
    labels = load_predictor(teeth_run).predict(to_uint8(read_image(row["image"])), **options)
    assert tooth_metrics(labels, read_label_map(row["teeth"]))["tooth_dice"] == pytest.approx(float(row["tooth_dice"]))


def test_join_strays_alone_is_refused(teeth_run):
    import eval as eval_script
    from utils import ToothSegError

    with pytest.raises(ToothSegError, match="--join-strays says what becomes of the strays"):
        eval_script.main(["--checkpoint", str(teeth_run), "--join-strays", "--cpu"])


def test_binary_only_flags_are_refused_for_a_per_tooth_model(teeth_run):
    import eval as eval_script
    from utils import ToothSegError

    with pytest.raises(ToothSegError, match="is a per-tooth model; --min-component and --save-probs apply to binary"):
        eval_script.main(["--checkpoint", str(teeth_run), "--min-component", "0.001", "--cpu"])


@pytest.fixture(scope="module")
def binary_run(phantom_data_root, tmp_path_factory):
    """A binary model on the teeth_run's data, at a larger input than the per-tooth model's."""
    import finetune_seg

    out = tmp_path_factory.mktemp("binary_run")
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(out),
                       "--epochs", "3", "--lr", "3e-3", *TEETH_NET, "--img-height", "96", "--img-width", "192"])
    return out


def test_union_from_a_binary_model_outlines_the_teeth_the_per_tooth_model_numbers(teeth_run, binary_run, tmp_path,
                                                                                   monkeypatch):
    import json

    import eval as eval_script
    import visualizer
    from predict import ensemble_chart, load_predictor
    from utils import read_image, to_uint8

    # One image per forward pass, as the re-predictions below: in fp32 (a CPU without bf16) oneDNN's result depends
    # on the batch in the last bit, which flipped one near-tied pixel of this barely trained model's argmax.
    eval_script.main(["--checkpoint", str(teeth_run), str(teeth_run), "--union-from", str(binary_run), "--tta",
                      "--save-preds", str(tmp_path / "preds"), "--out-dir", str(tmp_path / "ev"), "--cpu", "--workers", "0",
                      "--top-k", "0", "--batch-size", "1"])
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["union_from"] == [str(load_predictor(binary_run).path)]
    teeth, binary = load_predictor(teeth_run), load_predictor(binary_run)
    for saved in sorted((tmp_path / "preds").glob("*.png")):
        image = to_uint8(read_image(Path(json.loads(saved.with_suffix(".json").read_text())["image"])))
        union = binary.predict(image, tta=True)
        labels = read_image(saved)
        assert union.any() and ((labels > 0) == union).all()  # the binary model's mask, every pixel numbered
        expected, _ = teeth_at_size(teeth.probabilities(teeth.network_input(image), tta=True), image.shape,
                                    teeth.classes, union=union)
        assert (labels == expected).all()
        # The notebook's re-prediction (an ensemble of the model with itself) gives the same map.
        assert (ensemble_chart([teeth, teeth], image, tta=True, union_from=[binary])[0] == labels).all()
    # The notebook's gallery re-predicts with both members and the union.
    members = []
    monkeypatch.setattr(visualizer, "ensemble_chart", lambda *args: members.append(args) or ensemble_chart(*args))
    visualizer.tooth_chart_gallery(tmp_path / "ev" / "per_image.csv", k=1)
    assert members and all(len(args[0]) == 2 and [p.path for p in args[7]] == [binary.path] for args in members)


def test_union_from_needs_a_per_tooth_model_and_binary_unions(teeth_run, binary_run):
    import eval as eval_script
    from utils import ToothSegError

    with pytest.raises(ToothSegError, match="is a binary model; --union-from gives a per-tooth model"):
        eval_script.main(["--checkpoint", str(binary_run), "--union-from", str(binary_run), "--cpu"])
    with pytest.raises(ToothSegError, match="is a per-tooth model; --union-from takes binary checkpoints"):
        eval_script.main(["--checkpoint", str(teeth_run), "--union-from", str(teeth_run), "--cpu"])


def test_a_binary_checkpoint_initialises_all_but_the_head(phantom_data_root, binary_run, tmp_path, capsys):
    import finetune_seg

    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), *TEETH_NET, "--task", "teeth",
                       "--init-from", str(binary_run), "--checkpoint-dir", str(tmp_path / "teeth"), "--epochs", "1"])
    report = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("init from"))
    assert "missing 0" in report and "mismatched 2 (head.conv.weight, head.conv.bias)" in report, report


def test_a_per_tooth_checkpoint_of_other_numbers_initialises_the_head_by_number(teeth_run):
    """As many classes but other FDI numbers: matched by shape, tooth 21's channel would start as another's."""
    from checkpoints import load_pretrained, open_checkpoint

    source = open_checkpoint(teeth_run)
    old = source.tooth_classes
    lacking = [number for number in FDI_ALL if number not in old][:2]
    new = [0] + sorted([c for c in old if c not in (0, 11, 21)] + lacking)  # as many classes, two numbers it lacks
    assert len(new) == len(old) and len(lacking) == 2
    torch.manual_seed(0)
    model = source.model.build()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, teeth_run, new)
    weights, trained = model.state_dict(), source.state.weights
    assert report.by_number == ["head.conv.weight", "head.conv.bias"] and report.mismatched == []
    assert "matched by FDI number" in report.summary() and f"{len(old) - 3} of this model's {len(new) - 1} teeth" \
        in report.summary()
    for key in report.by_number:
        for row, number in enumerate(new):
            expected = trained[key][old.index(number)] if number in old else initial[key][row]
            assert torch.equal(weights[key][row], expected), (key, number)
    assert all(torch.equal(weights[k], trained[k]) for k in weights
               if not k.startswith("head.") and not k.endswith("num_batches_tracked"))
    same = load_pretrained(source.model.build(), teeth_run, old)  # the same numbers: matched as they are
    assert same.by_number == [] and "FDI" not in same.summary()


def phantom_size(sample) -> tuple[int, int]:
    from utils import read_image

    return read_image(sample.image).shape[:2]


def test_training_flips_renumber_the_teeth(phantom_data_root):
    from data import TeethDataset, build_eval_transform
    from index import samples_from_index

    sample = samples_from_index(phantom_data_root / "sts2d_index.csv", phantom_data_root / "processed_2d", ("train",))[0]
    classes = [0] + sorted(FDI_ALL)
    size = phantom_size(sample)  # at the image's own size: nearest-neighbour resizing is not mirror-symmetric
    plain = TeethDataset([sample], build_eval_transform(*size), classes)[0]
    flips = TeethDataset([sample], build_eval_transform(*size), classes, mirror=True, seed=3)
    seen = set()
    for epoch in range(8):
        flips.set_epoch(epoch)
        image, target, _ = flips[0]
        flipped = torch.equal(image, plain[0].flip(-1))
        assert flipped or torch.equal(image, plain[0])
        number = np.asarray(classes)[target.numpy()]
        expected = np.asarray(classes)[plain[1].numpy()]
        assert (number == (mirror_label_map(expected) if flipped else expected)).all()
        seen.add(flipped)
    assert seen == {True, False}


def _centred_label_map() -> np.ndarray:
    labels = np.zeros((64, 128), np.uint8)
    labels[24:40, 40:60], labels[24:40, 68:88] = 11, 21  # two teeth, symmetric about the centre
    return labels


@pytest.mark.parametrize("augment", ["standard", "strong"])
def test_augmentation_keeps_tooth_numbers(augment):
    from data import build_train_transform

    transform = build_train_transform(64, 128, flip=False, augment=augment)
    image, labels = np.full((64, 128), 128, np.uint8), _centred_label_map()
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=labels)["mask"].numpy()
        assert set(np.unique(out)) <= {0, 11, 21}  # nearest-neighbour: no blended numbers


def test_strong_augmentation_moves_teeth_that_standard_only_rotates_in_place():
    from data import build_train_transform

    image, labels = np.full((64, 128), 128, np.uint8), _centred_label_map()

    def centroid_shifts(augment):
        transform = build_train_transform(64, 128, flip=False, augment=augment)
        shifts = []
        for seed in range(30):
            transform.set_random_seed(seed)
            ys, xs = np.nonzero(transform(image=image, mask=labels)["mask"].numpy())
            shifts.append(np.hypot(ys.mean() - 31.5, xs.mean() - 63.5))
        return max(shifts)

    assert centroid_shifts("standard") < 0.6 < 1.5 < centroid_shifts("strong")  # a centred pair rotates in place


def test_unknown_augmentation_lists_the_valid_ones():
    from data import build_train_transform
    from utils import ToothSegError

    with pytest.raises(ToothSegError, match="valid: standard, strong"):
        build_train_transform(64, 128, augment="heavy")


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_rotation_tta_rotates_each_prediction_back(amp_dtype):
    """A model whose logits follow its input: with rotation TTA the tooth stays where it is in the image
    (each view's prediction rotated back), and only interpolation differs; not rotating back would move it."""
    from predict import rotate

    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(96.0), indexing="ij")
    batch = torch.exp(-((y - 16) ** 2 + (x - 30) ** 2) / 40)[None, None] * 4 - 2

    def model(inputs):
        return 3 * inputs

    cpu = torch.device("cpu")
    plain = predict_probabilities(model, batch, False, None, cpu)
    rotated = predict_probabilities(model, batch, True, amp_dtype, cpu, rotations=(-15.0, 15.0))
    assert (rotated - plain).abs().max() < 0.05
    not_back = torch.sigmoid(model(rotate(batch, 15.0, -2.0)))
    assert (not_back - plain).abs().max() > 0.5


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("mirror", [None, [0, 1, 2]])  # (three classes each its own mirror: the views agree)
def test_views_that_agree_average_to_what_each_says(tta, mirror):
    """Every view predicting the same probabilities gives them back at every pixel: a rotated view weighs
    what it covers once rotated back (the corners of a wide frame it loses, and the mirror wedges when flipped)."""
    def model(inputs):
        return torch.tensor([0.0, 3.0, -1.0] if mirror else [3.0])[None, :, None, None].expand(
            inputs.shape[0], -1, *inputs.shape[-2:])

    logits = model(torch.zeros(1, 1, 1, 1))
    expected = torch.sigmoid(logits) if mirror is None else torch.softmax(logits, 1)
    probs = predict_probabilities(model, torch.zeros(1, 1, 64, 160), tta, None, torch.device("cpu"), mirror=mirror,
                                  rotations=(-10.0, 10.0))
    assert (probs - expected).abs().max() < 1e-5


def test_rotation_and_flip_tta_keep_the_tooth_numbers():
    classes = [0, 11, 21]

    def model(inputs):  # tooth 11 on the image's left half, 21 on its right, as in a panoramic
        logits = torch.zeros(inputs.shape[0], 3, *inputs.shape[-2:])
        logits[:, 1, :, : inputs.shape[-1] // 2] = 5
        logits[:, 2, :, inputs.shape[-1] // 2:] = 5
        return logits

    batch = torch.zeros(1, 1, 32, 64)
    cpu = torch.device("cpu")
    plain = predict_probabilities(model, batch, False, None, cpu, mirror=mirror_channels(classes)).argmax(1)
    tta = predict_probabilities(model, batch, True, None, cpu, mirror=mirror_channels(classes),
                                rotations=(-5.0, 5.0)).argmax(1)
    away_from_midline = torch.cat([torch.arange(0, 24), torch.arange(40, 64)])
    assert torch.equal(plain[..., away_from_midline], tta[..., away_from_midline])
