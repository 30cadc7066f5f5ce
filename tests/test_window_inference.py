"""benchmarks/window_inference.py at a tiny size: it times both ways end to end, from a fresh model or a
checkpoint file, and turns bad input into one line."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import window_inference
from checkpoints import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "window_inference.py"
TINY = ["--images", "phantom", "--count", "2", "--repeats", "2", "--input-size", "64", "128", "--window", "64", "64",
        "--base-channels", "4", "--threads", "1"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def timings(report: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^\| (windows|whole input) \| ([\d.]+) \| ([\d.]+) \|$", report, re.M)
    return {name: (float(best), float(middle)) for name, best, middle in rows}


def test_report_times_windows_and_whole_input(tmp_path):
    out = tmp_path / "inference.md"
    result = run_benchmark(*TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == result.stdout
    report = result.stdout
    assert "- command: `python benchmarks/window_inference.py --images phantom" in report
    assert "2 synthetic phantoms resized to 1615x840" in report
    assert "input 64x128, window 64x64, overlap 0.5" in report
    times = timings(report)
    assert set(times) == {"windows", "whole input"}
    for best, middle in times.values():
        assert 0 < best <= middle
    ratio, low, high = (float(x) for x in re.search(r"per-image ratios: ([\d.]+)x \(([\d.]+)-([\d.]+)\)", report).groups())
    assert 0 < low <= ratio <= high


def test_a_checkpoint_file_is_timed_with_its_own_window(tmp_path):
    predictor = window_inference.fresh_predictor(window_inference.parse_args([*TINY, "--window", "32", "64"]),
                                                 torch.device("cpu"))
    save_checkpoint(tmp_path / "best.pth", predictor.checkpoint)
    result = run_benchmark(*TINY, "--checkpoint", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"- model: {tmp_path}: unet 4, input 64x128, window 32x64" in result.stdout
    assert set(timings(result.stdout)) == {"windows", "whole input"}


def test_checkpoint_without_window_is_one_line_error(tmp_path, cli_error):
    record = window_inference.fresh_predictor(window_inference.parse_args(TINY), torch.device("cpu")).checkpoint
    save_checkpoint(tmp_path / "best.pth", replace(record, data=replace(record.data, window=None)))
    stderr = cli_error(window_inference.main, [*TINY, "--checkpoint", str(tmp_path / "best.pth")])
    assert stderr == f"error: {tmp_path / 'best.pth'}: was trained without --window; there are no windows to time"


@pytest.mark.parametrize("args, message", [
    (["--images", "/nonexistent/xrays"], "/nonexistent/xrays: no images found"),
    (["--count", "0"], "--count must be at least 1"),
    (["--window-overlap", "1"], "--window-overlap must be in [0, 1)"),
    (["--window", "128", "128"], "--window 128 128: larger than the input --input-size 64 128"),  # was timed
    (["--window", "50", "64"], "--window 50 64: both sides must be multiples of 16"),
])
def test_bad_input_is_one_line_error(args, message, cli_error):
    assert message in cli_error(window_inference.main, [*TINY, *args])


def test_a_report_path_that_cannot_be_written_is_refused_before_the_timing(tmp_path, capsys):
    """A folder given for --out failed only after the whole benchmark had run."""
    from utils import run_cli

    with pytest.raises(SystemExit) as stopped:
        run_cli(window_inference.main, [*TINY, "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"argument --out: {tmp_path} is a folder; give a file path" in capsys.readouterr().err
