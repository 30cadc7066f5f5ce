"""compare.py: paired differences between two evaluations, computed as summary.json computes each figure,
with the paired bootstrap CI; one-line refusals for evaluations that cannot be paired."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compare
from metrics import summarize_teeth
from utils import mean_ci

REPO = Path(__file__).resolve().parents[1]
BINARY_COLUMNS = ("pair_id", "dice", "iou", "precision", "recall", "hd95", "assd")


def write_rows(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "per_image.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def binary_rows(rng: np.random.Generator, n: int = 12) -> list[dict]:
    return [{"pair_id": f"img{i:02d}", "dice": rng.uniform(0.8, 0.95), "iou": rng.uniform(0.7, 0.9),
             "precision": rng.uniform(0.8, 1), "recall": rng.uniform(0.8, 1), "hd95": rng.uniform(5, 20),
             "assd": rng.uniform(1, 3), "gt_pixels": 9000 + i, "height": 512, "width": 512} for i in range(n)]


def run_compare(*args) -> subprocess.CompletedProcess:
    """compare.py as a user runs it, in its own process."""
    return subprocess.run([sys.executable, str(REPO / "compare.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def table_row(output: str, label: str) -> list[str]:
    return next(line for line in output.splitlines() if line.startswith(label))[len(label):].split()


def test_a_uniform_shift_is_the_difference_and_its_ci(tmp_path):
    rows = binary_rows(np.random.default_rng(1))
    a = write_rows(tmp_path / "a", rows)
    b = write_rows(tmp_path / "b", [{**r, "dice": r["dice"] + 0.01, "hd95": r["hd95"] + 2} for r in reversed(rows)])
    result = run_compare(a, b / "per_image.csv")
    assert result.returncode == 0, result.stderr
    mean_dice = np.mean([r["dice"] for r in rows])
    assert table_row(result.stdout, "Dice") == [f"{mean_dice:.4f}", f"{mean_dice + 0.01:.4f}", "+0.0100", "[+0.0100,",
                                                "+0.0100]", "B", "better"]
    assert table_row(result.stdout, "HD95 px")[-2:] == ["B", "worse"]  # lower is better for a distance
    assert table_row(result.stdout, "IoU")[-3:] == ["no", "clear", "difference"]


def test_a_tiny_difference_is_printed_with_the_digits_that_show_it(tmp_path):
    rows = binary_rows(np.random.default_rng(4))
    a = write_rows(tmp_path / "a", rows)
    b = write_rows(tmp_path / "b", [{**r, "dice": r["dice"] + 3e-5} for r in rows])
    result = run_compare(a, b)
    assert result.returncode == 0, result.stderr
    # At four decimals this row read +0.0000 [+0.0000, +0.0000] beside "B better".
    assert table_row(result.stdout, "Dice")[2:] == ["+0.000030", "[+0.000030,", "+0.000030]", "B", "better"]
    assert table_row(result.stdout, "IoU")[2:5] == ["+0.0000", "[+0.0000,", "+0.0000]"]  # exactly zero: 4 decimals


def test_the_ci_is_the_paired_bootstrap_of_the_differences(tmp_path):
    rng = np.random.default_rng(2)
    rows = binary_rows(rng, 20)
    other = [{**r, "dice": r["dice"] + rng.normal(0.005, 0.01)} for r in rows]
    results = compare.compare(write_rows(tmp_path / "a", rows) / "per_image.csv",
                              write_rows(tmp_path / "b", other) / "per_image.csv", n=2000, seed=3)
    dice = next(r for r in results if r["metric"] == "Dice")
    delta = np.array([o["dice"] - r["dice"] for r, o in zip(rows, other)])
    assert dice["difference"] == pytest.approx(delta.mean())
    assert (dice["low"], dice["high"]) == pytest.approx(mean_ci(delta, 2000, np.random.default_rng(3)))


def tooth_rows(rng: np.random.Generator, n: int = 10, true_counts: list[int] | None = None) -> list[dict]:
    """Per-image rows as tooth_metrics gives them, with different numbers of teeth (and one image without), or
    with `true_counts` true teeth (another model's rows for the same images)."""
    rows = []
    for i in range(n):  # image 0 has no true teeth, image 1 no predicted ones
        true_teeth = (0 if i == 0 else int(rng.integers(3, 30))) if true_counts is None else true_counts[i]
        dice = {11 + k: float(rng.uniform(0.6, 0.95)) for k in range(true_teeth)}
        matched = 0 if i == 1 else int(rng.integers(0, true_teeth + 1))
        rows.append({"pair_id": f"t{i}", "dice": rng.uniform(0.8, 0.95), "hd95": rng.uniform(5, 20),
                     "true_teeth": true_teeth, "pred_teeth": 0 if i == 1 else matched + int(rng.integers(0, 3)),
                     "matched": matched,
                     "numbered_right": int(rng.integers(0, matched + 1)),
                     "tooth_dice": float(np.mean(list(dice.values()))) if dice else 1.0, "dice_by_fdi": dice})
    return rows


def test_per_tooth_figures_are_pooled_as_the_summary_pools_them(tmp_path):
    rng = np.random.default_rng(4)
    a_rows = tooth_rows(rng)
    b_rows = tooth_rows(rng, true_counts=[r["true_teeth"] for r in a_rows])  # the same images
    results = {r["metric"]: r for r in compare.compare(
        write_rows(tmp_path / "a", [{k: v for k, v in r.items() if k != "dice_by_fdi"} for r in a_rows]) / "per_image.csv",
        write_rows(tmp_path / "b", [{k: v for k, v in r.items() if k != "dice_by_fdi"} for r in b_rows]) / "per_image.csv",
        n=500, seed=0)}
    for side, rows in (("a", a_rows), ("b", b_rows)):
        summary = summarize_teeth(rows)
        for name, statistic in compare.TOOTH_STATISTICS.items():
            expected = summary[name] if name in summary else np.mean([r[name] for r in rows])
            assert results[statistic.label][side] == pytest.approx(expected), (side, name)
    # A resample of one image is that image's summary, also without true or without predicted teeth.
    columns = {k: np.array([float(r[k]) for r in a_rows]) for k in (*compare.TOOTH_COLUMNS, "dice", "hd95")}
    for i in range(3):
        summary = summarize_teeth([a_rows[i]])
        for name in ("tooth_dice", "detection_precision", "detection_recall", "detection_f1", "numbering_accuracy"):
            figure = compare.TOOTH_STATISTICS[name].of(columns, np.array([[i]]))[0]
            assert figure == pytest.approx(summary[name]), (i, name)


@pytest.mark.parametrize("a, b", [("unet_scratch_f1_s0", "unet_mim_f1_s0"),
                                  ("unet_scratch_teeth_f1_s0", "unet_binary_teeth_f1_s0")])
def test_the_figures_are_those_of_eval_summaries(tiny_study, a, b):
    """Real eval.py outputs (the tiny study's cells, binary and per-tooth): A and B are their summary.json figures."""
    import json

    folders = [tiny_study / "cells" / cell / "eval_test" for cell in (a, b)]
    results = {r["metric"]: r for r in compare.compare(*(f / "per_image.csv" for f in folders), n=200, seed=0)}
    for side, folder in zip("ab", folders):
        summary = json.loads((folder / "summary.json").read_text())
        statistics = compare.TOOTH_STATISTICS if "teeth" in a else compare.BINARY_STATISTICS
        for name, statistic in statistics.items():
            expected = summary["teeth"][name] if name in compare.TOOTH_COLUMNS + tuple(summary.get("teeth") or ()) \
                else summary["metrics"][name]["mean"]
            assert results[statistic.label][side] == pytest.approx(expected), (side, name)


def per_tooth_rows_of(images: list[dict]) -> list[dict]:
    """A per-tooth evaluation's rows for the same pair ids."""
    rows = tooth_rows(np.random.default_rng(6), len(images))
    return [{**{k: v for k, v in r.items() if k != "dice_by_fdi"}, "pair_id": image["pair_id"]}
            for r, image in zip(rows, images)]


@pytest.mark.parametrize("case, message", [("other images", "scored different images"), ("other task", "one task"),
                                           ("other images of the same names", "img03 has another height/width/gt_pixels"),
                                           ("no file", "not found"), ("not an eval", "not an eval.py per_image.csv"),
                                           ("columns missing", "has no iou, precision columns")])
def test_evaluations_that_cannot_be_paired_are_refused_in_one_line(tmp_path, case, message):
    rows = binary_rows(np.random.default_rng(5))
    a = write_rows(tmp_path / "a", rows)
    b = {"other images": lambda: write_rows(tmp_path / "b", rows[1:]),
         "other task": lambda: write_rows(tmp_path / "b", per_tooth_rows_of(rows)),
         "other images of the same names": lambda: write_rows(tmp_path / "b", [{**r, "gt_pixels": r["gt_pixels"] + (i > 2)}
                                                                               for i, r in enumerate(rows)]),
         "no file": lambda: tmp_path / "nowhere",
         "not an eval": lambda: write_rows(tmp_path / "b", [{"image": "x.png", "score": 1}]),
         "columns missing": lambda: write_rows(tmp_path / "b", [{k: v for k, v in r.items() if k not in ("iou", "precision")}
                                                                for r in rows])}[case]()
    result = run_compare(a, b)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(b) in result.stderr and message in result.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows + [rows[0]], "image img00 has more than one row"),        # the last row had won
    (lambda rows: [{**rows[0], "dice": "nan"}, *rows[1:]], "dice of image img00 is nan, which eval.py never writes"),
    (lambda rows: [*rows[:3], {**rows[3], "dice": 1.7}, *rows[4:]], "dice of image img03 is 1.7"),
    (lambda rows: [{**rows[0], "hd95": -5}, *rows[1:]], "hd95 of image img00 is -5"),
])
def test_figures_eval_never_writes_are_refused_in_one_line(tmp_path, edit, message):
    """A per_image.csv edited by hand: a repeated image, a NaN or a Dice outside [0, 1] were used as they were."""
    rows = binary_rows(np.random.default_rng(5))
    a, b = write_rows(tmp_path / "a", rows) / "per_image.csv", write_rows(tmp_path / "b", edit(rows)) / "per_image.csv"
    with pytest.raises(compare.ToothSegError, match=f"^{b}: {message}"):
        compare.compare(a, b, n=100, seed=0)


def test_a_spreadsheet_saved_copy_pairs_and_a_cut_row_is_named(tmp_path):
    rows = binary_rows(np.random.default_rng(5))
    a, b = write_rows(tmp_path / "a", rows) / "per_image.csv", write_rows(tmp_path / "b", rows) / "per_image.csv"
    b.write_bytes(b"\xef\xbb\xbf" + b.read_bytes())  # Excel's BOM
    assert all(r["difference"] == 0 for r in compare.compare(a, b, n=100, seed=0))
    lines = b.read_text(encoding="utf-8-sig").splitlines()
    b.write_text("\n".join(lines[:3] + [lines[3].rsplit(",", 2)[0]] + lines[4:]) + "\n")
    with pytest.raises(compare.ToothSegError, match="line 4 has fewer values than columns"):
        compare.compare(a, b, n=100, seed=0)


def test_help_shows_an_example():
    result = run_compare("--help")
    assert result.returncode == 0 and "python compare.py runs/a/eval_val" in result.stdout
