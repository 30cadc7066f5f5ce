"""run_study.py: resumability after a kill, dry runs, study outputs; TG3K gets the ultrasound transform."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import finetune_seg
import prepare_sts2d
import run_study
from checkpoints import open_checkpoint

REPO = Path(__file__).resolve().parents[1]
TWO_CELLS = ["--models", "unet", "--inits", "scratch", "--label-fractions", "1", "--seeds", "0", "1",
             "--img-height", "32", "--img-width", "64", "--base-channels", "4", "--batch-size", "4",
             "--finetune-epochs", "1", "--workers", "0", "--cpu", "--bootstrap", "100"]


def study(images_dir: Path, out: Path, flags: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_study.py", "--images-dir", str(images_dir), "--out-dir", str(out), *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_killed_study_resumes_with_only_the_unfinished_cell(phantom_data_root, tmp_path):
    images, out = phantom_data_root / "processed_2d", tmp_path / "study"
    first = out / "cells" / "unet_scratch_f1_s0" / "cell.json"
    second = out / "cells" / "unet_scratch_f1_s1" / "cell.json"
    proc = study(images, out, TWO_CELLS, start_new_session=True)
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the stage it is running
    proc.wait()
    assert first.exists() and not second.exists(), "the kill should land while the second cell runs"

    rerun = study(images, out, TWO_CELLS)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "skip unet_scratch_f1_s0: done" in output and "cell unet_scratch_f1_s1 ..." in output
    assert "cell unet_scratch_f1_s0 ..." not in output
    assert "cells run 1, skipped (done) 1, failed 0" in output
    assert second.exists()
    with (out / "study.csv").open() as f:
        assert sorted(int(r["seed"]) for r in csv.DictReader(f)) == [0, 1]
    assert "base 4, fine-tuning 1 epochs" in (out / "study.md").read_text()  # no pretrained cell, no pretraining budget


def test_relative_paths_mean_the_callers_folder(phantom_data_root, tmp_path):
    """Started outside the repository, with relative --images-dir and --out-dir, every stage reads and writes
    where the caller meant (the stages once ran in the repository's folder and did not find the images)."""
    (tmp_path / "root").symlink_to(phantom_data_root)  # processed_2d with its index beside it
    flags = [*TWO_CELLS[:TWO_CELLS.index("--seeds") + 1], "0", *TWO_CELLS[TWO_CELLS.index("--seeds") + 3:]]
    result = subprocess.run([sys.executable, str(REPO / "run_study.py"), "--images-dir", "root/processed_2d", "--out-dir", "study",
                             *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cells run 1, skipped (done) 0, failed 0" in result.stdout
    assert (tmp_path / "study" / "cells" / "unet_scratch_f1_s0" / "eval_test" / "summary.json").is_file()
    assert not (REPO / "study").exists()

    def rerun(*changed: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "run_study.py"), "--images-dir", "root/processed_2d",
                               "--out-dir", "study", *flags, *changed], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    # Where it runs is no setting: the finished cell is skipped. A budget is: the cell is refused, not reused.
    assert "skip unet_scratch_f1_s0: done" in rerun("--workers", "1").stdout
    refused = rerun("--finetune-epochs", "2")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: study/cells/unet_scratch_f1_s0: finished with other settings (finetune_seg.py: --epochs was 1, this run "
        "asks 2); use another --out-dir, or delete it to run it again")


def finished_cell(out: Path, name: str, **record) -> None:
    """A cell.json as a finished cell writes it (nothing trained)."""
    (out / "cells" / name).mkdir(parents=True, exist_ok=True)
    (out / "cells" / name / "cell.json").write_text(json.dumps({"task": "binary", "model": "unet", "label_fraction": 1.0,
                                                                "seed": 0, "semi": "none", **record}))


@pytest.mark.parametrize("case, expected", [
    # a grid run in parts at another size: its seeds were pooled in one row under the last command's header
    ("another input", "unet_scratch_f1_s0: finished with input 48x96, this run asks 32x64; the tables state one budget"),
    # the pretraining deleted and rerun, as the refusal of its changed settings advises: the cell was kept as done
    ("pretraining redone", "unet_mim_f1_s0: made from {out}/pretrain/mim_unet, which was redone or removed since"),
    ("teacher removed", "unet_scratch_pseudo_f1_s0: made from {out}/cells/unet_scratch_f1_s0, which was redone or removed"),
    ("as recorded", None),
])
def test_finished_cells_the_tables_would_misdescribe_are_refused_before_any_work(tmp_path, case, expected):
    out = tmp_path / "study"
    flags = ["--images-dir", str(tmp_path), "--out-dir", str(out), *TWO_CELLS[:TWO_CELLS.index("--seeds")], "--seeds", "0",
             *TWO_CELLS[TWO_CELLS.index("--seeds") + 3:], "--inits", "scratch", "mim"]
    args = run_study.parse_args(flags)
    (out / "pretrain" / "mim_unet").mkdir(parents=True)
    (out / "pretrain" / "mim_unet" / "done.json").write_text(json.dumps({"finished": 2.0}))
    finished_cell(out, "unet_scratch_f1_s0", init="scratch", finished=3.0,
                  budget={**run_study.budget(args, "scratch"), **({"input": "48x96"} if case == "another input" else {})})
    finished_cell(out, "unet_mim_f1_s0", init="mim", budget=run_study.budget(args, "mim"),
                  made_from={"pretrain/mim_unet": 1.0 if case == "pretraining redone" else 2.0})
    finished_cell(out, "unet_scratch_pseudo_f1_s0", init="scratch", semi="pseudo", budget=run_study.budget(args, "scratch"),
                  made_from={"cells/unet_scratch_f1_s0": 3.0})
    if case == "teacher removed":
        (out / "cells" / "unet_scratch_f1_s0" / "cell.json").unlink()
    if expected is None:
        run_study.refuse_mixed(args)
        return
    with pytest.raises(run_study.ToothSegError, match=re.escape(expected.format(out=out))):
        run_study.main(flags)
    assert not list(out.rglob("*.log"))  # nothing ran


def test_each_ci_of_the_study_table_is_its_own(tmp_path):
    """Two cells with the same per-image scores get the same CI, whatever rows come before them."""
    import run_study

    args = run_study.parse_args(["--images-dir", "x", "--out-dir", str(tmp_path), "--bootstrap", "200"])
    scores = np.random.default_rng(0).uniform(0.7, 0.9, 12)
    records = []
    for semi in ("none", "pseudo"):
        record = {"task": "binary", "model": "unet", "init": "scratch", "semi": semi, "label_fraction": 0.5,
                  "seed": 0, "dice": float(scores.mean()), "hd95": 10.0, "assd": 2.0}
        folder = run_study.cell_dir(args, record) / "eval_test"
        folder.mkdir(parents=True)
        (folder / "per_image.csv").write_text("pair_id,dice\n" + "".join(f"p{i},{v}\n" for i, v in enumerate(scores)))
        records.append(record)
    lines, _ = run_study.score_tables(args, records)
    cis = [line.split("|")[7] for line in lines[2:]]
    assert len(cis) == 2 and cis[0] == cis[1]


def test_a_tiny_difference_beside_helps_is_printed_nonzero(tmp_path):
    """A method ahead by 2e-5 on every image: "helps", with digits that show it (it read +0.0000 [+0.0000, +0.0000])."""
    import run_study

    args = run_study.parse_args(["--images-dir", "x", "--out-dir", str(tmp_path), "--bootstrap", "200"])
    scores = np.random.default_rng(0).uniform(0.7, 0.9, 12)
    records = []
    for semi, shift in (("none", 0.0), ("pseudo", 2e-5)):
        record = {"task": "binary", "model": "unet", "init": "scratch", "semi": semi, "label_fraction": 0.5,
                  "seed": 0, "dice": float(scores.mean() + shift), "hd95": 10.0, "assd": 2.0}
        folder = run_study.cell_dir(args, record) / "eval_test"
        folder.mkdir(parents=True)
        (folder / "per_image.csv").write_text("pair_id,dice\n" + "".join(f"p{i},{v + shift}\n" for i, v in enumerate(scores)))
        records.append(record)
    _, diffs = run_study.score_tables(args, records)
    cells = [cell.strip() for cell in diffs[2].split("|")[1:-1]]
    assert cells[3:] == ["+0.000020", "[+0.000020, +0.000020]", "helps"]


def test_fractions_that_round_to_the_same_labelled_pairs_are_noted():
    """0.05 and 0.1 of 8 pairs both keep one (at least one is kept): the study says their rows are one experiment."""
    import run_study

    records = [{"model": "unet", "init": "scratch", "semi": "none", "seed": 0, "label_fraction": f, "n_labelled": n}
               for f, n in ((0.05, 1), (0.1, 1), (1, 8))]
    assert run_study.same_labels(records) == [
        "Note: label fractions 0.05 and 0.1 trained unet (scratch, none, seed 0) on the same 1 labelled pair(s); at least "
        "one is kept, so their rows are one experiment twice.", ""]
    assert run_study.same_labels(records[1:]) == []


def test_dry_run_prints_the_stage_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "run_study.py", "--images-dir", "data/processed_2d", "--out-dir", str(out),
                             "--models", "unet", "scag", "--inits", "scratch", "mim", "--label-fractions", "0.1", "1",
                             "--seeds", "0", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert sum("mim_pretrain.py" in line for line in lines) == 2  # once per model
    assert sum("finetune_seg.py" in line for line in lines) == 2 * 2 * 2
    assert sum("eval.py" in line for line in lines) == 2 * 2 * 2
    assert any(f"--init-from {out / 'pretrain' / 'mim_scag'}" in line and "--label-fraction 0.1" in line
               for line in lines)
    assert not out.exists()


def test_fused_teachers_share_the_labels_and_label_the_pool_together(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "run_study.py", "--images-dir", "data/processed_2d", "--out-dir", str(out),
                             "--inits", "scratch", "--semi", "none", "pseudo", "--label-fractions", "0.1", "--seeds", "3",
                             "--teachers", "2", "--pseudo-rounds", "2", "--dry-run"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if not line.startswith("#")]
    cells = out / "cells"
    twin, cell = cells / "unet_scratch_f0.1_s3", cells / "unet_scratch_pseudo_f0.1_s3"
    finetunes = {line[line.index("--checkpoint-dir") + 1]: line for line in lines if "finetune_seg.py" in line[1]}
    extra = finetunes[str(cell / "teacher_s4")]
    assert extra[extra.index("--seed") + 1] == "4" and extra[extra.index("--label-seed") + 1] == "3"
    assert "--pseudo-labels" not in extra and "--label-seed" not in finetunes[str(twin)]
    labelling = [line[line.index("--checkpoint") + 1:line.index("--split")] for line in lines
                 if "--save-probs" in line]
    assert labelling == [[str(twin), str(cell / "teacher_s4")], [str(cell / "round1")]]  # round 2: one teacher
    assert not out.exists()


def test_study_outputs_summarise_every_cell(tiny_study):
    with (tiny_study / "study.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["init"] for r in rows) == ["fullimage", "mim", "scratch"]
    for row in rows:
        cell = json.loads((tiny_study / "cells" / f"unet_{row['init']}_f1_s0" / "cell.json").read_text())
        summary = json.loads((tiny_study / "cells" / f"unet_{row['init']}_f1_s0" / "eval_test" / "summary.json").read_text())
        assert float(row["dice"]) == cell["dice"] == summary["metrics"]["dice"]["mean"]
    table = (tiny_study / "study.md").read_text()
    pairs = len(open_checkpoint(tiny_study / "cells" / "unet_mim_f1_s0").task["labelled_pairs"])
    assert cell["n_labelled"] == pairs  # what the fraction kept, read back from the cell's checkpoint
    assert f"| unet | mim | none | 1 ({pairs} pairs) | 1 |" in table and "Dice − supervised scratch" in table
    assert "base 4, pretraining 1 epochs, fine-tuning 2 epochs, batch 4; extra fine-tuning flags `none`." in table
    figure = cv2.imread(str(tiny_study / "study_dice.png"))
    assert figure is not None and figure.shape[0] > 200


def test_tg3k_data_trains_with_the_ultrasound_transform(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "tg3k"
    (root / "thyroid-image").mkdir(parents=True)
    (root / "thyroid-mask").mkdir()
    for i in range(10):
        image = (rng.random((48, 64)) * 255).astype(np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        mask[10 + i:30, 15:40 + i] = 255
        cv2.imwrite(str(root / "thyroid-image" / f"{i:04d}.jpg"), image)
        cv2.imwrite(str(root / "thyroid-mask" / f"{i:04d}.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, 60])  # JPEG-noisy
    (root / "tg3k-trainval.json").write_text(json.dumps({"train": list(range(8)), "val": [8, 9]}))
    prepare_sts2d.main(["--tg3k-dir", str(root), "--data-root", str(tmp_path / "data"), "--val-ratio", "0.25"])
    finetune_seg.main(["--images-dir", str(tmp_path / "data" / "processed_2d"), "--checkpoint-dir", str(tmp_path / "ft"),
                       "--img-height", "32", "--img-width", "32", "--base-channels", "4", "--epochs", "1",
                       "--batch-size", "2", "--num-workers", "0", "--cpu"])
    assert open_checkpoint(tmp_path / "ft" / "last.pth").data.modality == "ultrasound"


@pytest.mark.parametrize("flags, expected", [
    (["--models", "unet", "unet3plus"], "unknown --models unet3plus; valid: "),
    # each of these failed only after the pretraining had run, or (--bootstrap) at the very end
    (["--label-fractions", "1.5"], "--label-fractions: must be above 0 and at most 1, got 1.5"),
    (["--finetune-epochs", "0"], "--finetune-epochs: must be at least 1, got 0"),
    (["--bootstrap", "0"], "--bootstrap: must be at least 1, got 0"),
    # bare folders have no split for the pretraining to leave out: it pretrained on the cells' test images
    (["--masks-dir", "masks", "--inits", "scratch", "mim"], "pretraining on folders without an index would see every image"),
    # finetune_seg.py refuses a way's flags in the other way's cells (they were ignored, and shown as applied)
    (["--semi", "none", "pseudo", "online", "--semi-args", "--pseudo-keep 0.5"],
     "--semi-args --pseudo-keep is for the pseudo cells only, but would reach the online cells"),
    (["--semi", "none", "pseudo", "online", "--semi-args=--ema-d=0.9"], "--semi-args --ema-d is for the online cells"),
    (["--semi", "none", "online", "--finetune-args", "--confidence 0.8"],
     "--finetune-args --confidence is for the online cells only, but would reach every cell"),
    (["--finetune-args", '--lr "0.1'], "argument --finetune-args: No closing quotation"),
])
def test_a_grid_that_cannot_run_is_refused_before_any_work(tmp_path, capsys, flags, expected):
    import run_study

    with pytest.raises(SystemExit) as stopped:
        run_study.main(["--images-dir", str(tmp_path), "--out-dir", str(tmp_path / "study"), *flags])
    assert stopped.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_a_damaged_record_or_a_file_for_the_folder_is_one_line(tiny_study, tmp_path):
    """A cell.json cut short or a per_image.csv edited by hand name the file and the fix; so does an --out-dir
    that is a file (a NotADirectoryError after the first cell's log was opened)."""
    from utils import ToothSegError

    study = tmp_path / "study"
    shutil.copytree(tiny_study, study)
    argv = ["--images-dir", str(tmp_path / "absent"), "--out-dir", str(study), "--inits", "scratch"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ToothSegError, match=r"file: exists and is not a folder; give --out-dir a folder path"):
        run_study.main([*argv[:2], "--out-dir", str(tmp_path / "file" / "study")])
    cell = next((study / "cells").glob("*/cell.json"))
    per_image = cell.parent / "eval_test" / "per_image.csv"
    per_image.write_text(per_image.read_text().replace(",", ",abc", 1 + per_image.read_text().split("\n")[0].count(",")))
    with pytest.raises(ToothSegError, match=rf"{re.escape(str(per_image))}: cannot be read as eval.py wrote it"):
        run_study.score_tables(run_study.parse_args(argv), run_study.collect(run_study.parse_args(argv)))
    cell = study / "cells" / "unet_scratch_f1_s0" / "cell.json"  # a cell of this grid
    cell.write_text('{"model": "unet", ')
    with pytest.raises(ToothSegError, match=rf"{re.escape(str(cell))}: cannot be read .*; delete the folder of that step"):
        run_study.main(argv)


def test_a_binary_initialised_per_tooth_cell_starts_from_its_binary_twin(tiny_study):
    from checkpoints import open_checkpoint

    cell = open_checkpoint(tiny_study / "cells" / "unet_binary_teeth_f1_s0")
    assert cell.tooth_classes and cell.task["init_from"].endswith("cells/unet_scratch_f1_s0")
    assert re.search(r"\| unet \| binary \| none \| 1 \(\d+ pairs\) \| 1 \|", (tiny_study / "study_teeth.md").read_text())


def test_binary_init_needs_the_per_tooth_task(tmp_path, capsys):
    import run_study

    with pytest.raises(SystemExit):
        run_study.main(["--images-dir", str(tmp_path), "--inits", "binary"])
    assert "--inits binary starts a per-tooth cell from its binary twin" in capsys.readouterr().err


def test_an_external_evaluation_is_found_done_whatever_path_named_its_set(tmp_path, monkeypatch):
    """eval records the absolute path; run_study was given a relative one (it redid the evaluation every time
    and left it out of the report)."""
    from argparse import Namespace

    (tmp_path / "other" / "processed_2d").mkdir(parents=True)
    (tmp_path / "cell" / "eval_external").mkdir(parents=True)
    summary = tmp_path / "cell" / "eval_external" / "summary.json"
    monkeypatch.chdir(tmp_path)
    summary.write_text(json.dumps({"images_dir": str(tmp_path / "other" / "processed_2d")}))
    assert run_study.external_done(Namespace(external_test=Path("other/processed_2d")), Path("cell"))
    summary.write_text(json.dumps({"images_dir": str(tmp_path / "elsewhere")}))  # another set is redone
    assert not run_study.external_done(Namespace(external_test=Path("other/processed_2d")), Path("cell"))


def test_the_table_describes_each_cell_as_it_ran():
    """A grid run in parts (the README's pseudo cells with two rounds, then the online cells): the header once
    described every cell by the last command's flags."""
    cells = [{"name": "a", "semi": "none", "extra": {"finetune_args": "--augment=strong"}},
             {"name": "b", "semi": "pseudo", "extra": {"finetune_args": "--augment=strong", "pseudo_rounds": 2,
                                                       "semi_args": "--labelled-share=0.5"}},
             {"name": "c", "semi": "online", "extra": {"finetune_args": "--augment=strong", "semi_args": ""}},
             {"name": "d", "semi": "online"}]  # a cell from before the record
    assert run_study.cell_extras(cells) == (
        "extra fine-tuning flags `--augment=strong` (a, b, c); not recorded (d); pseudo-label cells: 2 round(s), "
        "extra flags `--labelled-share=0.5`; online cells: extra flags `none` (c); not recorded (d)")


@pytest.mark.parametrize("given, name", [("runs/tufts/processed_2d", "tufts"), ("runs/tufts/processed_2d_fbf", "tufts"),
                                         ("runs/tufts", "tufts")])  # a data root given as --external-test: once "runs"
def test_a_plot_panel_names_the_data_root_however_it_was_given(given, name):
    assert run_study.data_name(Path(given)) == name


def test_a_cell_of_other_steps_is_named_by_its_steps_not_a_shifted_flag():
    """Another number of pseudo-label rounds compared command by command read 'a flag was finetune_seg.py, this run
    asks eval.py'."""
    one_round = [["finetune_seg.py", "--epochs", "1"], ["eval.py", "--split", "unlabelled"], ["eval.py", "--split", "test"]]
    two_rounds = [one_round[0], one_round[1], ["finetune_seg.py", "--epochs", "1"], *one_round[1:]]
    assert run_study.first_difference(two_rounds, one_round) == (
        "its steps were finetune_seg.py then eval.py then finetune_seg.py then eval.py then eval.py, this run's are "
        "finetune_seg.py then eval.py then eval.py")
    assert run_study.first_difference(one_round, [one_round[0][:2] + ["2"], *one_round[1:]]) == \
        "finetune_seg.py: --epochs was 1, this run asks 2"
