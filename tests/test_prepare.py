"""prepare_sts2d.py on every source (folder pair, real ufba425-dev, zip parts, raw tree, TG3K,
synthetic) and the unlabelled pools added to them, its bad-input errors, the split and duplicate
rules, mask binarisation, determinism, idempotency, and that it (and fbf.py) start without torch."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

import prepare_sts2d
from index import INDEX_COLUMNS, INDEX_NAME, PROCESSED_NAME, read_index, read_mask, segmentation_splits, write_index
from prepare_sts2d import split_sizes
from utils import ToothSegError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Helpers: small images the tests write themselves
# ----------------------------------------------------------------------------------------------
def image_bytes(seed: int, shape=(24, 48), dtype=np.uint8, ext=".png") -> bytes:
    rng = np.random.default_rng(seed)
    high = 65535 if dtype == np.uint16 else 255
    return cv2.imencode(ext, rng.integers(0, high, shape, dtype=dtype, endpoint=True))[1].tobytes()


def mask_bytes(seed: int, shape=(24, 48), value=1, ext=".png") -> bytes:
    """A mask whose foreground is a seed-dependent rectangle, drawn with `value` (not always 255)."""
    m = np.zeros(shape, np.uint8)
    y, x = seed % (shape[0] - 8), (3 * seed) % (shape[1] - 8)
    m[y:y + 8, x:x + 8] = value
    return cv2.imencode(ext, m)[1].tobytes()


def expected_mask(seed: int, shape=(24, 48)) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(mask_bytes(seed, shape, 255), np.uint8), cv2.IMREAD_GRAYSCALE)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def folder_pair(root: Path, n: int, start: int = 0) -> tuple[Path, Path]:
    files = {}
    for i in range(start, start + n):
        files[f"images/p{i:03d}.png"] = image_bytes(i)
        files[f"masks/p{i:03d}.png"] = mask_bytes(i)
    write_files(root, files)
    return root / "images", root / "masks"


def sts_files(adult=(6, 3), children=(4, 2), top="SD-Tooth/STS-2D-Tooth", names=("A-PXI", "C-PXI"),
              status=("Labeled", "Unlabeled"), kinds=("Image", "Mask")) -> dict[str, bytes]:
    """An STS-2D-Tooth tree: (labelled, unlabelled) counts per age group; folder names configurable."""
    files, seed = {}, 100
    for age, (n_labeled, n_unlabeled) in zip(names, (adult, children)):
        for i in range(n_labeled):
            files[f"{top}/{age}/{status[0]}/{kinds[0]}/{age[0]}{i}.png"] = image_bytes(seed)
            files[f"{top}/{age}/{status[0]}/{kinds[1]}/{age[0]}{i}.png"] = mask_bytes(seed)
            seed += 1
        for i in range(n_unlabeled):
            files[f"{top}/{age}/{status[1]}/{kinds[0]}/{age[0]}u{i}.png"] = image_bytes(seed)
            seed += 1
    return files


def zip_parts(folder: Path, files: dict[str, bytes], n_parts: int = 3, extra: dict[str, bytes] | None = None) -> list[Path]:
    """A zip of `files` split into SD-Tooth.zip.001..00n, like the Zenodo download."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**files, **(extra or {})}.items():
            z.writestr(name, data)
    data = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(data), n_parts + 1).astype(int)
    parts = []
    for k in range(n_parts):
        parts.append(folder / f"SD-Tooth.zip.{k + 1:03d}")
        parts[-1].write_bytes(data[cuts[k]:cuts[k + 1]])
    return parts


def run(argv: list[str], capsys) -> str:
    prepare_sts2d.main(argv)
    return capsys.readouterr().out


def error_of(argv: list[str]) -> str:
    with pytest.raises(ToothSegError) as info:
        prepare_sts2d.main(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def images_by(rows, key="pair_id"):
    return {r[key]: r for r in rows if not r["is_mask"]}


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def test_folder_pair_source(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "src", 8)
    # A 16-bit image, a 3-channel image and a mask stored with 0/1 values must all be normalised.
    (images / "p000.png").write_bytes(image_bytes(0, dtype=np.uint16))
    (images / "p001.png").write_bytes(image_bytes(1, shape=(24, 48, 3)))
    out = tmp_path / "out"
    printed = run(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out)], capsys)

    rows = read_index(out / INDEX_NAME)
    assert len(rows) == 16 and {(r["age_group"], r["label_status"], r["source"]) for r in rows} == {("adult", "labeled", "folder")}
    for r in rows:
        data = (out / PROCESSED_NAME / r["rel_path"]).read_bytes()
        assert hashlib.sha1(data).hexdigest() == r["sha1"]
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert arr.dtype == np.uint8 and arr.shape == (r["height"], r["width"]) == (24, 48)
        expected_dir = "masks" if r["is_mask"] else "images"
        assert r["rel_path"] == f"adult/labeled/{expected_dir}/{r['pair_id']}.png"
        if r["is_mask"]:
            assert np.array_equal(arr, expected_mask(int(r["pair_id"][1:])))
    source16 = cv2.imdecode(np.frombuffer(image_bytes(0, dtype=np.uint16), np.uint8), cv2.IMREAD_UNCHANGED)
    written16 = cv2.imread(str(out / PROCESSED_NAME / "adult/labeled/images/p000.png"), cv2.IMREAD_UNCHANGED)
    stretched = (source16 - source16.min()) / (source16.max() - source16.min()) * 255  # its own range onto 0..255
    assert np.abs(written16.astype(int) - stretched).max() <= 0.5
    for line in ("age_group: adult 16 / children 0", "label_status: labeled 16 / unlabeled 0", "is_mask: False 8 / True 8"):
        assert line in printed
    assert "split (images): train 6 " in printed and "val 1 " in printed and "test 1 " in printed


