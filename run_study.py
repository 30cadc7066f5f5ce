"""The study: how much do unlabelled X-rays help tooth segmentation, and which way of using them? Runs
the grid models x initialisation x use of unlabelled images x label fraction x seed by calling the stage
scripts as subprocesses with the flags a user would type, then tabulates test metrics.

Initialisation (--inits): scratch, or MIM / full-image pretraining on the whole pool (the labelled
training images and every unlabelled one), once per model (seed --pretrain-seed). Unlabelled images
during fine-tuning (--semi): none; pseudo (offline, as the STS 2023 winners: the cell's supervised twin,
fused with --teachers N-1 more models of the same labels, labels the unlabelled pool with soft
probabilities, eval.py --save-probs, and a student fine-tunes on labels plus pseudo-labels); online
(finetune_seg.py --semi, a mean teacher with weak-to-strong consistency). The unlabelled pool is the
index's unlabelled images plus the training pairs that the label fraction leaves out. Every cell
evaluates on the test split (eval.py). The study is resumable: a cell is done when
OUT_DIR/cells/NAME/cell.json exists; failed or interrupted cells are redone from scratch, so a crash
loses only the cell in progress. A finished cell or pretraining of other settings is refused, not reused.

Outputs in OUT_DIR, over every finished cell of the task in the folder (so a study can run in parts, say
the pseudo and online cells for scratch only, and still be tabulated as one): study.csv (one row per cell), study.md (mean ± std over seeds, bootstrap 95% CIs
over test images, and each pretraining's paired difference to scratch), and study_dice.png
(test Dice against label fraction, one line per method); study_teeth.* for --task teeth. Each method is compared with supervised
scratch by a paired bootstrap over the test images.

--task teeth runs the per-tooth task (finetune_seg.py --task teeth) in the same grid of models and
initialisations, on the pairs with per-tooth label maps, and tabulates per-tooth Dice, detection F1 and
numbering accuracy. Its --inits may include binary: start from the binary scratch cell of the same model,
label fraction and seed (run the binary grid in the same --out-dir first); on real X-rays that is what made
the per-tooth task learn within a CPU budget.

Example (the README's real-data run):
  python run_study.py --images-dir ./ufba/processed_2d --out-dir runs/study_ufba --models unet \\
      --inits scratch mim fullimage --label-fractions 0.1 0.3 1.0 --seeds 0 1 --img-height 160 --img-width 320
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from checkpoints import open_checkpoint
from metrics import METRIC_NAMES, TOOTH_SUMMARY_NAMES
from models import MODELS
from semi import ONLINE_FLAGS, PSEUDO_FLAGS
from utils import (ToothSegError, atomic_path, atomic_write_text, check_output_dir, decimals, make_parser, mean_ci,
                   non_negative_int, positive_int, run_cli, share_of_all)

HERE = Path(__file__).resolve().parent
INITS = ("scratch", "mim", "fullimage", "binary")  # binary: a per-tooth cell starts from its binary twin
SEMI = ("none", "pseudo", "online")
PRETRAIN_SCRIPTS = {"mim": "mim_pretrain.py", "fullimage": "fullimage_pretrain.py"}


def parse_args(argv=None):
    parser = make_parser(__doc__)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--models", nargs="+", default=["unet"], metavar="NAME", help=", ".join(sorted(MODELS)))
    grid.add_argument("--inits", nargs="+", default=["scratch", "mim", "fullimage"], choices=INITS, metavar="INIT",
                      help="scratch, mim, fullimage, or with --task teeth binary (from the binary scratch cell of the same "
                           "model, labels and seed in this --out-dir)")
    grid.add_argument("--semi", nargs="+", default=["none"], choices=SEMI, metavar="WAY",
                      help="none, pseudo (offline teacher -> student; needs none, its teacher), online (mean teacher)")
    grid.add_argument("--task", choices=("binary", "teeth"), default="binary",
                      help="binary tooth masks, or every tooth by its FDI number (finetune_seg.py --task teeth; scored "
                           "by per-tooth Dice, detection F1 and numbering accuracy; supervised cells only)")
    grid.add_argument("--label-fractions", nargs="+", type=share_of_all, default=[0.1, 0.3, 1.0], metavar="F", help="shares of the labelled training pairs")
    grid.add_argument("--seeds", nargs="+", type=int, default=[0, 1], metavar="S", help="fine-tuning seeds (also pick the label subsets)")
    data = parser.add_argument_group("data")
    data.add_argument("--images-dir", type=Path, required=True, metavar="DIR", help="processed_2d (with its index) or images")
    data.add_argument("--masks-dir", type=Path, metavar="DIR", help="only for folders without an index")
    data.add_argument("--external-test", type=Path, metavar="DIR",
                      help="also score every cell on the test split of another prepared data set (a processed_2d with "
                           "its sts2d_index.csv, say another clinic's X-rays): CELL/eval_external and a table in study.md")
    data.add_argument("--img-height", type=positive_int, default=160, metavar="H", help="network input height")
    data.add_argument("--img-width", type=positive_int, default=320, metavar="W", help="network input width")
    train = parser.add_argument_group("training budget")
    train.add_argument("--pretrain-epochs", type=positive_int, default=30, metavar="N", help="epochs of each pretraining")
    train.add_argument("--finetune-epochs", type=positive_int, default=40, metavar="N", help="epochs of each fine-tune")
    train.add_argument("--steps-per-epoch", type=positive_int, metavar="N",
                       help="each fine-tune's epoch is N steps whatever its training set's size (finetune_seg.py "
                            "--steps-per-epoch), so every label fraction and method gets the same budget; default: one "
                            "pass over the training set")
    train.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="batch size of every stage")
    train.add_argument("--base-channels", type=positive_int, default=32, metavar="C", help="model width")
    train.add_argument("--pretrain-seed", type=int, default=0, metavar="S", help="seed of the pretraining runs")
    train.add_argument("--pretrain-args", default="", metavar="'FLAGS'", help="extra flags for both pretraining scripts")
    train.add_argument("--finetune-args", default="", metavar="'FLAGS'", help="extra flags for finetune_seg.py")
    train.add_argument("--pseudo-rounds", type=positive_int, default=1, metavar="N",
                       help="pseudo cells: N rounds of teacher -> student, each round's student the next round's teacher")
    train.add_argument("--teachers", type=positive_int, default=1, metavar="N",
                       help="pseudo cells: the first round's teacher fuses N supervised models of the cell's labels, its "
                            "supervised twin and N-1 more with --seed S+1.. and --label-seed S (CELL/teacher_sK), their "
                            "probabilities averaged, as the STS 2023 winners fused two teachers")
    train.add_argument("--semi-args", default="", metavar="'FLAGS'",
                       help="extra flags for the pseudo and online fine-tunes, after --finetune-args (e.g. '--epochs 10')")
    train.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="DataLoader workers of every stage")
    train.add_argument("--cpu", action="store_true", help="pass --cpu to every stage")
    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=Path("runs/study"), metavar="DIR", help="pretrain/, cells/ and the study tables go here")
    out.add_argument("--bootstrap", type=positive_int, default=2000, metavar="N", help="bootstrap resamples for the CIs")
    out.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    for option in ("--pretrain-args", "--finetune-args", "--semi-args"):
        try:
            shlex.split(getattr(args, option[2:].replace("-", "_")))
        except ValueError as exc:
            parser.error(f"argument {option}: {exc} (quote the flags as one shell word)")
    # Checked before any work: a typo in the last model name must not surface after hours of pretraining.
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)}; valid: {', '.join(sorted(MODELS))}")
    if "binary" in args.inits and args.task != "teeth":
        parser.error("--inits binary starts a per-tooth cell from its binary twin: use it with --task teeth")
    if args.task == "teeth" and args.semi != ["none"]:
        parser.error("--task teeth runs supervised cells only (--semi none); pseudo-labels and the online method are binary")
    if args.teachers > 1 and "pseudo" not in args.semi:
        parser.error(f"--teachers {args.teachers} fuses the teachers of pseudo cells: add pseudo to --semi")
    if args.masks_dir is not None and any(init in PRETRAIN_SCRIPTS for init in args.inits):
        parser.error("pretraining on folders without an index would see every image, the cells' test images too: "
                     "prepare them with prepare_sts2d.py --images-dir ... --masks-dir ... and give its processed_2d")
    for flags, way, other in ((PSEUDO_FLAGS, "pseudo", "online"), (ONLINE_FLAGS, "online", "pseudo")):
        # finetune_seg.py refuses a way's flags in the other way's cells (and in supervised ones); argparse takes
        # an unambiguous abbreviation (--ema-d) for the flag
        named = {f"--{prefix}{flag[2:]}" for flag in flags for prefix in ("", "no-")}
        for option, extra, reaches in (("--finetune-args", args.finetune_args, True),
                                       ("--semi-args", args.semi_args, other in args.semi)):
            given = [t.split("=")[0] for t in shlex.split(extra) if t.startswith("--") and len(t.split("=")[0]) > 3]
            mine = sorted(t for t in given if any(flag.startswith(t) for flag in named))
            if mine and reaches:
                parser.error(f"{option} {mine[0]} is for the {way} cells only, but would reach "
                             f"{'every cell' if option == '--finetune-args' else f'the {other} cells'}: give it in "
                             f"--semi-args, in a command whose --semi has no {other} cells")
    if "pseudo" in args.semi and "none" not in args.semi:
        parser.error("--semi pseudo labels with its supervised twin: add none to --semi")
    args.semi = [way for way in SEMI if way in args.semi]  # teachers (none) before their students
    return args


def cell_name(model: str, init: str, fraction: float, seed: int, semi: str = "none", task: str = "binary") -> str:
    way = "" if semi == "none" else f"_{semi}"  # supervised cells keep the names of studies before --semi
    kind = "_teeth" if task == "teeth" else ""  # so a per-tooth grid never takes a binary cell for done
    return f"{model}_{init}{kind}{way}_f{fraction:g}_s{seed}"


def output_path(args, name: str) -> Path:
    """study.csv, study.md, study_dice.png in OUT_DIR; study_teeth.* for the per-tooth task, so one folder
    (sharing its pretraining) can hold both grids."""
    return args.out_dir / (name.replace("study", "study_teeth", 1) if args.task == "teeth" else name)


def score_name(args) -> str:
    """The per-image score the tables and CIs use: Dice, or the per-tooth task's mean Dice of the true teeth."""
    return "tooth_dice" if args.task == "teeth" else "dice"


