"""``oncoseg-node weights check PATH [--base DIR] [--json]``: what a SAM3 checkpoint holds.

Run before commissioning: the layout, the tensors per part of the model
(from the checkpoint, left to the base folder, unused, missing), the LoRA
(rank, alpha and where it came from, targets, whether it was merged), the
dtype, each file's SHA-256, and whether the engine would start on it (exit
0) or why not (exit 2). ``PATH`` is a checkpoint file layered over
``--base``, a base folder on its own (today's ``model_dir``), or a peft
adapter folder over ``--base`` (with ``--checkpoint``: over that checkpoint
layered on ``--base``, as ``finetune`` trains it when one is configured).
Nothing in a checkpoint is run: it is read by the same restricted reader the
engine uses. Torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_WOULD_NOT_START = 2


def add_parser(weights: argparse.ArgumentParser) -> None:
    """The ``check`` subcommand under ``weights``."""
    sub = weights.add_subparsers(dest="weights_command", required=True)
    p = sub.add_parser("check", help="what a checkpoint holds and whether the engine starts on it")
    p.add_argument("path", type=Path,
                   help="checkpoint file (.ckpt, .pt, .safetensors), base folder or adapter folder")
    p.add_argument("--base", type=Path, metavar="DIR",
                   help="base folder: config.json, tokenizer, preprocessor, base weights")
    p.add_argument("--checkpoint", type=Path, metavar="FILE",
                   help="with an adapter folder: the checkpoint under it, layered over --base "
                        "(engine.sam3.checkpoint)")
    p.add_argument("--lora-alpha", type=float,
                   help="alpha for a peft-wrapped LoRA whose checkpoint does not record it "
                        "(engine.sam3.lora_alpha)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_weights_check)


def check(path: Path, base: Path | None, lora_alpha: float | None = None,
          checkpoint: Path | None = None) -> dict[str, Any]:
    """The report as a dict; ``would_start`` and ``problems`` say whether the engine starts.

    ``checkpoint`` goes with an adapter folder: the adapter over it, layered on ``base``.
    """
    from oncoseg_node.errors import EngineError

    try:
        if checkpoint is not None:
            return _check_adapter(Path(path), base, Path(checkpoint), lora_alpha)
        return _check(Path(path), base, lora_alpha)
    except EngineError as exc:
        return {"path": str(path), "base_dir": str(base) if base else None,
                "would_start": False, "problems": [str(exc)]}


def _check(path: Path, base: Path | None, lora_alpha: float | None) -> dict[str, Any]:
    from oncoseg_node.contouring.engines.sam3.checkpoint import inspect_checkpoint, layer_checkpoint

    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _check_adapter(path, base)
    if path.is_dir():
        if base is not None:
            return {"path": str(path), "would_start": False,
                    "problems": [f"{path}: a folder is checked on its own (it is the base); "
                                 "--base goes with a checkpoint file or an adapter folder"]}
        return _check_base(path)[0]
    if base is None:
        _, report = inspect_checkpoint(path, lora_alpha)
        report.problems.append(
            "no base folder (--base): config.json, the tokenizer, the preprocessor and every "
            "tensor the checkpoint lacks (for an image model: the tracker) come from there")
    else:
        _, _, report = layer_checkpoint(base, path, lora_alpha, setting="--base")
    return {"path": str(path), **report.as_dict()}


def base_files(base: Path) -> tuple[str, list[dict[str, Any]]]:
    """A base folder's layout and its weight files (path, sha256, bytes, role "base")."""
    from oncoseg_node.contouring.engines.sam3.checkpoint import FileInfo
    from oncoseg_node.contouring.engines.sam3.load import (
        is_meta_checkpoint,
        sha256_files,
        weight_files,
    )

    files = weight_files(base)
    layout = ("Meta's sam3 layout (converted at load)" if is_meta_checkpoint(files)
              else "transformers Sam3VideoModel")
    return layout, [vars(FileInfo(str(f), sha256_files([f]), f.stat().st_size, "base"))
                    for f in files]


def _check_base(base: Path, setting: str = "PATH") -> tuple[dict[str, Any], Any]:
    from oncoseg_node.contouring.engines.sam3.checkpoint import GroupCount, group_of
    from oncoseg_node.contouring.engines.sam3.load import load_base

    model, _ = load_base(base, setting=setting)
    groups: dict[str, GroupCount] = {}
    for key in model.state_dict():
        groups.setdefault(group_of(key), GroupCount()).from_base += 1
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.state_dict().values()})
    layout, files = base_files(base)
    return {
        "path": str(base), "layout": layout, "container": "base folder", "base_dir": str(base),
        "base_has_weights": True, "files": files,
        "dtypes": dtypes, "lora": {"wrapped": False, "merged": "no LoRA (a base folder)"},
        "groups": {k: vars(v) for k, v in groups.items()}, "from_base": sorted(groups),
        "problems": [], "would_start": True}, model