def test_dicom_images_pair_with_png_masks(tmp_path, capsys, write_dicom):
    images, masks = folder_pair(tmp_path / "src", 3)
    stored = np.random.default_rng(0).integers(0, 4096, (24, 48)).astype(np.uint16)  # 12-bit values
    for i in range(3):
        (images / f"p{i:03d}.png").unlink()
        write_dicom(images / f"p{i:03d}.dcm", stored + i, BitsStored=12, HighBit=11,
                    PhotometricInterpretation="MONOCHROME1" if i == 2 else "MONOCHROME2")
    run(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "out")], capsys)
    written = {r["pair_id"]: cv2.imread(str(tmp_path / "out" / PROCESSED_NAME / r["rel_path"]), cv2.IMREAD_UNCHANGED)
               for r in read_index(tmp_path / "out" / INDEX_NAME) if not r["is_mask"]}
    share = (stored - stored.min()) / (stored.max() - stored.min())  # no window: the whole range fills 0..255
    assert np.array_equal(written["p000"], np.rint(share * 255).astype(np.uint8))
    assert np.array_equal(written["p002"], np.rint((1 - share) * 255).astype(np.uint8))  # MONOCHROME1: inverted

    (images / "p001.dcm").write_bytes(b"DICOM in name only")
    message = error_of(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "bad")])
    assert message.startswith(f"{images / 'p001.dcm'}: cannot read as DICOM (") and "replace or remove it" not in message
    assert message.endswith("; fix or remove it, or pass --skip-bad to leave bad files out")


def test_pairs_by_name_not_by_order(tmp_path, capsys):
    """Sorted, the masks [a, b2, b_mask] don't line up with the images [a, b, b2]: pairing by
    stem (with the `_mask` suffix) must still give each image its own mask."""
    files = {"images/a.png": image_bytes(1), "images/b.png": image_bytes(2), "images/b2.png": image_bytes(3),
             "masks/a.png": mask_bytes(1), "masks/b_mask.png": mask_bytes(2), "masks/b2.png": mask_bytes(3)}
    write_files(tmp_path, files)
    out = tmp_path / "out"
    run(["--images-dir", str(tmp_path / "images"), "--masks-dir", str(tmp_path / "masks"), "--data-root", str(out)], capsys)
    for stem, seed in (("a", 1), ("b", 2), ("b2", 3)):
        mask = cv2.imread(str(out / PROCESSED_NAME / f"adult/labeled/masks/{stem}.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(mask, expected_mask(seed)), stem


def test_real_ufba425_dev(ufba_dir, tmp_path, capsys):
    out = tmp_path / "out"
    printed = run(["--images-dir", str(ufba_dir / "images"), "--masks-dir", str(ufba_dir / "masks"), "--data-root", str(out)], capsys)
    rows = read_index(out / INDEX_NAME)
    assert Counter(r["is_mask"] for r in rows) == {False: 322, True: 322}
    assert {r["pair_id"] for r in rows} == {p.stem for p in (ufba_dir / "images").glob("*.png")}
    assert Counter(r["split"] for r in rows if not r["is_mask"]) == {"train": 258, "val": 32, "test": 32}
    assert "is_mask: False 322 / True 322" in printed


def test_zip_parts_are_read_as_one_stream(tmp_path, capsys):
    files = sts_files()
    parts = zip_parts(tmp_path / "dl", files, extra={"SD-Tooth/STS-3D-Tooth/x/scan.png": image_bytes(9), "SD-Tooth/readme.txt": b"hi"})
    before = tree_digest(tmp_path / "dl")
    out = tmp_path / "out"
    printed = run(["--zip-dir", str(tmp_path / "dl"), "--data-root", str(out)], capsys)
    rows = read_index(out / INDEX_NAME)
    assert Counter((r["age_group"], r["label_status"], r["is_mask"]) for r in rows) == {
        ("adult", "labeled", False): 6, ("adult", "labeled", True): 6, ("adult", "unlabeled", False): 3,
        ("children", "labeled", False): 4, ("children", "labeled", True): 4, ("children", "unlabeled", False): 2}
    assert {r["source"] for r in rows} == {"zip"}
    assert "age_group: adult 15 / children 10" in printed
    written = cv2.imread(str(out / PROCESSED_NAME / "children/labeled/masks/C1.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(written, expected_mask(110))  # seeds: adult 100-108, then C0 = 109
    assert tree_digest(tmp_path / "dl") == before and len(parts) == 3  # the source is never modified
    assert not list(tmp_path.rglob("SD-Tooth.zip")) and not (out / "SD-Tooth").exists()  # no merged copy, no raw dump


def test_zip_missing_middle_part(tmp_path):
    zip_parts(tmp_path / "dl", sts_files())[1].unlink()
    message = error_of(["--zip-dir", str(tmp_path / "dl"), "--data-root", str(tmp_path / "out")])
    assert "SD-Tooth.zip.002" in message and "missing" in message


def test_zip_member_escaping_the_target_is_refused(tmp_path, capsys):
    evil = "SD-Tooth/STS-2D-Tooth/A-PXI/Labeled/Image/../../../../../../evil.png"
    zip_parts(tmp_path / "dl", sts_files(), extra={evil: image_bytes(5)})
    argv = ["--zip-dir", str(tmp_path / "dl"), "--data-root", str(tmp_path / "out")]
    message = error_of(argv)
    assert evil in message and "escapes" in message
    printed = run(argv + ["--skip-bad"], capsys)
    rejected = read_csv(tmp_path / "out" / "rejected.csv")
    assert [r["file"].endswith(evil) for r in rejected] == [True] and "skipped 1 bad files" in printed
    assert not list(tmp_path.rglob("evil.png"))


def test_corrupt_zip(tmp_path):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "SD-Tooth.zip.001").write_bytes(b"PK\x03\x04 this is not really a zip" * 20)
    message = error_of(["--zip-dir", str(tmp_path / "dl"), "--data-root", str(tmp_path / "out")])
    assert "SD-Tooth.zip.001" in message and "zip" in message


def test_raw_tree_with_odd_case_folders(tmp_path, capsys):
    files = sts_files(adult=(3, 1), children=(3, 1), top="sd-tooth/sts-2D-TOOTH", names=("a-Pxi", "C-PXI"),
                      status=("LABELED", "unlabeled"), kinds=("image", "MASKS"))
    write_files(tmp_path / "raw", files)
    out = tmp_path / "out"
    for raw_dir in (tmp_path / "raw", tmp_path / "raw/sd-tooth/sts-2D-TOOTH"):  # an ancestor, or the folder itself
        run(["--raw-dir", str(raw_dir), "--data-root", str(out), "--force"], capsys)
        rows = read_index(out / INDEX_NAME)
        assert Counter((r["age_group"], r["label_status"], r["is_mask"]) for r in rows) == {
            ("adult", "labeled", False): 3, ("adult", "labeled", True): 3, ("adult", "unlabeled", False): 1,
            ("children", "labeled", False): 3, ("children", "labeled", True): 3, ("children", "unlabeled", False): 1}
        assert {r["source"] for r in rows} == {"raw"}


def tg3k_tree(root: Path, n: int, val: list[int]) -> None:
    """TG3K's layout: n JPEG images and masks named 0.jpg .. and the json listing `val`."""
    files = {}
    for i in range(n):
        files[f"thyroid-image/{i}.jpg"] = image_bytes(i, shape=(40, 30), ext=".jpg")
        files[f"thyroid-mask/{i}.jpg"] = mask_bytes(i, shape=(40, 30), value=255, ext=".jpg")
    write_files(root, files)
    (root / "tg3k-trainval.json").write_text(json.dumps({"train": [i for i in range(n) if i not in val], "val": val}))


def test_tg3k_split_follows_its_json(tmp_path, capsys):
    n = 12  # names 0.jpg .. 11.jpg: numeric order differs from text order ("10" < "2")
    tg3k_tree(tmp_path / "data/tg3k", n, val=[2, 10, 11])
    out = tmp_path / "out"
    run(["--tg3k-dir", str(tmp_path / "data"), "--data-root", str(out), "--val-ratio", "0.2"], capsys)
    rows = read_index(out / INDEX_NAME)
    assert {(r["age_group"], r["label_status"], r["source"]) for r in rows} == {("adult", "labeled", "tg3k")}
    splits = {pid: r["split"] for pid, r in images_by(rows).items()}
    assert {r["mask_threshold"] for r in rows if r["is_mask"]} == {127}  # JPEG masks, by the general rule
    assert {pid for pid, s in splits.items() if s == "test"} == {"2", "10", "11"}
    assert Counter(splits.values()) == {"train": 7, "val": 2, "test": 3}
    for i in range(n):  # JPEG noise in the masks is gone: exactly the drawn square, 0/255
        mask = cv2.imread(str(out / PROCESSED_NAME / f"adult/labeled/masks/{i}.png"), cv2.IMREAD_GRAYSCALE)
        assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask, expected_mask(i, (40, 30)))


def test_synthetic_fixture_is_a_usable_data_root(phantom_data_root):
    rows = read_index(phantom_data_root / INDEX_NAME)
    images = [r for r in rows if not r["is_mask"]]
    assert len(images) == 24 and sum(r["is_mask"] for r in rows) == 8
    assert {r["source"] for r in rows} == {"synthetic"} and {(r["width"], r["height"]) for r in rows} == {(640, 320)}
    for split in ("train", "val", "test"):
        assert {r["age_group"] for r in images if r["split"] == split} == {"adult", "children"}
    assert all(r["split"] == "pretrain" for r in images if r["label_status"] == "unlabeled")
    mask = cv2.imread(str(phantom_data_root / PROCESSED_NAME / next(r["rel_path"] for r in rows if r["is_mask"])), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(mask)) == {0, 255}
    splits = segmentation_splits(phantom_data_root / PROCESSED_NAME)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def _undecodable(images, masks):
    (images / "p002.png").write_bytes(b"\x89PNG but truncated")
    return images / "p002.png", "cannot decode"


def _mask_size(images, masks):
    (masks / "p003.png").write_bytes(mask_bytes(3, shape=(20, 48)))
    return masks / "p003.png", "size 48x20 differs"


def _mask_without_image(images, masks):
    (masks / "p099.png").write_bytes(mask_bytes(99))
    return masks / "p099.png", "mask without an image"


def _image_without_mask(images, masks):
    (masks / "p001.png").unlink()
    return images / "p001.png", "without a mask"


@pytest.mark.parametrize("defect", [_undecodable, _mask_size, _mask_without_image, _image_without_mask])
def test_bad_input_is_one_line_naming_the_file(tmp_path, defect):
    images, masks = folder_pair(tmp_path / "src", 5)
    bad_file, reason = defect(images, masks)
    message = error_of(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "out")])
    assert message.startswith(str(bad_file)) and reason in message and "--skip-bad" in message
    assert not (tmp_path / "out" / INDEX_NAME).exists() and not (tmp_path / "out" / PROCESSED_NAME).exists()


