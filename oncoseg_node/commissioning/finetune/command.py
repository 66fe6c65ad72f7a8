"""``oncoseg-node finetune``: cases in, a LoRA adapter folder and its report out."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from oncoseg_node.commissioning.finetune.adapter import write_adapter
from oncoseg_node.commissioning.finetune.cases import (
    case_list_sha256,
    load_cases,
    split_by_patient,
)
from oncoseg_node.commissioning.finetune.report import side_by_side, to_csv, to_html
from oncoseg_node.commissioning.finetune.trainer import CHECKPOINT_DIR, FineTuner, TrainSettings
from oncoseg_node.config import Config, Sam3Config
from oncoseg_node.contouring.protocols import Structure, load_protocols
from oncoseg_node.errors import OncosegError


@dataclass(frozen=True)
class FinetuneRequest:
    cases: Path
    out: Path
    structures: Sequence[str] = ()
    aliases: Mapping[str, str] | None = None
    steps: int = 500
    resume: bool = False
    validation_fraction: float = 0.2
    settings: TrainSettings = TrainSettings()


class Progress:
    """A one-line bar with loss and time left on a terminal; JSON lines otherwise."""

    def __init__(self, total: int, start: int, stream: TextIO | None = None) -> None:
        self.total, self.start = total, start
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.began = time.monotonic()

    def __call__(self, step: int, loss: float) -> None:
        done = step - self.start
        per_step = (time.monotonic() - self.began) / max(done, 1)
        left = per_step * (self.total - step)
        if self.tty:
            width = 30
            filled = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/"
                              f"{self.total} loss {loss:.4f} {per_step:.2f} s/step "
                              f"left {int(left) // 60}:{int(left) % 60:02d}")
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(json.dumps({"event": "finetune_step", "step": step,
                                          "steps": self.total, "loss": round(loss, 6),
                                          "s_per_step": round(per_step, 3),
                                          "eta_s": round(left, 1)}) + "\n")
        self.stream.flush()


def _structures(config: Config, names: Sequence[str]) -> dict[str, Structure]:
    library = load_protocols(config.protocols).library
    if not names:
        return {n: s for n, s in library.items() if any(c.strip() for c in s.concepts)}
    unknown = [n for n in names if n not in library]
    if unknown:
        raise OncosegError(f"--structures: {', '.join(unknown)} not in the structure library "
                           f"of {config.protocols}")
    silent = [n for n in names if not any(c.strip() for c in library[n].concepts)]
    if silent:
        raise OncosegError(f"--structures: {', '.join(silent)} have no text concept to train")
    return {n: library[n] for n in names}


def base_of(sam3: Sam3Config) -> tuple[Path | None, str]:
    """The base folder and the setting that names it: ``base_dir``, else ``model_dir``."""
    if sam3.base_dir is not None:
        return sam3.base_dir, "engine.sam3.base_dir"
    return sam3.model_dir, "engine.sam3.model_dir"


def load_weights(sam3: Sam3Config):  # -> (Sam3VideoModel, tokenizer, provenance dict)
    """The model the engine would start on (the base, or the checkpoint layered over it).

    Returns it with what it is made of: the layout, each file's SHA-256 and
    role, and for a checkpoint its container and LoRA; EngineError as the
    engine would raise it.
    """
    from oncoseg_node.contouring.engines.sam3.checkpoint import load_layered
    from oncoseg_node.contouring.engines.sam3.load import load_base, sha256_files, weight_files
    from oncoseg_node.contouring.engines.sam3.weights_check import base_files

    base, setting = base_of(sam3)
    if sam3.checkpoint is not None:
        model, tokenizer, report = load_layered(base, Path(sam3.checkpoint), sam3.lora_alpha,
                                                setting=setting)
        lora = report.as_dict()["lora"]
        return model, tokenizer, {
            "path": str(base), "setting": setting, "sha256": report.identity,
            "checkpoint": {"path": str(sam3.checkpoint), "layout": report.layout,
                           "container": report.container,
                           "lora": {k: lora[k] for k in ("rank", "alpha", "alpha_source",
                                                         "targets", "merged")}},
            "layout": report.layout, "files": [vars(f) for f in report.files]}
    model, tokenizer = load_base(base, setting=setting)
    assert base is not None  # load_base raised otherwise
    layout, files = base_files(Path(base))
    # the engine's identity of a base alone: one hash over its weight files
    return model, tokenizer, {
        "path": str(base), "setting": setting, "sha256": sha256_files(weight_files(Path(base))),
        "checkpoint": None, "layout": layout, "files": files}


def describe_weights(weights: Mapping[str, Any]) -> list[str]:
    """What the adapter was trained over, one line each: layout, then every file's hash."""
    checkpoint = weights.get("checkpoint")
    head = (f"trained over {checkpoint['path']} ({checkpoint['layout']}, "
            f"{checkpoint['container']}) layered over {weights['path']}" if checkpoint
            else f"trained over {weights['path']} ({weights['layout']})")
    return [head, *(f"  sha256 {f['sha256']}  {f['role']:<10} {f['path']}"
                    for f in weights["files"])]


