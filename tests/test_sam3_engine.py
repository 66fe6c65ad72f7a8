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

from peft import PeftModel, get_peft_model  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Sam3Model, Sam3VideoModel  # noqa: E402
from transformers.models.sam3_video import modeling_sam3_video  # noqa: E402

from oncoseg_node.config import Sam3Config  # noqa: E402
from oncoseg_node.contouring.engines.base import Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3 import Sam3Engine, _Choice  # noqa: E402
from oncoseg_node.contouring.engines.sam3_load import onco_seg_lora_config, sha256_files  # noqa: E402
from oncoseg_node.contouring.engines.sam3_preprocess import (  # noqa: E402
    DEFAULT_WINDOW,
    SliceFrame,
    window_to_unit,
)
from oncoseg_node.contouring.engines.sam3_track import Detection  # noqa: E402
from oncoseg_node.contouring.protocols import Structure  # noqa: E402
from oncoseg_node.contouring.sanity import body_midline_x  # noqa: E402
from oncoseg_node.contouring.volume import Volume  # noqa: E402
from oncoseg_node.errors import EngineError  # noqa: E402
from tests.sam3_tiny import build_tiny_sam3  # noqa: E402

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


# -- what the model sees, at what precision, and how many instances it follows ----------


def test_model_always_sees_the_onco_seg_window_whatever_the_box_window(tiny_dir: Path):
    """``hu_window`` is for intensity box prompts only: the ViT input stays [-1000, 1000]."""
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    seen: list[torch.Tensor] = []
    engine.model.detector_model.vision_encoder.backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].clone()))
    trachea = Structure("Trachea", (1, 2, 3), engine="sam3", concepts=("trachea",),
                        hu_window=(-1100.0, -900.0))
    volume = phantom(slices=3)
    engine.segment(volume, [STRUCTURES[0], trachea])
    assert len(seen) == 1  # one pass over the series for both structures
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    expected = frame.to_model(window_to_unit(volume.hu, DEFAULT_WINDOW), "cpu", torch.float32)
    assert torch.equal(seen[0], expected)


def test_rotary_tables_stay_fp32_after_the_bf16_cast(tiny_dir: Path):
    """The engine's bf16 model keeps the fp32 rotary buffers ``from_pretrained(dtype)`` keeps."""
    engine = Sam3Engine.from_config(replace(cpu_config(tiny_dir), dtype="bfloat16"))
    reference = Sam3VideoModel.from_pretrained(tiny_dir, local_files_only=True,
                                               dtype=torch.bfloat16)
    want = {n: b for n, b in reference.named_buffers() if b.dtype == torch.float32}
    got = {n: b for n, b in engine.model.named_buffers() if b.dtype == torch.float32}
    assert len(want) == 8  # 2 ViT layers x 3 tables, 2 in the tracker's memory attention
    assert sorted(got) == sorted(want)
    for name, buffer in want.items():
        assert torch.equal(got[name], buffer), name
    assert engine.model.detector_model.vision_encoder.backbone.layers[0].attention \
        .q_proj.weight.dtype == torch.bfloat16


def _tracked_objects(engine: Sam3Engine) -> list[int]:
    counts: list[int] = []
    engine.model.tracker_model.register_forward_pre_hook(
        lambda m, args, kwargs: counts.append(kwargs["inference_session"].get_obj_num()),
        with_kwargs=True)
    return counts


def _seed_slice_instances(engine: Sam3Engine, structure: Structure) -> int:
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    with torch.inference_mode():
        _, hits, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW,
                                               engine._prompts([structure], [None]))
    candidates = engine._candidates(volume, frame, structure, False, hits, 0.0)
    seed = max((d for dets in candidates for d in dets), key=lambda d: d.score)
    return len(candidates[seed.z])


def test_a_single_organ_tracks_only_its_best_instance(tiny_dir: Path):
    """Other detections on the seed slice are not merged into a one-part organ."""
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    liver = replace(STRUCTURES[0], negative_concepts=())
    assert _seed_slice_instances(engine, liver) >= 2  # the case under test exists
    counts = _tracked_objects(engine)
    engine.segment(phantom(), [liver])
    assert counts and set(counts) == {1}


def test_a_multi_part_structure_tracks_every_instance(tiny_dir: Path):
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    bowel = replace(STRUCTURES[0], negative_concepts=(), parts="many")
    instances = _seed_slice_instances(engine, bowel)
    assert instances >= 2
    counts = _tracked_objects(engine)
    engine.segment(phantom(), [bowel])
    assert counts and set(counts) == {instances}


# -- the tracker loop: re-anchoring, forgetting, memory ----------------------------------


