"""Prediction exactly as training validated it: a checkpoint's model at its own input size, precision
and normalisation, probabilities resized back to each image's own size before thresholding. eval.py
scores with it, and the visualizer and notebook show with it, so a Dice shown anywhere is eval.py's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import Checkpoint, open_checkpoint
from data import build_eval_transform
from engine import autocast, checkpoint_amp, memory_format
from index import read_mask
from utils import ToothSegError


@torch.inference_mode()
def predict_probabilities(model, batch: torch.Tensor, tta: bool, amp_dtype, device) -> torch.Tensor:
    """Tooth probabilities at network size; with `tta`, averaged with the horizontally flipped prediction."""
    with autocast(device, amp_dtype):
        probs = torch.sigmoid(model(batch).float())
        if tta:
            probs = 0.5 * (probs + torch.sigmoid(model(batch.flip(-1)).float()).flip(-1))
    return probs


def prob_at_size(probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (1, 1, h, w) probability map resized (bilinear) to the image's own (H, W), as float32 numpy."""
    return F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


def mask_at_size(probs: torch.Tensor, size: tuple[int, int], threshold: float) -> np.ndarray:
    """A (1, 1, h, w) probability map resized to the image's own (H, W) and thresholded: masks are
    scored, saved and shown at the original resolution, never at network size."""
    return prob_at_size(probs, size) > threshold


@dataclass
class Predictor:
    """A fine-tuned segmentation model with the preprocessing and data it was trained with."""
    model: torch.nn.Module  # in eval mode, on `device`
    checkpoint: Checkpoint
    device: torch.device
    _mask_paths: dict[Path, Path] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.amp_dtype = checkpoint_amp(self.checkpoint, self.device)  # the precision it was validated in

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def transform(self):
        """The eval transform at the checkpoint's input size (resize + normalise + to tensor)."""
        return build_eval_transform(*self.checkpoint.data.input_size)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """(1, 1, h, w) normalised tensor at network size, via the eval transform."""
        return self.transform()(image=image)["image"][None]

    def probabilities(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """(N, 1, h, w) tooth probabilities of a batch of network inputs."""
        batch = batch.to(self.device, memory_format=memory_format(self.device))
        return predict_probabilities(self.model, batch, tta, self.amp_dtype, self.device)

    def predict(self, image: np.ndarray, threshold: float = 0.5, tta: bool = False) -> np.ndarray:
        """Boolean HxW mask at the image's own size (eval.py's inference, resize and threshold)."""
        return mask_at_size(self.probabilities(self.network_input(image), tta), image.shape[:2], threshold)

    def saliency(self, image: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """`get_saliency_map` for an original-size uint8 image, resized back to its size. `region`
        (optional boolean mask at the image's size) picks the logits whose sum is explained."""
        batch = self.network_input(image)
        if region is not None:
            region = cv2.resize(np.asarray(region, np.uint8), batch.shape[:-3:-1], interpolation=cv2.INTER_NEAREST) > 0
        saliency = get_saliency_map(self.model, batch, region)
        return np.clip(cv2.resize(saliency, image.shape[1::-1], interpolation=cv2.INTER_LINEAR), 0, 1)

    def ground_truth(self, image_path: str | os.PathLike) -> np.ndarray:
        """The mask (uint8 0/1) of one of the labelled images this model was trained and tested with,
        paired as eval.py pairs them (the index, or file names in the masks folder)."""
        if self._mask_paths is None:
            splits = self.checkpoint.data.labelled_splits()
            self._mask_paths = {s.image.resolve(): s.mask for part in splits.values() for s in part}
        mask_path = self._mask_paths.get(Path(image_path).resolve())
        if mask_path is None:
            raise ToothSegError(f"{image_path}: not one of the labelled images of {self.path}; pass its mask explicitly")
        return read_mask(mask_path)


def load_predictor(source: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """A Predictor from a segmentation checkpoint, or a run folder (its best.pth)."""
    record = open_checkpoint(source, ("segmentation",), "a prediction")
    device = torch.device(device)
    model = record.build_model().to(device, memory_format=memory_format(device)).eval()
    return Predictor(model, record, device)


def get_saliency_map(model, image, region: np.ndarray | None = None) -> np.ndarray:
    """Gradient saliency of a segmentation model: |d objective / d input|, max over channels,
    scaled to [0, 1] (all zeros when the gradient vanishes). The objective is the mean logit over
    the predicted foreground (logit > 0; every pixel when nothing is predicted), or, with `region`
    (boolean HxW at the input's size), the sum of the logits inside it. `image` is a normalised
    (C, H, W) or (1, C, H, W) tensor; returns an HxW float32 array. Runs in eval mode on the model's
    device and leaves the model's parameters' gradients and its train/eval mode untouched."""
    device = next(model.parameters()).device
    x = torch.as_tensor(image).detach().clone().float()
    x = (x[None] if x.ndim == 3 else x).to(device).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)[0, 0]
            if region is not None:
                where = torch.as_tensor(np.asarray(region, bool), device=device)
                if where.shape != logits.shape:
                    raise ToothSegError(f"saliency region has shape {tuple(where.shape)}, the input {tuple(logits.shape)}; "
                                        f"give a mask of the input's size")
                objective = logits[where].sum()
            else:
                foreground = logits > 0
                objective = logits[foreground].mean() if foreground.any() else logits.mean()
            (grad,) = torch.autograd.grad(objective, x)
    finally:
        model.train(was_training)
    saliency = grad[0].abs().amax(dim=0)
    peak = saliency.max()
    return (saliency / peak if peak > 0 else saliency).cpu().numpy().astype(np.float32)
