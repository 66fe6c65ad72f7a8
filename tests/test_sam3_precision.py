"""What the model is shown and at what precision: window, rotary tables, bf16, tokenizer,
presence-gated scores, the checkpoint's preprocessing, and the GPU bench's arithmetic.

Random tiny weights (``tests/sam3_tiny.py``): these check what reaches the
model and how scores are formed, never segmentation quality.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import Sam3VideoModel  # noqa: E402

from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.preprocess import (  # noqa: E402
    DEFAULT_WINDOW,
    SliceFrame,
    window_to_unit,
)
from oncoseg_node.contouring.protocols import Structure  # noqa: E402
from tests.sam3_cases import (  # noqa: E402, F401  - fixtures are found by name
    STRUCTURES,
    cpu_config,
    engine,
    one_thread,
    phantom,
    tiny_dir,
)

# -- what the model sees and at what precision -----------------------------------------


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