def script(name: str) -> list[str]:
    return [sys.executable, str(HERE / name)]


def common_flags(args) -> list[str]:
    flags = ["--img-height", str(args.img_height), "--img-width", str(args.img_width), "--batch-size", str(args.batch_size),
             "--num-workers", str(args.workers)]
    return flags + (["--cpu"] if args.cpu else [])


def settings(commands: list[list[str]], args) -> list[list[str]]:
    """What a step's commands say about its settings, to tell a finished step of other settings from one of this
    run's: each script's name and flags, without where it runs (--workers, --num-workers, --cpu) or where the
    study folder is (a cell copied into another study, as the README does, stays the same cell)."""
    described = []
    for cmd in commands:
        tokens, skip = [Path(cmd[1]).name], False
        for token in cmd[2:]:
            if skip or token == "--cpu":
                skip = False
                continue
            skip = token in ("--workers", "--num-workers")
            if not skip:
                tokens.append(token.replace(str(args.out_dir), "OUT_DIR"))
        described.append(tokens)
    return described


def first_difference(recorded: list[list[str]], now: list[list[str]]) -> str:
    """The first setting in which two `settings` differ, in words."""
    steps = [[command[0] for command in commands] for commands in (recorded, now)]
    if steps[0] != steps[1]:  # another number of rounds or teachers: compared command by command, they shift
        return f"its steps were {' then '.join(steps[0])}, this run's are {' then '.join(steps[1])}"
    for old, new in itertools.zip_longest(recorded, now, fillvalue=[]):
        if old != new:
            i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            flag = old[i - 1] if 0 < i <= len(old) and old[i - 1].startswith("--") else "a flag"
            was, asked = (" ".join(t[i:i + 1]) or "absent" for t in (old, new))
            return f"{(old or new)[0]}: {flag} was {was}, this run asks {asked}"
    return "none"


