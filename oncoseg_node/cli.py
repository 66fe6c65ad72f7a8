"""Command line: ``oncoseg-node run | check-config | segment | status | retry | ...``.

Every command exits 0 on success and non-zero with a one-line reason on
failure: 2 for an invalid config (listing every problem), 3 when the node
cannot start and changed nothing (state directory held by another node, a
port taken). The systemd unit's ``RestartPreventExitStatus`` lists both:
restarting cannot fix either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from oncoseg_node import __version__
from oncoseg_node.cli_setup import cmd_check_config, cmd_init, cmd_run  # set-up and run
from oncoseg_node.cli_users import add_users_parser
from oncoseg_node.config import DEFAULT_CONFIG, Config, load_config
from oncoseg_node.errors import ConfigError, OncosegError, StartupError
from oncoseg_node.ops.malloc import limit_malloc_arenas

EXIT_FAILURE = 1
EXIT_INVALID_CONFIG = 2
EXIT_START_FAILED = 3


def _config_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config", type=Path, required=required,
        default=Path(os.environ.get("ONCOSEG_CONFIG", DEFAULT_CONFIG)),
        help="node config file (default: $ONCOSEG_CONFIG, else the packaged default)",
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from oncoseg_node.ops.offline import segment_folder

    segment_folder(load_config(args.config), args.series_dir, args.output,
                   protocol_name=args.protocol, profile_name=args.profile,
                   series_uid=args.series)
    return 0


def _open_ledger(config: Config):  # noqa: ANN202 - Ledger imported lazily
    from oncoseg_node.ledger import Ledger

    if not config.ledger_path.exists():
        raise OncosegError(f"no ledger at {config.ledger_path} (has the node run yet?)")
    return Ledger(config.ledger_path)


def cmd_status(args: argparse.Namespace) -> int:
    from oncoseg_node.intake.spool import Spool
    from oncoseg_node.ops.status import job_rows, render_text

    config = load_config(args.config)
    ledger = _open_ledger(config)
    rows = job_rows(ledger, Spool(config.spool_dir), args.limit)
    print(json.dumps(rows, indent=2) if args.json else render_text(rows))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    ledger = _open_ledger(config)
    if ledger.job(args.job) is None:
        raise OncosegError(f"no job {args.job}")
    count = ledger.retry_deliveries(args.job, args.to)
    if not count:
        raise OncosegError(f"job {args.job} has no failed or pending delivery to retry")
    print(f"job {args.job}: {count} delivery(ies) {_when_sent(config)}")
    return 0


def _when_sent(config: Config, plural: bool = True) -> str:
    """When a delivery made due now in the ledger is attempted: by the running node, or later."""
    from oncoseg_node.ops.statelock import holder_pid

    pid = holder_pid(config.state_dir)
    they, them = ("they", "them") if plural else ("it", "it")
    if pid is None:
        return (f"due now; no node is running on {config.state_dir}, "
                f"{they} will be sent when it starts")
    # The node's delivery scheduler reads the ledger every second and replaces
    # the old backoff timer with one for now.
    return f"due now; the running node (PID {pid}) sends {them} within about a second"


def cmd_release(args: argparse.Namespace) -> int:
    ledger = _open_ledger(load_config(args.config))
    if not ledger.release(args.job):
        raise OncosegError(f"job {args.job} is not held")
    print(f"job {args.job}: released; it will be contoured despite its finding")
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    ledger = _open_ledger(load_config(args.config))
    if not ledger.discard(args.job, f"discarded by operator: {args.reason}"):
        raise OncosegError(f"job {args.job} is not held, failed, skipped or quarantined")
    print(f"job {args.job}: discarded")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.to and args.to not in {d.name for d in config.destinations}:
        raise OncosegError(f"no destination named {args.to!r}")
    job_id = _open_ledger(config).resend(args.series_uid, args.to)
    if job_id is None:
        raise OncosegError(f"series {args.series_uid} has no structure set to resend")
    print(f"job {job_id}: structure set {_when_sent(config, plural=False)}")
    return 0


def cmd_protocols_list(args: argparse.Namespace) -> int:
    from oncoseg_node.contouring.protocol_report import protocol_lines
    from oncoseg_node.contouring.protocols import load_protocols

    print("\n".join(protocol_lines(load_protocols(load_config(args.config).protocols))))
    return 0


def cmd_protocols_explain(args: argparse.Namespace) -> int:
    from oncoseg_node.contouring.protocol_report import explain_lines
    from oncoseg_node.contouring.protocols import load_protocols

    config = load_config(args.config)
    print("\n".join(explain_lines(config, load_protocols(config.protocols), args.series_dir,
                                 args.calling_ae, args.series)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from oncoseg_node.commissioning.commands import evaluate

    evaluate(config_path=args.config, series=args.series, reference=args.reference,
             ours=args.ours, cases=args.cases, series_uid=args.series_uid,
             alias_map=args.alias_map, csv_path=args.csv, html_path=args.html)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import yaml

    from oncoseg_node.commissioning.finetune.command import FinetuneRequest, run_finetune
    from oncoseg_node.commissioning.finetune.trainer import TrainSettings

    aliases = yaml.safe_load(Path(args.alias_map).read_text()) if args.alias_map else {}
    if not isinstance(aliases, dict):
        raise OncosegError(f"{args.alias_map}: expected a mapping of reference name -> TG-263")
    settings = TrainSettings(learning_rate=args.learning_rate, accumulate=args.accumulate,
                             checkpoint_every=args.checkpoint_every, seed=args.seed)
    run_finetune(load_config(args.config), FinetuneRequest(
        cases=Path(args.cases), out=Path(args.out), structures=tuple(args.structures or ()),
        aliases=aliases, steps=args.steps, resume=args.resume,
        validation_fraction=args.validation_fraction, settings=settings))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from oncoseg_node.commissioning.commands import phantom

    phantom(args.out_dir, slices=args.slices, size=args.size, position=args.position,
            site=args.site, new_uids=args.new_uids, reference=args.reference,
            config_path=args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oncoseg-node",
        description="Silent-assistant DICOM node: CT in, draft RT Structure Set out.",
    )
    parser.add_argument("--version", action="version", version=f"oncoseg-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    _config_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config and its protocols file")
    _config_arg(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("init", help="write the commented example config and protocols to edit")
    p.add_argument("directory", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite files already there")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("segment", help="contour a folder of CT files offline (no network)")
    p.add_argument("series_dir", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="RTSTRUCT file to write")
    p.add_argument("--protocol", help="protocol name (default: matched from the series)")
    p.add_argument("--profile", default="generic", help="destination profile for the writer")
    p.add_argument("--series", metavar="UID",
                   help="the CT series to contour when the folder holds several")
    _config_arg(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("status", help="list jobs and their states")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="retry a job's failed deliveries now")
    p.add_argument("job", type=int)
    p.add_argument("--to", help="only this destination")
    _config_arg(p)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("release", help="contour a held job despite its geometry finding")
    p.add_argument("job", type=int)
    _config_arg(p)
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("discard", help="end a held or failed job for good")
    p.add_argument("job", type=int)
    p.add_argument("--reason", default="no reason given")
    _config_arg(p)
    p.set_defaults(func=cmd_discard)

    p = sub.add_parser("resend", help="send a series' newest structure set again")
    p.add_argument("series_uid")
    p.add_argument("--to", help="only this destination")
    _config_arg(p)
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("protocols", help="list protocols, or explain which one a series gets")
    psub = p.add_subparsers(dest="protocols_command", required=True)
    q = psub.add_parser("list", help="protocols and their structures")
    _config_arg(q)
    q.set_defaults(func=cmd_protocols_list)
    q = psub.add_parser("explain", help="which protocol matches a series, and why not the others")
    q.add_argument("series_dir", type=Path)
    q.add_argument("--calling-ae", help="the scanner's AE title, for calling-AE rules")
    q.add_argument("--series", metavar="UID",
                   help="the CT series to explain when the folder holds several")
    _config_arg(q)
    q.set_defaults(func=cmd_protocols_explain)

    p = sub.add_parser("evaluate", help="compare our contours with reference contours")
    p.add_argument("--series", help="folder of the CT series")
    p.add_argument("--reference", help="reference RT Structure Set (e.g. manual contours)")
    p.add_argument("--ours", help="our RT Structure Set (default: contour the series now)")
    p.add_argument("--series-uid", help="the CT series in --series DIR when it holds several "
                   "(default: the one the reference is drawn on)")
    p.add_argument("--cases", help="folder of cases, each with ct/, reference.dcm, [ours.dcm]")
    p.add_argument("--alias-map", help="YAML: reference ROI name -> TG-263 name")
    p.add_argument("--csv", help="write per-structure metrics as CSV")
    p.add_argument("--html", help="write an HTML report")
    _config_arg(p)
    p.set_defaults(func=cmd_evaluate)

    from oncoseg_node.contouring.engines.sam3 import weights_check  # torch only when it runs

    p = sub.add_parser("weights", help="check SAM3 weights before commissioning")
    weights_check.add_parser(p)

    p = sub.add_parser("finetune", help="train a LoRA adapter on approved structure sets")
    p.add_argument("--cases", required=True, help="folder of cases, each with ct/, reference.dcm")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--structures", nargs="+", help="TG-263 names (default: all found)")
    p.add_argument("--alias-map", help="YAML: reference ROI name -> TG-263 name")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--accumulate", type=int, default=4, help="samples per optimiser step")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    _config_arg(p)
    p.set_defaults(func=cmd_finetune)

    add_users_parser(sub, _config_arg)

    p = sub.add_parser("phantom", help="write a synthetic CT series with known organs")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--slices", type=int, default=96)
    p.add_argument("--size", type=int, default=512, help="rows and columns")
    p.add_argument("--position", default="HFS", choices=["HFS", "HFP", "FFS", "FFP"])
    p.add_argument("--site", default="thorax", choices=["thorax", "head", "pelvis"])
    p.add_argument("--new-uids", action="store_true",
                   help="new study, series and instance UIDs (default: the same every time)")
    p.add_argument("--reference", type=Path, metavar="RS.dcm",
                   help="also write the known organs as a reference RT Structure Set")
    _config_arg(p)
    p.set_defaults(func=cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()  # before any thread: each keeps the arena it first got
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        # Each problem already names its file and line (FILE:LINE: key: message).
        print(f"oncoseg-node: invalid configuration: {len(exc.problems)} problem(s)",
              file=sys.stderr)
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID_CONFIG
    except StartupError as exc:
        print(f"oncoseg-node: cannot start: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    except OncosegError as exc:
        print(f"oncoseg-node: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"oncoseg-node: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
