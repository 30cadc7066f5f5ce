"""The checkpoint contract: a format-1 file (written by the code before the contract, committed as a
fixture) still works in eval, tool, --init-from and --resume; format 2 round-trips through its record;
and the modules import downhill (no cycles, no matplotlib in training or eval, no torch in prepare)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import eval as eval_script
import finetune_seg
from checkpoints import (BEST, Checkpoint, DataSpec, ModelSpec, Precision, SplitSpec, TrainingState, open_checkpoint,
                         read_weights, save_checkpoint)
from utils import ToothSegError

REPO = Path(__file__).resolve().parents[1]
# UNet base 2 at 32x64, fine-tuned for 1 epoch on the 24-image phantom (prepare_sts2d.py --synthetic 24
# --seed 7) by finetune_seg.py at commit 10a1597, the last to write format 1; its data paths no longer exist.
FORMAT1 = REPO / "tests" / "fixtures" / "format1_segmentation.pth"
NET = ["--img-height", "32", "--img-width", "64", "--batch-size", "4", "--num-workers", "0", "--cpu"]


def test_format1_is_read_into_the_same_record():
    record = open_checkpoint(FORMAT1, ("segmentation",))
    raw = torch.load(FORMAT1, weights_only=True)
    assert raw["format"] == 1 and record.format == 1  # the fixture really is the old layout
    assert record.kind == "segmentation" and record.model == ModelSpec("unet", raw["model_args"])
    assert record.data.input_size == (32, 64) and record.data.modality == "xray"
    assert record.data.split == SplitSpec(None, 0.1, 0.1, 0)  # the old --val-ratio/--test-ratio/--seed
    assert record.precision.amp == "auto" and record.task["lambda_dice"] == 0.2
    assert record.epoch == 1 and record.state.global_step == 1 and record.state.best["metric"] == "val/dice"
    assert record.state.optimizer is not None and "epochs_since_best" not in record.metrics
    model = record.build_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw["model"].items())


def test_format1_is_scored_inspected_and_transferred(phantom_data_root, tmp_path, capsys):
    eval_script.main(["--checkpoint", str(FORMAT1), "--images-dir", str(phantom_data_root / "processed_2d"),
                      "--out-dir", str(tmp_path / "eval"), "--cpu", "--workers", "0"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["n_images"] == 2 and summary["input_size"] == [32, 64]

    result = subprocess.run([sys.executable, "tool.py", str(FORMAT1), "--no-keys"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "checkpoint format 1, upgraded on read" in result.stdout, result.stderr

    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir",
                       str(tmp_path / "init"), *NET, "--epochs", "1", "--init-from", str(FORMAT1)])
    assert "matched 92, missing 0, mismatched 0, unused 0" in capsys.readouterr().out
    assert open_checkpoint(tmp_path / "init").model.args["base_channels"] == 2  # width followed the checkpoint


def test_format1_resumes_where_it_stopped(phantom_data_root, tmp_path, capsys):
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    shutil.copy(FORMAT1, old_run / "last.pth")
    finetune_seg.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--checkpoint-dir", str(tmp_path / "new"),
                       *NET, "--epochs", "2", "--resume", str(old_run / "last.pth")])
    assert "resumed" in capsys.readouterr().out
    resumed = open_checkpoint(tmp_path / "new" / "last.pth")
    assert resumed.format == 2 and resumed.epoch == 2 and resumed.state.global_step == 2
    assert resumed.model.args["base_channels"] == 2


def test_format2_round_trips_and_reads_no_flags(tmp_path):
    """Readers use the named sections only: a checkpoint whose run flags are wiped still evaluates the same."""
    record = open_checkpoint(FORMAT1)
    renamed = replace(record, run_args={"renamed_flag": 1}, data=replace(record.data, images_dir="/nowhere"))
    save_checkpoint(tmp_path / BEST, renamed)
    back = open_checkpoint(tmp_path)
    assert back.format == 2 and back.run_args == {"renamed_flag": 1} and back.data.images_dir == "/nowhere"
    assert (back.model, back.data.split, back.task, back.epoch) == (record.model, record.data.split, record.task, record.epoch)
    assert back.data.input_size == (32, 64) and isinstance(back.data.input_size, tuple)
    with pytest.raises(ToothSegError, match="/nowhere: images folder not found"):
        back.data.labelled_splits()  # the recorded folder, not a flag, is where it looks


def test_a_damaged_or_foreign_file_is_one_clear_error(tmp_path):
    raw = torch.load(FORMAT1, weights_only=True)
    del raw["model_args"]
    torch.save(raw, tmp_path / "damaged.pth")
    with pytest.raises(ToothSegError, match="damaged.pth: a damaged ToothSeg checkpoint"):
        open_checkpoint(tmp_path / "damaged.pth")
    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "bare.pth")
    with pytest.raises(ToothSegError, match="not a ToothSeg checkpoint"):
        open_checkpoint(tmp_path / "bare.pth")
    assert read_weights(tmp_path / "bare.pth")[0] is None  # but --init-from takes it
    with pytest.raises(ToothSegError, match=f"{tmp_path}: no {BEST} in this folder"):
        open_checkpoint(tmp_path)
    raw = torch.load(FORMAT1, weights_only=True)
    torch.save({**raw, "format": 3}, tmp_path / "newer.pth")  # once called neither a checkpoint nor a state_dict
    for read in (open_checkpoint, read_weights):
        with pytest.raises(ToothSegError, match="newer.pth: a ToothSeg checkpoint of format 3, which this version reads "
                                                "only up to format 2"):
            read(tmp_path / "newer.pth")


def test_weights_that_do_not_fit_their_record_are_one_clear_error(tmp_path):
    record = open_checkpoint(FORMAT1)
    weights = dict(list(record.state.weights.items())[2:])  # cut short
    save_checkpoint(tmp_path / BEST, replace(record, state=replace(record.state, weights=weights)))
    with pytest.raises(ToothSegError, match=rf"{BEST}: its weights do not fit the unet .* it records \(Missing key"):
        open_checkpoint(tmp_path).build_model()


def test_the_record_is_plain_data(tmp_path):
    record = Checkpoint(kind="mim", model=ModelSpec("unet", {"base_channels": 2}),
                        data=DataSpec(input_size=(8, 16), norm_mean=0.5, norm_std=0.25, images_dir=str(tmp_path),
                                      holdout=0.1),
                        precision=Precision("off", "float32"), task={"masking": {"ratio": 0.5}},
                        state=TrainingState({"w": torch.zeros(2)}), run_args={"path": tmp_path})
    save_checkpoint(tmp_path / "x.pth", record)
    raw = torch.load(tmp_path / "x.pth", weights_only=True)  # plain types and tensors only
    assert raw["run_args"] == {"path": str(tmp_path)} and raw["data"]["input_size"] == [8, 16]
    assert open_checkpoint(tmp_path / "x.pth").data.holdout == 0.1


@pytest.mark.parametrize("modules, forbidden", [
    (("eval", "finetune_seg", "mim_pretrain", "fullimage_pretrain", "predict"), ("visualizer", "matplotlib")),
    (("tool",), ("visualizer", "matplotlib", "albumentations")),
    (("prepare_sts2d", "fbf", "index", "compare"), ("torch", "albumentations")),
])
def test_modules_import_downhill(modules, forbidden):
    """Modules imported one after another in one fresh interpreter: the first that loads a forbidden module is
    named (what an earlier one loaded, it did not)."""
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"    loaded = sorted(m for m in {forbidden!r} if m in sys.modules)\n"
            f"    if loaded:\n        print(name, 'loads', loaded)\n        break")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_no_import_cycles():
    """Each project module's imports of other project modules form a DAG (stages -> topics -> utils)."""
    import ast

    modules = {p.stem: p for p in REPO.glob("*.py")}
    edges = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        edges[name] = sorted(found & set(modules) - {name})
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for other in edges[name]:
            visit(other, trail + [name])
        state[name] = "done"

    for name in modules:
        visit(name, [])
    assert "visualizer" not in edges["eval"] and "eval" not in edges["visualizer"]


def test_resume_from_a_run_folder_takes_its_last_checkpoint(tmp_path):
    """best.pth may be epochs behind where the run stopped; a folder given to --resume means last.pth."""
    assert finetune_seg.parse_args(["--images-dir", "x", "--resume", str(tmp_path)]).resume == tmp_path / "last.pth"
    assert finetune_seg.parse_args(["--images-dir", "x", "--resume", str(tmp_path / "best.pth")]).resume \
        == tmp_path / "best.pth"