def refuse_stale(steps: list[tuple[Path, Path, list[list[str]]]], args) -> None:
    """Refuse, before any work, a study whose folder holds finished steps (pretraining or cells) run with other
    settings: they would be skipped as done and tabulated under this run's settings. Steps finished before
    settings were recorded are taken as they are."""
    stale = []
    for folder, marker, commands in steps:
        recorded = read_record(marker).get("settings") if marker.exists() else None
        now = settings(commands, args)
        if recorded is not None and recorded != now:
            stale.append(f"{folder}: finished with other settings ({first_difference(recorded, now)})")
    if stale:
        more = f" ({len(stale) - 1} more)" if len(stale) > 1 else ""
        raise ToothSegError(f"{stale[0]}{more}; use another --out-dir, or delete it to run it again")


def budget(args, init: str) -> dict:
    """What study.md's header states once for all the cells of the folder: the data, input, width and budget
    (and the pretraining's epochs, for a pretrained cell)."""
    # The folders as given, as the cells' settings record them: a study moved with its data stays the same study.
    return {"images_dir": str(args.images_dir), "masks_dir": str(args.masks_dir) if args.masks_dir is not None else None,
            "input": f"{args.img_height}x{args.img_width}", "base_channels": args.base_channels,
            "batch_size": args.batch_size, "finetune_epochs": args.finetune_epochs, "steps_per_epoch": args.steps_per_epoch,
            **({"pretrain_epochs": args.pretrain_epochs} if init in PRETRAIN_SCRIPTS else {})}


def finished_at(folder: Path) -> float | None:
    """When a pretraining (done.json) or a cell (cell.json) finished; None while it has not."""
    marker = next((m for m in (folder / "done.json", folder / "cell.json") if m.exists()), None)
    return read_record(marker).get("finished") if marker is not None else None


def teacher_cell(args, model: str, init: str, fraction: float, seed: int) -> Path:
    """A pseudo cell's first teacher: the supervised binary cell of the same model, init, labels and seed."""
    return args.out_dir / "cells" / cell_name(model, init, fraction, seed)


