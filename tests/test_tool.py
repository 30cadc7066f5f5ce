"""tool.py, run as a user runs it: inspecting checkpoints and bare state_dicts, diffing what
transfers from pretraining to fine-tuning, and one-line errors."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import tool
from checkpoints import open_checkpoint, save_checkpoint
from utils import run_cli

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args) -> subprocess.CompletedProcess:
    """tool.py as a user runs it, in its own process."""
    return subprocess.run([sys.executable, str(REPO / "tool.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    """The same command line through run_cli in this process (saves a torch import per call)."""
    try:
        run_cli(tool.main, [str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(output: str, label: str) -> list[str]:
    """The numbers on the line of a table that starts with `label`."""
    line = next(line for line in output.splitlines() if line.startswith(label))
    return re.findall(r"[\d,]+", line[len(label):])


def test_inspect_reports_the_real_model(tiny_study, capsys):
    path = tiny_study / "cells" / "unet_mim_f1_s0" / "best.pth"
    ckpt = open_checkpoint(path)
    model = ckpt.build_model()
    result = run_tool(path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^kind +segmentation ", out, re.M)
    assert re.search(r"^model +unet$", out, re.M)
    assert "base_channels=4" in out
    assert re.search(rf"^epoch +{ckpt.epoch} \(global step {ckpt.state.global_step}\)", out, re.M)
    best = ckpt.state.best
    assert re.search(rf"^best +val/dice = {best['value']:.6g} at epoch {best['epoch']}", out, re.M)
    assert f"parameters   {sum(p.numel() for p in model.parameters()):,} in " in out
    assert re.search(r"^input +64 x 128 \(H x W\)", out, re.M)
    # a format-2 file recorded the index it split by, or none: then file names, not "found or else"
    split = ckpt.data.split
    assert re.search(rf"^splits +index {re.escape(str(split.index))}$" if split.index else
                     rf"^splits +file names \(val {split.val_ratio}, test {split.test_ratio}, seed {split.seed}\)$", out, re.M)
    assert re.search(r"^precision +--amp auto \(trained in ", out, re.M)
    assert re.search(r"^task +task=binary classes=None lambda_dice=0\.2 label_fraction=1\.0 .*augment=standard "
                     r"mask_resize=area init_from=\S*pretrain/mim_unet", out, re.M)
    assert re.search(r"^  init_from +.*pretrain/mim_unet$", out, re.M)  # run arguments
    for key, tensor in ckpt.state.weights.items():                  # every key with its shape
        assert re.search(rf"^  {re.escape(key)} +{'x'.join(map(str, tensor.shape)) or 'scalar'} ", out, re.M)

    code, short, _ = run_in_process(capsys, path, "--no-keys")
    assert code == 0 and "encoder.stem.0.conv.weight" not in short and "parameters" in short
    # pretraining records an index only when given --index; the one it found beside the images it does not
    code, pretrained, _ = run_in_process(capsys, tiny_study / "pretrain" / "mim_unet", "--no-keys")
    assert code == 0 and re.search(r"^splits +index found in or beside the images, else file names", pretrained, re.M)


def test_diff_pretraining_to_finetuning_shares_every_key(tiny_study):
    pretrained = tiny_study / "pretrain" / "mim_unet" / "best.pth"
    finetuned = tiny_study / "cells" / "unet_mim_f1_s0" / "best.pth"
    state = open_checkpoint(finetuned).state.weights
    keys = [k for k in state if not k.endswith("num_batches_tracked")]
    result = run_tool("--diff", pretrained, finetuned, "--no-keys")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert row(out, "in both, same shape") == [str(len(keys)), f"{sum(state[k].numel() for k in keys):,}"]
    assert row(out, "only in A") == ["0", "0"] and row(out, "only in B") == ["0", "0"]
    assert row(out, "shape mismatch") == ["0", "0"]
    assert "fills 100.0% of its weight elements (enough" in out
    assert re.search(r"^B +.*best\.pth: segmentation checkpoint, unet ", out, re.M)


def test_bare_state_dict_inspected_and_diffed(tiny_study, tmp_path):
    """A bare state_dict saved from a DDP-wrapped model (module. prefix), with one tensor changed,
    one dropped, one reshaped and one extra: each lands in its own row."""
    checkpoint = tiny_study / "cells" / "unet_scratch_f1_s0" / "best.pth"
    model = open_checkpoint(checkpoint).build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    changed, dropped, reshaped = "head.conv.weight", "encoder.stem.0.conv.weight", "encoder.stem.1.conv.weight"
    state[changed] += 0.25
    del state[dropped]
    state[reshaped] = torch.zeros(3, 3)
    state["extra.weight"] = torch.ones(7)
    bare = tmp_path / "weights.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, bare)

    inspected = run_tool(bare, "--no-keys")
    assert inspected.returncode == 0, inspected.stderr
    assert "bare state_dict" in inspected.stdout

    result = run_tool("--diff", bare, checkpoint)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert row(out, "in both, same shape")[0] == str(len(keys) - 2)
    assert row(out, "  of which equal values")[0] == str(len(keys) - 3)
    assert row(out, "only in A") == ["1", "7"]
    assert row(out, "only in B")[0] == "1" and row(out, "shape mismatch")[0] == "1"
    assert re.search(rf"^  {re.escape(changed)} +\S+ +\S+ +differs +0\.25\b", out, re.M)
    assert re.search(rf"^  {re.escape(dropped)} +- +4x1x3x3 +only in B", out, re.M)
    assert re.search(rf"^  {re.escape(reshaped)} +3x3 +4x4x3x3 +shape mismatch", out, re.M)
    assert re.search(r"^  extra\.weight +7 +- +only in A", out, re.M)
    assert "largest difference among shared keys: max |A - B| = 0.25 (head.conv.weight)" in out


def test_too_little_overlap_is_flagged(tiny_study, tmp_path):
    small = {"head.conv.weight": open_checkpoint(tiny_study / "cells" / "unet_mim_f1_s0").state.weights["head.conv.weight"]}
    torch.save(small, tmp_path / "head_only.pt")
    out = run_tool("--diff", tmp_path / "head_only.pt", tiny_study / "cells" / "unet_mim_f1_s0" / "best.pth",
                   "--no-keys").stdout
    assert "too little: finetune_seg.py would refuse; it needs 20%" in out


def test_bad_files_give_one_line_errors(tmp_path, capsys):
    missing = run_tool(tmp_path / "missing.pth")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'missing.pth'}: file not found; check the path"
    (tmp_path / "corrupt.pth").write_bytes(b"not a torch file")
    torch.save({"note": "no tensors here"}, tmp_path / "dict.pth")
    for name, reason in (("corrupt.pth", "corrupt or not a torch file"), ("dict.pth", "neither a ToothSeg checkpoint")):
        code, _, err = run_in_process(capsys, "--diff", tmp_path / name, tmp_path / name)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith(f"error: {tmp_path / name}: ") and reason in err


def test_help_and_usage(capsys):
    code, out, _ = run_in_process(capsys, "--help")
    assert code == 0 and "--diff A B" in out and "on by default" in out
    code, _, err = run_in_process(capsys)
    assert code == 2 and "give one CKPT to inspect, or --diff A B" in err


def test_resume_state_names_the_task_state(tiny_study, tmp_path, capsys):
    """--semi's mean teacher is part of what a run resumes from: listed when the file holds it, so a copy
    without it (which cannot resume) reads differently."""
    ckpt = open_checkpoint(tiny_study / "cells" / "unet_mim_f1_s0" / "best.pth")
    with_teacher = ckpt.with_state(epoch=ckpt.epoch, metrics=ckpt.metrics, state=dataclasses.replace(
        ckpt.state, task_state={"teacher": dict(ckpt.state.weights), "steps": 3}))
    save_checkpoint(tmp_path / "semi.pth", with_teacher)
    listed = {}
    for name, path in (("with", tmp_path / "semi.pth"), ("without", tiny_study / "cells" / "unet_mim_f1_s0" / "best.pth")):
        code, out, err = run_in_process(capsys, path, "--no-keys")
        assert code == 0, err
        listed[name] = next(line for line in out.splitlines() if line.startswith("resume state"))
    assert "the task's own (teacher, steps)" in listed["with"]
    assert "task" not in listed["without"]
