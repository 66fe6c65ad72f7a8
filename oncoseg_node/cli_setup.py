"""The commands that set up and run the node: ``run``, ``check-config`` and ``init``.

Argument parsing and exit codes stay in :mod:`oncoseg_node.cli`.
"""

from __future__ import annotations

import argparse

from oncoseg_node.config import load_config
from oncoseg_node.errors import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.statelock import StateLock, refuse_if_held

    config = load_config(args.config)
    refuse_if_held(config.state_dir)  # a second node goes at once, before the slow parts
    from oncoseg_node.contouring.protocols import load_protocols
    from oncoseg_node.ops.logs import configure_logging

    load_protocols(config.protocols)  # both files valid before anything exists on disk
    configure_logging(config.logging)
    # Locked before the heavy imports below: a second node is refused at once.
    lock = StateLock(config.state_dir)
    lock.acquire()
    from oncoseg_node.ops.service import Service

    service = Service(config, lock=lock)
    service.install_signal_handlers()
    service.start()
    service.run_until_stopped()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.configcheck import check_files

    report = check_files(args.config)
    if report.problems:
        raise ConfigError(report.problems)
    print(report.summary())
    for line in report.warnings:
        print(line)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.configcheck import write_examples

    written = write_examples(args.directory, force=args.force)
    print(f"wrote {written[0]} and {written[1]} (the commented defaults); edit them, then:\n"
          f"  oncoseg-node check-config --config {written[0]}\n"
          f"  oncoseg-node run --config {written[0]}")
    return 0
