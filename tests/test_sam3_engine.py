"""The SAM3 engine on a tiny random SAM3 saved to disk and loaded the production way.

The weights are random (see ``tests/sam3_tiny.py``): tests here check loading,
plumbing, bookkeeping and the engine's own rules, never segmentation quality.
Tests that only look at shapes of random outputs say so.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Sam3VideoModel  # noqa: E402
from transformers.models.sam3_video import modeling_sam3_video  # noqa: E402

from oncoseg_node.config import Sam3Config  # noqa: E402
from oncoseg_node.contouring.engines.base import Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.load import sha256_files  # noqa: E402
from oncoseg_node.contouring.engines.sam3.preprocess import (  # noqa: E402
    DEFAULT_WINDOW,
    SliceFrame,
)
from oncoseg_node.contouring.engines.sam3.track import Detection  # noqa: E402
from oncoseg_node.contouring.protocols import Structure  # noqa: E402
from oncoseg_node.contouring.volume import Volume  # noqa: E402
from oncoseg_node.errors import EngineError  # noqa: E402
from tests.sam3_cases import (  # noqa: E402, F401  - fixtures are found by name
    STRUCTURES,
    VIT_PROJECTION,
    adapter_dir,
    cpu_config,
    engine,
    make_adapter,
    one_thread,
    phantom,
    tiny_dir,
)

# -- the interface and loading -------------------------------------------------------


def test_engine_identity_and_supports(engine: Sam3Engine, tiny_dir: Path):
    assert isinstance(engine, Engine) and engine.name == "sam3"
    digest = sha256_files([tiny_dir / "model.safetensors"])
    assert engine.description == f"SAM3 {tiny_dir.name} sha256:{digest[:12]}"
    assert engine.supports(STRUCTURES[0]) and not engine.supports(STRUCTURES[3])


def test_node_config_builds_the_engine_beside_the_classical_one(tiny_dir: Path):
    """Plumbing only (random weights): the registry's sam3 path, as the daemon uses it."""
    from oncoseg_node.config import EngineConfig
    from oncoseg_node.contouring.engines.registry import build_engines

    engines = build_engines(EngineConfig(name="sam3", sam3=cpu_config(tiny_dir)))
    assert set(engines.engines) == {"classical", "sam3"}
    structures = [STRUCTURES[0], Structure("External", (1, 2, 3))]
    results = engines.segment(phantom(), structures)
    assert [r.name for r in results] == ["Liver", "External"]
    assert engines.describe_for(structures[:1]).startswith(f"sam3: SAM3 {tiny_dir.name} ")


def test_results_are_on_the_ct_grid_one_per_structure(engine: Sam3Engine):
    """Shapes only: the model is random, so what it contours means nothing."""
    volume = phantom()
    results = engine.segment(volume, STRUCTURES)
    assert [r.name for r in results] == [s.name for s in STRUCTURES]
    for result in results[:3]:
        assert result.score is not None and 0.0 <= result.score <= 1.0
        if result.mask is not None:
            assert result.mask.shape == volume.shape and result.mask.dtype == bool
    assert results[3].absent and results[3].note == "no text concept"
    again = engine.segment(volume, STRUCTURES)  # pure: same input, same output
    for a, b in zip(results, again, strict=True):
        assert a.score == b.score and a.note == b.note
        assert (a.mask is None) == (b.mask is None)
        assert a.mask is None or np.array_equal(a.mask, b.mask)


def test_not_found_is_absent_with_its_best_score(tiny_dir: Path):
    strict = Sam3Engine.from_config(replace(cpu_config(tiny_dir), score_threshold=1.0))
    results = strict.segment(phantom(), STRUCTURES[:3])
    for result in results:
        assert result.mask is None and result.absent
        assert 0.0 < result.score < 1.0
        assert result.note.startswith("not found: best detection score")


def test_low_mean_score_raises_a_flag(tiny_dir: Path):
    """Random weights score about 0.25: under a 0.6 flag level every found structure is flagged."""
    results = Sam3Engine.from_config(cpu_config(tiny_dir)).segment(phantom(), STRUCTURES[:1])
    assert not results[0].absent
    assert results[0].flags == (f"low SAM3 score {results[0].score:.2f} < 0.60",)