def test_empty_source(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    message = error_of(["--images-dir", str(tmp_path / "images"), "--masks-dir", str(tmp_path / "masks"), "--data-root", str(tmp_path / "out")])
    assert str(tmp_path / "images") in message and "no images" in message


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_data_root_taken_by_a_file_is_one_line(tmp_path, below):
    images, masks = folder_pair(tmp_path / "src", 3)
    (tmp_path / "afile").write_text("not a folder")
    message = error_of(["--images-dir", str(images), "--masks-dir", str(masks),
                        "--data-root", str(tmp_path / "afile" / below)])
    assert message == f"{tmp_path / 'afile'}: exists and is not a folder; give --data-root a folder path"


def test_cli_exit_code_and_one_line_error(tmp_path):
    images, masks = folder_pair(tmp_path / "src", 3)
    image = images / "p002.png"
    image.write_bytes(image.read_bytes()[:100])  # a cut-off PNG, which OpenCV also warns about on stderr
    proc = subprocess.run([sys.executable, str(REPO / "prepare_sts2d.py"), "--images-dir", str(images), "--masks-dir", str(masks),
                           "--data-root", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(image) in lines[0], proc.stderr


def test_skip_bad_writes_rejected_csv(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "src", 8)
    bad = [_undecodable(images, masks)[0], _mask_size(images, masks)[0], _mask_without_image(images, masks)[0],
           _image_without_mask(images, masks)[0]]
    out = tmp_path / "out"
    printed = run(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out), "--skip-bad"], capsys)
    rejected = read_csv(out / "rejected.csv")
    assert sorted(r["file"] for r in rejected) == sorted(map(str, bad)) and all(r["reason"] for r in rejected)
    assert "skipped 4 bad files" in printed
    assert sorted(images_by(read_index(out / INDEX_NAME))) == ["p000", "p004", "p005", "p006", "p007"]

    for image in images.iterdir():  # nothing usable left: the error says why, not only how many
        image.write_bytes(b"not an image")
    message = error_of(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out), "--skip-bad"])
    assert re.search(r"no usable images \(all \d+ files were rejected; first \S+: (cannot decode image|mask without)", message)


