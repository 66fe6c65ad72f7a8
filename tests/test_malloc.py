"""The process's malloc arenas: capped at start, before any thread takes one of its own.

Each case runs in a fresh interpreter (an arena, once given to a thread, is
never taken back) and counts the arenas glibc's own ``malloc_stats`` lists
(the node runs on Linux with glibc).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The cap is set ("limit"), not set ("plain"), or left to the command line's
# main (here a command that fails at once, "cli"); then four threads allocate
# at once (the barrier keeps each alive until all have) and glibc prints one
# "Arena N:" block per arena to standard error.
THREADS = """
import ctypes, sys, threading
mode = sys.argv[1]
if mode == "cli":
    from oncoseg_node import cli
    said = cli.main(["check-config", "--config", "/nonexistent/oncoseg-node.yaml"]) != 0
else:
    from oncoseg_node.ops.malloc import limit_malloc_arenas
    said = limit_malloc_arenas() if mode == "limit" else None
print(said, flush=True)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(4)
def work():
    libc.malloc(64 * 1024)
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def arenas(mode: str, **env: str) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True,
                          text=True, timeout=60, check=True,
                          env={**environment, "PYTHONPATH": str(REPO), **env})
    return done.stdout.strip().splitlines()[-1], done.stderr.count("Arena ")


def test_four_threads_share_two_arenas_once_capped():
    said, count = arenas("limit")
    assert said == "True"
    assert count == 2


def test_without_the_cap_each_thread_takes_an_arena_of_its_own():
    # What the cap is for: glibc's default gives the four threads four more arenas.
    said, count = arenas("plain")
    assert said == "None"
    assert count == 5


def test_an_operators_malloc_arena_max_is_left_as_it_is():
    said, count = arenas("limit", MALLOC_ARENA_MAX="3")
    assert said == "False"
    assert count == 3


def test_the_command_line_caps_the_arenas_before_anything_else():
    said, count = arenas("cli")
    assert said == "True"  # the command ran (and failed on the missing file)
    assert count == 2