def test_protocol_postprocessing_applies_to_sam3_masks(engine: Sam3Engine):
    from scipy import ndimage

    from oncoseg_node.contouring.protocols import PostProcess

    one = replace(STRUCTURES[0], postprocess=PostProcess(keep_components=1))
    result = engine.segment(phantom(), [one])[0]
    assert result.mask is not None
    assert ndimage.label(result.mask)[1] == 1


# -- encode once, prompt many; NMS ------------------------------------------------------


def test_each_slice_is_encoded_once_per_window_and_text_once(tiny_dir: Path):
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    vit, text = [], []
    detector = engine.model.detector_model
    detector.vision_encoder.backbone.register_forward_hook(
        lambda m, args, out: vit.append(args[0].shape[0]))
    detector.text_encoder.register_forward_hook(lambda m, args, out: text.append(1))
    engine.segment(phantom(slices=6), STRUCTURES)
    # 6 slices in batches of 4, for the default window and for the Bones model_window
    assert vit == [4, 2, 4, 2]
    assert len(text) == 5  # liver, hepar, spleen, left parotid gland, bone
    engine.segment(phantom(slices=6), STRUCTURES)
    assert len(text) == 5 and len(vit) == 8  # text features come from the cache


def test_detection_nms_bounds_objects_and_skips_the_hub_kernel(tiny_dir: Path):
    # threshold 0: all 20 queries of every slice pass and must go through our NMS
    engine = Sam3Engine.from_config(cpu_config(tiny_dir, max_instances=2))
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    prompts = engine._prompts(STRUCTURES[:1], [None])
    with torch.inference_mode():
        _, hits, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW, prompts)
    for key in hits:
        for dets in hits[key]:
            assert 1 <= len(dets) <= 2
            if len(dets) == 2:
                a, b = (d.mask.float() for d in dets)
                iou = (a * b).sum() / ((a + b) > 0).sum()
                assert iou <= engine.nms_iou
    # transformers' own NMS / hole filling (which downloads a kernel) was never reached
    assert modeling_sam3_video.cv_utils_kernel is None


# -- instance selection ----------------------------------------------------------------


def side_detections(volume: Volume, engine: Sam3Engine) -> tuple[Detection, Detection]:
    """Two detections on slice 2: one over image columns < 12, one over columns > 36."""
    size = 4 * engine.image_size // 14
    low, high = torch.zeros(size, size, dtype=torch.bool), torch.zeros(size, size, dtype=torch.bool)
    low[10:14, 2:6] = True  # CT columns ~3-7 (the frame is 48 px wide, side 48)
    high[10:14, 26:30] = True  # CT columns ~39-44
    return Detection(2, 0.9, low), Detection(2, 0.8, high)


@pytest.mark.parametrize("row_x, left_is", [(1.0, "high"), (-1.0, "low")])
def test_laterality_comes_from_patient_coordinates(engine: Sam3Engine, row_x: float,
                                                   left_is: str):
    """Columns grow toward the patient's left only when the row direction is +x (LPS)."""
    volume = phantom(row_direction=(row_x, 0.0, 0.0))
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    low, high = side_detections(volume, engine)
    hits = {("left parotid gland", None): [[] for _ in range(volume.shape[0])]}
    hits[("left parotid gland", None)][2] = [low, high]
    from oncoseg_node.contouring.sanity import body_midline_x

    chosen = engine._candidates(volume, frame, STRUCTURES[1], False, hits,
                                body_midline_x(volume))
    assert chosen[2] == [high if left_is == "high" else low]
    right = replace(STRUCTURES[1], name="Parotid_R", laterality="right")
    chosen = engine._candidates(volume, frame, right, False, hits, body_midline_x(volume))
    assert chosen[2] == [low if left_is == "high" else high]


