"""fbf.py: the bilateral grid against the exact filter, edge keeping, bit depth, and the dataset-tree CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import fbf
from fbf import bilateral_filter
from index import INDEX_NAME
from phantom import generate_panoramic
from utils import ToothSegError

REPO = Path(__file__).resolve().parents[1]


def psnr(test: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> float:
    error = np.mean((test.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak ** 2 / error))


def noisy_step(height=48, width=96, low=60.0, high=160.0, noise=10.0, seed=0) -> np.ndarray:
    """A vertical step edge between columns width/2 - 1 and width/2, with Gaussian noise (float, 0-255)."""
    img = np.full((height, width), low)
    img[:, width // 2:] = high
    return (img + np.random.default_rng(seed).normal(0, noise, img.shape)).astype(np.float32)


def edge_width(img: np.ndarray, low=60.0, high=160.0) -> float:
    """10-90% rise distance, in pixels, of the row-averaged profile across the step."""
    profile = img.mean(axis=0)
    columns = np.arange(len(profile))
    at = [np.interp(low + level * (high - low), profile, columns) for level in (0.1, 0.9)]
    return at[1] - at[0]


@pytest.fixture(scope="module")
def phantom_small() -> np.ndarray:
    image, _ = generate_panoramic(3, 96, 192, age_group="adult")
    return image


# ----------------------------------------------------------------------------------------------
# The filter
# ----------------------------------------------------------------------------------------------
def test_exact_reference_agrees_with_opencv_away_from_the_border(phantom_small):
    # OpenCV mirrors the image at the border while the exact filter leaves outside pixels out, so
    # compare the interior; inside, the two differ only by OpenCV's rounding to 8 bits.
    sigma_space = 2.0
    exact = bilateral_filter(phantom_small.astype(np.float32), sigma_space, 30, method="exact")
    opencv = bilateral_filter(phantom_small, sigma_space, 30, method="opencv")
    margin = fbf.window_radius(sigma_space)
    difference = np.abs(opencv.astype(np.float64) - exact)[margin:-margin, margin:-margin]
    assert difference.max() <= 0.5 + 1e-3
    assert np.abs(exact - phantom_small).mean() > 1.0  # it did filter


@pytest.mark.parametrize("sigma_space", [3.0, 6.0])
def test_grid_is_within_45_db_of_the_exact_filter(phantom_small, sigma_space):
    image = phantom_small.astype(np.float32)
    exact = bilateral_filter(image, sigma_space, 30, method="exact")
    grid = bilateral_filter(image, sigma_space, 30)  # default sampling = the sigmas
    assert psnr(grid, exact) >= 45.0
    # ...and far closer to it than the unfiltered image is, so the PSNR is not just "nothing happened"
    assert psnr(image, exact) < psnr(grid, exact) - 15


def test_finer_sampling_gets_closer_to_the_exact_filter(phantom_small):
    image = phantom_small.astype(np.float32)
    exact = bilateral_filter(image, 4, 30, method="exact")
    coarse = bilateral_filter(image, 4, 30)
    fine = bilateral_filter(image, 4, 30, sample_space=2, sample_color=15)
    assert psnr(fine, exact) > psnr(coarse, exact) + 1.0


def test_torch_path_on_cpu_matches_numpy_path(phantom_small):
    image = phantom_small.astype(np.float32)
    # the last case has over 64 intensity cells, so the numpy path blurs them in several OpenCV blocks
    for sigma_space, sigma_color, sample_space in ((3.0, 25, None), (5.0, 25, 2.5), (3.0, 2, None)):
        numpy_out = bilateral_filter(image, sigma_space, sigma_color, sample_space=sample_space, backend="numpy")
        torch_out = bilateral_filter(image, sigma_space, sigma_color, sample_space=sample_space, backend="torch", device="cpu")
        assert torch_out.dtype == np.float32 and torch_out.shape == image.shape
        assert np.abs(torch_out - numpy_out).max() < 0.01
    assert fbf._plan_grid(image, 3, 2, 3, 2).shape[2] * 2 > fbf.OPENCV_MAX_CHANNELS
    torch_uint8 = bilateral_filter(phantom_small, 3, 25, backend="torch", device="cpu")
    assert torch_uint8.dtype == np.uint8
    assert np.abs(torch_uint8.astype(int) - bilateral_filter(phantom_small, 3, 25)).max() <= 1  # rounding ties only


def test_noisy_step_loses_noise_but_keeps_a_sharp_edge():
    image = noisy_step()
    filtered = bilateral_filter(image, 3, 30)
    half = image.shape[1] // 2
    flat_left, flat_right = (slice(None), slice(4, half - 12)), (slice(None), slice(half + 12, -4))
    for flat in (flat_left, flat_right):
        assert filtered[flat].std() <= image[flat].std() / 2
    contrast = filtered[:, half:half + 3].mean() - filtered[:, half - 3:half].mean()
    assert contrast >= 0.9 * 100
    assert edge_width(filtered) <= 1.5  # a clean step measures 0.8 px


def test_downsample_filter_upsample_shortcut_blurs_the_edge():
    # The shortcut the grid replaces: filter a 4x smaller image, then scale it back up.
    image = noisy_step()
    small = cv2.resize(image, (image.shape[1] // 4, image.shape[0] // 4), interpolation=cv2.INTER_AREA)
    shortcut = cv2.resize(bilateral_filter(small, 3 / 4, 30, method="exact"), image.shape[::-1],
                          interpolation=cv2.INTER_LINEAR)
    assert edge_width(shortcut) > 2.5
    assert edge_width(shortcut) > 2 * edge_width(bilateral_filter(image, 3, 30))


@pytest.mark.parametrize("method", ["grid", "opencv", "exact"])
def test_16_bit_images_keep_their_depth_and_sigma_color_scales_with_it(phantom_small, method):
    image8 = phantom_small[:48, :64]
    image16 = image8.astype(np.uint16) * 257
    out8 = bilateral_filter(image8, 2, 20, method=method)
    out16 = bilateral_filter(image16, 2, 20, method=method)
    assert out8.dtype == np.uint8 and out16.dtype == np.uint16
    assert np.abs(out16 / 257.0 - out8).max() <= 1.0  # the same filter, at 257x the precision
    assert len(np.unique(out16 % 257)) > 1  # real 16-bit values, not an 8-bit image scaled up


@pytest.mark.parametrize("method", ["grid", "exact"])
def test_a_12_bit_xray_in_16_bits_and_a_float_one_in_0_1_are_filtered_as_their_8_bit_copy(phantom_small, method):
    """sigma_color was x257 for any 16-bit file: wider than a 12-bit X-ray's whole 0-4095, a plain Gaussian blur;
    and a float in 0-1 was taken on 0-255."""
    image8 = phantom_small[:48, :64]
    out8 = bilateral_filter(image8, 2, 20, method=method).astype(np.float64)
    twelve = np.rint(image8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    assert np.abs(bilateral_filter(twelve, 2, 20, method=method) / (4095 / 255) - out8).max() <= 1.0
    unit = image8.astype(np.float32) / 255
    assert np.abs(bilateral_filter(unit, 2, 20, method=method) * 255 - out8).max() <= 1.0
    blurred = cv2.GaussianBlur(image8.astype(np.float64), (0, 0), 2)
    assert np.abs(out8 - blurred).mean() > 1.0  # the filter keeps edges a blur smooths: the check can tell them apart


@pytest.mark.parametrize("flag", ["--sigma-space", "--sigma-color", "--sample-space", "--sample-color"])
def test_a_bad_filter_flag_is_named_on_the_command_line(flag, tmp_path, capsys):
    from utils import run_cli

    with pytest.raises(SystemExit):
        run_cli(fbf.main, ["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), flag, "-1"])
    assert f"argument {flag}: must be above 0, got -1.0" in capsys.readouterr().err


def test_a_broken_link_is_named_and_a_linked_folder_read(dataset, tmp_path):
    """Files are listed as prepare lists them: through linked folders, and a broken link named, not left out."""
    _mkdir_and_write(tmp_path / "elsewhere" / "more.png", generate_panoramic(9, 40, 80)[0])
    (dataset / "adult" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    fbf.main(["--input-dir", str(dataset), "--output-dir", str(tmp_path / "out"), "--backend", "numpy", "--workers", "1"])
    assert (tmp_path / "out" / "adult" / "linked" / "more.png").is_file()
    (dataset / "adult" / "gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.raises(ToothSegError, match=r"gone\.png: is a link to .*moved\.png, which does not exist; restore it"):
        fbf.main(["--input-dir", str(dataset), "--output-dir", str(tmp_path / "out2"), "--backend", "numpy",
                  "--workers", "1"])


def test_constant_image_stays_constant():
    flat = np.full((20, 30), 77, np.uint8)
    for method in fbf.METHODS:
        assert np.array_equal(bilateral_filter(flat, 3, 20, method=method), flat)


@pytest.mark.parametrize("bad, message", [
    (dict(img=np.zeros((4, 4, 3), np.uint8)), "2D grey image"),
    (dict(sigma_space=0), "sigma_space must be a finite number > 0"),
    (dict(sample_color=-1), "sample_color must be a finite number > 0"),
    (dict(sigma_color=float("inf")), "sigma_color must be a finite number > 0, got inf"),  # once a traceback
    (dict(method="fast"), "unknown method"),
    (dict(backend="jax"), "unknown backend"),
    (dict(img=np.zeros((4, 4), np.int32)), "cannot filter dtype int32"),
])
def test_bad_arguments_get_one_line_errors(bad, message):
    arguments = dict(img=np.zeros((4, 4), np.uint8), sigma_space=2, sigma_color=10) | bad
    with pytest.raises(ToothSegError, match=message) as caught:
        bilateral_filter(**arguments)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------
# The dataset-tree CLI
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> Path:
    """A small processed_2d tree (one masks folder spelled 'Masks') with its index beside it."""
    root = tmp_path / "data" / "processed_2d"
    for number, (age, status, masks) in enumerate([("adult", "labeled", "masks"), ("adult", "unlabeled", None),
                                                   ("children", "labeled", "Masks")]):
        image, mask = generate_panoramic(number, 40, 80, age_group=age)
        noisy = np.clip(image + np.random.default_rng(number).normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        _mkdir_and_write(root / age / status / "images" / f"img{number}.png", noisy)
        if masks:
            _mkdir_and_write(root / age / status / masks / f"img{number}.png", mask)
    (tmp_path / "data" / "sts2d_index.csv").write_text("rel_path,split\nadult/labeled/images/img0.png,train\n")
    return root


def _mkdir_and_write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def run_fbf(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "fbf.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_tree_is_mirrored_images_filtered_masks_and_index_copied(dataset):
    fbf.main(["--input-dir", str(dataset), "--backend", "numpy", "--workers", "1", "--sigma-space", "2"])
    output = dataset.with_name("processed_2d_fbf")  # the default output is a sibling
    assert files_under(output) == files_under(dataset) | {"sts2d_index.csv", "fbf_settings.json"}
    assert (output / "sts2d_index.csv").read_bytes() == (dataset.parent / "sts2d_index.csv").read_bytes()
    for source in dataset.rglob("*.png"):
        target = output / source.relative_to(dataset)
        if source.parent.name.lower() == "masks":
            assert target.read_bytes() == source.read_bytes()
        else:
            original = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
            written = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(written, bilateral_filter(original, 2, 20))
            assert not np.array_equal(written, original)
    assert not any(p.name.startswith(".") for p in output.rglob("*"))  # no temporary files left behind


def test_existing_outputs_are_kept_unless_overwrite(dataset, tmp_path, capsys):
    output = tmp_path / "filtered"
    arguments = ["--input-dir", str(dataset), "--output-dir", str(output), "--backend", "numpy", "--workers", "1"]
    fbf.main(arguments)
    image = output / "adult" / "labeled" / "images" / "img0.png"
    mask = output / "adult" / "labeled" / "masks" / "img0.png"
    good_image, good_mask = image.read_bytes(), mask.read_bytes()
    image.write_bytes(b"stale")
    mask.write_bytes(b"stale")
    fbf.main(arguments)
    assert image.read_bytes() == b"stale" and mask.read_bytes() == b"stale"
    fbf.main(arguments + ["--overwrite"])
    assert image.read_bytes() == good_image and mask.read_bytes() == good_mask
    # Kept outputs and new ones of other settings would make a mixed mirror (an interrupted run rerun otherwise).
    image.unlink()
    with pytest.raises(ToothSegError, match=r"filtered with --sigma-color 20.0, this run asks 80.0; rerun with the "
                                            r"settings in .*fbf_settings.json, or --overwrite"):
        fbf.main(arguments + ["--sigma-color", "80"])
    assert not image.exists()
    # An --overwrite stopped halfway leaves files of the old filter: a rerun without --overwrite is refused, where it
    # kept them beside the new ones under the new record.
    process = fbf.process
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fbf, "process", lambda job, settings: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            fbf.main(arguments + ["--sigma-color", "80", "--overwrite", "--workers", "1"])
    assert fbf.process is process
    with pytest.raises(ToothSegError, match=r"an --overwrite run was stopped before it had filtered every file again .*; "
                                            r"rerun with --overwrite$"):
        fbf.main(arguments + ["--sigma-color", "80"])
    fbf.main(arguments + ["--sigma-color", "80", "--overwrite"])
    assert json.loads((output / "fbf_settings.json").read_text()) == {
        "method": "grid", "sigma_space": 3.0, "sigma_color": 80.0, "sample_space": None, "sample_color": None}
    fbf.main(arguments + ["--sigma-color", "80"])  # finished: a rerun goes on
    # A source that no longer decodes: --overwrite removes its old output, which the new record would misname
    source = dataset / "adult" / "labeled" / "images" / "img0.png"
    intact = source.read_bytes()
    try:
        source.write_bytes(intact[:100])
        with pytest.raises(ToothSegError, match="1 of .* files could not be decoded"):
            fbf.main(arguments + ["--sigma-color", "40", "--overwrite"])
        assert not image.exists()
    finally:
        source.write_bytes(intact)
    # A mirror of before the record: its kept outputs' filter is not known, so none is recorded for them.
    (output / "fbf_settings.json").unlink()
    fbf.main(arguments)
    assert not (output / "fbf_settings.json").exists() and "the filter of the outputs kept there is not known" in \
        capsys.readouterr().out


def test_16_bit_png_is_written_as_16_bit(tmp_path):
    source = tmp_path / "in" / "images" / "deep.png"
    image8, _ = generate_panoramic(5, 40, 80)
    image16 = image8.astype(np.uint16) * 257 + np.random.default_rng(0).integers(0, 257, image8.shape).astype(np.uint16)
    _mkdir_and_write(source, image16)
    fbf.main(["--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"), "--backend", "numpy",
              "--workers", "1"])
    written = cv2.imread(str(tmp_path / "out" / "images" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint16
    assert np.array_equal(written, bilateral_filter(image16, 3, 20))


def test_a_dicom_file_is_left_out_and_counted_not_a_crash(dataset, tmp_path, write_dicom, capsys):
    write_dicom(dataset / "adult" / "unlabeled" / "images" / "scan.dcm", np.zeros((8, 8), np.uint16))
    fbf.main(["--input-dir", str(dataset), "--output-dir", str(tmp_path / "out"), "--backend", "numpy", "--workers", "1"])
    assert "1 DICOM files left out (prepare_sts2d.py converts them" in capsys.readouterr().out  # a mirror keeps formats
    assert files_under(tmp_path / "out") == files_under(dataset) - {"adult/unlabeled/images/scan.dcm"} | \
        {"sts2d_index.csv", "fbf_settings.json"}


def test_bad_files_are_named_counted_and_the_rest_still_written(dataset, tmp_path):
    bad = dataset / "adult" / "unlabeled" / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    output = tmp_path / "out"
    result = run_fbf("--input-dir", str(dataset), "--output-dir", str(output), "--backend", "numpy", "--workers", "2")
    assert result.returncode == 2
    assert [line for line in result.stdout.splitlines() if line.startswith("skipped")] == [
        f"skipped {bad}: cannot decode image (corrupt or not an image); replace or remove it"]
    errors = result.stderr.strip().splitlines()
    assert errors[-1].startswith("error: 1 of 6 files could not be decoded")
    assert "Traceback" not in result.stderr
    assert files_under(output) == files_under(dataset) - {"adult/unlabeled/images/broken.png"} | \
        {"sts2d_index.csv", "fbf_settings.json"}


def test_missing_input_is_a_one_line_error(tmp_path):
    result = run_fbf(cwd=tmp_path)  # no arguments: ./sts_tooth_data/processed_2d
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: sts_tooth_data/processed_2d: input folder not found; run prepare_sts2d.py first or pass --input-dir"]
    assert not (tmp_path / "sts_tooth_data").exists()


def test_output_inside_input_is_refused(dataset):
    with pytest.raises(ToothSegError, match="must lie outside"):
        fbf.main(["--input-dir", str(dataset), "--output-dir", str(dataset / "filtered"), "--backend", "numpy"])
    assert not (dataset / "filtered").exists()


def test_a_mirror_of_an_earlier_preparation_is_refused(dataset, tmp_path):
    """Prepared again (say, with a pool added or another seed), the source's index differs from the mirror's:
    the mirror's kept outputs and splits are stale, so it is rebuilt only when asked."""
    source = tmp_path / "root"
    shutil.copytree(dataset.parent, source)
    out = tmp_path / "mirror"
    fbf.main(["--input-dir", str(source / dataset.name), "--output-dir", str(out), "--backend", "numpy", "--workers", "1"])
    index = source / INDEX_NAME
    index.write_text(index.read_text() + "adult/unlabeled/images/img1.png,pretrain\n")
    with pytest.raises(ToothSegError, match=f"{out / INDEX_NAME}: differs from .*rebuild it with --overwrite"):
        fbf.main(["--input-dir", str(source / dataset.name), "--output-dir", str(out), "--backend", "numpy"])
    fbf.main(["--input-dir", str(source / dataset.name), "--output-dir", str(out), "--backend", "numpy", "--workers", "1",
              "--overwrite"])
    assert (out / INDEX_NAME).read_bytes() == index.read_bytes()


