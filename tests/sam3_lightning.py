"""Lightning-style checkpoints of Meta's SAM3 image model, as Onco-Seg publishes one.

``last.ckpt`` holds ``state_dict`` (every key prefixed ``model.``; Meta's
image-model names, no ``detector.``), ``hyper_parameters`` in Lightning's
``AttributeDict``, ``epoch`` and ``global_step``. The LoRA is either still
wrapped by peft (``base_layer``, ``lora_A.default``, ``lora_B.default`` on
every module named ``qkv`` or ``proj``, ``patch_embed.proj`` a Conv2d among
them) or merged; one head is trained plainly, another as a peft
``modules_to_save`` copy. Lightning need not be installed: its
``AttributeDict`` is stood in for, under Lightning's own module name, only
while the file is pickled, so the file names the real global.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

LIGHTNING_MODULE = "lightning_fabric.utilities.data"
TARGETS = ("qkv", "proj")
PLAIN_HEAD = "segmentation_head.instance_seg_head"
COPIED_HEAD = "dot_prod_scoring.hs_proj"


@contextmanager
def lightning_attribute_dict() -> Iterator[type]:
    """Lightning's ``AttributeDict`` (a dict with attribute access) under its module name."""
    if LIGHTNING_MODULE in sys.modules:  # the real one, when Lightning is installed
        yield sys.modules[LIGHTNING_MODULE].AttributeDict
        return

    class AttributeDict(dict):
        def __getattr__(self, key: str) -> Any:
            try:
                return self[key]
            except KeyError as exc:
                raise AttributeError(key) from exc

        def __setattr__(self, key: str, value: Any) -> None:
            self[key] = value

    AttributeDict.__module__ = LIGHTNING_MODULE
    AttributeDict.__qualname__ = "AttributeDict"
    parts = LIGHTNING_MODULE.split(".")
    added = [".".join(parts[:i]) for i in range(1, len(parts) + 1)
             if ".".join(parts[:i]) not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[LIGHTNING_MODULE].AttributeDict = AttributeDict  # type: ignore[attr-defined]
    try:
        yield AttributeDict
    finally:
        for name in added:
            del sys.modules[name]


def meta_image_state(meta_dir: Path) -> dict[str, torch.Tensor]:
    """Meta's image model (the detector of ``sam3.pt``) under its own names, no ``detector.``."""
    state = torch.load(meta_dir / "sam3.pt", weights_only=True)["model"]
    return {k.removeprefix("detector."): v.clone() for k, v in state.items()
            if k.startswith("detector.")}


def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Modules peft's ``target_modules=["qkv", "proj"]`` wraps: any named ``qkv`` or ``proj``."""
    return sorted(k[: -len(".weight")] for k in state
                  if k.endswith(".weight") and k[: -len(".weight")].rsplit(".", 1)[-1] in TARGETS)


def onco_seg_style(state: dict[str, torch.Tensor], *, rank: int = 4, alpha: float = 8.0,
                   seed: int = 5) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(peft-wrapped state, the same merged by hand): non-zero LoRA, two trained heads."""
    generator = torch.Generator().manual_seed(seed)
    wrapped: dict[str, torch.Tensor] = {}
    merged = dict(state)
    modules = lora_modules(state)
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module in modules:
            wrapped[f"{module}.base_layer.{leaf}"] = tensor
        else:
            wrapped[key] = tensor
    for module in modules:
        weight = state[f"{module}.weight"]
        out_features, in_features = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:])
        a = torch.randn(rank, in_features, *kernel, generator=generator) * 0.1
        b = torch.randn(out_features, rank, *((1, 1) if kernel else ()), generator=generator) * 0.1
        wrapped[f"{module}.lora_A.default.weight"] = a
        wrapped[f"{module}.lora_B.default.weight"] = b
        # by hand, not as the node computes it: each output unit gets B's row times A
        delta = torch.einsum("or,r...->o...", b.flatten(1), a)
        merged[f"{module}.weight"] = weight + alpha / rank * delta
    head = f"{PLAIN_HEAD}.weight"
    trained = state[head] + 0.5 * torch.randn(state[head].shape, generator=generator)
    wrapped[head] = merged[head] = trained
    for leaf in ("weight", "bias"):
        original = wrapped.pop(f"{COPIED_HEAD}.{leaf}")
        copy = original + 0.5 * torch.randn(original.shape, generator=generator)
        wrapped[f"{COPIED_HEAD}.original_module.{leaf}"] = original
        wrapped[f"{COPIED_HEAD}.modules_to_save.default.{leaf}"] = copy
        merged[f"{COPIED_HEAD}.{leaf}"] = copy
    return wrapped, merged


def write_lightning_checkpoint(path: Path, state: dict[str, torch.Tensor], *,
                               hyper_parameters: dict[str, Any] | None = None,
                               peft_model: bool = True, extra: dict[str, Any] | None = None,
                               holder: str = "model",
                               other_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """``path`` as Lightning writes it, the model (peft-wrapped or not) held as ``holder``.

    ``other_tensors``: state of the LightningModule's other attributes (a loss's buffers).
    """
    prefix = f"{holder}.base_model.model." if peft_model else f"{holder}."
    with lightning_attribute_dict() as attribute_dict:
        hparams = attribute_dict(_attribute_dicts(attribute_dict, hyper_parameters or {}))
        checkpoint = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.1",
                      "state_dict": {**{prefix + k: v for k, v in state.items()},
                                     **(other_tensors or {})},
                      "hyper_parameters": hparams, "optimizer_states": [],
                      "lr_schedulers": [], "loops": {}, "callbacks": {}, **(extra or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)
    return path


def _attribute_dicts(cls: type, value: Any) -> Any:
    if isinstance(value, dict):
        return cls({k: _attribute_dicts(cls, v) for k, v in value.items()})
    return value


ONCO_SEG_HPARAMS = {"learning_rate": 1e-4, "modality": "CT",
                    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                             "target_modules": ["qkv", "proj"]}}
