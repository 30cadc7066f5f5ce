"""The dataset index, datasets, transforms and the self-supervised corruptions (masking, Models Genesis)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from utils import ToothSegError

INDEX_NAME = "sts2d_index.csv"
PROCESSED_NAME = "processed_2d"
# One row per file under processed_2d/. `rel_path` is relative to processed_2d and uses "/".
# `pair_id` is unique among image rows; a mask row carries its image's pair_id.
# `split` is train/val/test for labelled pairs and pretrain for unlabelled images.
# `sha1` is the file's content hash; `dup_group` is shared by all pairs whose image bytes are identical.
INDEX_COLUMNS = (
    "rel_path", "age_group", "label_status", "is_mask", "pair_id",
    "split", "width", "height", "sha1", "dup_group", "source",
)
AGE_GROUPS = ("adult", "children")
LABEL_STATUSES = ("labeled", "unlabeled")
SPLITS = ("train", "val", "test", "pretrain")


def read_index(path: str | os.PathLike) -> list[dict]:
    """Read sts2d_index.csv into dicts (is_mask as bool, width/height as int)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = set(INDEX_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise ToothSegError(
                    f"{path}: not a ToothSeg index (missing columns {sorted(missing)}); rebuild it with prepare_sts2d.py --force")
            rows = list(reader)
    except OSError as exc:
        raise ToothSegError(f"{path}: cannot read index ({exc.strerror}); run prepare_sts2d.py first") from None
    for row in rows:
        row["is_mask"] = row["is_mask"].strip().lower() in ("true", "1")
        row["width"], row["height"] = int(row["width"]), int(row["height"])
    return rows


def write_index(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write the index atomically, in INDEX_COLUMNS order."""
    import io

    from utils import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in INDEX_COLUMNS})
    atomic_write_text(path, buf.getvalue())