def made_from(args, model: str, init: str, semi: str, fraction: float, seed: int, source: Path | None) -> list[Path]:
    """The finished steps a cell starts from: its pretraining or binary twin, and a pseudo cell's teacher."""
    teacher = [teacher_cell(args, model, init, fraction, seed)] if semi == "pseudo" else []
    return ([source] if source is not None else []) + teacher


def refuse_mixed(args) -> None:
    """Refuse, before any work, a finished cell of the folder that this run's tables would misdescribe: one of
    another budget than the header states (a grid run in parts with another size pooled its seeds in one row),
    or one made from a pretraining or teacher that was redone or removed since (it would be kept as done).
    Cells finished before these were recorded are taken as they are."""
    for record in collect(args):
        cell, now, was = cell_dir(args, record), budget(args, record["init"]), record.get("budget")
        changed = [key for key in now if was is not None and was.get(key) != now[key]]
        if changed:
            raise ToothSegError(f"{cell}: finished with {changed[0]} {was.get(changed[0])}, this run asks "
                                f"{now[changed[0]]}; the tables state one budget for all the cells of a folder: use "
                                f"another --out-dir, or delete the cell to run it again")
        for folder, finished in (record.get("made_from") or {}).items():
            if finished_at(args.out_dir / folder) != finished:
                raise ToothSegError(f"{cell}: made from {args.out_dir / folder}, which was redone or removed since; "
                                    f"delete the cell to run it again")


def pretrain_command(args, model: str, init: str) -> tuple[list[str], Path]:
    """The pretraining command and the folder it writes."""
    out = args.out_dir / "pretrain" / f"{init}_{model}"
    cmd = script(PRETRAIN_SCRIPTS[init]) + ["--images-dir", str(args.images_dir), "--checkpoint-dir", str(out), "--model-type", model,
                          "--base-channels", str(args.base_channels), "--epochs", str(args.pretrain_epochs),
                          "--seed", str(args.pretrain_seed), *common_flags(args), *shlex.split(args.pretrain_args)]
    return cmd, out  # --init-from takes the folder: its best.pth, or an older run's mim_best.pth


def cell_commands(args, model: str, init: str, semi: str, fraction: float, seed: int,
                  pretrained: Path | None) -> list[list[str]]:
    cell = args.out_dir / "cells" / cell_name(model, init, fraction, seed, semi, args.task)
    budget = ["--steps-per-epoch", str(args.steps_per_epoch)] if args.steps_per_epoch else []
    cpu = ["--cpu"] if args.cpu else []

    def finetune(folder: Path, run_seed: int = seed) -> list[str]:
        return script("finetune_seg.py") + [
            "--task", args.task, "--images-dir", str(args.images_dir), "--checkpoint-dir", str(folder),
            "--model-type", model, "--base-channels", str(args.base_channels), "--epochs", str(args.finetune_epochs),
            "--seed", str(run_seed), *(["--label-seed", str(seed)] if run_seed != seed else []),
            "--label-fraction", f"{fraction:g}", *common_flags(args), *budget,
            *shlex.split(args.finetune_args),
            *(["--masks-dir", str(args.masks_dir)] if args.masks_dir is not None else []),
            *(["--init-from", str(pretrained)] if pretrained is not None else [])]

    evaluate = script("eval.py") + ["--checkpoint", str(cell), "--split", "test",
                                     "--out-dir", str(cell / "eval_test"), "--workers", str(args.workers), *cpu]
    if semi == "none":
        return [finetune(cell), evaluate]
    if semi == "online":
        return [finetune(cell) + ["--semi", *shlex.split(args.semi_args)], evaluate]
    # Offline rounds: the supervised twin labels the pool (flip TTA, as the STS 2023 winners did), a student
    # learns from labels + pseudo-labels (with --semi-args, e.g. --pseudo-keep), and each further round's teacher
    # is the last round's student. Earlier rounds' students live in CELL/roundR, the last one is the cell.
    # With --teachers N, the first round's teacher is the twin fused with N-1 more models of the same labels.
    extra = {seed + k: cell / f"teacher_s{seed + k}" for k in range(1, args.teachers)}
    commands = [finetune(folder, run_seed) for run_seed, folder in extra.items()]
    teachers = [teacher_cell(args, model, init, fraction, seed), *extra.values()]
    for round_number in range(1, args.pseudo_rounds + 1):
        student = cell if round_number == args.pseudo_rounds else cell / f"round{round_number}"
        commands += [script("eval.py") + ["--checkpoint", *map(str, teachers), "--split", "unlabelled", "--tta", "--save-probs",
                                          str(student / "pseudo_labels"), "--out-dir", str(student / "teacher"),
                                          "--workers", str(args.workers), *cpu],
                     finetune(student) + ["--pseudo-labels", str(student / "pseudo_labels"), *shlex.split(args.semi_args)]]
        teachers = [student]
    return commands + [evaluate]


