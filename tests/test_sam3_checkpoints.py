"""Checkpoints and adapters as published: Meta's original layout beside transformers'.

A tiny random SAM3 is written in both layouts (``tests/sam3_meta.py`` writes
Meta's); both must load to the same model and give identical masks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.load import onco_seg_lora_config, sha256_files  # noqa: E402
from oncoseg_node.errors import EngineError  # noqa: E402
from tests.sam3_cases import (  # noqa: E402, F401  - fixtures are found by name
    STRUCTURES,
    adapter_dir,
    cpu_config,
    engine,
    one_thread,
    phantom,
    tiny_dir,
)

# -- checkpoints as they are published -------------------------------------------------------


@pytest.fixture(scope="module")
def meta_dir(tiny_dir: Path, tmp_path_factory) -> Path:
    from tests.sam3_meta import write_meta_checkpoint

    return write_meta_checkpoint(tiny_dir, tmp_path_factory.mktemp("meta") / "sam3-meta")


def test_meta_layout_checkpoint_is_meta_s_naming(meta_dir: Path):
    """The written file uses the module names of Meta's code, not transformers'."""
    state = torch.load(meta_dir / "sam3.pt", weights_only=True)["model"]
    for key in ("detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight",
                "detector.backbone.vision_backbone.trunk.blocks.1.attn.proj.bias",
                "detector.backbone.language_backbone.encoder.transformer.resblocks.0.attn."
                "in_proj_weight",
                "detector.transformer.decoder.layers.0.ca_text.in_proj_weight",
                "detector.backbone.vision_backbone.sam2_convs.0.dconv_2x2_0.weight",
                "tracker.maskmem_backbone.mask_downsampler.encoder.12.weight",
                "tracker.sam_mask_decoder.transformer.layers.0.mlp.lin1.weight",
                "tracker.sam_prompt_encoder.point_embeddings.3.weight",
                "tracker.transformer.encoder.layers.0.cross_attn_image.q_proj.weight"):
        assert key in state, key
    assert state["detector.backbone.vision_backbone.trunk.pos_embed"].shape == (1, 17, 32)
    assert not any(".q_proj." in k for k in state if k.startswith("detector."))
    assert not list(meta_dir.glob("*.safetensors"))


def test_meta_and_transformers_layouts_load_the_same_model(meta_dir: Path, engine: Sam3Engine):
    meta = Sam3Engine.from_config(cpu_config(meta_dir))
    assert meta.description.startswith(
        f"SAM3 sam3-meta sha256:{sha256_files([meta_dir / 'sam3.pt'])[:12]}")
    want = engine.model.state_dict()
    got = meta.model.state_dict()
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert different == []
    volume = phantom()
    for a, b in zip(meta.segment(volume, STRUCTURES), engine.segment(volume, STRUCTURES),
                    strict=True):
        assert (a.score, a.note) == (b.score, b.note)
        assert (a.mask is None) == (b.mask is None)
        assert a.mask is None or np.array_equal(a.mask, b.mask)
    assert any(r.mask is not None for r in meta.segment(volume, STRUCTURES))


@pytest.mark.parametrize("damage", ["foreign", "missing"])
def test_meta_checkpoint_that_does_not_fit_names_the_path(meta_dir: Path, tmp_path: Path,
                                                          damage: str):
    broken = tmp_path / "sam3"
    shutil.copytree(meta_dir, broken)
    state = torch.load(broken / "sam3.pt", weights_only=True)["model"]
    if damage == "foreign":
        state = {k.replace("detector.", "model.", 1).replace("tracker.", "model.", 1): v
                 for k, v in state.items()}
        match = f"{broken / 'sam3.pt'}: neither Meta's layout"
    else:
        state = {k: v for k, v in state.items() if ".maskmem_backbone." not in k}
        match = f"{broken}: checkpoint \\(Meta's layout, converted\\) does not fill"
    torch.save(state, broken / "sam3.pt")
    with pytest.raises(EngineError, match=match):
        Sam3Engine.from_config(cpu_config(broken))


def write_fused_lora(out: Path, *, image_model: bool = False) -> tuple[Path, dict]:
    """A LoRA adapter on Meta's ViT names (fused ``attn.qkv``, ``attn.proj``), r16 alpha 32."""
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(11)
    prefix = "" if image_model else "detector."
    tensors, factors = {}, {}
    for layer in range(2):
        for module, rows in (("qkv", 96), ("proj", 32)):
            a = torch.randn(16, 32, generator=generator) * 0.1
            b = torch.randn(rows, 16, generator=generator) * 0.1
            name = (f"base_model.model.{prefix}backbone.vision_backbone.trunk.blocks.{layer}."
                    f"attn.{module}")
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            factors[(layer, module)] = (a, b)
    out.mkdir(parents=True)
    LoraConfig(r=16, lora_alpha=32, target_modules=["qkv", "proj"]).save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out, factors