def test_negative_concept_outranks_only_when_it_scores_higher(engine: Sam3Engine):
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    low, high = side_detections(volume, engine)
    n = volume.shape[0]
    hits = {(c, None): [[] for _ in range(n)] for c in ("liver", "hepar", "spleen")}
    hits[("liver", None)][2] = [low, high]
    hits[("spleen", None)][2] = [Detection(2, 0.95, low.mask.clone()),
                                 Detection(2, 0.5, high.mask.clone())]
    chosen = engine._candidates(volume, frame, STRUCTURES[0], False, hits, 0.0)
    assert chosen[2] == [high]


def test_expected_volume_makes_the_engine_try_other_instances(tiny_dir: Path, monkeypatch):
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    calls = []
    original = engine._track
    monkeypatch.setattr(engine, "_track", lambda *a: calls.append(a[1]) or original(*a))
    engine.segment(phantom(), STRUCTURES[:1])
    assert len(calls) == 1
    impossible = replace(STRUCTURES[0], volume_cc=(1e6, 2e6))
    calls.clear()
    result = engine.segment(phantom(), [impossible])[0]
    assert len(calls) == 3 and len({(d.z, d.score) for d in calls}) == 3
    assert "3 seed(s) tried" in result.note and result.mask is not None


def test_box_prompts_reach_the_detector(tiny_dir: Path):
    """Plumbing only: slices with a box are prompted with text and box, the rest text only."""
    boxes = {1: [(15, 30, 24, 37)], 2: [(15, 30, 24, 37), (0, 0, 5, 5)]}
    engine = Sam3Engine.from_config(
        cpu_config(tiny_dir),
        box_prompter=lambda volume, s: boxes if s.name == "Liver" else None)
    seen = []
    engine.model.detector_model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs.get("input_boxes")), with_kwargs=True)
    results = engine.segment(phantom(), STRUCTURES[:2])
    assert len(results) == 2
    with_boxes = [b for b in seen if b is not None]
    assert [tuple(b.shape) for b in with_boxes] == [(2, 2, 4), (2, 2, 4)]  # liver, hepar
    assert float(with_boxes[0][0, 0, 0]) == pytest.approx((30 + 38) / 2 / 48)


# -- LoRA ---------------------------------------------------------------------------


def test_lora_targets_exactly_the_vit_attention_projections(tiny_dir: Path, adapter_dir: Path):
    import re

    keys = load_file(adapter_dir / "adapter_model.safetensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert len(modules) == 2 * 4  # 2 ViT layers x q, k, v, o
    assert all(re.search(VIT_PROJECTION + "$", m) for m in modules)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.1)