def test_tracking_rules_come_from_the_checkpoint_config(engine: Sam3Engine):
    """transformers' Sam3VideoConfig defaults: re-anchor every 16 slices at 0.8 / 0.8."""
    follow = engine.follow
    assert (follow.reanchor_every, follow.high_conf, follow.high_iou) == (16, 0.8, 0.8)
    assert follow.assoc_iou == engine.assoc_iou and follow.max_gap == 2


def _run_on_tiny(engine: Sam3Engine, **settings):
    """A tracker run over the tiny phantom's cached features, and its seed."""
    from oncoseg_node.contouring.engines.sam3_follow import TrackerRun

    volume = phantom(slices=6)
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    with torch.inference_mode():
        store, hits, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW,
                                                   engine._prompts(STRUCTURES[:1], [None]))
    candidates = engine._candidates(volume, frame, STRUCTURES[0], False, hits, 0.0)
    seed = max((d for dets in candidates for d in dets), key=lambda d: d.score)
    run = TrackerRun(engine.model.tracker_model, store, engine.device, engine.dtype,
                     replace(engine.follow, **settings))
    return run, seed, candidates


def test_full_resolution_masks_are_freed_and_dropped_slices_forgotten(engine: Sam3Engine):
    from oncoseg_node.contouring.engines.sam3_follow import follow

    run, seed, candidates = _run_on_tiny(engine)
    with torch.inference_mode():
        track = follow(run, [seed], candidates)
    stored = run.session.output_dict_per_obj[0]
    outputs = [*stored["cond_frame_outputs"].values(), *stored["non_cond_frame_outputs"].values()]
    assert outputs and all("high_res_masks" not in out for out in outputs)
    assert all("maskmem_features" in out for out in outputs)  # memory itself is kept
    kept = run.stored_slices()
    assert kept["cond_frame_outputs"] | kept["non_cond_frame_outputs"] == set(track.logits)
    assert set(run.session.frames_tracked_per_obj[0]) <= set(track.logits)


@pytest.fixture(scope="module")
def present_engine(tiny_dir: Path) -> Sam3Engine:
    """The tiny model with its object-score head biased so the tracker always reports the object.

    Random weights often call the object absent one slice from its seed; the
    re-anchoring plumbing needs slices where it is present.
    """
    engine = Sam3Engine.from_config(cpu_config(tiny_dir))
    with torch.no_grad():
        engine.model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(20.0)
    return engine


def test_a_confident_detection_re_anchors_the_tracked_slice(present_engine: Sam3Engine):
    """Plumbing on random weights: with the thresholds at 0 any agreeing detection is confident."""
    run, seed, candidates = _run_on_tiny(present_engine, high_conf=0.0, high_iou=0.0)
    z = seed.z + 1 if seed.z + 1 < 6 else seed.z - 1
    with torch.inference_mode():
        run.seed(seed.z, [seed.mask])
        logits = run.step(z, z < seed.z)
        assert logits is not None
        agreeing = Detection(z, 0.99, torch.from_numpy(logits > 0))
        assert not run.anchor(z + 1, [agreeing])  # only the slice just stepped can be anchored
        assert run.anchor(z, [agreeing])
    assert run.stored_slices()["cond_frame_outputs"] == {seed.z, z}
    strict, seed, _ = _run_on_tiny(present_engine)  # real thresholds: a 0.5 score never anchors
    with torch.inference_mode():
        strict.seed(seed.z, [seed.mask])
        logits = strict.step(z, z < seed.z)
        assert not strict.anchor(z, [Detection(z, 0.5, torch.from_numpy(logits > 0))])
    assert strict.stored_slices()["cond_frame_outputs"] == {seed.z}


def test_left_and_right_of_a_paired_organ_never_share_a_voxel(present_engine: Sam3Engine):
    """Two seeds overlapping across the midline: the tracked sides must split the overlap."""
    engine = present_engine
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], engine.image_size)
    left = Structure("Parotid_L", (1, 2, 3), engine="sam3", concepts=("parotid gland",),
                     laterality="left")
    right = replace(left, name="Parotid_R", laterality="right")
    size = 4 * engine.image_size // 14
    patient_left, patient_right = (torch.zeros(size, size, dtype=torch.bool) for _ in range(2))
    patient_left[8:20, 16:26] = True  # image right of the centre: the patient's left (+x rows)
    patient_right[8:20, 6:17] = True  # one column shared: not a duplicate for NMS
    hits = {("parotid gland", None): [[] for _ in range(volume.shape[0])]}
    hits[("parotid gland", None)][2] = [Detection(2, 0.9, patient_left),
                                        Detection(2, 0.8, patient_right)]
    best = {("parotid gland", None): np.full(volume.shape[0], 0.9)}
    with torch.inference_mode():
        store, _, _ = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW, [])
        chosen = {i: engine._choose(volume, frame, s, False, store, hits, best,
                                    body_midline_x(volume)) for i, s in enumerate((left, right))}
    assert all(isinstance(c, _Choice) for c in chosen.values()), chosen
    tracks = [chosen[i].track for i in (0, 1)]
    overlap = (tracks[0].logits[2] > 0) & (tracks[1].logits[2] > 0)
    assert overlap.any()  # the case under test: both sides claim the midline band
    results = engine._finish(volume, frame, (left, right), chosen)
    assert results[0].mask is not None and results[1].mask is not None
    assert results[0].mask[2].any() and results[1].mask[2].any()
    assert not (results[0].mask & results[1].mask).any()


