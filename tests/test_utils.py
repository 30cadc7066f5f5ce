"""utils.py: atomic writes keep old outputs on failure and leave no temp files; image reading errors name the file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from utils import ToothSegError, atomic_path, atomic_write_text, make_parser, read_image, write_png


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_outputs_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    write_png(tmp_path / "mask.png", np.zeros((4, 5), np.uint8))
    assert stat.S_IMODE((tmp_path / "mask.png").stat().st_mode) == 0o666 & ~umask


def test_read_image_keeps_depth_and_names_bad_files(tmp_path):
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    write_png(tmp_path / "deep.png", deep)
    assert np.array_equal(read_image(tmp_path / "deep.png"), deep)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ToothSegError, match="broken.png: cannot decode image"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ToothSegError, match="missing.png: cannot read"):
        read_image(tmp_path / "missing.png")


def test_help_shows_every_default_also_of_options_without_help_text():
    parser = make_parser("demo")
    parser.add_argument("--with-text", type=int, default=3, metavar="N", help="some number")
    parser.add_argument("--bare", type=float, default=0.4, metavar="P")
    parser.add_argument("--switch", action="store_true")
    parser.add_argument("--unset", metavar="X")
    shown = " ".join(parser.format_help().split())
    assert "--with-text N some number (default: 3)" in shown
    assert "--bare P default: 0.4" in shown  # argparse alone prints no line for it
    assert "default: False" not in shown and "default: None" not in shown


def test_dicom_is_read_as_a_viewer_shows_it(tmp_path, write_dicom):
    stored = np.array([[0, 1000, 2000], [3000, 4000, 4095]], np.uint16)  # a 12-bit detector in 16-bit words
    # No window: the whole range of values fills 0..255 (divided by 257 as 16-bit, this X-ray would be black).
    plain = read_image(write_dicom(tmp_path / "plain.dcm", stored, BitsStored=12, HighBit=11))
    assert plain.dtype == np.uint8 and np.array_equal(plain, np.rint(stored / 4095 * 255).astype(np.uint8))
    # The file's window, in rescaled units (stored * 2 - 1000): 0..4000 → 0..255, clipped outside.
    windowed = read_image(write_dicom(tmp_path / "windowed.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                                      WindowCenter=2000, WindowWidth=4000))
    expected = np.clip((stored.astype(float) * 2 - 1000) / 4000, 0, 1) * 255
    assert np.array_equal(windowed, np.rint(expected).astype(np.uint8))
    # MONOCHROME1 stores bone dark; it is inverted so that teeth are bright as in every other format.
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", stored, PhotometricInterpretation="MONOCHROME1"))
    assert np.array_equal(inverted, np.rint((1 - stored / 4095) * 255).astype(np.uint8))
    # Empty window elements are no window; a 12-bit colour image keeps its scale (cast to 8 bits it wrapped).
    assert np.array_equal(read_image(write_dicom(tmp_path / "empty.dcm", stored, WindowCenter="", WindowWidth="")), plain)
    colour = np.repeat(np.array([[4000, 4095]], np.uint16)[..., None], 3, axis=2)
    assert read_image(write_dicom(tmp_path / "rgb.dcm", colour, SamplesPerPixel=3, PhotometricInterpretation="RGB",
                                  PlanarConfiguration=0, BitsStored=12, HighBit=11)).tolist() == [[249, 255]]
    # A DX file's Presentation LUT Shape INVERSE is the same one inversion (with MONOCHROME1, as the DX IOD has it,
    # or alone); it was ignored, and such an X-ray was read with dark teeth.
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        lut = read_image(write_dicom(tmp_path / f"lut_{photometric}.dcm", stored, PhotometricInterpretation=photometric,
                                     PresentationLUTShape="INVERSE"))
        assert np.array_equal(lut, inverted), photometric
    # Found by its "DICM" marker whatever its name.
    assert np.array_equal(read_image(write_dicom(tmp_path / "IM0001", stored)), plain)


def test_unusable_dicom_files_are_one_line_naming_the_fix(tmp_path, write_dicom):
    from pydicom.data import get_testdata_file

    (tmp_path / "text.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(ToothSegError, match=r"text.dcm: cannot read as DICOM \(.*\); replace or remove it$"):
        read_image(tmp_path / "text.dcm")
    unknown = write_dicom(tmp_path / "bare.dcm", np.zeros((2, 3), np.uint8))  # uncompressed, but undecodable
    with pytest.raises(ToothSegError, match=r"bare.dcm: cannot decode its DICOM pixel data \(Explicit VR Little Endian: "
                                            r".*\); replace or remove it$"):
        read_image(unknown.write_bytes(unknown.read_bytes()[:-2]) and unknown)  # pixel data cut short
    frames = write_dicom(tmp_path / "cine.dcm", np.zeros((2, 3), np.uint8), NumberOfFrames=2)
    with pytest.raises(ToothSegError, match="cine.dcm: a DICOM file of 2 frames; export the panoramic as one frame"):
        read_image(frames)
    with pytest.raises(ToothSegError, match="rtplan.dcm: a DICOM file without an image"):
        read_image(get_testdata_file("rtplan.dcm"))
    # 12-bit lossy JPEG: neither pydicom nor Pillow decodes it, so the line says which packages do.
    with pytest.raises(ToothSegError, match=r"JPEG-lossy.dcm: cannot decode its DICOM pixel data \(JPEG Extended.*\); "
                                            r"for a compressed file install the decoders: pip install pylibjpeg"):
        read_image(get_testdata_file("JPEG-lossy.dcm"))


def test_images_are_read_upright_and_deep_ones_keep_their_contrast(tmp_path):
    import io

    import cv2
    from PIL import Image

    from utils import is_image_file, to_uint8

    wide = np.zeros((20, 40), np.uint8)
    wide[:5, :10] = 255  # a bright corner: top left as the viewer shows it
    stored = Image.fromarray(np.rot90(wide, 1))  # stored on its side (20 wide, 40 high) with "rotate 90° clockwise"
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "phone.jpg").write_bytes(buffer.getvalue())
    upright = read_image(tmp_path / "phone.jpg")
    assert upright.shape == (20, 40) and upright[:5, :10].mean() > 200 and upright[5:, 10:].mean() < 30

    twelve_bit = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 372)  # 0..4092 in a 16-bit PNG
    write_png(tmp_path / "deep.png", twelve_bit)
    assert np.array_equal(to_uint8(read_image(tmp_path / "deep.png")), np.rint(np.arange(12).reshape(3, 4) / 11 * 255))
    assert np.array_equal(to_uint8(np.array([[0.0, 0.5], [0.25, 1.0]])), [[0, 128], [64, 255]])  # a float TIFF in 0..1
    assert not to_uint8(np.full((2, 2), 700, np.uint16)).any()  # one value: nothing to stretch

    (tmp_path / "scan.webp").write_bytes(cv2.imencode(".webp", wide, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes())
    assert is_image_file(tmp_path / "scan.webp") and np.array_equal(read_image(tmp_path / "scan.webp"), wide)

    painted = np.full((6, 8, 4), 255, np.uint8)  # white paint everywhere, visible only where opaque
    painted[..., 3] = 0
    painted[2:4, 3:6, 3] = 255
    write_png(tmp_path / "layer.png", painted)
    assert np.array_equal(read_image(tmp_path / "layer.png") > 0, painted[..., 3] > 0)


def test_a_tiff_with_several_full_size_pages_is_refused_and_a_thumbnail_is_skipped(tmp_path):
    import cv2

    xray, other = np.full((20, 30), 200, np.uint8), np.full((20, 30), 9, np.uint8)
    (tmp_path / "stack.tif").write_bytes(cv2.imencodemulti(".tif", [xray, other])[1].tobytes())
    with pytest.raises(ToothSegError, match="stack.tif: a TIFF of 2 full-size pages; save each X-ray as a one-page file"):
        read_image(tmp_path / "stack.tif")
    (tmp_path / "thumb.tif").write_bytes(cv2.imencodemulti(".tif", [xray, other[:5, :8]])[1].tobytes())
    assert np.array_equal(read_image(tmp_path / "thumb.tif"), xray)
    (tmp_path / "one.tiff").write_bytes(cv2.imencode(".tiff", xray)[1].tobytes())
    assert np.array_equal(read_image(tmp_path / "one.tiff"), xray)


def test_every_exif_orientation_of_a_transparent_png_is_turned_as_a_viewer_turns_it(tmp_path):
    """cv2 reads a PNG with alpha unturned (IMREAD_UNCHANGED ignores EXIF): each of the 8 orientations is applied as
    cv2 applies it to the same picture as a JPEG."""
    import io

    import cv2
    from PIL import Image

    picture = (np.random.default_rng(0).random((20, 36)) * 255).astype(np.uint8)
    picture[:5, :7] = 255
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        jpeg, png = io.BytesIO(), io.BytesIO()
        Image.fromarray(picture).save(jpeg, "JPEG", quality=100, exif=exif.tobytes())
        Image.fromarray(np.dstack([picture] * 3 + [np.full_like(picture, 255)]), "RGBA").save(png, "PNG",
                                                                                            exif=exif.tobytes())
        viewer = cv2.imdecode(np.frombuffer(jpeg.getvalue(), np.uint8), cv2.IMREAD_GRAYSCALE)
        (tmp_path / "layer.png").write_bytes(png.getvalue())
        ours = read_image(tmp_path / "layer.png")
        assert ours.shape == viewer.shape and np.abs(ours.astype(int) - viewer).max() <= 2, orientation


def test_a_float_image_with_nan_is_stretched_by_its_finite_values(tmp_path):
    """One NaN made min and max NaN, and the whole X-ray black."""
    import cv2

    from utils import to_uint8

    image = np.array([[0.0, 0.25, np.nan], [0.5, 1.0, np.inf], [-np.inf, 0.75, 0.5]], np.float32)
    assert to_uint8(image).tolist() == [[0, 64, 0], [128, 255, 255], [0, 191, 128]]
    cv2.imwrite(str(tmp_path / "scan.tif"), image)
    assert to_uint8(read_image(tmp_path / "scan.tif")).tolist() == [[0, 64, 0], [128, 255, 255], [0, 191, 128]]


def test_a_truncated_png_is_one_line_and_libpng_says_nothing(tmp_path, capfd):
    write_png(tmp_path / "whole.png", (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    capfd.readouterr()
    with pytest.raises(ToothSegError, match=r"cut.png: a PNG cut short \(it has no end chunk; .*\); replace or remove it$"):
        read_image(tmp_path / "cut.png")
    assert capfd.readouterr().err == ""


def test_sigterm_is_one_line_and_the_previous_handler_comes_back():
    """A kill (or torchrun stopping its ranks) went through no cleanup and said nothing; now it is handled as Ctrl-C."""
    import subprocess
    import sys

    # In its own process: without the handler SIGTERM ends the process it is sent to.
    code = ("import os, signal, sys, time\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
            "from utils import run_cli\n"
            "before = signal.getsignal(signal.SIGTERM)\n"
            "try:\n"
            "    run_cli(lambda argv: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))\n"
            "finally:\n"
            "    print(signal.getsignal(signal.SIGTERM) is before)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr, result.stdout) == (143, "terminated\n", "True\n")


def test_a_worker_leaves_when_the_process_it_works_for_is_killed(tmp_path):
    """DataLoader workers start from a forkserver, whose children outlived a SIGKILLed trainer (about 600 MB each at
    real sizes); the loader's workers now watch the trainer itself."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "load.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "from engine import DistEnv, make_loader\n"
        "class Pids(Dataset):\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i): time.sleep(0.05); return os.getpid()\n"
        "if __name__ == '__main__':\n"
        "    loader = make_loader(Pids(), batch_size=1, train=False, workers=1, dist=DistEnv(), device=torch.device('cpu'), seed=0)\n"
        "    for batch in loader:\n"
        "        print(int(batch[0]), flush=True)\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        worker = int(process.stdout.readline())
        assert worker != process.pid
        process.send_signal(signal.SIGKILL)  # not reaped until the worker is checked: a zombie answers os.kill
        deadline = time.time() + 30
        while time.time() < deadline and os.path.exists(f"/proc/{worker}") and \
                "zombie" not in open(f"/proc/{worker}/status").read().lower():
            time.sleep(0.5)
        assert not os.path.exists(f"/proc/{worker}") or "zombie" in open(f"/proc/{worker}/status").read().lower()
    finally:
        process.kill()
        process.wait(timeout=30)
