"""CT slices to SAM3 inputs and SAM3 masks back to the CT grid (Onco-Seg preprocessing).

Onco-Seg trains on CT windowed to HU [-1000, 1000], scaled to [0, 1] and then
normalised with (x - 0.5) / 0.5, grey replicated to three channels, at the
model's square input size. Only a structure's explicit ``model_window``
changes the pixels the model sees (its slices are then encoded separately);
``hu_window`` is the window of intensity box prompts and never reaches the model.

Slices that are not square are padded (bottom and right, with the window's
low end, i.e. air in the default window) to a square before resizing, so the
anatomy is never stretched; masks are mapped back through the same frame.
Arrays are ``(z, y, x)`` = (slice, row, column) as everywhere in the node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
NORMALISE_MEAN = 0.5  # (x - mean) / std on [0, 1] pixels, every channel
NORMALISE_STD = 0.5
PREPROCESSOR_FILE = "preprocessor_config.json"


def check_preprocessor_config(model_dir: Path, image_size: int) -> list[str]:
    """How the checkpoint's ``preprocessor_config.json`` disagrees with what this module does.

    The checkpoint ships the preprocessing it was trained with; the engine
    does its own (CT window instead of 8-bit rescale), which matches only if
    the square input size is the model's (1008 for SAM3) and the
    normalisation is mean 0.5, std 0.5 on every channel. Empty when they agree.
    """
    path = Path(model_dir) / PREPROCESSOR_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path}: missing (the checkpoint's preprocessing cannot be checked)"]
    except (OSError, ValueError) as exc:
        return [f"{path}: unreadable ({exc})"]
    config = raw.get("image_processor", raw) if isinstance(raw, dict) else {}
    problems = []
    size = config.get("size") or {}
    sides = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size, size)
    if sides != (image_size, image_size):
        problems.append(f"{path}: size {size!r}, the engine feeds {image_size} x {image_size}")
    if config.get("do_normalize", True) is not True:
        problems.append(f"{path}: do_normalize {config.get('do_normalize')!r}, the engine "
                        "always normalises")
    for key, want in (("image_mean", NORMALISE_MEAN), ("image_std", NORMALISE_STD)):
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        if len(values) not in (1, 3) or any(not isinstance(v, (int, float))
                                            or abs(v - want) > 1e-6 for v in values):
            problems.append(f"{path}: {key} {value!r}, the engine uses {want} on every channel")
    return problems


def window_to_unit(hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and scale it linearly to [0, 1] (float32)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"HU window {window!r} is empty")
    unit = (np.asarray(hu, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(unit, 0.0, 1.0, out=unit)


@dataclass(frozen=True)
class SliceFrame:
    """How a ``rows x cols`` CT slice maps onto the model's ``size x size`` input.

    The slice sits in the top-left corner of a ``side x side`` square
    (``side = max(rows, cols)``), which is resized to ``size``.
    """

    rows: int
    cols: int
    size: int

    @property
    def side(self) -> int:
        return max(self.rows, self.cols)

    def to_model(self, unit: np.ndarray, device: torch.device | str,
                 dtype: torch.dtype) -> torch.Tensor:
        """``(b, rows, cols)`` values in [0, 1] -> normalised ``(b, 3, size, size)``."""
        x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).to(device)
        x = F.pad(x, (0, self.side - self.cols, 0, self.side - self.rows), value=0.0)
        x = x.unsqueeze(1)
        if self.side != self.size:
            # antialias only matters when shrinking (a CT wider than the model input)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=self.side > self.size)
        x = (x - NORMALISE_MEAN) / NORMALISE_STD
        return x.expand(-1, 3, -1, -1).to(dtype).contiguous()

    def logits_to_ct(self, logits: torch.Tensor) -> np.ndarray:
        """Mask logits ``(n, h, w)`` on the model frame -> boolean ``(n, rows, cols)``.

        Logits, not binary masks, are resized so the contour keeps the
        model's sub-pixel boundary instead of a staircase from the low-res grid.
        """
        x = logits.float().unsqueeze(1)
        x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return (x[:, 0, : self.rows, : self.cols] > 0).cpu().numpy()

    def lowres_to_index(self, r: np.ndarray, c: np.ndarray,
                        lowres: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates on an ``h x w`` model-frame mask -> CT (row, col)."""
        h, w = lowres
        rows = (np.asarray(r, dtype=np.float64) + 0.5) * self.side / h - 0.5
        cols = (np.asarray(c, dtype=np.float64) + 0.5) * self.side / w - 0.5
        return rows, cols

    def box_to_model(self, box: tuple[float, float, float, float]) -> tuple[float, ...]:
        """CT pixel box (row0, col0, row1, col1), inclusive -> normalised (cx, cy, w, h).

        SAM3's detector takes boxes in [0, 1] of its input image, centre form;
        the box edges are the outer edges of the first and last pixels.
        """
        row0, col0, row1, col1 = (float(v) for v in box)
        # pixel i spans [i, i + 1) in edge coordinates of the padded square
        x0, x1 = col0 / self.side, (col1 + 1.0) / self.side
        y0, y1 = row0 / self.side, (row1 + 1.0) / self.side
        x0, x1 = max(0.0, min(x0, 1.0)), max(0.0, min(x1, 1.0))
        y0, y1 = max(0.0, min(y0, 1.0)), max(0.0, min(y1, 1.0))
        return ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)


def mask_centroid_index(frame: SliceFrame, mask: torch.Tensor) -> tuple[float, float] | None:
    """Centroid of a boolean model-frame mask ``(h, w)`` as CT (row, col); None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    rows, cols = frame.lowres_to_index(np.array([ys.float().mean().item()]),
                                       np.array([xs.float().mean().item()]),
                                       (mask.shape[-2], mask.shape[-1]))
    return float(rows[0]), float(cols[0])
