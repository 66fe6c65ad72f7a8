"""Loading SAM3 (and an optional LoRA adapter) from local files only, or failing loudly.

The node never downloads: the hub is switched off for this process and every
``from_pretrained`` call is ``local_files_only``. Each way loading can go
wrong (missing directory or file, a checkpoint of the wrong kind, a CUDA
device that is not there, an adapter that does not fit) is an
:class:`~oncoseg_node.errors.EngineError` naming the path or key, raised at
startup; nothing falls back silently to the CPU or to base weights.
"""

from __future__ import annotations

import os

# huggingface_hub and transformers read these once, at import: set them first.
# local_files_only below is the guarantee; these catch any path that forgets it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, cast  # noqa: E402

import structlog  # noqa: E402
import torch  # noqa: E402

from oncoseg_node.errors import EngineError  # noqa: E402

log = structlog.get_logger("oncoseg_node.contouring.engines.sam3")

# Onco-Seg's LoRA: r=16, alpha=32, dropout 0.1 on the ViT attention projections
# only. The pattern matches exactly the 4 x 32 projections of the vision backbone,
# whether the adapter was made on the image model or on the video model
# (``detector_model.`` prefix). A bare list of names would also catch the
# text encoder, the DETR heads and the tracker.
LORA_TARGET_MODULES = (
    r"^(detector_model\.)?vision_encoder\.backbone\.layers\.\d+\.attention\."
    r"(q_proj|k_proj|v_proj|o_proj)$"
)
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.1
# an adapter trained on Meta's layout: its module names, not transformers'
META_ADAPTER = re.compile(r"^base_model\.model\.(detector\.|sam3_model\.|backbone\.)|\.attn\.qkv\.")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def onco_seg_lora_config():  # -> peft.LoraConfig (peft is imported lazily)
    """The LoRA configuration Onco-Seg fine-tunes with; adapters we build use it."""
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                      target_modules=LORA_TARGET_MODULES)


@dataclass(frozen=True)
class AdapterInfo:
    """What was merged, for the engine description."""

    path: Path
    sha256: str
    rank: int
    modules: int


def check_device(device: str) -> torch.device:
    """The configured device, or EngineError when it asks for a GPU that is not there."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(
                f"engine.sam3.device: {device!r} is configured but no CUDA GPU is usable "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                "set device: cpu explicitly to run without one")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise EngineError(f"engine.sam3.device: {device!r} but only "
                              f"{torch.cuda.device_count()} CUDA device(s) are present")
    elif dev.type != "cpu":
        raise EngineError(f"engine.sam3.device: {device!r} is not cpu, cuda or cuda:N")
    return dev


def cast_model(model, device: torch.device, dtype: torch.dtype):
    """``model`` on ``device`` in ``dtype``, its rotary position tables kept in float32.

    A plain ``.to(dtype)`` also casts the rotary tables (the ViT layers'
    ``position_ids``, ``inv_freq`` and ``original_inv_freq``, and the
    tracker's memory-attention ``inv_freq``), which transformers keeps in
    float32 on purpose: the global ViT layers scale positions by fractions
    bfloat16 cannot hold. They are recomputed here exactly as the model
    builds them, so the result matches ``from_pretrained(dtype=...)``.
    """
    from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer, Sam3ViTRotaryEmbedding
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
        Sam3TrackerVideoVisionRotaryEmbedding,
    )

    model = model.to(device=device, dtype=dtype)
    for module in model.modules():
        if isinstance(module, (Sam3ViTRotaryEmbedding, Sam3TrackerVideoVisionRotaryEmbedding)):
            _refresh_inv_freq(module, device)
        elif isinstance(module, Sam3ViTLayer):
            _refresh_positions(module, device)
    return model


def _refresh_inv_freq(rotary: Any, device: torch.device) -> None:
    inv_freq, _ = rotary.compute_axial_rope_parameters(rotary.config)
    rotary.inv_freq = inv_freq.to(device)
    rotary.original_inv_freq = inv_freq.clone().to(device)


def _refresh_positions(layer: Any, device: torch.device) -> None:
    layer.position_ids = layer.precompute_positions(layer.config, layer.window_size).to(device)


def sha256_files(paths: list[Path]) -> str:
    """One SHA-256 over the given files in order: the identity of a set of weights."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    """A SAM3 directory's weights: safetensors, else Meta's ``.pt``; EngineError if none."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.pt"))
    if not files:
        raise EngineError(f"{model_dir}: no weights in the SAM3 model directory (*.safetensors "
                          "in the transformers layout, or Meta's sam3.pt)")
    return files


