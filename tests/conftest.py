"""Shared fixtures: the real ufba425-dev set when it is present, and a small synthetic data root
built through prepare_sts2d.py that tests of every stage can reuse."""
from __future__ import annotations

from pathlib import Path

import pytest

UFBA_DIR = Path(__file__).resolve().parents[2] / "shared/data/ufba425-dev"
PHANTOM_IMAGES = 24  # 5 labelled adults, 3 labelled children (each with train/val/test), 16 unlabelled
PHANTOM_SEED = 7


@pytest.fixture(scope="session")
def ufba_dir() -> Path:
    """../shared/data/ufba425-dev (322 real panoramic X-rays with masks); skips when absent."""
    if not (UFBA_DIR / "images").is_dir() or not (UFBA_DIR / "masks").is_dir():
        pytest.skip(f"real data not found at {UFBA_DIR}")
    return UFBA_DIR


@pytest.fixture(scope="session")
def phantom_data_root(tmp_path_factory) -> Path:
    """A data root made by `prepare_sts2d.py --synthetic 24 --seed 7`: processed_2d/ and
    sts2d_index.csv. Shared by the whole session, so treat it as read-only (copy it to change it)."""
    import prepare_sts2d

    root = tmp_path_factory.mktemp("phantom_data")
    prepare_sts2d.main(["--synthetic", str(PHANTOM_IMAGES), "--seed", str(PHANTOM_SEED), "--data-root", str(root)])
    return root


TINY_STUDY_FLAGS = ["--models", "unet", "--inits", "scratch", "mim", "fullimage", "--label-fractions", "1",
                    "--seeds", "0", "--img-height", "64", "--img-width", "128", "--base-channels", "4",
                    "--batch-size", "4", "--pretrain-epochs", "1", "--finetune-epochs", "2", "--workers", "0",
                    "--cpu", "--bootstrap", "200"]


@pytest.fixture(scope="session")
def tiny_study(phantom_data_root, tmp_path_factory) -> Path:
    """The demo chain in miniature, through the real CLIs: run_study.py on the phantom data root with
    MIM and full-image pretraining and three fine-tunes (scratch, mim, fullimage), each evaluated on
    the test split, then the per-tooth grid (from scratch, and from the binary scratch cell) in the same folder. Returns the run folder
    (cells/, pretrain/, study.csv, study.md, study_dice.png, study_teeth.*). Read-only for the tests that share it."""
    import run_study

    out = tmp_path_factory.mktemp("tiny_study")
    run_study.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--out-dir", str(out), *TINY_STUDY_FLAGS])
    run_study.main(["--images-dir", str(phantom_data_root / "processed_2d"), "--out-dir", str(out), *TINY_STUDY_FLAGS,
                    "--task", "teeth", "--inits", "scratch", "binary"])
    return out


@pytest.fixture
def interrupted_run(monkeypatch):
    """`interrupted_run(main, argv)` runs a training script's main and stops it as its second epoch starts,
    as a kill would, leaving the checkpoints of epoch 1 for a --resume test."""
    import engine

    original = engine.Trainer.train_epoch

    def stop_at_second_epoch(self, loader, epoch, epochs):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, loader, epoch, epochs)

    def run(main, argv: list[str]) -> None:
        monkeypatch.setattr(engine.Trainer, "train_epoch", stop_at_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
        monkeypatch.setattr(engine.Trainer, "train_epoch", original)

    return run


@pytest.fixture
def cli_error(capsys):
    """`cli_error(main, argv)` runs a script's main as its command line does (utils.run_cli), expects the exit
    code 2 of a user error, and returns stderr, checked to be one `error: ` line. The script's torch thread
    setting is undone afterwards, so later tests in this process keep theirs."""
    import torch

    from utils import run_cli

    def run(main, argv: list[str]) -> str:
        threads = torch.get_num_threads()
        try:
            with pytest.raises(SystemExit) as exit_info:
                run_cli(main, argv)
        finally:
            torch.set_num_threads(threads)
        assert exit_info.value.code == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        return stderr.strip()

    return run


@pytest.fixture(scope="session")
def write_dicom():
    """`write_dicom(path, pixels, **elements)` writes an uncompressed single-frame DICOM (MONOCHROME2 unless
    an element says otherwise) of a uint8/uint16 array, as an X-ray unit exports one."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path: Path, pixels: np.ndarray, **elements) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored, ds.HighBit = ds.BitsAllocated, ds.BitsAllocated - 1
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    return write
