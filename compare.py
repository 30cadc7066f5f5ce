"""Compare two evaluations of the same images: B − A for each metric, with a paired 95% bootstrap CI.

  python compare.py A B            A and B: eval.py output folders (or their per_image.csv files)

Each resample draws the images with replacement once and scores A and B on the same draw, so the CI is the
paired one that the README quotes. Every figure is computed as eval.py's summary.json computes it: binary
metrics are means over images; per-tooth Dice is pooled over all true teeth, and detection precision, recall,
F1 and numbering accuracy over the pooled tooth counts. A verdict is given only where the CI excludes zero.
Both evaluations must have scored the same images (the same pair ids); choose between recipes on the
validation split and score the test split once.

Examples:
  python eval.py --checkpoint runs/a --split val --out-dir runs/a/eval_val
  python eval.py --checkpoint runs/b --split val --tta --out-dir runs/b/eval_val_tta
  python compare.py runs/a/eval_val runs/b/eval_val_tta
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from utils import ToothSegError, bootstrap_ci, decimals, make_parser, positive_int, run_cli

Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class Statistic:
    """A dataset figure as a ratio of sums over images, Σ numerator / Σ denominator (a mean when the
    denominator is 1), so that a resample of the images gives the figure of that resample."""
    label: str
    numerator: Callable[[Columns], np.ndarray]
    denominator: Callable[[Columns], np.ndarray]
    higher_is_better: bool = True
    # When nothing is counted (no teeth predicted, matched, ...) summarize_teeth's figure is 1, but 0 when one of
    # these counts is not 0 (no tooth predicted where there are some).
    zero_if_any: tuple[str, ...] = ()

    def of(self, columns: Columns, rows: np.ndarray) -> np.ndarray:
        """The figure of each resample (each row of `rows` indexes images)."""
        num, den = self.numerator(columns)[rows].sum(axis=-1), self.denominator(columns)[rows].sum(axis=-1)
        counted = sum((columns[name][rows].sum(axis=-1) for name in self.zero_if_any), 0)
        empty = np.where(counted > 0, 0.0, 1.0)
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def image_mean(label: str, column: str, higher_is_better: bool = True) -> Statistic:
    return Statistic(label, lambda c: c[column], lambda c: np.ones_like(c[column]), higher_is_better)


BINARY_STATISTICS = {
    "dice": image_mean("Dice", "dice"),
    "iou": image_mean("IoU", "iou"),
    "precision": image_mean("precision", "precision"),
    "recall": image_mean("recall", "recall"),
    "hd95": image_mean("HD95 px", "hd95", higher_is_better=False),
    "assd": image_mean("ASSD px", "assd", higher_is_better=False),
}
# What summarize_teeth reports, from the counts each per-tooth per_image.csv row carries.
TOOTH_STATISTICS = {
    "tooth_dice": Statistic("per-tooth Dice", lambda c: c["tooth_dice"] * c["true_teeth"], lambda c: c["true_teeth"],
                            zero_if_any=("pred_teeth",)),
    "detection_precision": Statistic("detection precision", lambda c: c["matched"], lambda c: c["pred_teeth"],
                                     zero_if_any=("true_teeth",)),
    "detection_recall": Statistic("detection recall", lambda c: c["matched"], lambda c: c["true_teeth"],
                                  zero_if_any=("pred_teeth",)),
    "detection_f1": Statistic("detection F1", lambda c: 2 * c["matched"], lambda c: c["true_teeth"] + c["pred_teeth"]),
    "numbering_accuracy": Statistic("numbering accuracy", lambda c: c["numbered_right"], lambda c: c["matched"],
                                    zero_if_any=("true_teeth", "pred_teeth")),
    **{name: BINARY_STATISTICS[name] for name in ("dice", "hd95")},
}
TOOTH_COLUMNS = ("tooth_dice", "true_teeth", "pred_teeth", "matched", "numbered_right")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    inputs = parser.add_argument_group("evaluations")
    inputs.add_argument("base", type=Path, metavar="A", help="the reference: an eval.py output folder or its per_image.csv")
    inputs.add_argument("other", type=Path, metavar="B", help="the evaluation compared with A, of the same images")
    stats = parser.add_argument_group("bootstrap")
    stats.add_argument("--bootstrap", type=positive_int, default=10000, metavar="N", help="resamples of the images")
    stats.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the resampling")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
SHARES = ("dice", "iou", "precision", "recall", "tooth_dice")  # figures within [0, 1]
SAME_IMAGE_COLUMNS = ("height", "width", "gt_pixels", "true_teeth")  # those that each evaluation recorded


def per_image_path(path: Path) -> Path:
    csv_path = path / "per_image.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise ToothSegError(f"{csv_path}: not found; give an eval.py output folder (it holds per_image.csv) or the file")
    return csv_path


def read_per_image(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an eval.py per_image.csv by pair id."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: as a spreadsheet saves it, with a BOM
        rows = list(csv.DictReader(f))
    if not rows or "pair_id" not in rows[0] or "dice" not in rows[0]:
        raise ToothSegError(f"{path}: not an eval.py per_image.csv (no rows, or no pair_id and dice columns)")
    damaged = next(((line, row) for line, row in enumerate(rows, start=2) if None in row or None in row.values()), None)
    if damaged is not None:  # DictReader fills a short row with None values and files a long one's rest under None
        line, row = damaged
        raise ToothSegError(f"{path}: line {line} has {'fewer' if None in row.values() else 'more'} values than "
                            f"columns; score it again with eval.py")
    by_id = {row["pair_id"]: row for row in rows}
    if len(by_id) < len(rows):
        twice = next(pair_id for pair_id, n in Counter(row["pair_id"] for row in rows).items() if n > 1)
        raise ToothSegError(f"{path}: image {twice} has more than one row; score it again with eval.py")
    return by_id


def columns(rows: dict[str, dict[str, str]], ids: list[str], names: list[str], path: Path) -> Columns:
    missing = [name for name in names if name not in next(iter(rows.values()))]
    if missing:
        raise ToothSegError(f"{path}: has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}; "
                            f"score it again with eval.py")
    try:
        values = {name: np.array([float(rows[i][name]) for i in ids]) for name in names}
    except ValueError as exc:
        raise ToothSegError(f"{path}: a value is not a number ({exc}); score it again with eval.py") from None
    for name, column in values.items():  # eval.py writes finite figures, the ratios within [0, 1]
        wrong = ~np.isfinite(column) | (column < 0) | ((column > 1) if name in SHARES else False)
        if wrong.any():
            first = int(np.flatnonzero(wrong)[0])
            raise ToothSegError(f"{path}: {name} of image {ids[first]} is {rows[ids[first]][name]}, which eval.py "
                                f"never writes; score it again with eval.py")
    return values


def describe(path: Path) -> str:
    """What was evaluated, from summary.json beside per_image.csv when it is there."""
    summary_path = path.parent / "summary.json"
    if not summary_path.is_file():
        return str(path)
    summary = json.loads(summary_path.read_text())
    models = summary.get("ensemble") or [summary.get("checkpoint")]
    options = [f"split {summary.get('split')}"] + (["flip TTA"] if summary.get("tta") else []) + \
              ([f"union from {', '.join(map(str, summary['union_from']))}"] if summary.get("union_from") else [])
    return f"{path.parent} ({', '.join(map(str, models))}; {', '.join(options)})"


# ----------------------------------------------------------------------------------------------
# Comparing
# ----------------------------------------------------------------------------------------------
def verdict(low: float, high: float, higher_is_better: bool) -> str:
    if low > 0 or high < 0:
        return "B better" if (low > 0) == higher_is_better else "B worse"
    return "no clear difference"


def compare(base_path: Path, other_path: Path, n: int, seed: int) -> list[dict]:
    """One row per metric: A's and B's figure, B − A and its paired 95% CI, the verdict and the number of images."""
    base, other = read_per_image(base_path), read_per_image(other_path)
    if set(base) != set(other):
        raise ToothSegError(f"{base_path} and {other_path} scored different images ({len(set(base) - set(other))} "
                            f"only in A, {len(set(other) - set(base))} only in B); compare evaluations of one split")
    # Pair ids are file names, which two folders can share (1.png of two clinics): one image has one size and
    # one ground truth in both evaluations.
    same_image = [c for c in SAME_IMAGE_COLUMNS if c in next(iter(base.values())) and c in next(iter(other.values()))]
    unlike = [i for i in sorted(base) if any(base[i][c] != other[i][c] for c in same_image)]
    if unlike:
        raise ToothSegError(f"{base_path} and {other_path}: {unlike[0]} has another {'/'.join(same_image)} in each "
                            f"({len(unlike)} of {len(base)} images), so they are other images of the same names; "
                            f"compare evaluations of the same images")
    teeth = [all(c in next(iter(rows.values())) for c in TOOTH_COLUMNS) for rows in (base, other)]
    if teeth[0] != teeth[1]:
        raise ToothSegError(f"{base_path} and {other_path}: one is a per-tooth evaluation and the other a binary one; "
                            "compare evaluations of one task")
    statistics = TOOTH_STATISTICS if teeth[0] else BINARY_STATISTICS
    ids = sorted(base)
    needed = sorted({"dice", "hd95", *(TOOTH_COLUMNS if teeth[0] else BINARY_STATISTICS)})
    a, b = columns(base, ids, needed, base_path), columns(other, ids, needed, other_path)
    everything = np.arange(len(ids))
    results = []
    for statistic in statistics.values():
        rng = np.random.default_rng(seed)  # the same draws for every metric, as one paired resampling
        low, high = bootstrap_ci(lambda rows: statistic.of(b, rows) - statistic.of(a, rows), len(ids), n, rng)
        value_a, value_b = float(statistic.of(a, everything)), float(statistic.of(b, everything))
        results.append({"metric": statistic.label, "a": value_a, "b": value_b, "difference": value_b - value_a,
                        "low": low, "high": high, "verdict": verdict(low, high, statistic.higher_is_better),
                        "n": len(ids)})
    return results


def main(argv=None):
    args = parse_args(argv)
    base_path, other_path = per_image_path(args.base), per_image_path(args.other)
    results = compare(base_path, other_path, args.bootstrap, args.seed)
    print(f"A  {describe(base_path)}\nB  {describe(other_path)}\n"
          f"B − A with a paired 95% bootstrap CI over the {results[0]['n']} images both scored "
          f"({args.bootstrap} resamples, seed {args.seed}):\n")
    print(f"{'metric':<20} {'A':>9} {'B':>9} {'B − A':>9}   {'95% CI':<20}  verdict")
    for r in results:
        d = decimals(r["difference"], r["low"], r["high"])
        ci = f"[{r['low']:+.{d}f}, {r['high']:+.{d}f}]"
        print(f"{r['metric']:<20} {r['a']:>9.4f} {r['b']:>9.4f} {r['difference']:>+9.{d}f}   {ci:<20}  {r['verdict']}")


if __name__ == "__main__":
    run_cli(main)
