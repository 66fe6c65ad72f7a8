"""The adapter folder: what the engine loads, and where it came from.

``adapter_config.json`` and ``adapter_model.safetensors`` are peft's own
format, which ``engine.sam3.adapter_dir`` merges at start.
``provenance.json`` beside them records the base model's identity, the
training material (case list hash, the split by patient), the structures,
the steps and settings, the validation figures and the node's version, so an
adapter found on disk can always be traced to what made it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from oncoseg_node import __version__
from oncoseg_node.durable import write_durably

PROVENANCE = "provenance.json"


def write_adapter(peft_model: Any, folder: Path, provenance: dict[str, Any]) -> Path:
    """Save the LoRA weights in peft's format and the provenance beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card template says nothing
    record = {"software": f"oncoseg-node {__version__}", **provenance}
    write_durably(folder / PROVENANCE, json.dumps(record, indent=2, sort_keys=True).encode())
    return folder
