"""Per-tooth labels in: labelme polygons rasterised by teeth.py's rules, PNG label maps checked,
prepare_sts2d.py --teeth-dir writing label maps and the index's `teeth` column, Sample.teeth, the
phantom's own label maps and their left/right mirror, and the two real sets (skipped when absent)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import fbf
import phantom
import prepare_sts2d
import teeth
from index import INDEX_COLUMNS, INDEX_NAME, PROCESSED_NAME, list_images, read_index, samples_from_folders, segmentation_splits
from utils import ToothSegError, read_image

REPO = Path(__file__).resolve().parents[1]
TUFTS_DIR = REPO.parent / "shared/data/tufts-dev"  # beside conftest's UFBA_DIR


# ----------------------------------------------------------------------------------------------
# Helpers: tiny images, label maps and labelme files the tests write themselves
# ----------------------------------------------------------------------------------------------
def polygon(label: str, points, shape_type: str = "polygon") -> dict:
    return {"label": label, "points": [list(map(float, p)) for p in points], "group_id": None,
            "shape_type": shape_type, "flags": {}}


def box(label: str, x0: int, y0: int, x1: int, y1: int) -> dict:
    """A rectangle drawn as a polygon: it fills columns x0..x1 and rows y0..y1, both inclusive."""
    return polygon(label, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def write_labelme(path: Path, shapes: list[dict], height: int = 6, width: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": f"{path.stem}.png",
                                "imageData": None, "imageHeight": height, "imageWidth": width}))
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)
    return path


def error_line(call) -> str:
    with pytest.raises(ToothSegError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def run_prepare(argv: list[str], capsys) -> str:
    prepare_sts2d.main(argv)
    return capsys.readouterr().out


def teeth_rows(data_root: Path) -> dict[str, dict]:
    """pair_id -> mask row of the index."""
    return {r["pair_id"]: r for r in read_index(data_root / INDEX_NAME) if r["is_mask"]}


def centre_x(label_map: np.ndarray, numbers) -> float:
    """Mean column of the pixels of the given FDI numbers, as a share of the width."""
    return float(np.nonzero(np.isin(label_map, list(numbers)))[1].mean() / label_map.shape[1])


# ----------------------------------------------------------------------------------------------
# teeth.py: labels, rasterising, rules
# ----------------------------------------------------------------------------------------------
def test_labels_name_fdi_numbers():
    expected = dict(zip("ABCDE", (55, 54, 53, 52, 51))) | dict(zip("FGHIJ", (61, 62, 63, 64, 65))) \
        | dict(zip("KLMNO", (75, 74, 73, 72, 71))) | dict(zip("PQRST", (81, 82, 83, 84, 85)))
    assert teeth.UNIVERSAL_PRIMARY == expected
    assert all(teeth.fdi_from_label(letter, "x.json") == number for letter, number in expected.items())
    # A..J run across the upper arch, K..T back along the lower one: A/J and K/T are mirror teeth.
    assert teeth.mirror_fdi(expected["A"]) == expected["J"] and teeth.mirror_fdi(expected["K"]) == expected["T"]
    for text, number in [("14 - 1st Premolar", 14), ("48 - 3rd Molar", 48), ("21", 21), (" 36-1st Molar ", 36)]:
        assert teeth.fdi_from_label(text, "x.json") == number


@pytest.mark.parametrize("label", ["19 - Extra", "U", "a", "tooth", "1", "", "114 - Canine"])
def test_unknown_label_is_one_line_naming_label_and_file(tmp_path, label):
    path = write_labelme(tmp_path / "case7.json", [box("11", 0, 0, 2, 2), box(label, 4, 0, 6, 2)])
    message = error_line(lambda: teeth.rasterise_labelme(path, 6, 8))
    assert str(path) in message and repr(label) in message and "FDI number" in message


def test_labelme_rasterises_to_the_exact_label_map(tmp_path):
    """Each polygon fills its boundary and inside; a letter is a primary tooth; a polygon reaching
    outside the image is clipped and counted."""
    path = write_labelme(tmp_path / "t.json", [box("11 - Central Incisor", 0, 0, 1, 1), box("J", 3, 1, 4, 3),
                                               polygon("46", [(6, 4), (9, 4), (9, 7), (6, 7)])])
    found = teeth.rasterise_labelme(path, 6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[0:2, 0:2] = 11
    expected[1:4, 3:5] = 65
    expected[4:6, 6:8] = 46  # clipped at the bottom-right corner
    assert found.label_map.dtype == np.uint8 and np.array_equal(found.label_map, expected)
    assert (found.polygons, found.overlap_pixels, found.clipped) == (3, 0, 1)


@pytest.mark.parametrize("small_first", [True, False])
def test_overlapping_polygons_give_the_shared_pixels_to_the_smaller_tooth(tmp_path, small_first):
    big, small = box("36", 0, 0, 5, 4), box("75", 4, 2, 7, 5)  # they share columns 4-5 of rows 2-4
    path = write_labelme(tmp_path / "o.json", [small, big] if small_first else [big, small])
    found = teeth.rasterise_labelme(path, 6, 8)
    assert found.overlap_pixels == 6
    assert (found.label_map == 75).sum() == 16 and (found.label_map == 36).sum() == 30 - 6
    assert np.all(found.label_map[2:5, 4:6] == 75)


def test_a_file_without_polygons_labels_no_tooth(tmp_path):
    found = teeth.rasterise_labelme(write_labelme(tmp_path / "e.json", []), 6, 8)
    assert found.polygons == 0 and not found.label_map.any()


@pytest.mark.parametrize("shapes, size, expected", [
    ([box("11", 0, 0, 2, 2) | {"shape_type": "rectangle"}], (6, 8), "'11' is a rectangle"),
    ([box("11", 0, 0, 2, 2), box("11 - Central Incisor", 4, 0, 6, 2)], (6, 8), "two polygons are labelled 11"),
    ([box("11", 20, 20, 30, 30)], (6, 8), "wholly outside the 8x6 image"),
    ([box("11", 0, 0, 2, 2)], (12, 8), "drawn on a 8x6 image"),
    ([polygon("11", [(0, 0), (2, 2)])], (6, 8), "at least 3 points"),
])
def test_bad_labelme_files_are_one_line_naming_the_file_and_the_fix(tmp_path, shapes, size, expected):
    path = write_labelme(tmp_path / "bad.json", shapes)
    message = error_line(lambda: teeth.rasterise_labelme(path, *size))
    assert message.startswith(f"{path}: ") and expected in message


def test_a_file_that_is_not_labelme_is_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    assert "not a labelme JSON file" in error_line(lambda: teeth.rasterise_labelme(tmp_path / "x.json", 6, 8))
    (tmp_path / "y.json").write_text('{"shapes": []}')
    assert "not a labelme file" in error_line(lambda: teeth.rasterise_labelme(tmp_path / "y.json", 6, 8))


def test_label_map_images_are_checked(tmp_path):
    good = np.array([[0, 11], [48, 85]], np.uint8)
    assert np.array_equal(teeth.as_label_map(np.dstack([good] * 3), "g.png"), good)  # identical channels are fine
    assert "not FDI tooth numbers" in error_line(lambda: teeth.as_label_map(np.array([[0, 99]], np.uint8), "b.png"))
    colour = np.dstack([good, good, good + 1])
    assert "colour image" in error_line(lambda: teeth.as_label_map(colour, "c.png"))


def test_teeth_module_imports_no_torch():
    code = "import sys, teeth; print(sorted(m for m in ('torch', 'albumentations') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# ----------------------------------------------------------------------------------------------
# prepare_sts2d.py --teeth-dir
# ----------------------------------------------------------------------------------------------
SIZE = (6, 8)


def tiny_sources(root: Path) -> dict[str, np.ndarray]:
    """images/ p0..p3, masks/ p0..p3, teeth/: p0 a PNG label map, p1 a labelme file, p2 a labelme file
    without polygons, p3 nothing. Returns the expected label maps of p0 and p1."""
    rng = np.random.default_rng(0)
    p0 = np.zeros(SIZE, np.uint8)
    p0[1:3, 1:3], p0[3:5, 5:7] = 21, 83
    p1 = np.zeros(SIZE, np.uint8)
    p1[0:2, 0:2], p1[2:4, 3:5] = 14, 55
    for i in range(4):
        write_png(root / "images" / f"p{i}.png", rng.integers(0, 256, SIZE, dtype=np.uint8))
        mask = np.zeros(SIZE, np.uint8)
        mask[:, :4] = 255
        write_png(root / "masks" / f"p{i}.png", mask)
    write_png(root / "teeth" / "p0.png", p0)
    write_labelme(root / "teeth" / "p1.json", [box("14 - 1st Premolar", 0, 0, 1, 1), box("A", 3, 2, 4, 3)])
    write_labelme(root / "teeth" / "p2.json", [])
    return {"p0": p0, "p1": p1}


def test_prepare_writes_label_maps_and_the_index_column(tmp_path, capsys):
    expected = tiny_sources(tmp_path / "src")
    out = tmp_path / "out"
    printed = run_prepare(["--images-dir", str(tmp_path / "src/images"), "--masks-dir", str(tmp_path / "src/masks"),
                           "--teeth-dir", str(tmp_path / "src/teeth"), "--data-root", str(out), "--val-ratio", "0",
                           "--test-ratio", "0"], capsys)
    rows = teeth_rows(out)
    assert {pid: r["teeth"] for pid, r in rows.items()} == {"p0": "adult/labeled/teeth/p0.png",
                                                            "p1": "adult/labeled/teeth/p1.png", "p2": None, "p3": None}
    for pair_id, label_map in expected.items():
        written = cv2.imread(str(out / PROCESSED_NAME / rows[pair_id]["teeth"]), cv2.IMREAD_UNCHANGED)
        assert written.dtype == np.uint8 and np.array_equal(written, label_map)
    assert (read_image(out / PROCESSED_NAME / rows["p1"]["rel_path"]) == 255).sum() == 24  # the given mask, kept
    assert "per-tooth label maps: 2 of 4 labelled pairs" in printed and "2x: 21 1" in printed and "5x: 55 1" in printed
    assert "note: 1 labelme files have no polygons" in printed and "p2.json" in printed
    assert "note: 1 labelled images have no teeth file" in printed and "p3.png" in printed
    assert "labelme: 2 polygons in 2 files" in printed
    assert open(out / INDEX_NAME).readline().strip().split(",") == list(INDEX_COLUMNS)

    train = segmentation_splits(out / PROCESSED_NAME)["train"]
    assert {s.pair_id: s.teeth for s in train} == {pid: None if r["teeth"] is None else out / PROCESSED_NAME / r["teeth"]
                                                   for pid, r in rows.items()}
    assert all(s.teeth is None for s in samples_from_folders(out / PROCESSED_NAME))
    assert all("/teeth/" not in p.as_posix() for p in list_images(out / PROCESSED_NAME))  # a label map is no image

    rerun = ["--images-dir", str(tmp_path / "src/images"), "--masks-dir", str(tmp_path / "src/masks"), "--data-root",
             str(out), "--val-ratio", "0", "--test-ratio", "0"]
    assert "up to date" in run_prepare(rerun + ["--teeth-dir", str(tmp_path / "src/teeth")], capsys)
    (out / PROCESSED_NAME / rows["p0"]["teeth"]).unlink()  # a label map lost: it said "up to date"
    assert "up to date" not in run_prepare(rerun + ["--teeth-dir", str(tmp_path / "src/teeth")], capsys)
    assert (out / PROCESSED_NAME / rows["p0"]["teeth"]).is_file()
    (tmp_path / "src/teeth").rename(tmp_path / "src/teeth2")
    printed = run_prepare(rerun + ["--teeth-dir", str(tmp_path / "src/teeth2")], capsys)  # another teeth dir rebuilds
    label_maps = sum(r["teeth"] is not None for r in teeth_rows(out).values())
    assert 0 < label_maps and f"wrote 8 images and masks and {label_maps} per-tooth label maps to" in printed
    assert teeth_rows(out)["p0"]["teeth"] == "adult/labeled/teeth/p0.png"


def test_labelme_files_beside_their_images_as_labelme_saves_them(tmp_path, capsys):
    """--teeth-dir = --images-dir: the X-rays there are no label maps (each was 'another teeth file of the same
    name', and the fix offered was to remove the annotation)."""
    expected = tiny_sources(tmp_path / "src")
    (tmp_path / "src/teeth/p1.json").rename(tmp_path / "src/images/p1.json")
    (tmp_path / "src/teeth").rename(tmp_path / "src/images/teeth")  # label maps may still sit in a teeth folder
    images = str(tmp_path / "src/images")
    run_prepare(["--images-dir", images, "--masks-dir", str(tmp_path / "src/masks"), "--teeth-dir", images,
                 "--data-root", str(tmp_path / "out"), "--val-ratio", "0", "--test-ratio", "0"], capsys)
    rows = teeth_rows(tmp_path / "out")
    assert sorted(rows) == ["p0", "p1", "p2", "p3"] and rows["p2"]["teeth"] is None
    for pair_id, label_map in expected.items():
        written = cv2.imread(str(tmp_path / "out" / PROCESSED_NAME / rows[pair_id]["teeth"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(written, label_map), pair_id


def test_a_labelme_file_drawn_on_another_image_is_noted(tmp_path, capsys):
    tiny_sources(tmp_path / "src")
    moved = tmp_path / "src/teeth/p1.json"
    moved.write_text(moved.read_text().replace('"p1.png"', '"..\\\\images\\\\p3.png"'))  # as labelme on Windows writes it
    printed = run_prepare(["--images-dir", str(tmp_path / "src/images"), "--masks-dir", str(tmp_path / "src/masks"),
                           "--teeth-dir", str(tmp_path / "src/teeth"), "--data-root", str(tmp_path / "out")], capsys)
    assert "note: 1 labelme files name another image in their imagePath, e.g. " in printed and "p1.json (p3.png)" in printed


def test_without_masks_the_mask_is_the_union_of_the_teeth(tmp_path, capsys):
    expected = tiny_sources(tmp_path / "src")
    argv = ["--images-dir", str(tmp_path / "src/images"), "--teeth-dir", str(tmp_path / "src/teeth"),
            "--data-root", str(tmp_path / "out")]
    message = error_line(lambda: prepare_sts2d.main(argv))  # p3 has no teeth file, p2 one that labels no tooth
    assert "p3.png: labelled image without a teeth file" in message
    run_prepare(argv + ["--skip-bad"], capsys)
    rows = teeth_rows(tmp_path / "out")
    assert sorted(rows) == ["p0", "p1"] and {r["mask_threshold"] for r in rows.values()} == {0}
    for pair_id, label_map in expected.items():
        assert np.array_equal(read_image(tmp_path / "out" / PROCESSED_NAME / rows[pair_id]["rel_path"]),
                              np.where(label_map > 0, 255, 0))
    rejected = {Path(r["file"]).name: r["reason"] for r in csv.DictReader(open(tmp_path / "out" / "rejected.csv"))}
    assert sorted(rejected) == ["p2.json", "p3.png"] and "no polygons" in rejected["p2.json"]


@pytest.mark.parametrize("name, content, expected", [
    ("p0.png", np.full(SIZE, 99, np.uint8), "are not FDI tooth numbers"),
    ("p0.jpg", np.full(SIZE, 11, np.uint8), "a JPEG label map"),
    ("p0.png", np.zeros((3, 3), np.uint8), "label map size 3x3 differs"),
])
def test_a_bad_label_map_is_one_line_naming_the_file(tmp_path, name, content, expected):
    tiny_sources(tmp_path / "src")
    (tmp_path / "src/teeth/p0.png").unlink()
    write_png(tmp_path / "src/teeth" / name, content)
    message = error_line(lambda: prepare_sts2d.main(
        ["--images-dir", str(tmp_path / "src/images"), "--masks-dir", str(tmp_path / "src/masks"),
         "--teeth-dir", str(tmp_path / "src/teeth"), "--data-root", str(tmp_path / "out")]))
    assert message.startswith(str(tmp_path / "src/teeth" / name)) and expected in message and "--skip-bad" in message


def test_a_bad_labelme_file_stops_prepare_with_one_line_and_no_traceback(tmp_path):
    tiny_sources(tmp_path / "src")
    write_labelme(tmp_path / "src/teeth/p1.json", [box("Z", 0, 0, 2, 2)])
    result = subprocess.run([sys.executable, str(REPO / "prepare_sts2d.py"), "--images-dir", str(tmp_path / "src/images"),
                             "--masks-dir", str(tmp_path / "src/masks"), "--teeth-dir", str(tmp_path / "src/teeth"),
                             "--data-root", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "p1.json: unknown tooth label 'Z'" in result.stderr


def test_teeth_dir_needs_images_dir(tmp_path):
    assert "go with --images-dir" in error_line(lambda: prepare_sts2d.main(
        ["--synthetic", "3", "--teeth-dir", str(tmp_path), "--data-root", str(tmp_path / "out")]))
    (tmp_path / "images").mkdir()
    (tmp_path / "teeth").mkdir()
    assert "no label maps or labelme files" in error_line(lambda: prepare_sts2d.main(
        ["--images-dir", str(tmp_path / "images"), "--teeth-dir", str(tmp_path / "teeth"), "--data-root", str(tmp_path / "o")]))


def test_an_index_without_the_teeth_column_still_reads(tmp_path):
    with open(tmp_path / INDEX_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in INDEX_COLUMNS if c not in ("teeth", "mask_threshold")])
        writer.writeheader()
        writer.writerow({"rel_path": "adult/labeled/masks/a.png", "age_group": "adult", "label_status": "labeled",
                         "is_mask": True, "pair_id": "a", "split": "train", "width": 8, "height": 6, "sha1": "",
                         "dup_group": "a", "source": "folder"})
    assert read_index(tmp_path / INDEX_NAME)[0]["teeth"] is None


def test_fbf_copies_label_maps_unfiltered(tmp_path):
    for rel in ("adult/labeled/images/a.png", "adult/labeled/masks/a.png", "adult/labeled/teeth/a.png"):
        write_png(tmp_path / "in" / rel, np.zeros(SIZE, np.uint8))
    jobs, _, _ = fbf.find_jobs(tmp_path / "in", tmp_path / "out")
    assert {j.source.parent.name: j.copy_only for j in jobs} == {"images": False, "masks": True, "teeth": True}


# ----------------------------------------------------------------------------------------------
# The phantom's label maps
# ----------------------------------------------------------------------------------------------
def test_phantom_masks_are_unchanged_by_the_label_maps():
    """The label map is drawn beside the mask without touching the random stream: the masks (integer
    fills, so the same on every machine) hash as before, and the images come out the same either way."""
    digest = hashlib.sha1()
    for seed in range(3):
        for age in ("adult", "children"):
            image, mask, label_map = phantom.generate_panoramic_teeth(seed, 80, 160, age_group=age)
            assert all(np.array_equal(a, b) for a, b in zip((image, mask), phantom.generate_panoramic(seed, 80, 160, age)))
            assert np.array_equal(label_map > 0, mask > 0)
            digest.update(mask.tobytes())
    assert digest.hexdigest() == "052fb4cf84d42f4cb25f35f6d294cf92efeb42ce"


@pytest.mark.parametrize("age_group, seeds", [("adult", range(4)), ("children", range(3))])
def test_phantom_teeth_are_numbered_as_on_a_real_panoramic(age_group, seeds):
    """Quadrants 1, 4 (5, 8) on the image's left, numbers rising from the midline, and a left-right flip
    of the image matches teeth.mirror_label_map: the flipped map still has quadrant 1 on the left, with
    every tooth near where its namesake was."""
    for seed in seeds:
        _, mask, label_map = phantom.generate_panoramic_teeth(seed, age_group=age_group)
        teeth.check_label_map(label_map, "phantom")
        numbers = {int(n) for n in np.unique(label_map) if n}
        assert numbers <= set(teeth.PERMANENT) if age_group == "adult" else numbers & set(teeth.PRIMARY)
        for n in numbers & {teeth.mirror_fdi(n) for n in numbers}:  # each tooth and its namesake on the other side
            left = n // 10 in (1, 4, 5, 8)
            assert (centre_x(label_map, [n]) < centre_x(label_map, [teeth.mirror_fdi(n)])) == left, (seed, n)
        for quadrant in {n // 10 for n in numbers}:
            across = [centre_x(label_map, [n]) for n in sorted(n for n in numbers if n // 10 == quadrant)]
            assert across == sorted(across, reverse=quadrant in (1, 4, 5, 8)), (seed, quadrant)  # away from the midline
        flipped = teeth.mirror_label_map(label_map)
        assert np.array_equal(flipped > 0, mask[:, ::-1] > 0)
        for n in numbers & {int(n) for n in np.unique(flipped)}:
            assert abs(centre_x(flipped, [n]) - centre_x(label_map, [n])) < 0.05, (seed, n)


def test_synthetic_prepare_carries_label_maps(phantom_data_root):
    rows = read_index(phantom_data_root / INDEX_NAME)
    masks = [r for r in rows if r["is_mask"]]
    assert masks and all(r["teeth"] == r["rel_path"].replace("/masks/", "/teeth/") for r in masks)
    for r in masks[:3]:
        label_map = cv2.imread(str(phantom_data_root / PROCESSED_NAME / r["teeth"]), cv2.IMREAD_UNCHANGED)
        teeth.check_label_map(label_map, r["teeth"])
        assert np.array_equal(label_map > 0, read_image(phantom_data_root / PROCESSED_NAME / r["rel_path"]) > 0)
    splits = segmentation_splits(phantom_data_root / PROCESSED_NAME)
    assert all(s.teeth is not None and s.teeth.is_file() for part in splits.values() for s in part)


# ----------------------------------------------------------------------------------------------
# The real sets (a handful of files each; skipped when ../shared/data is absent)
# ----------------------------------------------------------------------------------------------
def linked_subset(tmp_path: Path, folders: dict[str, Path], names: list[str]) -> dict[str, Path]:
    """Folders of symbolic links to a few real files (the data stays where it is)."""
    linked = {}
    for kind, folder in folders.items():
        linked[kind] = tmp_path / kind
        linked[kind].mkdir()
        for name in names:
            source = next(folder.glob(f"{name}.*"))
            os.symlink(source, linked[kind] / source.name)
    return linked


def test_real_ufba_label_maps(ufba_dir, tmp_path, capsys):
    if not (ufba_dir / "teeth_fdi").is_dir():
        pytest.skip(f"no teeth_fdi in {ufba_dir}")
    names = ["cate1-00002", "cate1-00005", "cate1-00008"]
    linked = linked_subset(tmp_path, {k: ufba_dir / k for k in ("images", "masks", "teeth_fdi")}, names)
    out = tmp_path / "out"
    printed = run_prepare(["--images-dir", str(linked["images"]), "--masks-dir", str(linked["masks"]),
                           "--teeth-dir", str(linked["teeth_fdi"]), "--data-root", str(out)], capsys)
    assert "IoU 1.000 on average (min 1.000, 3 pairs)" in printed  # the union of UFBA's teeth is its mask
    for pair_id, row in teeth_rows(out).items():
        label_map = read_image(out / PROCESSED_NAME / row["teeth"])
        assert np.array_equal(label_map, cv2.imread(str(ufba_dir / "teeth_fdi" / f"{pair_id}.png"), cv2.IMREAD_UNCHANGED))
        assert centre_x(label_map, range(11, 19)) < 0.5 < centre_x(label_map, range(21, 29))  # patient right on the left
        assert centre_x(label_map, range(41, 49)) < 0.5 < centre_x(label_map, range(31, 39))


def test_real_tufts_labelme(tmp_path, capsys):
    if not (TUFTS_DIR / "teeth_labelme").is_dir():
        pytest.skip(f"real data not found at {TUFTS_DIR}")
    names = ["1", "15", "1032"]  # permanent teeth; a mixed dentition with 17 lettered primary teeth; no polygons
    linked = linked_subset(tmp_path, {k: TUFTS_DIR / k for k in ("images", "masks", "teeth_labelme")}, names)
    out = tmp_path / "out"
    printed = run_prepare(["--images-dir", str(linked["images"]), "--masks-dir", str(linked["masks"]),
                           "--teeth-dir", str(linked["teeth_labelme"]), "--data-root", str(out)], capsys)
    assert "labelme: 56 polygons in 3 files" in printed and "note: 1 labelme files have no polygons" in printed
    rows = teeth_rows(out)
    assert rows["1032"]["teeth"] is None
    for pair_id in ("1", "15"):
        label_map = read_image(out / PROCESSED_NAME / rows[pair_id]["teeth"])
        shapes = json.loads((TUFTS_DIR / "teeth_labelme" / f"{pair_id}.json").read_text())["shapes"]
        assert {int(n) for n in np.unique(label_map) if n} == {teeth.fdi_from_label(s["label"], "") for s in shapes}
        mask = read_image(out / PROCESSED_NAME / rows[pair_id]["rel_path"]) > 0
        union = label_map > 0
        assert 0.75 < (union & mask).sum() / (union | mask).sum() < 0.95  # drawn apart from the masks (README: 0.88)
    mixed = read_image(out / PROCESSED_NAME / rows["15"]["teeth"])
    assert centre_x(mixed, [55]) < 0.5 < centre_x(mixed, [65]) and centre_x(mixed, [85]) < 0.5 < centre_x(mixed, [75])
