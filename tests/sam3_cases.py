"""Shared cases for the SAM3 engine tests: a phantom, structures, configs and fixtures.

Test modules import the fixtures they use by name (pytest finds them there).
The model is the tiny random SAM3 of ``tests/sam3_tiny.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from pydicom.dataset import Dataset
from transformers import Sam3Model, Sam3VideoModel

from oncoseg_node.config import Sam3Config
from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine
from oncoseg_node.contouring.engines.sam3.load import onco_seg_lora_config
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.volume import Volume
from tests.sam3_tiny import build_tiny_sam3

VIT_PROJECTION = r"vision_encoder\.backbone\.layers\.\d+\.attention\.(q|k|v|o)_proj"

def phantom(slices: int = 6, rows: int = 40, cols: int = 48,
            row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> Volume:
    """An elliptic soft-tissue body in air; with a bright organ right of the image centre."""
    hu = np.full((slices, rows, cols), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:rows, :cols]
    hu[:, ((yy - rows / 2) / (rows * 0.4)) ** 2 + ((xx - cols / 2) / (cols * 0.42)) ** 2 < 1] = 40
    hu[1:5, 15:25, 30:38] = 300
    x0 = -cols / 2 * row_direction[0]
    return Volume(
        hu=hu, positions=np.array([[x0, -rows / 2, 2.5 * k] for k in range(slices)]),
        row_direction=np.array(row_direction), col_direction=np.array([0.0, 1.0, 0.0]),
        pixel_spacing=(1.0, 1.0), sop_instance_uids=tuple(str(k) for k in range(slices)),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5",
        patient_position="HFS", header=Dataset())


STRUCTURES = (
    Structure("Liver", (1, 2, 3), engine="sam3", concepts=("liver", "hepar"),
              negative_concepts=("spleen",)),
    Structure("Parotid_L", (1, 2, 3), engine="sam3", concepts=("left parotid gland",),
              laterality="left"),
    Structure("Bones", (1, 2, 3), engine="sam3", concepts=("bone",), model_window=(-200, 1500)),
    Structure("External", (1, 2, 3)),
)


def cpu_config(model_dir: Path, **overrides) -> Sam3Config:
    return Sam3Config(model_dir=model_dir, device="cpu", dtype="float32", batch_size=4,
                      score_threshold=0.0, **overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads; on a shared CPU they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_sam3(tmp_path_factory.mktemp("sam3") / "facebook-sam3-tiny")


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Sam3Engine:
    return Sam3Engine.from_config(cpu_config(tiny_dir))


def make_adapter(tiny_dir: Path, out: Path, *, on_image_model: bool = False) -> Path:
    """A peft adapter with Onco-Seg's LoRA config and non-zero weights (B starts at 0)."""
    cls = Sam3Model if on_image_model else Sam3VideoModel
    base = cls.from_pretrained(tiny_dir, local_files_only=True)
    wrapped = get_peft_model(base, onco_seg_lora_config())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir: Path, tmp_path_factory) -> Path:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("lora") / "oncoseg-lora")

