"""Destination profiles: what each planning system accepts in a structure set.

Pure data. The writer shapes its output by the profile (hole style, name
length) and checks its own file against it before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DestinationProfile:
    """``hole_style``: "keyhole" joins each hole to its outer contour with a
    zero-width cut; "separate" writes holes as their own contours (the planning
    system subtracts contours nested inside another on the same slice)."""

    name: str
    max_roi_name_length: int
    hole_style: str
    charset: str = "ISO_IR 100"


PROFILES: dict[str, DestinationProfile] = {
    "generic": DestinationProfile("generic", 64, "keyhole"),
    "eclipse": DestinationProfile("eclipse", 16, "keyhole"),
    "raystation": DestinationProfile("raystation", 64, "separate"),
    "monaco": DestinationProfile("monaco", 32, "separate"),
}


def get_profile(name: str) -> DestinationProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown destination profile {name!r}; "
                         f"choose one of {', '.join(sorted(PROFILES))}") from None
