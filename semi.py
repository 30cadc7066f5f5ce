"""Learning from unlabelled X-rays: the pseudo-label files that eval.py writes and finetune_seg.py reads
(offline teacher -> student, as the STS 2023 winners did), and the pieces of the online method (a mean
teacher with weak-to-strong consistency, FixMatch/UniMatch style).

Pseudo-labels are a folder of 8-bit PNGs, 255 * p at each image's own size, named by pair id, with a
manifest `pseudo_labels.json`: the teacher checkpoints, and per image its path and mean binary entropy
(lower = more confident), so the student can keep the most confident share without re-reading them.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils import ToothSegError, atomic_write_text

MANIFEST = "pseudo_labels.json"
# finetune_seg.py's flags of each way of learning from the pool, refused without it (and by run_study for the cells
# of the other way).
PSEUDO_FLAGS = ("--pseudo-weight", "--pseudo-keep", "--labelled-share", "--student-noise")
ONLINE_FLAGS = ("--ema-decay", "--confidence", "--unlabelled-weight", "--rampup-epochs")


# ----------------------------------------------------------------------------------------------
# Offline pseudo-labels
# ----------------------------------------------------------------------------------------------
def mean_entropy(probs: np.ndarray) -> float:
    """Mean binary entropy (bits) of a probability map: 0 for a sure map, 1 for p = 0.5 everywhere."""
    p = np.clip(probs.astype(np.float64), 1e-6, 1 - 1e-6)
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


@dataclass(frozen=True)
class PseudoLabel:
    pair_id: str
    image: Path
    probs: Path
    mean_entropy: float
    image_sha1: str = ""  # the labelled image's content (manifests before it: "")


def write_manifest(folder: Path, labels: list[PseudoLabel], teachers: list[str], tta: bool,
                   tta_rotate: list[float] = ()) -> None:
    manifest = {"teachers": teachers, "tta": tta, "tta_rotate": list(tta_rotate), "images": {
        label.pair_id: {"image": str(label.image), "image_sha1": label.image_sha1, "probs": label.probs.name,
                        "mean_entropy": label.mean_entropy}
        for label in labels}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def read_pseudo_labels(folder: str | os.PathLike) -> tuple[list[PseudoLabel], list[str]]:
    """(pseudo-labels, the teacher checkpoints that made them) of an `eval.py --save-probs` folder."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        labels = [PseudoLabel(pair_id, Path(entry["image"]), folder / entry["probs"], float(entry["mean_entropy"]),
                              entry.get("image_sha1", ""))
                  for pair_id, entry in manifest["images"].items()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ToothSegError(f"{folder / MANIFEST}: cannot read the pseudo-label manifest ({type(exc).__name__}); "
                            f"write the folder with eval.py --save-probs") from None
    missing = [label.probs for label in labels if not label.probs.is_file()]
    if missing:
        raise ToothSegError(f"{missing[0]}: listed in {folder / MANIFEST} but missing ({len(missing)} in all); "
                            f"re-run eval.py --save-probs")
    if not labels:
        raise ToothSegError(f"{folder / MANIFEST}: lists no images; run eval.py --save-probs on the unlabelled pool")
    return labels, list(manifest.get("teachers", []))


def most_confident(labels: list[PseudoLabel], keep: float) -> list[PseudoLabel]:
    """The `keep` share of pseudo-labels with the lowest mean entropy (at least one), as the STS 2023 4th
    place kept its 1,000 most confident; ties broken by pair id so the choice is deterministic."""
    ranked = sorted(labels, key=lambda label: (label.mean_entropy, label.pair_id))
    return sorted(ranked[:max(1, round(len(ranked) * keep))], key=lambda label: label.pair_id)


# ----------------------------------------------------------------------------------------------
# Online: a mean teacher and a confidence-masked consistency loss
# ----------------------------------------------------------------------------------------------
class MeanTeacher:
    """An exponential moving average of the student's weights (BatchNorm statistics copied), used in eval
    mode to label the weakly augmented view of each unlabelled image."""

    def __init__(self, student: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ToothSegError(f"--ema-decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(student).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for teacher_p, student_p in zip(self.model.parameters(), student.parameters()):
            teacher_p.lerp_(student_p.detach(), 1 - self.decay)
        for teacher_b, student_b in zip(self.model.buffers(), student.buffers()):
            teacher_b.copy_(student_b)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images).float())

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def consistency_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, confidence: float) -> torch.Tensor:
    """BCE of the student against the teacher's hard labels, on pixels where the teacher is at least
    `confidence` sure (max(p, 1 - p) >= confidence); averaged over all pixels, so an unsure teacher
    contributes little rather than a few loud pixels (FixMatch)."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        teacher_probs = teacher_probs.float()
        sure = (torch.maximum(teacher_probs, 1 - teacher_probs) >= confidence).float()
        bce = F.binary_cross_entropy_with_logits(student_logits.float(), (teacher_probs > 0.5).float(), reduction="none")
        return (bce * sure).mean()
