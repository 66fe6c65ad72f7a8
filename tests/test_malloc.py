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

# Four threads allocate at once (the barrier keeps each alive until all have),
# then glibc prints one "Arena N:" block per arena to standard error.
THREADS = """
import ctypes, sys, threading
from oncoseg_node.ops.malloc import limit_malloc_arenas
print(limit_malloc_arenas() if sys.argv[1] == "limit" else None, flush=True)
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
    return done.stdout.strip(), done.stderr.count("Arena ")


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


# The command line: ``main`` caps the arenas before it parses anything, so
# whatever command runs (here one that fails at once) its threads share two.
COMMAND_LINE = """
import ctypes, threading
from oncoseg_node import cli
cli.main(["check-config", "--config", "/nonexistent/oncoseg-node.yaml"])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(3)
def work():
    libc.malloc(64 * 1024)
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def test_the_command_line_caps_the_arenas_before_anything_else():
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", COMMAND_LINE], capture_output=True,
                          text=True, timeout=60, env={**environment, "PYTHONPATH": str(REPO)})
    assert done.stderr.count("Arena ") == 2, done.stderr[-2000:]
