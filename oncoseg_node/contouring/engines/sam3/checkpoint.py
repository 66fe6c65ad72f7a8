"""A checkpoint file layered over a SAM3 base folder, every tensor accounted for.

A fine-tuned SAM3 is often published as one file holding only what its
training touched, in the layout of the code that trained it: Onco-Seg's is a
PyTorch Lightning ``.ckpt`` of Meta's image model (``state_dict``, every key
prefixed ``model.``, no ``detector.`` prefix), its LoRA possibly still
wrapped by peft (``attn.qkv.base_layer.weight``, ``attn.qkv.lora_A.default.weight``)
and trained heads either plain or as peft ``modules_to_save`` copies. The
base folder (today's ``model_dir`` layout) supplies what the file lacks: the
configuration, tokenizer, preprocessor and, where it has weights, every
tensor the checkpoint does not replace (the tracker, for an image model).

Layering reads the file with the restricted reader (nothing in it is run),
merges any LoRA as peft merges it (``W + alpha / r * B A``; a convolution's
update as peft's ``Conv2d`` computes it), renames Meta's layout with the
conversion of :mod:`convert`, and accounts for every tensor per module group:
taken from the checkpoint, left to the base, unused, or missing. A model
with a missing tensor (a part that would run randomly initialised) or a
tensor of the wrong shape is refused, naming the part.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from oncoseg_node.errors import EngineError

# transformers-name prefix -> the part a physicist would name, in match order
GROUPS = (
    ("detector_model.vision_encoder.backbone.", "vision backbone (ViT)"),
    ("detector_model.vision_encoder.neck.", "vision neck (FPN)"),
    ("tracker_neck.", "tracker neck (FPN)"),
    ("detector_model.text_encoder.", "text encoder"),
    ("detector_model.text_projection.", "text encoder"),
    ("detector_model.geometry_encoder.", "geometry encoder"),
    ("detector_model.detr_encoder.", "DETR encoder"),
    ("detector_model.detr_decoder.", "DETR decoder"),
    ("detector_model.dot_product_scoring.", "scoring head"),
    ("detector_model.mask_decoder.", "mask decoder"),
    ("tracker_model.", "tracker"),
)
# first names of transformers' image model (``Sam3Model``): detector_model without its prefix
HF_IMAGE_ROOTS = ("vision_encoder.", "text_encoder.", "text_projection.", "geometry_encoder.",
                  "detr_encoder.", "detr_decoder.", "dot_product_scoring.", "mask_decoder.")
WRAPPERS = ("model.", "module.", "_orig_mod.", "base_model.model.")
# what comes before the ViT's name is whatever held the model (peft's prefix kept for later)
ANCHOR = re.compile(r"^(?P<outer>.*?)(base_model\.model\.)?(detector\.|detector_model\.)?"
                    r"(backbone\.vision_backbone\.trunk\.|vision_encoder\.backbone\.)")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
SAVED_COPY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<rest>.+)$")
ORIGINAL = re.compile(r"^(?P<module>.+)\.original_module\.(?P<rest>.+)$")
ALPHA_SETTING = "engine.sam3.lora_alpha"


def group_of(key: str) -> str:
    """The module group of a transformers-layout key ("other" for names the model lacks)."""
    for prefix, name in GROUPS:
        if key.startswith(prefix):
            return name
    return "other"


@dataclass
class FileInfo:
    path: str
    sha256: str
    bytes: int
    role: str  # "checkpoint" or "base"


@dataclass
class LoraInfo:
    """The LoRA found in the checkpoint: still wrapped by peft (merged here) or not at all."""

    wrapped: bool
    rank: int | None = None
    alpha: float | None = None
    alpha_source: str | None = None
    rslora: bool = False
    targets: list[str] = field(default_factory=list)
    modules: int = 0
    trained_copies: int = 0  # peft modules_to_save tensors taken over the originals

    @property
    def merged(self) -> str:
        if self.wrapped and self.alpha is None:
            return "peft-wrapped in the file, not merged (no alpha)"
        if self.wrapped:
            return "merged at load (was peft-wrapped in the file)"
        return "no LoRA tensors in the file (merged before saving, or none)"


@dataclass
class GroupCount:
    from_checkpoint: int = 0
    from_base: int = 0
    unused: int = 0
    missing: int = 0
    mismatched: int = 0


@dataclass
class WeightsReport:
    """What a checkpoint holds and how it lands on the model; ``problems`` refuse it."""

    layout: str
    container: str
    files: list[FileInfo]
    dtypes: list[str]
    tensors_in_file: int
    lora: LoraInfo
    groups: dict[str, GroupCount] = field(default_factory=dict)
    base_dir: str | None = None
    base_has_weights: bool = False
    unused_examples: list[str] = field(default_factory=list)
    missing_examples: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def would_start(self) -> bool:
        return not self.problems

    @property
    def from_base(self) -> list[str]:
        """Parts (groups) some of whose tensors come from the base folder."""
        return sorted(g for g, c in self.groups.items() if c.from_base)

    @property
    def identity(self) -> str:
        """One SHA-256 over the base weights and the checkpoint, in that order."""
        import hashlib

        digest = hashlib.sha256()
        for info in sorted(self.files, key=lambda f: f.role != "base"):
            digest.update(bytes.fromhex(info.sha256))
        return digest.hexdigest()

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"]["merged"] = self.lora.merged
        out["from_base"] = self.from_base
        out["would_start"] = self.would_start
        return out

    def refusal(self) -> str:
        checkpoint = next((f.path for f in self.files if f.role == "checkpoint"), "?")
        return f"{checkpoint}: not loaded: " + "; ".join(self.problems)


# -- reading ------------------------------------------------------------------------------


def read_checkpoint_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, hyper-parameters, container) of a checkpoint file; nothing in it is run."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: checkpoint file does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path), {}, "safetensors"
        except Exception as exc:  # a truncated or foreign file
            raise EngineError(f"{path}: unreadable ({exc})") from exc
    from oncoseg_node.contouring.engines.sam3.safe_read import read_pickled

    loaded = read_pickled(path)
    hparams: dict[str, Any] = {}
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        container = "PyTorch Lightning checkpoint (state_dict)"
        raw = loaded.get("hyper_parameters")
        hparams = raw if isinstance(raw, dict) else {}
        state = loaded["state_dict"]
    elif isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        container, state = "state dict under 'model' (Meta's sam3.pt)", loaded["model"]
    elif isinstance(loaded, dict):
        container, state = "bare state dict", loaded
    else:
        raise EngineError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EngineError(f"{path}: {container} without a single tensor")
    return tensors, hparams, container


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefixes of whatever held the model (Lightning, DDP, compile, peft)."""
    changed = True
    while changed:  # neither Meta's nor transformers' names start with any of these
        changed = False
        for prefix in WRAPPERS:
            if state and 2 * sum(k.startswith(prefix) for k in state) >= len(state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    # a LightningModule may hold the model under any attribute name ("sam3.", "net.")
    anchor = next((m for k in state if (m := ANCHOR.match(k))), None)
    if anchor is not None and anchor["outer"]:
        outer = anchor["outer"]
        if 2 * sum(k.startswith(outer) for k in state) >= len(state):
            return _strip_wrappers({k.removeprefix(outer): v for k, v in state.items()})
    return state


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            yield where, str(key), item
            yield from _walk(item, where)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")


def alpha_in(hparams: Mapping[str, Any]) -> tuple[float, str] | None:
    """LoRA alpha from hyper-parameters (``lora_alpha`` anywhere, else ``alpha``), and where."""
    for wanted in ("lora_alpha", "alpha"):
        for where, key, value in _walk(hparams):
            if key == wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), f"hyper_parameters.{where}"
    return None