def test_needs_exactly_one_source(tmp_path):
    assert "exactly one source" in error_of(["--data-root", str(tmp_path)])
    assert "--raw-dir, --synthetic" in error_of(["--raw-dir", str(tmp_path), "--synthetic", "3"])


# ----------------------------------------------------------------------------------------------
# Mask binarisation
# ----------------------------------------------------------------------------------------------
RECTANGLE = (slice(13, 53), slice(21, 101))  # off the 8x8 JPEG block grid, so its edges ring


def jpeg_mask_pair(root: Path) -> tuple[Path, Path, np.ndarray]:
    """p0: an image with a JPEG mask (a 255 rectangle at quality 75); p1: a PNG mask marking tooth with 1.
    Returns the two folders and the decoded JPEG."""
    mask = np.zeros((72, 120), np.uint8)
    mask[RECTANGLE] = 255
    jpeg = cv2.imencode(".jpg", mask, [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes()
    write_files(root, {"images/p0.png": image_bytes(0, (72, 120)), "masks/p0.jpg": jpeg,
                       "images/p1.png": image_bytes(1), "masks/p1.png": mask_bytes(1, value=1)})
    return root / "images", root / "masks", cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)


def test_jpeg_masks_are_binarised_at_the_middle_and_the_threshold_is_recorded(tmp_path, capsys):
    images, masks, decoded = jpeg_mask_pair(tmp_path / "src")
    true_area, noisy_area = decoded[RECTANGLE].size, int((decoded > 0).sum())
    assert noisy_area > 1.1 * true_area  # the JPEG noise is real: `> 0` would grow this mask
    out = tmp_path / "out"
    argv = ["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out)]
    printed = run(argv, capsys)
    rows = {r["pair_id"]: r for r in read_index(out / INDEX_NAME) if r["is_mask"]}
    area = int(read_mask(out / PROCESSED_NAME / rows["p0"]["rel_path"]).sum())
    assert abs(area - true_area) <= 0.03 * true_area and area < noisy_area
    assert read_mask(masks / "p0.jpg").sum() == area  # reading the source mask applies the same rule
    assert {pid: r["mask_threshold"] for pid, r in rows.items()} == {"p0": 127, "p1": 0}
    assert np.array_equal(read_mask(out / PROCESSED_NAME / rows["p1"]["rel_path"]) * 255, expected_mask(1))
    assert read_mask(masks / "p1.png").sum() == 64  # value 1 is tooth in a lossless mask
    assert "masks binarised at: > 0 1 / > 127 1" in printed

    run(argv + ["--mask-threshold", "0"], capsys)  # the override rebuilds and applies to every mask
    rows = {r["pair_id"]: r for r in read_index(out / INDEX_NAME) if r["is_mask"]}
    assert read_mask(out / PROCESSED_NAME / rows["p0"]["rel_path"]).sum() == noisy_area
    assert {r["mask_threshold"] for r in rows.values()} == {0}


def test_a_jpeg_mask_marking_tooth_with_small_values_is_refused_not_emptied(tmp_path, capsys):
    mask = np.zeros((24, 48), np.uint8)
    mask[5:15, 10:30] = 1  # tooth as 1: the JPEG rule (> 127) would leave nothing
    write_files(tmp_path / "src", {"images/p0.png": image_bytes(0), "masks/p0.jpg": cv2.imencode(".jpg", mask)[1].tobytes(),
                                   "images/p1.png": image_bytes(1), "masks/p1.jpg": cv2.imencode(".jpg", 0 * mask)[1].tobytes()})
    argv = ["--images-dir", str(tmp_path / "src/images"), "--masks-dir", str(tmp_path / "src/masks")]
    message = error_of([*argv, "--data-root", str(tmp_path / "out")])
    assert message.startswith(f"{tmp_path / 'src/masks/p0.jpg'}: a JPEG/WebP mask whose marked pixels are all at most ")
    assert "prepare it with prepare_sts2d.py --mask-threshold 0" in message
    with pytest.raises(ToothSegError, match="p0.jpg: a JPEG/WebP mask whose marked pixels"):  # eval/finetune on the folder
        read_mask(tmp_path / "src/masks/p0.jpg")
    run([*argv, "--data-root", str(tmp_path / "out"), "--mask-threshold", "0"], capsys)
    rows = {r["pair_id"]: r for r in read_index(tmp_path / "out" / INDEX_NAME) if r["is_mask"]}
    assert read_mask(tmp_path / "out" / PROCESSED_NAME / rows["p0"]["rel_path"]).sum() >= 200
    assert read_mask(tmp_path / "src/masks/p1.jpg").sum() == 0  # an all-black JPEG mask (no teeth) stays empty


@pytest.mark.parametrize("damage, expected", [
    (lambda text: text.replace(",512,", ",abc,", 1), "line 2 is damaged"),
    (lambda text: text + "adult/labeled/images/x.png,adult\n", "is damaged"),
    (lambda text: text.encode("utf-16"), "is not UTF-8 text"),
])
def test_a_damaged_index_is_one_line(tmp_path, damage, expected):
    """A hand-edited or damaged index: one line naming it and the fix, not a ValueError from deep inside."""
    rows = [dict.fromkeys(INDEX_COLUMNS, "") | {"rel_path": f"adult/labeled/images/p{i}.png", "is_mask": "False",
                                               "width": 512, "height": 256, "split": "train"} for i in range(2)]
    write_index(tmp_path / INDEX_NAME, rows)
    damaged = damage((tmp_path / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    with pytest.raises(ToothSegError) as caught:
        read_index(tmp_path / INDEX_NAME)
    assert str(caught.value).startswith(f"{tmp_path / INDEX_NAME}: ") and expected in str(caught.value)
    assert "prepare_sts2d.py --force" in str(caught.value)


def test_an_index_without_mask_threshold_still_reads(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "src", 5)
    out = tmp_path / "out"
    run(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out)], capsys)
    rows = read_csv(out / INDEX_NAME)
    old_columns = [c for c in INDEX_COLUMNS if c != "mask_threshold"]  # the index as written before the column
    with (out / INDEX_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    old = read_index(out / INDEX_NAME)
    assert len(old) == 10 and {r["mask_threshold"] for r in old} == {None}
    assert sum(len(v) for v in segmentation_splits(out / PROCESSED_NAME).values()) == 5
    write_index(out / INDEX_NAME, old)  # and is written back with the column, empty
    assert read_csv(out / INDEX_NAME)[0]["mask_threshold"] == ""


@pytest.mark.parametrize("value", ["300", "-1", "255"])
def test_mask_threshold_out_of_range_is_a_one_line_error(tmp_path, value):
    images, masks = folder_pair(tmp_path / "src", 2)
    proc = subprocess.run([sys.executable, str(REPO / "prepare_sts2d.py"), "--images-dir", str(images), "--masks-dir",
                           str(masks), "--data-root", str(tmp_path / "out"), "--mask-threshold", value],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --mask-threshold must be in 0..254 (a mask pixel is tooth when its value > T), got {value}; "
        f"or leave it out for the default of each mask's format"]
    assert not (tmp_path / "out").exists()


def test_prepare_and_fbf_import_without_torch():
    """They need only the index: --help answers in well under a second instead of ~3 s."""
    code = ("import sys, prepare_sts2d, fbf; heavy = {'torch', 'albumentations'} & set(sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------
# Splits, duplicates, determinism, idempotency
# ----------------------------------------------------------------------------------------------
def test_split_ratios_are_stratified_by_age_group(tmp_path, capsys):
    write_files(tmp_path / "raw", sts_files(adult=(40, 5), children=(10, 3)))
    out = tmp_path / "out"
    run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(out), "--val-ratio", "0.1", "--test-ratio", "0.2"], capsys)
    images = images_by(read_index(out / INDEX_NAME)).values()
    counts = Counter((r["age_group"], r["split"]) for r in images)
    assert counts == {("adult", "train"): 28, ("adult", "val"): 4, ("adult", "test"): 8, ("adult", "pretrain"): 5,
                      ("children", "train"): 7, ("children", "val"): 1, ("children", "test"): 2, ("children", "pretrain"): 3}


@pytest.mark.parametrize("n, expected", [(1, (0, 0)), (2, (0, 0)), (3, (1, 1)), (10, (1, 1)), (40, (4, 4)), (45, (4, 4))])
def test_split_sizes(n, expected):
    assert split_sizes(n, 0.1, 0.1) == expected


def test_duplicates_share_a_split_and_conflicts_are_reported(tmp_path, capsys):
    files = sts_files(adult=(12, 2), children=(4, 1))
    base = "SD-Tooth/STS-2D-Tooth/A-PXI"
    same_image = image_bytes(500)
    for name in ("d1", "d2"):  # identical images with identical masks
        files[f"{base}/Labeled/Image/{name}.png"] = same_image
        files[f"{base}/Labeled/Mask/{name}.png"] = mask_bytes(500)
    files[f"{base}/Unlabeled/Image/d3.png"] = same_image  # an unlabelled copy of them
    for name, seed in (("c1", 1), ("c2", 2)):  # identical images, different masks
        files[f"{base}/Labeled/Image/{name}.png"] = image_bytes(600)
        files[f"{base}/Labeled/Mask/{name}.png"] = mask_bytes(seed)
    write_files(tmp_path / "raw", files)
    out = tmp_path / "out"
    seen_splits = set()
    for seed in range(6):  # whichever split the groups land in, they land there together
        printed = run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(out), "--seed", str(seed)], capsys)
        images = images_by(read_index(out / INDEX_NAME))
        assert images["d1"]["dup_group"] == images["d2"]["dup_group"] == images["d3"]["dup_group"] == "d1"
        assert images["d1"]["split"] == images["d2"]["split"] == images["d3"]["split"] != "pretrain"
        assert images["c1"]["split"] == images["c2"]["split"] and images["c1"]["dup_group"] == "c1"
        seen_splits |= {images["d1"]["split"], images["c1"]["split"]}
        assert "conflicting masks for one image: c1, c2" in printed and "d1, d2" not in printed.split("conflicting")[-1]
    assert len(seen_splits) >= 2
    report = {r["pair_id"]: r for r in read_csv(out / "duplicates.csv")}
    assert set(report) == {"c1", "c2", "d1", "d2", "d3"}
    assert {p: report[p]["conflicting_masks"] for p in report} == {"c1": "True", "c2": "True", "d1": "False", "d2": "False", "d3": "False"}