def is_meta_checkpoint(files: list[Path]) -> bool:
    """Whether the weights use Meta's original layout (converted at load) or transformers'."""
    from oncoseg_node.contouring.engines.sam3.convert import checkpoint_keys, is_meta_layout

    try:
        keys = checkpoint_keys(files[0])
    except Exception as exc:  # a truncated or foreign file: safetensors, pickle, OS errors
        raise EngineError(f"{files[0]}: unreadable ({exc})") from exc
    if files[0].suffix != ".safetensors" and not is_meta_layout(keys):
        raise EngineError(f"{files[0]}: neither Meta's layout (detector., tracker.) nor "
                          "safetensors in the transformers layout")
    return is_meta_layout(keys)


def check_base_dir(model_dir: Path | None, *, setting: str = "engine.sam3.model_dir",
                   weights: bool = True) -> list[Path]:
    """The weight files of a SAM3 base folder after checking its config and tokenizer files.

    With ``weights=False`` a folder without weights passes (an empty list):
    a checkpoint layered over it must then supply every tensor.
    """
    if model_dir is None:
        raise EngineError(f"{setting}: not set; a local SAM3 directory is required")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EngineError(f"{model_dir}: SAM3 model directory does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EngineError(f"{config_path}: missing (not an HF-format SAM3 directory)")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise EngineError(f"{config_path}: unreadable ({exc})") from exc
    if model_type != "sam3_video":
        raise EngineError(f"{config_path}: model_type {model_type!r}; the engine needs the "
                          "sam3_video checkpoint (detector and tracker), as facebook/sam3 ships")
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.pt"))
    files = weight_files(model_dir) if weights or has_weights else []
    # without its files AutoTokenizer quietly builds a near-empty CLIP tokenizer
    if not any(all((model_dir / name).is_file() for name in group) for group in TOKENIZER_FILES):
        raise EngineError(f"{model_dir}: no tokenizer files "
                          "(tokenizer.json, or vocab.json and merges.txt)")
    return files


def load_base(model_dir: Path | None, *,
              setting: str = "engine.sam3.model_dir"):  # -> (Sam3VideoModel, tokenizer)
    """Load the SAM3 detector + tracker checkpoint and its tokenizer from ``model_dir``."""
    files = check_base_dir(model_dir, setting=setting)
    assert model_dir is not None  # check_base_dir raised otherwise
    model_dir = Path(model_dir)

    from transformers import Sam3VideoModel

    from oncoseg_node.contouring.engines.sam3.convert import load_meta_checkpoint

    meta = is_meta_checkpoint(files)
    try:
        if meta:
            model, info = load_meta_checkpoint(model_dir, files)
        else:
            # with output_loading_info the call returns (model, info); its hints say model only
            model, info = cast(tuple[Sam3VideoModel, dict[str, Any]],
                               Sam3VideoModel.from_pretrained(
                                   model_dir, local_files_only=True, dtype=torch.float32,
                                   output_loading_info=True))
    except Exception as exc:  # transformers raises OSError, ValueError, RuntimeError, ...
        raise EngineError(f"{model_dir}: SAM3 weights could not be loaded ({exc})") from exc
    problems = sorted(info.get("missing_keys", ())) + sorted(
        str(k) for k in info.get("mismatched_keys", ()))
    if problems:
        layout = "Meta's layout, converted" if meta else "transformers layout"
        raise EngineError(f"{model_dir}: checkpoint ({layout}) does not fill the SAM3 model "
                          f"({len(problems)} missing or mismatched, e.g. {problems[:3]})")
    if info.get("unexpected_keys"):
        log.warning("sam3_unexpected_weights", model_dir=str(model_dir),
                    count=len(info["unexpected_keys"]))
    return model.eval(), load_tokenizer(model_dir, model)


def load_tokenizer(model_dir: Path, model):  # -> tokenizer
    """The tokenizer of ``model_dir``, checked against ``model``'s text encoder and image size."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # missing vocab files surface as OSError or ValueError
        raise EngineError(f"{model_dir}: tokenizer could not be loaded ({exc})") from exc
    from oncoseg_node.contouring.engines.sam3.preprocess import check_preprocessor_config

    mismatches = check_preprocessor_config(model_dir, int(model.config.image_size))
    if mismatches:
        raise EngineError("; ".join(mismatches))
    vocab_size = model.config.detector_config.text_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise EngineError(f"{model_dir}: tokenizer has {len(tokenizer)} tokens, the text "
                          f"encoder only {vocab_size}: they do not belong together")
    return tokenizer


def _adapter_weights(adapter_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    if not adapter_dir.is_dir():
        raise EngineError(f"{adapter_dir}: LoRA adapter directory does not exist")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise EngineError(f"{adapter_dir / 'adapter_config.json'}: missing")
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise EngineError(f"{path}: missing (adapters are read as safetensors only)")
    from safetensors.torch import load_file

    try:
        return path, load_file(path)
    except Exception as exc:  # a truncated or foreign file
        raise EngineError(f"{path}: unreadable ({exc})") from exc


def merge_adapter(model, adapter_dir: Path) -> AdapterInfo:
    """Apply the LoRA adapter in ``adapter_dir`` to ``model`` and merge it into the weights.

    An adapter made on the image model (keys without ``detector_model.``) is
    applied to the detector inside the video model. Every LoRA tensor in the
    file must land on a module and every wrapped module must get its
    tensors; otherwise the adapter does not fit and loading stops.
    """
    from peft import LoraConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    weights_path, tensors = _adapter_weights(adapter_dir)
    lora_keys = {k for k in tensors if ".lora_" in k}
    if not lora_keys:
        raise EngineError(f"{weights_path}: holds no LoRA tensors")
    if any(META_ADAPTER.search(k) for k in lora_keys):
        return _merge_meta_adapter(model, adapter_dir, weights_path, tensors)
    on_video = any(k.startswith("base_model.model.detector_model.") for k in lora_keys)
    target = model if on_video else model.detector_model
    try:
        wrapped = PeftModel.from_pretrained(target, adapter_dir, is_trainable=False,
                                            local_files_only=True)
    except Exception as exc:  # peft: ValueError (no target module), RuntimeError (shape)
        raise EngineError(f"{adapter_dir}: LoRA adapter does not fit the SAM3 model ({exc})"
                          ) from exc
    loaded = {name.replace(".default.", ".") for name, _ in wrapped.named_parameters()
              if ".lora_" in name}
    if loaded != lora_keys:
        extra, unfilled = sorted(lora_keys - loaded), sorted(loaded - lora_keys)
        raise EngineError(
            f"{adapter_dir}: LoRA adapter does not fit the SAM3 model "
            f"({len(extra)} adapter tensors match no module, e.g. {extra[:2]}; "
            f"{len(unfilled)} wrapped modules get no tensors, e.g. {unfilled[:2]})")
    adapter_config = wrapped.peft_config["default"]
    if not isinstance(adapter_config, LoraConfig):
        raise EngineError(f"{adapter_dir}: a {type(adapter_config).__name__} adapter, not LoRA")
    rank = int(adapter_config.r)
    modules = len({k.rsplit(".lora_", 1)[0] for k in lora_keys})
    merged = wrapped.merge_and_unload()
    if not on_video:
        model.detector_model = merged
    return AdapterInfo(adapter_dir, sha256_files([weights_path]), rank, modules)


def _merge_meta_adapter(model, adapter_dir: Path, weights_path: Path,
                        tensors: dict[str, torch.Tensor]) -> AdapterInfo:
    """Merge a LoRA adapter trained on Meta's layout (``attn.qkv``, ``attn.proj``).

    Its modules are renamed with the checkpoint conversion; a fused-qkv
    adapter becomes q, k and v adapters sharing its A. The adapter's own
    settings (rank, alpha, rsLoRA) come from its ``adapter_config.json``.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from oncoseg_node.contouring.engines.sam3.convert import split_fused_lora

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        if rest in ("A.weight", "B.weight"):
            if module.startswith("backbone."):  # made on Meta's image model: its detector
                module = "detector." + module
            pairs.setdefault(module, {})[rest[0]] = tensor
    unpaired = sorted(m for m, ab in pairs.items() if set(ab) != {"A", "B"})
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # unreadable or not a LoRA config
        raise EngineError(f"{adapter_dir / 'adapter_config.json'}: not a LoRA config ({exc})"
                          ) from exc
    if unpaired or getattr(config, "use_dora", False):
        why = (f"modules without both A and B, e.g. {unpaired[:2]}" if unpaired
               else "DoRA magnitudes cannot be split like a fused qkv")
        raise EngineError(f"{weights_path}: Meta-layout LoRA adapter not usable ({why})")
    modules = split_fused_lora({m: (ab["A"], ab["B"]) for m, ab in pairs.items()})
    config.target_modules = sorted(modules)
    config.base_model_name_or_path = None
    state = {f"base_model.model.{m}.lora_{k}.weight": t
             for m, (a, b) in modules.items() for k, t in (("A", a), ("B", b))}
    try:
        wrapped = get_peft_model(model, config)
        result = set_peft_model_state_dict(wrapped, state)
    except Exception as exc:  # peft: ValueError (no such module), RuntimeError (shape)
        raise EngineError(f"{adapter_dir}: Meta-layout LoRA adapter does not fit the SAM3 "
                          f"model ({exc})") from exc
    unexpected = sorted(getattr(result, "unexpected_keys", ()))
    if unexpected:
        raise EngineError(f"{adapter_dir}: Meta-layout LoRA adapter does not fit the SAM3 "
                          f"model (e.g. {unexpected[:2]})")
    wrapped.merge_and_unload()
    return AdapterInfo(adapter_dir, sha256_files([weights_path]), int(config.r), len(modules))