def _rslora_in(hparams: Mapping[str, Any]) -> bool:
    return any(key == "use_rslora" and value is True for _, key, value in _walk(hparams))


# -- LoRA ---------------------------------------------------------------------------------


def lora_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               scale: float) -> torch.Tensor:
    """``scale * B A`` shaped like ``weight``, as peft's Linear and Conv2d layers merge it."""
    a32, b32 = a.float(), b.float()
    if weight.ndim == 2:
        return scale * (b32 @ a32)
    if weight.ndim == 4:  # peft's Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)
        return scale * torch.nn.functional.conv2d(a32.transpose(0, 1), b32).transpose(0, 1)
    raise ValueError(f"LoRA on a {weight.ndim}-D weight")


def merge_lora(state: dict[str, torch.Tensor], hparams: Mapping[str, Any],
               configured_alpha: float | None, problems: list[str]
               ) -> tuple[dict[str, torch.Tensor], LoraInfo]:
    """``state`` with peft's wrapping undone: LoRA merged, trained copies taken, originals out."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapters: set[str] = set()
    rest: dict[str, torch.Tensor] = {}
    copies: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if (m := LORA_KEY.match(key)) is not None:
            pairs.setdefault(m["module"], {})[m["ab"]] = tensor
            adapters.add(m["adapter"] or "default")
        elif (m := SAVED_COPY.match(key)) is not None:
            copies[f"{m['module']}.{m['rest']}"] = tensor
            adapters.add(m["adapter"])
        elif ORIGINAL.match(key) is None:
            rest[key.replace(".base_layer.", ".")] = tensor
    info = LoraInfo(wrapped=bool(pairs), trained_copies=len(copies))
    if any(".lora_magnitude_vector" in k or ".lora_embedding_" in k for k in state):
        problems.append("the file holds DoRA magnitudes or LoRA embeddings, which are not merged")
    if len(adapters) > 1:
        problems.append(f"the file holds {len(adapters)} peft adapters ({sorted(adapters)}); "
                        "one is expected")
    rest.update(copies)
    if not pairs:
        return rest, info
    unpaired = sorted(m for m, ab in pairs.items() if set(ab) != {"A", "B"})
    if unpaired:
        problems.append(f"LoRA modules without both A and B, e.g. {unpaired[:2]}")
        return rest, info
    ranks = {int(ab["A"].shape[0]) for ab in pairs.values()}
    info.rank = min(ranks)
    info.targets = sorted({m.rsplit(".", 1)[-1] for m in pairs})
    info.modules = len(pairs)
    if len(ranks) > 1:
        problems.append(f"LoRA ranks differ between modules ({sorted(ranks)}); "
                        "one alpha cannot scale them all")
        return rest, info
    found = alpha_in(hparams)
    if found is not None:
        info.alpha, info.alpha_source = found
        if configured_alpha is not None and float(configured_alpha) != info.alpha:
            problems.append(f"{ALPHA_SETTING}: {configured_alpha} but the checkpoint's "
                            f"{info.alpha_source} is {info.alpha:g}")
    elif configured_alpha is not None:
        info.alpha, info.alpha_source = float(configured_alpha), ALPHA_SETTING
    else:
        problems.append(f"{ALPHA_SETTING}: not set, and the checkpoint's hyper-parameters hold "
                        f"no LoRA alpha; the LoRA (r={info.rank}, still peft-wrapped) cannot be "
                        "merged without it (Onco-Seg's is 32; weights check: --lora-alpha)")
        return rest, info
    info.rslora = _rslora_in(hparams)
    scale = info.alpha / (math.sqrt(info.rank) if info.rslora else info.rank)
    for module, ab in sorted(pairs.items()):
        key = f"{module}.weight"
        weight = rest.get(key)
        if weight is None:
            problems.append(f"LoRA on {module} but the file holds no base weight for it "
                            f"({module}.base_layer.weight)")
            continue
        a, b = ab["A"], ab["B"]
        if b.shape[1] != a.shape[0]:
            problems.append(f"LoRA on {module}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                            "do not pair")
            continue
        try:
            delta = lora_delta(weight, a, b, scale)
            rest[key] = (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)
        except (RuntimeError, ValueError) as exc:
            problems.append(f"LoRA on {module} does not fit its weight {tuple(weight.shape)} "
                            f"({exc})")
    return rest, info


# -- layout -------------------------------------------------------------------------------


def to_model_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The state in the node's (transformers video model) names, and the layout it came in."""
    from oncoseg_node.contouring.engines.sam3.convert import is_meta_layout, meta_to_transformers

    keys = list(state)
    if is_meta_layout(keys):
        parts = sorted({k.split(".", 1)[0] for k in keys
                        if k.startswith(("detector.", "tracker."))})
        return meta_to_transformers(state), f"Meta's sam3 layout ({', '.join(parts)})"
    if any(k.startswith(("detector_model.", "tracker_model.")) for k in keys):
        # transformers' save_pretrained writes the tracker under its prefix twice
        return ({re.sub(r"^tracker_model\.tracker_model\.", "tracker_model.", k): v
                 for k, v in state.items()}, "transformers Sam3VideoModel")
    if any(k.startswith("backbone.vision_backbone.") for k in keys):
        converted = meta_to_transformers({"detector." + k: v for k, v in state.items()})
        return converted, "Meta's sam3 image model (no detector. prefix)"
    if all(k.startswith(HF_IMAGE_ROOTS) for k in keys):
        return ({"detector_model." + k: v for k, v in state.items()},
                "transformers Sam3Model (image model)")
    examples = sorted(keys)[:3]
    raise EngineError(f"neither Meta's SAM3 names nor transformers' (e.g. {examples})")