@pytest.mark.parametrize("on_image_model", [False, True])
def test_merged_adapter_reproduces_the_unmerged_model(tiny_dir: Path, adapter_dir: Path,
                                                      engine: Sam3Engine, tmp_path: Path,
                                                      on_image_model: bool):
    adapter = (make_adapter(tiny_dir, tmp_path / "image-lora", on_image_model=True)
               if on_image_model else adapter_dir)
    merged = Sam3Engine.from_config(cpu_config(tiny_dir, adapter_dir=adapter))
    assert merged.adapter is not None and merged.adapter.modules == 8
    assert merged.description.endswith(
        f"+ LoRA {adapter.name} sha256:{merged.adapter.sha256[:12]} r16 merged")
    assert not any("lora" in n for n, _ in merged.model.named_parameters())

    base = Sam3VideoModel.from_pretrained(tiny_dir, local_files_only=True)
    target = base.detector_model if on_image_model else base
    unmerged = PeftModel.from_pretrained(target, adapter).eval()
    plain = engine
    if on_image_model:
        reference = Sam3Engine(base, plain.tokenizer, cpu_config(tiny_dir), weights_sha256="x")
    else:
        reference = Sam3Engine(unmerged, plain.tokenizer, cpu_config(tiny_dir),
                               weights_sha256="x")

    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = merged._vision(pixels).last_hidden_state
        want = reference._vision(pixels).last_hidden_state
        without = plain._vision(pixels).last_hidden_state
    assert (got - want).abs().max() < 1e-4 * got.abs().max(), (got - want).abs().max()
    assert not torch.allclose(got, without, atol=1e-3)  # the adapter does change the model

    volume = phantom()
    for a, b in zip(merged.segment(volume, STRUCTURES[:2]),
                    reference.segment(volume, STRUCTURES[:2]), strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert (a.mask is None) == (b.mask is None)
        assert a.mask is None or (a.mask != b.mask).mean() < 0.01


# -- local only, loud failures ----------------------------------------------------------


def test_no_network_connection_is_opened(tiny_dir: Path, adapter_dir: Path, monkeypatch):
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    engine = Sam3Engine.from_config(cpu_config(tiny_dir, adapter_dir=adapter_dir))
    engine.segment(phantom(), STRUCTURES[:2])
    assert attempts == []


def test_missing_model_directory_names_the_path(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EngineError, match=str(missing)):
        Sam3Engine.from_config(cpu_config(missing))
    with pytest.raises(EngineError, match="model_dir"):
        Sam3Engine.from_config(Sam3Config(device="cpu"))


@pytest.mark.parametrize("change, message", [
    ({"size": {"height": 1008, "width": 1008}}, "size .* the engine feeds 112 x 112"),
    ({"image_std": [0.229, 0.224, 0.225]}, "image_std .* the engine uses 0.5"),
    ({"image_mean": [0.485, 0.456, 0.406]}, "image_mean .* the engine uses 0.5"),
    ({"do_normalize": False}, "do_normalize False"),
    (None, "missing"),
])
def test_preprocessing_that_disagrees_with_the_engine_names_the_file(
        tiny_dir: Path, tmp_path: Path, change, message: str):
    changed = tmp_path / "sam3"
    shutil.copytree(tiny_dir, changed)
    path = changed / "preprocessor_config.json"
    if change is None:
        path.unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(EngineError, match=f"{path}: {message}"):
        Sam3Engine.from_config(cpu_config(changed))


def test_the_shipped_preprocessing_is_what_the_engine_does(tiny_dir: Path):
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert (config["image_mean"], config["image_std"]) == ([0.5] * 3, [0.5] * 3)
    assert config["size"] == {"height": 112, "width": 112}


@pytest.mark.parametrize("damage", ["config", "weights", "tokenizer", "model_type", "truncated"])
def test_broken_model_directory_names_the_path(tiny_dir: Path, tmp_path: Path, damage: str):
    broken = tmp_path / "sam3"
    shutil.copytree(tiny_dir, broken)
    if damage == "config":
        (broken / "config.json").unlink()
    elif damage == "weights":
        (broken / "model.safetensors").unlink()
    elif damage == "tokenizer":
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            (broken / name).unlink(missing_ok=True)
    elif damage == "model_type":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "model_type": "sam3"}))
    else:
        tensors = load_file(broken / "model.safetensors")
        drop = [k for k in tensors if ".memory_encoder." in k]
        save_file({k: v for k, v in tensors.items() if k not in drop},
                  broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EngineError, match=str(broken)):
        Sam3Engine.from_config(cpu_config(broken))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_configured_without_a_gpu_fails_at_startup(tiny_dir: Path):
    with pytest.raises(EngineError, match="engine.sam3.device: 'cuda:0'.*no CUDA GPU"):
        Sam3Engine.from_config(replace(cpu_config(tiny_dir), device="cuda:0"))


@pytest.mark.parametrize("damage", ["missing", "shape", "keys", "targets"])
def test_adapter_that_does_not_fit_names_the_path(tiny_dir: Path, adapter_dir: Path,
                                                  tmp_path: Path, damage: str):
    bad = tmp_path / "bad-lora"
    if damage != "missing":
        shutil.copytree(adapter_dir, bad)
        weights = bad / "adapter_model.safetensors"
        tensors = load_file(weights)
        if damage == "shape":
            key = next(k for k in tensors if "lora_A" in k)
            tensors[key] = torch.zeros(16, 7)
        elif damage == "keys":
            tensors = {k.replace("layers.0.", "layers.5."): v for k, v in tensors.items()}
        if damage in ("shape", "keys"):
            save_file(tensors, weights, metadata={"format": "pt"})
        else:
            config = json.loads((bad / "adapter_config.json").read_text())
            config["target_modules"] = r"^text_encoder\.nothing$"
            (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match=str(bad)):
        Sam3Engine.from_config(cpu_config(tiny_dir, adapter_dir=bad))
