"""benchmarks/throughput.py at a tiny size: it runs end to end on this machine's device and its report
has every row, with positive, mutually consistent numbers."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import throughput
from models import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"
TINY = ["--data", "phantom", "--phantom-images", "3", "--height", "32", "--width", "64", "--base-channels", "4",
        "--batch-size", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "1",
        "--threads", "1"]  # one intra-op thread: tiny convolutions otherwise wait on OpenMP barriers


BENCHED = ["unet", "fpn"]  # an own U-Net and an smp model: the rows of every model cost the suite half a minute


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def table(report: str, heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under the section whose heading starts with `heading`."""
    section = report.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return rows[2:]  # past the header and the alignment rule


def number(cell: str) -> float:
    """The leading figure of a cell: "2.31x (1.90-2.60)" gives 2.31."""
    return float(cell.split()[0].removesuffix("x"))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bench") / "throughput.md"
    result = run_benchmark(*TINY, "--models", *BENCHED, "--peak-tflops", "0.5", "--profile", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == result.stdout
    return result.stdout


def test_header_names_device_torch_date_and_command(report):
    header = report.split("\n## ", 1)[0]
    assert "- device: " in header and f"- torch: {torch.__version__}" in header and "- date: " in header
    assert "- command: `python benchmarks/throughput.py --data phantom" in header


def test_throughput_table_has_every_model_with_positive_rates(report):
    rows = table(report, "Throughput")
    assert [row[0] for row in rows] == BENCHED
    for row in rows:
        train_ours, train_naive, train_ratio, infer_ours, infer_naive, infer_ratio = map(number, row[1:])
        assert min(train_ours, train_naive, infer_ours, infer_naive) > 0
        # With one round the speed-up is exactly the ratio of the two rates (up to the printed rounding).
        assert train_ratio == pytest.approx(train_ours / train_naive, rel=0.02, abs=0.01)
        assert infer_ratio == pytest.approx(infer_ours / infer_naive, rel=0.02, abs=0.01)
        assert row[3].endswith(f"({train_ratio:.2f}-{train_ratio:.2f})")  # one round: no spread


def test_compute_table_matches_an_independent_flop_count(report):
    rates = {row[0]: number(row[1]) for row in table(report, "Throughput")}
    rows = table(report, "Compute use")
    assert [row[0] for row in rows] == BENCHED
    for name, forward, train, train_tflops, infer_tflops, share in rows:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            build_model(name, base_channels=4)(torch.zeros(1, 1, 32, 64))
        assert float(forward) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-3)
        assert 2 < float(train) / float(forward) < 4  # backward costs about twice the forward
        assert float(train_tflops) == pytest.approx(float(train) * rates[name] / 1e3, rel=0.02)
        assert float(infer_tflops) > 0
        assert float(share) == pytest.approx(100 * float(train_tflops) / 0.5, rel=0.02, abs=0.05)


def test_pipeline_table_compares_with_training(report):
    rows = table(report, "Data pipeline")
    assert [row[0].split(":")[0] for row in rows] == ["ours", "naive"]
    fastest_train = max(number(row[1]) for row in table(report, "Throughput"))
    for _, rate, headroom in rows:
        assert number(rate) > 0
        assert number(headroom) == pytest.approx(number(rate) / fastest_train, rel=0.05, abs=0.1)


def test_profile_names_the_operators_and_the_data_wait(report):
    profile = report.split("\n## Profile", 1)[1]
    assert "aten::convolution_backward" in profile
    waited, wall = (float(x) for x in re.search(r"waiting for the DataLoader: ([\d.]+) s of ([\d.]+) s", profile).groups())
    assert 0 <= waited < wall


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/bench"], "/nonexistent/bench: needs images/ and masks/ subfolders"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_input_is_one_line_error(args, message, cli_error):
    assert message in cli_error(throughput.main, [*TINY, *args])