# -- layering -----------------------------------------------------------------------------


def _file_info(path: Path, role: str) -> FileInfo:
    from oncoseg_node.contouring.engines.sam3.load import sha256_files

    return FileInfo(str(path), sha256_files([path]), path.stat().st_size, role)


def inspect_checkpoint(checkpoint: Path, lora_alpha: float | None = None
                       ) -> tuple[dict[str, torch.Tensor], WeightsReport]:
    """The checkpoint's tensors in the node's names and what was found, before any base."""
    checkpoint = Path(checkpoint)
    raw, hparams, container = read_checkpoint_file(checkpoint)
    problems: list[str] = []
    merged, lora = merge_lora(_strip_wrappers(raw), hparams, lora_alpha, problems)
    try:
        named, layout = to_model_names(merged)
    except EngineError as exc:
        raise EngineError(f"{checkpoint}: {exc}") from exc
    report = WeightsReport(
        layout=layout, container=container, files=[_file_info(checkpoint, "checkpoint")],
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()}),
        tensors_in_file=len(raw), lora=lora, problems=problems)
    return named, report


def layer_checkpoint(base_dir: Path | None, checkpoint: Path, lora_alpha: float | None = None,
                     *, setting: str = "engine.sam3.base_dir"
                     ):  # -> (Sam3VideoModel | None, tokenizer | None, WeightsReport)
    """The base folder's model with the checkpoint over it, and the accounting.

    The model is ``None`` when the report has problems (it would not start).
    EngineError when the checkpoint or base folder cannot be read at all.
    """
    from oncoseg_node.contouring.engines.sam3.load import check_base_dir, load_base, load_tokenizer

    named, report = inspect_checkpoint(checkpoint, lora_alpha)
    base_files = check_base_dir(base_dir, setting=setting, weights=False)
    assert base_dir is not None  # check_base_dir raised otherwise
    base_dir = Path(base_dir)
    report.base_dir = str(base_dir)
    report.base_has_weights = bool(base_files)
    report.files = [_file_info(p, "base") for p in base_files] + report.files
    if base_files:
        model, tokenizer = load_base(base_dir, setting=setting)
    else:
        from transformers import Sam3VideoConfig, Sam3VideoModel
        from transformers.initialization import no_init_weights

        try:
            config = Sam3VideoConfig.from_pretrained(base_dir, local_files_only=True)
        except Exception as exc:  # unreadable config
            raise EngineError(f"{base_dir / 'config.json'}: unreadable ({exc})") from exc
        with no_init_weights():  # anything the checkpoint leaves unset is refused below
            model = Sam3VideoModel(config).float()
        tokenizer = load_tokenizer(base_dir, model)
    expected = model.state_dict()
    counts: dict[str, GroupCount] = {name: GroupCount() for _, name in GROUPS}
    take: dict[str, torch.Tensor] = {}
    for key, tensor in named.items():
        count = counts.setdefault(group_of(key), GroupCount())
        if key not in expected:
            count.unused += 1
            report.unused_examples.append(key)
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            count.mismatched += 1
            report.problems.append(f"{group_of(key)}: {key} is {tuple(tensor.shape)} in the "
                                   f"checkpoint, {tuple(expected[key].shape)} in the model")
        else:
            count.from_checkpoint += 1
            take[key] = tensor
    for key in expected:
        if key not in take:
            count = counts.setdefault(group_of(key), GroupCount())
            if base_files:
                count.from_base += 1
            else:
                count.missing += 1
                report.missing_examples.append(key)
    report.groups = {name: c for name, c in counts.items() if any(asdict(c).values())}
    missing = [name for name, c in report.groups.items() if c.missing]
    if missing:
        report.problems.append(
            f"would run with randomly initialised parts: {', '.join(missing)} (neither the "
            f"checkpoint nor the base folder {base_dir} supplies them, e.g. "
            f"{report.missing_examples[:2]})")
    report.unused_examples = sorted(report.unused_examples)[:10]
    report.missing_examples = sorted(report.missing_examples)[:10]
    if report.problems:
        return None, None, report
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in take.items()},
                              strict=False)
    return model.float().eval(), tokenizer, report


def load_layered(base_dir: Path | None, checkpoint: Path, lora_alpha: float | None = None,
                 *, setting: str = "engine.sam3.base_dir"):  # -> (model, tokenizer, report)
    """``layer_checkpoint`` for the engine: EngineError naming its problems, if any."""
    model, tokenizer, report = layer_checkpoint(base_dir, checkpoint, lora_alpha,
                                                setting=setting)
    if model is None:
        raise EngineError(report.refusal())
    unused = {name: c.unused for name, c in report.groups.items() if c.unused}
    if unused:  # e.g. tensors of Meta's model that the node's model has no place for
        import structlog

        structlog.get_logger("oncoseg_node.contouring.engines.sam3").warning(
            "sam3_checkpoint_unused_tensors", checkpoint=str(checkpoint), by_part=unused,
            examples=report.unused_examples[:3])
    return model, tokenizer, report