def external_command(args, cell: Path) -> list[str]:
    return script("eval.py") + ["--checkpoint", str(cell), "--images-dir", str(args.external_test), "--split", "test",
                                "--out-dir", str(cell / "eval_external"), "--workers", str(args.workers),
                                *(["--cpu"] if args.cpu else [])]


def external_done(args, cell: Path) -> bool:
    """Scored on this --external-test set (a summary of another set is redone)."""
    summary = cell / "eval_external" / "summary.json"
    return summary.exists() and \
        Path(read_record(summary)["images_dir"]).resolve() == Path(args.external_test).resolve()


def pretrainings(args):
    """(model, init, command, folder) of each pretraining the grid needs, once per model and method."""
    for model in args.models:
        for init in (i for i in args.inits if i in PRETRAIN_SCRIPTS):
            yield model, init, *pretrain_command(args, model, init)


def cells_of(args):
    """(model, init, semi, fraction, seed, cell folder, the folder it starts from or None) of every grid cell, in
    run order. A binary-initialised per-tooth cell starts from the binary grid's scratch cell, run before in this
    folder; a pretrained one from its pretraining."""
    for model, init, semi, fraction, seed in grid(args):
        cells = args.out_dir / "cells"
        source = cells / cell_name(model, "scratch", fraction, seed) if init == "binary" else \
            pretrain_command(args, model, init)[1] if init in PRETRAIN_SCRIPTS else None
        yield model, init, semi, fraction, seed, cells / cell_name(model, init, fraction, seed, semi, args.task), source


def grid(args):
    """Every (model, init, semi, label fraction, seed) cell, in run order: a pseudo cell after its teacher."""
    for model, init, fraction, seed in itertools.product(args.models, args.inits, args.label_fractions, args.seeds):
        for semi in args.semi:
            yield model, init, semi, fraction, seed


def log_path(folder: Path) -> Path:
    """The log beside a cell or pretraining folder (not with_suffix: cell names hold dots, f0.1)."""
    return folder.parent / f"{folder.name}.log"


def run_logged(cmd: list[str], log: Path) -> bool:
    """Run one stage, appending its output to `log`; True on success."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        # In the caller's folder, where the relative paths in the flags point (the scripts are called by full path).
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode == 0


def tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print("# dry run: commands that a full run executes (completed steps are skipped at run time)")
    started, ran, skipped, failed = time.time(), 0, 0, []

    if not args.dry_run:
        check_output_dir(args.out_dir, "--out-dir")
        refuse_stale([(folder, folder / "done.json", [cmd]) for _, _, cmd, folder in pretrainings(args)]
                     + [(cell, cell / "cell.json", cell_commands(args, model, init, semi, fraction, seed, source))
                        for model, init, semi, fraction, seed, cell, source in cells_of(args)], args)
        refuse_mixed(args)

    # Pretraining, once per model and method.
    for model, init, cmd, folder in pretrainings(args):
        done = folder / "done.json"
        if args.dry_run:
            print(shlex.join(cmd))
        elif done.exists():
            print(f"skip pretraining {init} {model}: done")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"pretraining {init} {model} ...", flush=True)
            if not run_logged(cmd, log_path(folder)):
                failed.append(f"pretrain {init} {model}: {tail(log_path(folder))}")
                continue
            atomic_write_text(done, json.dumps({"folder": str(folder), "finished": time.time(),
                                                "settings": settings([cmd], args)}))

    # Cells: fine-tune then evaluate; cell.json marks a finished cell.
    for model, init, semi, fraction, seed, cell, source in cells_of(args):
        name = cell.name
        binary_twin = source if init == "binary" else None
        commands = cell_commands(args, model, init, semi, fraction, seed, source)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in commands + ([external_command(args, cell)] if args.external_test else [])))
            continue
        if (cell / "cell.json").exists():
            skipped += 1
            print(f"skip {name}: done")
            continue
        if binary_twin is not None and not (binary_twin / "cell.json").exists():
            failed.append(f"{name}: its binary twin {binary_twin.name} is not finished; run the binary grid "
                          f"(without --task teeth) in {args.out_dir} first")
            continue
        if source is not None and binary_twin is None and not (source / "done.json").exists():
            failed.append(f"{name}: its {init} pretraining failed")
            continue
        teacher = teacher_cell(args, model, init, fraction, seed)
        if semi == "pseudo" and not (teacher / "cell.json").exists():
            failed.append(f"{name}: its teacher {teacher.name} failed")
            continue
        shutil.rmtree(cell, ignore_errors=True)
        print(f"cell {name} ...", flush=True)
        cell_start = time.time()
        log = log_path(cell)
        log.unlink(missing_ok=True)
        if not all(run_logged(c, log) for c in commands):
            failed.append(f"{name}: {tail(log)}")
            continue
        summary = read_record(cell / "eval_test" / "summary.json")
        record = {"task": args.task, "model": model, "init": init, "semi": semi, "label_fraction": fraction, "seed": seed,
                  **{m: summary["metrics"][m]["mean"] for m in METRIC_NAMES},
                  **({m: summary["teeth"][m] for m in TOOTH_SUMMARY_NAMES} if args.task == "teeth" else {}),
                  "n_test": summary["n_images"], "best_epoch": summary["checkpoint_epoch"],
                  # what the fraction rounded to: at least one pair, so two small fractions can train on the same one
                  "n_labelled": len(open_checkpoint(summary["checkpoint"]).task.get("labelled_pairs") or ()),
                  "seconds": round(time.time() - cell_start, 1), "finished": time.time(),
                  "settings": settings(commands, args), "budget": budget(args, init),
                  "made_from": {str(folder.relative_to(args.out_dir)): finished_at(folder)
                                for folder in made_from(args, model, init, semi, fraction, seed, source)},
                  "extra": {"finetune_args": args.finetune_args, "semi_args": args.semi_args if semi != "none" else None,
                            "pseudo_rounds": args.pseudo_rounds if semi == "pseudo" else None}}
        atomic_write_text(cell / "cell.json", json.dumps(record, indent=2))
        ran += 1
        print(f"  {name}: test {score_name(args)} {record[score_name(args)]:.4f}, hd95 {record['hd95']:.1f} px", flush=True)
    if args.dry_run:
        return

    # Every finished cell of the folder (earlier runs' too) is scored once on the external test set.
    records = collect(args)
    for record in records if args.external_test is not None else []:
        cell = cell_dir(args, record)
        if not external_done(args, cell):
            print(f"external test {cell.name} ...", flush=True)
            if not run_logged(external_command(args, cell), log_path(cell)):
                failed.append(f"{cell.name} on {args.external_test}: {tail(log_path(cell))}")

    # Tables and plot over every finished cell of this task in the folder (earlier runs of other axes too).
    if records:
        write_outputs(args, records)
    print(f"cells run {ran}, skipped (done) {skipped}, failed {len(failed)}; {time.time() - started:.0f} s")
    if failed:
        raise ToothSegError(f"{len(failed)} steps failed (logs beside the cell folders); first: {failed[0]}")


def read_record(path: Path) -> dict:
    """A step's JSON record (cell.json, done.json, an evaluation's summary.json), or one line naming it."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToothSegError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); delete the folder of "
                            f"that step to run it again") from None
    if not isinstance(record, dict):
        raise ToothSegError(f"{path}: holds no record; delete the folder of that step to run it again")
    return record