def test_an_unlabelled_copy_of_the_same_name_moves_no_labelled_image(tmp_path, capsys):
    files = sts_files(adult=(12, 2), children=(4, 1))
    write_files(tmp_path / "raw", files)
    run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(tmp_path / "before")], capsys)
    base = "SD-Tooth/STS-2D-Tooth/A-PXI"
    for i in range(12):  # every labelled adult image again among the unlabelled, under its own name
        write_files(tmp_path / "raw", {f"{base}/Unlabeled/Image/A{i}.png": files[f"{base}/Labeled/Image/A{i}.png"]})
    run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(tmp_path / "after")], capsys)
    labelled = [{(r["pair_id"], r["split"]) for r in read_index(tmp_path / root / INDEX_NAME)
                 if r["label_status"] == "labeled"} for root in ("before", "after")]
    assert labelled[0] == labelled[1]  # it renamed them adult_labeled_A3... and drew their splits anew
    copies = [r for r in read_index(tmp_path / "after" / INDEX_NAME) if r["pair_id"].startswith("adult_unlabeled_A")]
    splits = dict(labelled[1])
    assert len(copies) == 12 and all(r["split"] == splits[r["dup_group"]] for r in copies)


def test_a_rebuild_that_moves_labelled_images_between_splits_says_so(tmp_path, capsys):
    write_files(tmp_path / "raw", sts_files(adult=(20, 3), children=(6, 2)))
    argv = ["--raw-dir", str(tmp_path / "raw"), "--data-root", str(tmp_path / "out")]
    assert "another split" not in run(argv, capsys)
    labelled = lambda: {r["pair_id"]: r["split"] for r in read_index(tmp_path / "out" / INDEX_NAME)  # noqa: E731
                        if r["label_status"] == "labeled" and not r["is_mask"]}
    before = labelled()
    printed = run([*argv, "--seed", "7"], capsys)  # as another id rule or ratio would: silently, before
    after = labelled()
    moved = sum(before[p] != after[p] for p in after)
    assert moved and f"note: {moved} labelled images lie in another split than in the index this one replaces" in printed