def test_a_device_torch_cannot_use_is_refused_before_any_file(dataset, tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(ToothSegError, match="--device cuda:99: no such CUDA device here"):
        fbf.main(["--input-dir", str(dataset), "--output-dir", str(tmp_path / "out"), "--backend", "torch",
                  "--device", "cuda:99"])
    assert not (tmp_path / "out").exists()


def test_output_taken_by_a_file_is_refused(dataset, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(ToothSegError, match="afile: exists and is not a folder; give --output-dir a folder path"):
        fbf.main(["--input-dir", str(dataset), "--output-dir", str(tmp_path / "afile" / "out"), "--backend", "numpy"])


@pytest.mark.parametrize("hide_gpus", [False, True])
def test_auto_backend_without_a_gpu_does_not_import_torch(dataset, tmp_path, hide_gpus):
    """Importing torch (~2 s) only to learn that there is no GPU would cost more than filtering a few images."""
    if not hide_gpus and fbf.gpu_may_be_present():
        pytest.skip("a GPU may be present here, so auto rightly asks torch")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if hide_gpus else None
    argv = ["--input-dir", str(dataset), "--output-dir", str(tmp_path / "out"), "--method", "grid", "--workers", "1"]
    code = f"import sys, fbf; fbf.main({argv!r}); assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "grid/numpy" in result.stdout


@pytest.mark.parametrize("value", ["", "-1", "-1,0"])
def test_cuda_visible_devices_hiding_every_gpu_means_none(monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert not fbf.gpu_may_be_present() and fbf.resolve_backend("auto", None) == "numpy"
    assert fbf.resolve_backend("auto", "cpu") == "torch"  # a named device still means torch
