"""The LoRA optimisation loop: base model frozen, checkpoints, and an exact resume.

Only the LoRA matrices on the ViT attention projections train (the
configuration the engine merges: Onco-Seg's r=16, alpha=32, dropout 0.1);
every base weight stays frozen in the engine's dtype. Each optimiser step
accumulates ``accumulate`` samples, and the ViT runs with gradient
checkpointing so a full-size 1008 px sample fits one GPU.

Resume is exact: which samples a step sees and the dropout noise it draws are
both seeded from (seed, step), and a checkpoint holds the LoRA weights, the
optimiser state and the loss history, so a run stopped after step k and
resumed reaches the same weights as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from oncoseg_node.commissioning.finetune.cases import TrainingCase
from oncoseg_node.commissioning.finetune.objectives import image_loss
from oncoseg_node.commissioning.finetune.samples import (
    TEXT_LENGTH,
    Sample,
    boxes_of,
    build_samples,
    concept_of,
    instance_targets,
    pixels,
)
from oncoseg_node.contouring.engines.sam3.load import onco_seg_lora_config
from oncoseg_node.contouring.engines.sam3.preprocess import SliceFrame
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.errors import OncosegError

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 500
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    accumulate: int = 4  # samples per optimiser step
    checkpoint_every: int = 50
    seed: int = 0
    negatives_per_positive: float = 0.5
    gradient_checkpointing: bool = True

    def identity(self) -> str:
        """What must match for a checkpoint to be resumed (not the step count)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("steps",
                                                                     "checkpoint_every")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def checkpoint_vit_layers(detector: Any) -> int:
    """Recompute each ViT layer's activations in the backward pass; returns the layer count.

    transformers' ``gradient_checkpointing_enable`` refuses SAM3 models as a
    whole, but their ViT layers are ``GradientCheckpointingLayer``s, which
    checkpoint when given a checkpoint function; the ViT at 1008 px is where
    the activation memory is.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in detector.vision_encoder.backbone.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            setattr(module, "_gradient_checkpointing_func",  # noqa: B010 - a torch Module attribute
                    partial(checkpoint, use_reentrant=False))
            count += 1
    return count


def many_parts(structure: Structure) -> bool:
    return getattr(structure, "parts", "one") == "many"


class FineTuner:
    """Wraps the detector of a loaded SAM3 model with a trainable LoRA."""

    def __init__(self, model: Any, tokenizer: Any, structures: Mapping[str, Structure],
                 cases: Sequence[TrainingCase], settings: TrainSettings,
                 device: torch.device, dtype: torch.dtype) -> None:
        from peft import get_peft_model

        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.structures = dict(structures)
        self.cases = list(cases)
        self.image_size = int(model.config.image_size)
        detector = model.detector_model.to(device=device, dtype=dtype)
        for parameter in detector.parameters():
            parameter.requires_grad_(False)
        torch.manual_seed(settings.seed)  # LoRA A is initialised randomly
        self.peft = get_peft_model(detector, onco_seg_lora_config())
        if settings.gradient_checkpointing:
            checkpoint_vit_layers(detector)
        self.trainable = {n: p for n, p in self.peft.named_parameters() if p.requires_grad}
        if not self.trainable or any(".lora_" not in n for n in self.trainable):
            raise OncosegError("LoRA set-up left base weights trainable or no LoRA weights")
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.samples = build_samples(self.cases, self.structures,
                                     settings.negatives_per_positive, settings.seed)
        if not self.samples:
            raise OncosegError("no training samples: no case holds the structures asked for")
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step = 0
        self.losses: list[float] = []
        # the fixed-set loss of the training cases before any step: noise-free evidence
        # that training lowers the loss, carried through checkpoints for a resumed run
        self.start_loss: float | None = None

    # -- one sample ---------------------------------------------------------------

    def _prompt(self, concept: str) -> tuple[torch.Tensor, torch.Tensor]:
        if concept not in self._text:
            enc = self.tokenizer([concept], padding="max_length", max_length=TEXT_LENGTH,
                                 truncation=True, return_tensors="pt")
            self._text[concept] = (enc["input_ids"].to(self.device),
                                   enc["attention_mask"].to(self.device))
        return self._text[concept]

    def sample_loss(self, sample: Sample, cases: Sequence[TrainingCase] | None = None
                    ) -> dict[str, torch.Tensor]:
        case = (cases or self.cases)[sample.case]
        structure = self.structures[sample.structure]
        ids, attn = self._prompt(concept_of(structure))
        out = self.peft(pixel_values=pixels(case, sample.z, self.image_size, self.device,
                                            self.dtype),
                        input_ids=ids, attention_mask=attn)
        frame = SliceFrame(case.volume.shape[1], case.volume.shape[2], self.image_size)
        mask = case.masks.get(sample.structure)
        slice_mask = (mask[sample.z] if mask is not None
                      else np.zeros(case.volume.shape[1:], dtype=bool))
        targets = instance_targets(slice_mask, frame, tuple(out.pred_masks.shape[-2:]),
                                   many_parts(structure))
        return image_loss(out.pred_logits[0], out.pred_masks[0], out.pred_boxes[0],
                          out.presence_logits[0], targets, boxes_of(targets))

    # -- the loop -----------------------------------------------------------------

    def _batch(self, step: int) -> list[Sample]:
        rng = np.random.default_rng([self.settings.seed, step])
        picks = rng.integers(0, len(self.samples), size=self.settings.accumulate)
        return [self.samples[int(i)] for i in picks]

    def train_step(self) -> float:
        """One optimiser step; returns the mean loss of its samples."""
        self.peft.train()
        torch.manual_seed(self.settings.seed * 1_000_003 + self.step)  # dropout, per step
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for sample in self._batch(self.step):
            loss = self.sample_loss(sample)["total"] / self.settings.accumulate
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.step += 1
        self.losses.append(total)
        return total

    @torch.no_grad()
    def mean_loss(self, cases: Sequence[TrainingCase], limit: int = 64) -> float:
        """Mean loss over (up to ``limit``) samples of ``cases``, dropout off."""
        self.peft.eval()
        samples = build_samples(cases, self.structures, self.settings.negatives_per_positive,
                                self.settings.seed)
        if not samples:
            return float("nan")
        chosen = samples[:: max(1, len(samples) // limit)][:limit]
        return float(np.mean([float(self.sample_loss(s, cases)["total"]) for s in chosen]))

    def run(self, steps: int, checkpoints: Path,
            on_step: Callable[[int, float], None] | None = None) -> None:
        if self.step == 0 and self.start_loss is None:
            self.start_loss = self.mean_loss(self.cases)
        while self.step < steps:
            loss = self.train_step()
            if on_step is not None:
                on_step(self.step, loss)
            if self.step % self.settings.checkpoint_every == 0 or self.step == steps:
                self.save_checkpoint(checkpoints)

    # -- checkpoints --------------------------------------------------------------

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.trainable.items()}

    def save_checkpoint(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{self.step:06d}.pt"
        tmp = path.with_suffix(".pt.partial")
        torch.save({"step": self.step, "lora": self.lora_state(),
                    "optimizer": self.optimizer.state_dict(), "losses": self.losses,
                    "start_loss": self.start_loss, "settings": self.settings.identity()}, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def resume(self, folder: Path) -> int:
        """Load the newest checkpoint in ``folder``; returns its step (0 when none)."""
        found = sorted(folder.glob("step-*.pt")) if folder.is_dir() else []
        if not found:
            return 0
        state = torch.load(found[-1], map_location=self.device, weights_only=True)
        if state["settings"] != self.settings.identity():
            raise OncosegError(f"{found[-1]}: made with other training settings; "
                               "resume needs the same settings and cases")
        with torch.no_grad():
            for name, value in state["lora"].items():
                self.trainable[name].copy_(value.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.start_loss = state.get("start_loss")
        return self.step