def test_same_seed_gives_identical_output(tmp_path, capsys):
    write_files(tmp_path / "raw", sts_files(adult=(20, 3), children=(6, 2)))
    roots = [tmp_path / name for name in ("a", "b", "c")]
    for root, seed in zip(roots, (3, 3, 4)):
        run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(root), "--seed", str(seed)], capsys)
    index = [(root / INDEX_NAME).read_bytes() for root in roots]
    assert index[0] == index[1] and tree_digest(roots[0] / PROCESSED_NAME) == tree_digest(roots[1] / PROCESSED_NAME)
    assert index[0] != index[2]  # another seed, another split
    splits = [{pid: r["split"] for pid, r in images_by(read_index(root / INDEX_NAME)).items()} for root in roots]
    assert splits[0] != splits[2] and Counter(splits[0].values()) == Counter(splits[2].values())


def test_synthetic_is_deterministic(tmp_path, capsys):
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        run(["--synthetic", "12", "--seed", "2", "--synthetic-size", "64x128", "--data-root", str(root)], capsys)
    assert (roots[0] / INDEX_NAME).read_bytes() == (roots[1] / INDEX_NAME).read_bytes()
    assert tree_digest(roots[0] / PROCESSED_NAME) == tree_digest(roots[1] / PROCESSED_NAME)
    rows = read_index(roots[0] / INDEX_NAME)
    assert {(r["width"], r["height"]) for r in rows} == {(128, 64)} and sum(not r["is_mask"] for r in rows) == 12


def test_rerun_is_idempotent_and_force_rebuilds(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "src", 6)
    out = tmp_path / "out"
    argv = ["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out)]
    assert "wrote 12 images and masks to" in run(argv, capsys)
    index_mtime = (out / INDEX_NAME).stat().st_mtime_ns
    built = tree_digest(out / PROCESSED_NAME)

    printed = run(argv, capsys)
    assert "up to date" in printed and "wrote" not in printed and "is_mask: False 6 / True 6" in printed
    assert (out / INDEX_NAME).stat().st_mtime_ns == index_mtime

    (out / PROCESSED_NAME / "adult/labeled/images/p000.png").unlink()  # incomplete output is rebuilt
    assert "wrote 12 images and masks to" in run(argv, capsys)
    assert "wrote 12 images and masks to" in run(argv + ["--force"], capsys)
    assert tree_digest(out / PROCESSED_NAME) == built

    folder_pair(tmp_path / "src", 1, start=6)  # a changed source is rebuilt without --force
    assert "wrote 14 images and masks to" in run(argv, capsys)
    assert "wrote" in run(argv + ["--seed", "1"], capsys)  # so are changed settings
    assert "wrote" in run(argv + ["--seed", "1", "--mask-threshold", "10"], capsys)


def test_source_is_never_modified(tmp_path, capsys):
    write_files(tmp_path / "raw", sts_files(adult=(3, 1), children=(3, 1)))
    before = tree_digest(tmp_path / "raw")
    run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(tmp_path / "raw" / "out")], capsys)
    run(["--raw-dir", str(tmp_path / "raw"), "--data-root", str(tmp_path / "raw" / "out"), "--force"], capsys)
    after = {k: v for k, v in tree_digest(tmp_path / "raw").items() if not k.startswith("out")}
    assert after == before


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        prepare_sts2d.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "default: sts_tooth_data" in text and "--skip-bad" in text and "--val-ratio F" in text


# ----------------------------------------------------------------------------------------------
# Unlabelled pools (--unlabelled-dir)
# ----------------------------------------------------------------------------------------------
def pool_rows(rows) -> dict[str, dict]:
    return {r["pair_id"]: r for r in rows if r["source"].startswith("unlabelled:")}


def test_sub_folders_and_linked_folders_are_read_and_the_data_root_is_no_pool(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "lab", 4)
    write_files(tmp_path / "lab", {"images/2024/q0.png": image_bytes(10), "masks/2024/q0.png": mask_bytes(10)})
    write_files(tmp_path / "elsewhere", {"more/q1.png": image_bytes(11), "pool/u0.png": image_bytes(12)})
    (images / "linked").symlink_to(tmp_path / "elsewhere/more", target_is_directory=True)
    (masks / "q1.png").write_bytes(mask_bytes(11))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "linked").symlink_to(tmp_path / "elsewhere/pool", target_is_directory=True)
    (tmp_path / "pool" / "loop").symlink_to(tmp_path / "pool", target_is_directory=True)  # read once, not forever
    argv = ["--images-dir", str(images), "--masks-dir", str(masks), "--unlabelled-dir", str(tmp_path / "pool"),
            "--data-root", str(tmp_path / "pool" / "prepared")]  # its outputs must not join the pool on a rerun
    run(argv, capsys)
    first = read_index(tmp_path / "pool" / "prepared" / INDEX_NAME)
    labelled = {r["pair_id"] for r in first if r["label_status"] == "labeled" and not r["is_mask"]}
    assert labelled == {"p000", "p001", "p002", "p003", "q0", "q1"}  # q0 in a sub-folder, q1 in a linked one
    assert set(pool_rows(first)) == {"linked_u0"}
    assert "up to date" in run(argv, capsys)