def _check_adapter(adapter: Path, base: Path | None, checkpoint: Path | None = None,
                   lora_alpha: float | None = None) -> dict[str, Any]:
    from oncoseg_node.contouring.engines.sam3.checkpoint import layer_checkpoint
    from oncoseg_node.contouring.engines.sam3.load import merge_adapter

    if base is None:
        return {"path": str(adapter), "would_start": False,
                "problems": [f"{adapter}: an adapter folder needs --base, the model it adapts"]}
    if checkpoint is not None and not (adapter / "adapter_config.json").is_file():
        return {"path": str(adapter), "would_start": False,
                "problems": [f"{adapter}: --checkpoint goes with an adapter folder (one with "
                             "adapter_config.json); check a checkpoint file as PATH"]}
    if checkpoint is None:
        report, model = _check_base(base, "--base")
    else:
        model, _, layered = layer_checkpoint(base, checkpoint, lora_alpha, setting="--base")
        report = layered.as_dict()
        if model is None:
            return {"path": str(adapter), **report}
        report["checkpoint"] = {"path": str(checkpoint), "container": report["container"],
                                "layout": report["layout"], "lora": report["lora"]}
    info = merge_adapter(model, adapter)
    alpha = json.loads((adapter / "adapter_config.json").read_text()).get("lora_alpha")
    report.update({
        "path": str(adapter), "container": "peft adapter folder",
        "lora": {"wrapped": True, "rank": info.rank, "alpha": alpha,
                 "alpha_source": str(adapter / "adapter_config.json"), "modules": info.modules,
                 "merged": "merged at load"},
        "files": report["files"] + [{"path": str(info.path / "adapter_model.safetensors"),
                                     "sha256": info.sha256, "role": "adapter"}]})
    return report


def render_text(report: dict[str, Any]) -> str:
    lines = [f"checkpoint  {report['path']}"]
    for label, key in (("container", "container"), ("layout", "layout"), ("base", "base_dir")):
        if report.get(key):
            lines.append(f"{label:<11} {report[key]}")
    under = report.get("checkpoint")
    if under:
        lines.append(f"{'under':<11} {under['path']} ({under['layout']})")
    if report.get("dtypes"):
        lines.append(f"{'dtype':<11} {', '.join(report['dtypes'])}")
    if report.get("tensors_in_file") is not None:
        lines.append(f"{'tensors':<11} {report['tensors_in_file']} in the file")
    lora = report.get("lora")
    if lora:
        if lora.get("rank"):
            alpha = lora.get("alpha")
            lines.append(
                f"{'LoRA':<11} r={lora['rank']} alpha={'?' if alpha is None else f'{alpha:g}'}"
                f" ({lora.get('alpha_source') or 'not found'})"
                f" on {', '.join(lora.get('targets') or []) or 'adapter modules'}:"
                f" {lora.get('modules', 0)} modules, {lora['merged']}")
        else:
            lines.append(f"{'LoRA':<11} {lora['merged']}")
        if lora.get("trained_copies"):
            lines.append(f"{'':<11} {lora['trained_copies']} trained tensors from peft "
                         "modules_to_save copies")
    if report.get("files"):
        lines.append("files")
        for info in report["files"]:
            lines.append(f"  {info['sha256']}  {info['role']:<10} {info['path']}")
    groups = report.get("groups") or {}
    if groups:
        lines.append(f"  {'part':<24}{'checkpoint':>11}{'base':>7}{'unused':>8}{'missing':>9}"
                     f"{'wrong shape':>13}")
        for name, c in groups.items():
            lines.append(f"  {name:<24}{c['from_checkpoint']:>11}{c['from_base']:>7}"
                         f"{c['unused']:>8}{c['missing']:>9}{c['mismatched']:>13}")
    for key, label in (("unused_examples", "unused, e.g."), ("missing_examples", "missing, e.g.")):
        if report.get(key):
            lines.append(f"{label} {', '.join(report[key][:5])}")
    if report["would_start"]:
        lines.append("would start: yes")
    else:
        lines.append("would start: no")
        lines.extend(f"  - {problem}" for problem in report["problems"])
    return "\n".join(lines)


def cmd_weights_check(args: argparse.Namespace) -> int:
    report = check(args.path, args.base, args.lora_alpha, args.checkpoint)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return EXIT_OK if report["would_start"] else EXIT_WOULD_NOT_START
