"""The Modality LUT of a CT slice: HU = stored value x RescaleSlope + RescaleIntercept.

Both are Type 1 in the CT Image module (PS3.3 C.8.2.1.1); an absent one is
read as the identity (slope 1, intercept 0), as older exporters leave them
out for HU-stored data. A value that is not one finite number, or a slope of
0 (every voxel would be the intercept), gives no HU: the receiver refuses
the instance with it and an offline load stops on it, naming the attribute.
"""

from __future__ import annotations

import math

from pydicom.dataset import Dataset

DEFAULTS = {"RescaleSlope": 1.0, "RescaleIntercept": 0.0}


def rescale(ds: Dataset) -> tuple[float, float] | str:
    """``(slope, intercept)`` of ``ds``, or why they give no HU (naming the attribute)."""
    values = []
    for keyword, default in DEFAULTS.items():
        if keyword not in ds:
            values.append(default)
            continue
        raw: object = None
        try:
            raw = ds[keyword].value
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return f"{keyword} {raw!r} is not one number"
        if not math.isfinite(value) or (keyword == "RescaleSlope" and value == 0):
            return f"{keyword} {raw!s} gives no HU"
        values.append(value)
    return values[0], values[1]
