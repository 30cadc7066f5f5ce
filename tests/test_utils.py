"""utils.py: atomic writes keep old outputs on failure and leave no temp files; image reading errors name the file."""
from __future__ import annotations

import os
import stat

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
