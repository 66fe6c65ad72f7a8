"""Training samples: the same slices, window and text prompts the engine uses at inference.

A sample is one CT slice and one structure. Slices that hold the structure
are positives (each connected part is one instance when the library declares
the structure multi-part, otherwise the whole slice mask is one instance);
slices of the same series without it are negatives, so the presence head
learns to say "not here" instead of drawing something.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from oncoseg_node.commissioning.finetune.cases import TrainingCase
from oncoseg_node.contouring.engines.sam3.preprocess import (
    DEFAULT_WINDOW,
    SliceFrame,
    window_to_unit,
)
from oncoseg_node.contouring.protocols import Structure

TEXT_LENGTH = 32  # as the engine pads every prompt


@dataclass(frozen=True)
class Sample:
    case: int  # index into the training cases
    structure: str
    z: int
    positive: bool


def build_samples(cases: Sequence[TrainingCase], structures: Mapping[str, Structure],
                  negatives_per_positive: float = 0.5, seed: int = 0) -> list[Sample]:
    """Every positive slice, plus a seeded choice of negative slices per case and structure."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for index, case in enumerate(cases):
        for name in sorted(structures):
            mask = case.masks.get(name)
            if mask is None:
                continue  # this case never contoured it: absence there is not evidence
            present = mask.reshape(mask.shape[0], -1).any(axis=1)
            positives, absent = np.flatnonzero(present), np.flatnonzero(~present)
            samples += [Sample(index, name, int(z), True) for z in positives]
            n_neg = min(len(absent), int(np.ceil(len(positives) * negatives_per_positive)))
            if n_neg:
                chosen = np.sort(rng.choice(absent, size=n_neg, replace=False))
                samples += [Sample(index, name, int(z), False) for z in chosen]
    return samples


def concept_of(structure: Structure) -> str:
    """The text prompt trained: the structure's first concept, as the engine prompts it."""
    concepts = [c for c in structure.concepts if c.strip()]
    if not concepts:
        raise ValueError(f"{structure.name}: no text concept to train")
    return concepts[0]


def pixels(case: TrainingCase, z: int, image_size: int, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """``(1, 3, S, S)`` model input of one slice, exactly as the engine builds it."""
    frame = SliceFrame(case.volume.shape[1], case.volume.shape[2], image_size)
    return frame.to_model(window_to_unit(case.volume.hu[z:z + 1], DEFAULT_WINDOW), device,
                          dtype)


def instance_targets(mask: np.ndarray, frame: SliceFrame, size: tuple[int, int],
                     many_parts: bool) -> torch.Tensor:
    """Ground-truth instances of one slice on the model's mask grid: ``(k, h, w)`` float 0/1.

    The CT mask goes through the same square padding as the image, then is
    area-resampled to the predicted mask size; a pixel is inside when at
    least half of it is.
    """
    if not mask.any():
        return torch.zeros((0, *size))
    if many_parts:
        labels, count = ndimage.label(mask)
        parts = [labels == k for k in range(1, count + 1)]
    else:
        parts = [mask]
    stack = torch.from_numpy(np.stack(parts).astype(np.float32))
    stack = F.pad(stack, (0, frame.side - frame.cols, 0, frame.side - frame.rows))
    small = F.interpolate(stack[:, None], size=size, mode="area")[:, 0]
    targets = (small >= 0.5).float()
    return targets[targets.flatten(1).any(dim=1)]


def boxes_of(targets: torch.Tensor) -> torch.Tensor:
    """Normalised (x0, y0, x1, y1) boxes of ``(k, h, w)`` masks, the detector's box format."""
    k, h, w = targets.shape
    out = torch.zeros((k, 4))
    for i in range(k):
        ys, xs = torch.nonzero(targets[i] > 0, as_tuple=True)
        out[i] = torch.stack([xs.min() / w, ys.min() / h, (xs.max() + 1) / w,
                              (ys.max() + 1) / h]).float()
    return out