@pytest.mark.parametrize("image_model", [False, True])
def test_fused_qkv_adapter_is_split_into_q_k_v_sharing_a(tiny_dir: Path, engine: Sam3Engine,
                                                         tmp_path: Path, image_model: bool):
    adapter, factors = write_fused_lora(tmp_path / "meta-lora", image_model=image_model)
    merged = Sam3Engine.from_config(cpu_config(tiny_dir, adapter_dir=adapter))
    assert merged.adapter is not None and merged.adapter.modules == 8  # 2 layers x q, k, v, o
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    base = engine.model.detector_model.vision_encoder.backbone.layers
    layers = merged.model.detector_model.vision_encoder.backbone.layers
    for layer in range(2):
        a, b = factors[(layer, "qkv")]
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            delta = 2.0 * b[32 * part: 32 * (part + 1)] @ a  # alpha / r = 2
            got = getattr(layers[layer].attention, name).weight
            want = getattr(base[layer].attention, name).weight + delta
            assert torch.allclose(got, want, atol=1e-6), (layer, name)
        a, b = factors[(layer, "proj")]
        assert torch.allclose(layers[layer].attention.o_proj.weight,
                              base[layer].attention.o_proj.weight + 2.0 * b @ a, atol=1e-6)


def test_fused_adapter_and_its_split_transformers_adapter_give_the_same_masks(
        tiny_dir: Path, meta_dir: Path, tmp_path: Path):
    """Meta's checkpoint with a fused adapter = transformers' checkpoint with q/k/v adapters."""
    from peft import LoraConfig

    fused, factors = write_fused_lora(tmp_path / "meta-lora")
    split = tmp_path / "hf-lora"
    split.mkdir()
    tensors = {}
    for (layer, module), (a, b) in factors.items():
        parts = (zip(("q_proj", "k_proj", "v_proj"), torch.chunk(b, 3), strict=True)
                 if module == "qkv" else [("o_proj", b)])
        for name, part in parts:
            key = (f"base_model.model.detector_model.vision_encoder.backbone.layers.{layer}."
                   f"attention.{name}")
            tensors[f"{key}.lora_A.weight"] = a.clone()
            tensors[f"{key}.lora_B.weight"] = part.contiguous()
    config = onco_seg_lora_config()
    LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
               target_modules=config.target_modules).save_pretrained(split)
    save_file(tensors, split / "adapter_model.safetensors", metadata={"format": "pt"})
    meta = Sam3Engine.from_config(cpu_config(meta_dir, adapter_dir=fused))
    hf = Sam3Engine.from_config(cpu_config(tiny_dir, adapter_dir=split))
    volume = phantom()
    for a, b in zip(meta.segment(volume, STRUCTURES[:3]), hf.segment(volume, STRUCTURES[:3]),
                    strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6) and a.note == b.note
        assert (a.mask is None) == (b.mask is None)
        assert a.mask is None or np.array_equal(a.mask, b.mask)