def run_finetune(config: Config, request: FinetuneRequest, out: TextIO | None = None) -> dict:
    """Train, write the adapter and its report; returns the provenance written."""
    import torch

    from oncoseg_node.contouring.engines.sam3.load import DTYPES, check_device

    stream = out or sys.stdout
    sam3 = config.engine.sam3
    device = check_device(sam3.device)  # before minutes of reading cases
    wanted = _structures(config, request.structures)
    cases, skipped = load_cases(request.cases, sorted(wanted), request.aliases or {})
    for case in skipped:
        print(f"skipped {case.name}: {case.reason}", file=stream)
    if not cases:
        raise OncosegError(f"{request.cases}: no usable case ({len(skipped)} skipped)")
    train, validation = split_by_patient(cases, request.validation_fraction,
                                         request.settings.seed)
    if not train:
        raise OncosegError("every patient went to validation: give more cases")
    found = sorted({name for case in cases for name in case.masks})
    structures = {n: wanted[n] for n in found}
    print(f"{len(train)} training and {len(validation)} validation case(s) of "
          f"{len({c.patient_id for c in cases})} patient(s); structures {', '.join(found)}",
          file=stream)
    model, tokenizer, weights = load_weights(sam3)
    for line in describe_weights(weights):
        print(line, file=stream)
    tuner = FineTuner(model, tokenizer, structures, train, request.settings, device,
                      DTYPES[sam3.dtype])
    checkpoints = request.out / CHECKPOINT_DIR
    start = tuner.resume(checkpoints) if request.resume else 0
    if start:
        print(f"resumed at step {start} from {checkpoints}", file=stream)
    tuner.run(request.steps, checkpoints, Progress(request.steps, start, stream))
    figures: dict[str, float] = {"training_loss_start": float(tuner.start_loss or "nan"),
                                 "training_loss_end": tuner.mean_loss(train)}
    if validation:
        figures["validation_loss"] = tuner.mean_loss(validation)
        with tuner.peft.disable_adapter():
            figures["validation_loss_base"] = tuner.mean_loss(validation)
    provenance = {
        "base_model": weights,
        "cases": {"root": str(request.cases), "sha256": case_list_sha256(cases),
                  "train": [c.name for c in train], "validation": [c.name for c in validation],
                  "train_patients": sorted({c.patient_id for c in train}),
                  "validation_patients": sorted({c.patient_id for c in validation}),
                  "skipped": {c.name: c.reason for c in skipped}},
        "structures": found,
        "steps": tuner.step,
        "settings": {**request.settings.__dict__, "dtype": sam3.dtype, "device": str(device)},
        "loss_first_last": [tuner.losses[0], tuner.losses[-1]] if tuner.losses else [],
        "validation": figures,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.1, "targets": "ViT attention q/k/v/o"},
    }
    write_adapter(tuner.peft, request.out, provenance)
    del tuner, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if validation:
        report = side_by_side(sam3, request.out, validation, structures)
        (request.out / "report.csv").write_text(to_csv(report))
        (request.out / "report.html").write_text(
            to_html(report, f"LoRA adapter {request.out.name}: validation patients",
                    describe_weights(weights)))
        print(f"report: {request.out / 'report.html'}", file=stream)
    print(f"adapter: {request.out} ({provenance['steps']} steps)", file=stream)
    return provenance