@pytest.mark.parametrize("where", ["images", "masks", "pool"])
def test_a_broken_link_is_named_not_left_out(tmp_path, where):
    """A link to a moved X-ray was skipped without a word (it is no file); it is named, with where it points."""
    images, masks = folder_pair(tmp_path / "lab", 3)
    (tmp_path / "pool").mkdir()
    folder = {"images": images, "masks": masks, "pool": tmp_path / "pool"}[where]
    (folder / "gone.png").symlink_to(tmp_path / "moved.png")
    message = error_of(["--images-dir", str(images), "--masks-dir", str(masks), "--unlabelled-dir",
                        str(tmp_path / "pool"), "--data-root", str(tmp_path / "root")])
    assert message == f"{folder / 'gone.png'}: is a link to {tmp_path / 'moved.png'}, which does not exist; restore it " \
                      f"or remove it from the folder"


def test_folders_inside_the_images_folder_are_not_read_as_images(tmp_path, capsys):
    images, _ = folder_pair(tmp_path / "lab", 3)
    (tmp_path / "lab" / "masks").rename(images / "gt")  # the masks inside the images folder, not named masks
    write_files(images / "prep_pool", {"u0.png": image_bytes(20)})
    argv = ["--images-dir", str(images), "--masks-dir", str(images / "gt"), "--data-root", str(images / "prep"),
            "--unlabelled-dir", str(images / "prep_pool")]  # the outputs inside the images folder too
    for _ in range(2):  # the rerun must not read the first run's outputs as more images
        run(argv, capsys)
        rows = read_index(images / "prep" / INDEX_NAME)
        assert sorted(r["pair_id"] for r in rows if not r["is_mask"]) == ["p000", "p001", "p002", "u0"]


def test_a_data_root_inside_the_masks_folder_is_not_read_as_masks(tmp_path, capsys):
    """Its images had been read as masks without images on the rerun, and the error blamed the tool's output."""
    images, masks = folder_pair(tmp_path / "lab", 3)
    argv = ["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(masks / "root")]
    for extra in ([], ["--force"]):
        run(argv + extra, capsys)
    assert sorted(r["pair_id"] for r in read_index(masks / "root" / INDEX_NAME) if not r["is_mask"]) == \
        ["p000", "p001", "p002"]


def test_a_pool_inside_the_data_root_is_read(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "lab", 3)
    write_files(tmp_path / "root" / "raw_pool", {"u0.png": image_bytes(20), "u1.png": image_bytes(21)})
    run(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "root"),
         "--unlabelled-dir", str(tmp_path / "root" / "raw_pool")], capsys)
    assert set(pool_rows(read_index(tmp_path / "root" / INDEX_NAME))) == {"u0", "u1"}


