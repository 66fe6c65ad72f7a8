"""The classical engine's masks pinned by digest, and each step's memory at a fixed size.

A change that moves a mask fails here by name; such a change updates
``fixtures/classical_mask_digests.json`` (``python -m tests.mask_cases``) and
says in its commit which structures moved and their Dice before and after.
The phantoms' pixels come from numpy's random generators, whose streams may
change between numpy releases: the test extra pins numpy's and scipy's
minor versions for that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.mask_cases import CASES, DIGESTS, case_digests

PINNED = json.loads(DIGESTS.read_text())

# Each step's peak above what was held before it, 120 x 512 x 512 thorax, MiB:
# (tracemalloc, RSS). Measured 70.8/83.9, 4.7/0, 26.6/0.4, 61.0/54.0; the
# budget leaves a quarter and a few MiB for allocator noise.
BUDGET_MIB = {"body": (89.0, 105.0), "mid": (6.0, 8.0), "chest": (34.0, 40.0),
              "skeleton": (77.0, 70.0)}


def test_every_case_is_pinned():
    assert sorted(PINNED) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_match_their_digests(name):
    now = case_digests(name)
    moved = {s: f"{PINNED[name].get(s)} -> {d}" for s, d in now.items()
             if PINNED[name].get(s) != d}
    assert not moved, f"{name}: masks moved (count:sha256): {moved}"


def test_each_step_stays_within_its_memory_budget():
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-m", "tests.step_memory", "120"], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    measured = json.loads(out.stdout)
    over = {step: measured[step] for step, (traced, rss) in BUDGET_MIB.items()
            if measured[step]["traced_peak_mib"] > traced or measured[step]["rss_peak_mib"] > rss}
    assert not over, f"steps over budget {BUDGET_MIB}: {over}"