def collect(args) -> list[dict]:
    """The records of every finished cell of this task in OUT_DIR, this grid's and earlier runs' alike, so a
    study run in parts (say, the semi-supervised cells for scratch only) is tabulated as one."""
    records = [{"name": p.parent.name, "task": "binary", "semi": "none", **read_record(p)}  # older: binary
               for p in sorted((args.out_dir / "cells").glob("*/cell.json"))]
    return [r for r in records if r["task"] == args.task]


def cell_dir(args, record: dict) -> Path:
    return args.out_dir / "cells" / cell_name(record["model"], record["init"], record["label_fraction"], record["seed"],
                                              record["semi"], args.task)


def per_image_dice(args, record: dict, scored: str = "eval_test") -> dict[str, float]:
    path = cell_dir(args, record) / scored / "per_image.csv"
    try:
        with path.open(newline="") as f:
            return {row["pair_id"]: float(row[score_name(args)]) for row in csv.DictReader(f)}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ToothSegError(f"{path}: cannot be read as eval.py wrote it ({exc}); delete the cell to run it "
                            f"again") from None


def group_cells(records: list[dict]) -> dict[tuple, list[dict]]:
    """The seeds of each (model, init, semi, label fraction)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["init"], r["semi"], r["label_fraction"]), []).append(r)
    return groups


def score_tables(args, records: list[dict], scored: str = "eval_test") -> tuple[list[str], list[str]]:
    """The methods' table and their paired differences to supervised scratch, over the cells' scores in
    CELL/`scored` (eval_test, or eval_external for --external-test). Each CI draws from its own generator of
    seed 0, as compare.py does, so a row's CI does not depend on the rows before it."""
    groups = group_cells(records)

    def image_means(group: list[dict]) -> dict[str, float]:
        """Each test image's Dice averaged over seeds."""
        per_seed = [per_image_dice(args, r, scored) for r in group]
        common = set.intersection(*(set(p) for p in per_seed))
        return {k: float(np.mean([p[k] for p in per_seed])) for k in sorted(common)}

    score, teeth = score_name(args), args.task == "teeth"
    what = "per-tooth Dice" if teeth else "Dice"
    extra = " detection F1 | numbering |" if teeth else ""
    lines = [f"| model | init | unlabelled | labels | seeds | test {what} (mean ± std over seeds) | 95% CI over images | "
             f"HD95 px | ASSD px |{extra}", "| --- " * (9 + 2 * teeth) + "|"]
    diffs = [f"| model | labels | method | {what} − supervised scratch | paired 95% CI over images | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    order = lambda kv: (kv[0][0], kv[0][3], INITS.index(kv[0][1]), SEMI.index(kv[0][2]))  # noqa: E731
    for (model, init, semi, fraction), group in sorted(groups.items(), key=order):
        dice = np.array([r[score] for r in group])
        lo, hi = mean_ci(np.array(list(image_means(group).values())), args.bootstrap, np.random.default_rng(0))
        counts = sorted({r["n_labelled"] for r in group if "n_labelled" in r})  # older cells did not record it
        labels = f"{fraction:g} ({'/'.join(map(str, counts))} pairs)" if counts else f"{fraction:g}"
        lines.append(f"| {model} | {init} | {semi} | {labels} | {len(group)} | {dice.mean():.4f} ± {dice.std():.4f} | "
                     f"[{lo:.4f}, {hi:.4f}] | {np.mean([r['hd95'] for r in group]):.1f} | "
                     f"{np.mean([r['assd'] for r in group]):.1f} |"
                     + ("".join(f" {np.mean([r[m] for r in group]):.4f} |" for m in ("detection_f1", "numbering_accuracy"))
                        if teeth else ""))
        scratch = groups.get((model, "scratch", "none", fraction))
        if (init, semi) != ("scratch", "none") and scratch:
            ours, base = image_means(group), image_means(scratch)
            keys = sorted(set(ours) & set(base))
            delta = np.array([ours[k] - base[k] for k in keys])
            dlo, dhi = mean_ci(delta, args.bootstrap, np.random.default_rng(0))
            verdict = "helps" if dlo > 0 else "hurts" if dhi < 0 else "no clear difference"
            d = decimals(delta.mean(), dlo, dhi)  # a CI above zero never reads [+0.0000, ...] beside "helps"
            diffs.append(f"| {model} | {fraction:g} | {method_label(init, semi)} | {delta.mean():+.{d}f} | "
                         f"[{dlo:+.{d}f}, {dhi:+.{d}f}] | {verdict} |")
    return lines, diffs if len(diffs) > 2 else []


def external_records(args, records: list[dict]) -> list[dict]:
    """The cells' mean metrics on the --external-test set (from CELL/eval_external/summary.json); a cell whose
    external evaluation failed is left out (and listed among the failures)."""
    scored = []
    for r in (r for r in records if external_done(args, cell_dir(args, r))):
        summary = read_record(cell_dir(args, r) / "eval_external" / "summary.json")
        scored.append({**r, **{m: summary["metrics"][m]["mean"] for m in METRIC_NAMES},
                       **({m: summary["teeth"][m] for m in TOOTH_SUMMARY_NAMES} if args.task == "teeth" else {})})
    return scored


def write_outputs(args, records: list[dict]) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    columns = list(dict.fromkeys(key for r in records for key in r))  # older cells lack the newer fields
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(output_path(args, "study.csv"), buf.getvalue())

    teeth = args.task == "teeth"
    what = "per-tooth Dice" if teeth else "Dice"
    paired = (f"Each method against supervised scratch (same label fraction; per-image {what} averaged over seeds, "
              "paired bootstrap over test images):")
    lines, diffs = score_tables(args, records)
    # Only a grid with pretrained cells has a pretraining budget to state.
    pretraining = f"pretraining {args.pretrain_epochs} epochs, " if any(r["init"] in PRETRAIN_SCRIPTS for r in records) else ""
    text = ["# Study: unlabelled images and pretraining" + (", per-tooth task" if teeth else ""), "", f"Images: `{args.images_dir}`, input "
            f"{args.img_height}x{args.img_width}, base {args.base_channels}, {pretraining}"
            f"fine-tuning {args.finetune_epochs} epochs"
            f"{f' of {args.steps_per_epoch} steps' if args.steps_per_epoch else ''}, batch {args.batch_size}; "
            f"{cell_extras(records)}.", "", *lines, ""]
    text += [paired, "", *diffs, ""] if diffs else []
    text += same_labels(records)
    panels = [(f"test split of {data_name(args.images_dir)}", group_cells(records))]
    external = external_records(args, records) if args.external_test is not None else []
    if external:
        external_lines, external_diffs = score_tables(args, external, "eval_external")
        text += [f"## On the external test set `{args.external_test}` (its test split, never trained on)", "",
                 *external_lines, ""]
        text += [paired, "", *external_diffs, ""] if external_diffs else []
        panels.append((f"test split of {data_name(args.external_test)} (external)", group_cells(external)))
    atomic_write_text(output_path(args, "study.md"), "\n".join(text))
    plot(args, panels)
    print("\n".join(text[4:]))
    print(f"wrote {output_path(args, 'study.csv')}, {output_path(args, 'study.md')} and {output_path(args, 'study_dice.png')}")


def same_labels(records: list[dict]) -> list[str]:
    """A note for label fractions that rounded to the same labelled pairs (the smaller sets nest in the larger,
    so the same count of one model, init, method and seed is the same set): such rows are one experiment twice."""
    found: dict[tuple, set] = {}
    for r in records:
        if "n_labelled" in r:
            found.setdefault((r["model"], r["init"], r["semi"], r["seed"], r["n_labelled"]), set()).add(r["label_fraction"])
    return [f"Note: label fractions {' and '.join(f'{f:g}' for f in sorted(fractions))} trained {model} ({init}, "
            f"{semi}, seed {seed}) on the same {n} labelled pair(s); at least one is kept, so their rows are one "
            f"experiment twice." for (model, init, semi, seed, n), fractions in sorted(found.items()) if len(fractions) > 1] \
        + [""] * any(len(fractions) > 1 for fractions in found.values())


def data_name(images_dir: Path) -> str:
    """A data set's name for a plot: its data root's, whether the folder given is the root or its processed_2d
    (or the fbf mirror beside it)."""
    return images_dir.parent.name if images_dir.name.startswith("processed_2d") else images_dir.name


def cell_extras(records: list[dict]) -> str:
    """The extra flags (and pseudo-label rounds) of the tabulated cells, as each cell recorded them: a grid run in
    parts with other extras is described as it ran, not as the last command asked."""
    def described(rows: list[dict], key: str, show) -> str:
        found: dict[str, list[str]] = {}
        for r in rows:
            value = (r.get("extra") or {}).get(key, "?")
            found.setdefault("not recorded" if value == "?" else show(value), []).append(r["name"])
        return next(iter(found)) if len(found) == 1 else \
            "; ".join(f"{text} ({', '.join(names)})" for text, names in found.items())

    flags = lambda value: f"`{value or 'none'}`"
    parts = [f"extra fine-tuning flags {described(records, 'finetune_args', flags)}"]
    pseudo, online = ([r for r in records if r["semi"] == way] for way in ("pseudo", "online"))
    if pseudo:
        parts.append(f"pseudo-label cells: {described(pseudo, 'pseudo_rounds', lambda n: f'{n} round(s)')}, extra "
                     f"flags {described(pseudo, 'semi_args', flags)}")
    if online:
        parts.append(f"online cells: extra flags {described(online, 'semi_args', flags)}")
    return "; ".join(parts)


def method_label(init: str, semi: str) -> str:
    """scratch, mim, ... for supervised cells; scratch + pseudo, mim + online, ... otherwise."""
    return init if semi == "none" else f"{init} + {semi}"


def plot(args, panels: list[tuple[str, dict]]) -> None:
    """study_dice.png: one panel per scored set (the study's test split, and the --external-test one if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels):
        plot_panel(args, ax, title, groups)
    fig.tight_layout()
    with atomic_path(output_path(args, "study_dice.png")) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def plot_panel(args, ax, title: str, groups: dict) -> None:
    """Score against label fraction, one line per method; bars side by side when there is one fraction."""
    score = score_name(args)
    methods = sorted({key[:3] for key in groups}, key=lambda k: (k[0], INITS.index(k[1]), SEMI.index(k[2])))
    series = [(model, method_label(init, semi), sorted((f, [r[score] for r in g]) for (m, i, w, f), g in groups.items()
                                                       if (m, i, w) == (model, init, semi)))
              for model, init, semi in methods]
    fractions = sorted({key[3] for key in groups})
    label = (lambda m, i: f"{m} · {i}") if len({m for m, _, _ in methods}) > 1 else (lambda m, i: i)
    if len(fractions) == 1:  # one fraction: compare the methods side by side
        for k, (model, init, [(_, dice)]) in enumerate(series):
            ax.bar(k, np.mean(dice), yerr=np.std(dice), capsize=4, color=f"C{k}")
            ax.text(k, np.mean(dice) / 2, f"{np.mean(dice):.3f}", ha="center", color="white", fontweight="bold")
        ax.set_xticks(range(len(series)), [label(m, i) for m, i, _ in series])
        ax.set_ylim(0, 1)
        title = f"{title}, {fractions[0]:.0%} of the training labels"
    else:
        for model, init, points in series:
            ax.errorbar([f for f, _ in points], [np.mean(d) for _, d in points], yerr=[np.std(d) for _, d in points],
                        marker="o", capsize=3, label=label(model, init))
        ax.set_xscale("log")
        ax.set_xlabel("fraction of labelled training images")
        ax.legend()
    ax.set_title(title)
    ax.set_ylabel(f"test {score.replace('_', ' ')} (mean ± std over seeds)")
    ax.grid(alpha=0.3)


if __name__ == "__main__":
    run_cli(main)