def test_pools_join_a_folder_pair(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "lab", 6)
    colour_jpeg = image_bytes(50, shape=(24, 48, 3), ext=".jpg")
    write_files(tmp_path / "tufts-dev/images", {  # named after its parent: "images" says nothing
        "p000.jpg": colour_jpeg,                   # the labelled source has p000: prefixed
        "u1.png": image_bytes(51, dtype=np.uint16),
        "sub/u2.png": image_bytes(52),
        "Masks/u3.png": image_bytes(53)})          # skipped, in any case
    write_files(tmp_path / "more", {
        "u1.png": image_bytes(54),                 # the first pool has u1: prefixed with this pool's name
        "p001.bmp": image_bytes(55, ext=".bmp"),
        "masks/x.png": image_bytes(56),
        "Labeled/Mask/y.png": image_bytes(57),     # STS-2D-Tooth's masks and UFBA's label maps: no X-rays either
        "teeth_fdi/z.png": image_bytes(58)})
    out = tmp_path / "out"
    printed = run(["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(out),
                   "--unlabelled-dir", str(tmp_path / "tufts-dev/images"), f"other={tmp_path / 'more'}"], capsys)

    rows = read_index(out / INDEX_NAME)
    pools = pool_rows(rows)
    assert {pid: r["source"] for pid, r in pools.items()} == {
        "tufts-dev_p000": "unlabelled:tufts-dev", "u1": "unlabelled:tufts-dev", "sub_u2": "unlabelled:tufts-dev",
        "other_u1": "unlabelled:other", "other_p001": "unlabelled:other"}
    assert {(r["age_group"], r["label_status"], r["split"], r["is_mask"]) for r in pools.values()} == {
        ("adult", "unlabeled", "pretrain", False)}
    assert all(r["rel_path"] == f"adult/unlabeled/images/{pid}.png" for pid, r in pools.items())
    image_ids = [r["pair_id"] for r in rows if not r["is_mask"]]
    assert len(image_ids) == len(set(image_ids)) == 11
    assert Counter(r["source"] for r in rows if r["is_mask"]) == {"folder": 6}  # no mask rows for the pools
    for pid, r in pools.items():
        written = cv2.imread(str(out / PROCESSED_NAME / r["rel_path"]), cv2.IMREAD_UNCHANGED)
        assert written.dtype == np.uint8 and written.shape == (r["height"], r["width"]) == (24, 48), pid
    decoded = cv2.imdecode(np.frombuffer(colour_jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    written = cv2.imread(str(out / PROCESSED_NAME / "adult/unlabeled/images/tufts-dev_p000.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY))
    assert "label_status: labeled 12 / unlabeled 5" in printed
    assert "unlabelled pool 'other': 2 images below" in printed and \
        "(left out as labels: 1 in Mask/, 1 in masks/, 1 in teeth_fdi/)" in printed
    assert ("source (images): folder 6 (train 4, val 1, test 1) / unlabelled:other 2 (pretrain 2) / "
            "unlabelled:tufts-dev 3 (pretrain 3)") in printed


@pytest.mark.parametrize("kind", ["zip", "raw", "tg3k", "synthetic"])
def test_pools_join_every_source(tmp_path, capsys, kind):
    write_files(tmp_path / "pool", {"Au0.png": image_bytes(900), "x.png": image_bytes(901)})
    if kind == "zip":
        zip_parts(tmp_path / "src", sts_files(adult=(3, 1), children=(3, 1)))
    elif kind == "raw":  # its own unlabelled Au0 and the pool's Au0 are different images: both kept
        write_files(tmp_path / "src", sts_files(adult=(3, 1), children=(3, 1)))
    elif kind == "tg3k":
        tg3k_tree(tmp_path / "src", 6, val=[1])
    flag = ["--synthetic", "6", "--synthetic-size", "64x128"] if kind == "synthetic" else [f"--{kind}-dir", str(tmp_path / "src")]
    out = tmp_path / "out"
    run(flag + ["--data-root", str(out), "--unlabeled-dir", str(tmp_path / "pool")], capsys)
    rows = read_index(out / INDEX_NAME)
    assert {r["source"] for r in pool_rows(rows).values()} == {"unlabelled:pool"} and len(pool_rows(rows)) == 2
    assert {r["split"] for r in pool_rows(rows).values()} == {"pretrain"}
    assert len(rows) == len({(r["pair_id"], r["is_mask"]) for r in rows}) and not (out / "rejected.csv").exists()


def test_pool_copies_take_their_twins_split_and_move_nothing(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "lab", 10)
    write_files(tmp_path / "copy/images", {p.name: p.read_bytes() for p in images.iterdir()})  # every labelled image again
    write_files(tmp_path / "copy/images", {"fresh.png": image_bytes(77)})
    argv = ["--images-dir", str(images), "--masks-dir", str(masks)]
    run(argv + ["--data-root", str(tmp_path / "alone")], capsys)
    printed = run(argv + ["--data-root", str(tmp_path / "out"), "--unlabelled-dir", str(tmp_path / "copy/images")], capsys)

    alone = images_by(read_index(tmp_path / "alone" / INDEX_NAME))
    rows = images_by(read_index(tmp_path / "out" / INDEX_NAME))
    assert {pid: r["split"] for pid, r in rows.items() if r["source"] == "folder"} == {pid: r["split"] for pid, r in alone.items()}
    for pid, twin in alone.items():
        copy = rows[f"copy_{pid}"]
        assert copy["label_status"] == "unlabeled" and copy["split"] == twin["split"] and copy["dup_group"] == pid
    assert "test" in {rows[f"copy_{pid}"]["split"] for pid in alone} and rows["fresh"]["split"] == "pretrain"
    report = read_csv(tmp_path / "out" / "duplicates.csv")
    assert len(report) == 20 and {r["pair_id"] for r in report if r["label_status"] == "unlabeled"} == {f"copy_{p}" for p in alone}
    assert "duplicates: 10 groups of identical images (20 images)" in printed


def test_a_corrupt_pool_image_is_bad_input(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "lab", 4)
    write_files(tmp_path / "pool", {"ok.png": image_bytes(60), "bad.png": b"\x89PNG but truncated"})
    argv = ["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "out"),
            "--unlabelled-dir", str(tmp_path / "pool")]
    proc = subprocess.run([sys.executable, str(REPO / "prepare_sts2d.py"), *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'pool/bad.png'}: cannot decode") and "--skip-bad" in lines[0]
    assert not (tmp_path / "out" / INDEX_NAME).exists()

    printed = run(argv + ["--skip-bad"], capsys)
    assert [r["file"] for r in read_csv(tmp_path / "out" / "rejected.csv")] == [str(tmp_path / "pool/bad.png")]
    assert list(pool_rows(read_index(tmp_path / "out" / INDEX_NAME))) == ["ok"] and "skipped 1 bad files" in printed


def test_pool_errors_are_one_line(tmp_path):
    images, masks = folder_pair(tmp_path / "lab", 4)
    write_files(tmp_path / "masks_only", {"masks/a.png": image_bytes(1)})
    write_files(tmp_path, {"a/images/x.png": image_bytes(2), "b/a/y.png": image_bytes(3)})
    base = ["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "out"), "--unlabelled-dir"]
    message = error_of(base + [str(tmp_path / "missing")])
    assert message.startswith(str(tmp_path / "missing")) and "not found" in message
    message = error_of(base + [str(tmp_path / "masks_only")])
    assert message.startswith(str(tmp_path / "masks_only")) and "no images" in message
    message = error_of(base + [str(tmp_path / "a/images"), str(tmp_path / "b/a")])  # both named "a"
    assert str(tmp_path / "b/a") in message and "'a'" in message and "NAME=DIR" in message
    assert "a labelled source" in error_of(["--unlabelled-dir", str(tmp_path / "a/images"), "--data-root", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_rerun_with_pools(tmp_path, capsys):
    images, masks = folder_pair(tmp_path / "lab", 4)
    write_files(tmp_path, {"one/a.png": image_bytes(70), "two/b.png": image_bytes(71)})
    argv = ["--images-dir", str(images), "--masks-dir", str(masks), "--data-root", str(tmp_path / "out")]
    assert "wrote 9 images and masks to" in run(argv + ["--unlabelled-dir", str(tmp_path / "one")], capsys)
    printed = run(argv + ["--unlabelled-dir", str(tmp_path / "one")], capsys)
    assert "up to date" in printed and "unlabelled:one 1 (pretrain 1)" in printed
    both = argv + ["--unlabelled-dir", str(tmp_path / "one"), str(tmp_path / "two")]
    assert "wrote 10 images and masks to" in run(both, capsys)  # an added pool rebuilds
    assert "up to date" in run(both, capsys)
    write_files(tmp_path, {"two/c.png": image_bytes(72)})
    assert "wrote 11 images and masks to" in run(both, capsys)  # so does an added pool image
    assert "wrote 11 images and masks to" in run(argv + ["--unlabelled-dir", str(tmp_path / "one"), f"second={tmp_path / 'two'}"], capsys)  # a renamed pool
    assert {r["source"] for r in read_index(tmp_path / "out" / INDEX_NAME)} == {"folder", "unlabelled:one", "unlabelled:second"}
    assert "wrote 8 images and masks to" in run(argv, capsys)  # and dropping the pools