# -- what the random fp32 model never exercised ---------------------------------------------


def test_clip_tokenizer_merges_words_lowercases_and_pads_like_sam3(engine: Sam3Engine):
    from transformers import CLIPTokenizer

    tokenizer = engine.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    enc = tokenizer(["Left Parotid  GLAND"], padding="max_length", max_length=32,
                    truncation=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens[:5] == ["<|startoftext|>", "left</w>", "parotid</w>", "gland</w>",
                          "<|endoftext|>"]
    assert tokens[5:] == ["<|endoftext|>"] * 27 and sum(enc["attention_mask"][0]) == 5
    unknown = tokenizer.convert_ids_to_tokens(tokenizer(["zygoma"])["input_ids"][0])
    assert unknown[1:-1] == ["z", "y", "g", "o", "m", "a</w>"]  # bytes, never an error
    with torch.inference_mode():
        upper, _ = engine._text("LIVER")
        lower, mask = engine._text("liver")
    assert torch.equal(upper, lower) and int(mask.sum()) == 3


def test_bf16_on_cpu_runs_the_whole_engine_close_to_fp32(tiny_dir: Path, engine: Sam3Engine):
    bf16 = Sam3Engine.from_config(replace(cpu_config(tiny_dir), dtype="bfloat16"))
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = engine._vision(pixels).last_hidden_state
        got = bf16._vision(pixels.to(torch.bfloat16)).last_hidden_state
    assert got.dtype == torch.bfloat16
    error = float((got.float() - want).norm() / want.norm())
    assert error < 0.05, error
    volume = phantom()
    results = bf16.segment(volume, STRUCTURES)
    assert [r.name for r in results] == [s.name for s in STRUCTURES]
    found = [r for r in results[:3] if r.mask is not None]
    assert found, [r.note for r in results]
    for result in found:
        assert result.mask.shape == volume.shape and result.mask.dtype == bool
        assert 0.0 <= result.score <= 1.0


def test_nonzero_threshold_gates_queries_by_the_presence_score(tiny_dir: Path):
    """A query passes only if its probability times the image-level presence reaches it."""
    volume = phantom()
    frame = SliceFrame(volume.shape[1], volume.shape[2], 112)
    raw: list[tuple[torch.Tensor, torch.Tensor]] = []
    liver = Structure("Liver", (1, 2, 3), engine="sam3", concepts=("liver",))

    def detections(engine: Sam3Engine):
        engine.model.detector_model.register_forward_hook(
            lambda m, a, out: raw.append((out.pred_logits.float().sigmoid(),
                                          out.presence_logits.float().sigmoid())))
        with torch.inference_mode():
            _, hits, best = engine._encode_and_detect(volume, frame, DEFAULT_WINDOW,
                                                      engine._prompts([liver], [None]))
        return hits[("liver", None)], best[("liver", None)]

    detections(Sam3Engine.from_config(cpu_config(tiny_dir)))
    query = torch.cat([q for q, _ in raw])  # batches of 4 and 2 slices: (6, 20)
    presence = torch.cat([p for _, p in raw])  # (6, 1)
    score = query * presence
    threshold = float(score.median())  # about half the queries of each slice pass
    gated = (query >= threshold) & (score < threshold)
    assert bool(gated.any())  # queries that pass on their own probability but not with presence
    raw.clear()
    strict = Sam3Engine.from_config(replace(cpu_config(tiny_dir), score_threshold=threshold))
    hits, best = detections(strict)
    assert np.allclose(best, score.max(1).values.numpy(), atol=1e-6)
    for z, dets in enumerate(hits):
        passing = sorted(float(s) for s in score[z] if s >= threshold)
        assert bool(dets) == bool(passing)
        for det in dets:
            assert det.score >= threshold
            assert any(abs(det.score - s) < 1e-6 for s in passing)


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


def test_gpu_bench_dry_run_checks_its_own_arithmetic():
    """bench/sam3_gpu.py --dry-run: analytic ViT FLOPs and memory estimate against real ones."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "sam3_gpu.py"
    proc = subprocess.run([sys.executable, str(bench), "--dry-run"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: arithmetic checked" in proc.stdout
    assert "full size, 200 slices x 30 structures in bf16" in proc.stdout
