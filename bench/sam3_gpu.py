"""SAM3 on a GPU at full size: encoder speed against the bf16 peak, a whole contour job, memory.

Builds the full-size SAM3 (random weights: speed and memory do not depend on
them) in bfloat16 on CUDA, with the rotary tables kept fp32 as the engine
does, and measures on a synthetic 512 x 512 CT:

- image encoder (ViT + necks): slices/s, and achieved FLOP/s against the
  device's data-sheet dense bf16 peak (and a measured GEMM beside it); FLOPs
  are counted by torch's FlopCounterMode on one batch and checked against
  the analytic count of the ViT below;
- a whole job: ``Sam3Engine.segment`` on 200 slices x 30 structures (every
  structure its own concept, threshold 0 so every one is tracked), wall time;
- peak GPU memory of that job, beside the estimate this script computes
  from the model config (feature store, one tracker session, the detector
  masks kept on the host), and what the tracker's full-resolution masks would
  have added had they been kept.

``--dry-run`` runs the same code on the CPU with the tiny test model at small
size and checks the script's own arithmetic: the analytic ViT FLOPs against
the counter, and the memory estimate against the bytes really allocated
(feature store and tracker session, exactly); it exits non-zero on a mismatch.

    .venv/bin/python bench/sam3_gpu.py                # CUDA: 200 slices x 30 structures
    .venv/bin/python bench/sam3_gpu.py --dry-run      # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.sam3_throughput import gpu_peak, measured_matmul_peak, phantom, sync  # noqa: E402
from oncoseg_node.config import Sam3Config  # noqa: E402
from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.follow import TrackerRun, follow  # noqa: E402
from oncoseg_node.contouring.engines.sam3.preprocess import (  # noqa: E402
    DEFAULT_WINDOW,
    SliceFrame,
    window_to_unit,
)
from oncoseg_node.contouring.protocols import Structure  # noqa: E402

MIB = 2**20
GIB = 2**30
FULL_TRACKED = 60  # slices an organ spans in a 200-slice series, for the full-size estimate


def vit_flops(vit) -> tuple[int, int]:
    """(all, attention) multiply-add FLOPs (2 per MAC) of one slice through the SAM3 ViT.

    Patch embedding, then per layer: q, k, v and output projections, the MLP,
    and attention scores and mixing over windows of ``window_size``^2 tokens
    (the whole grid in the global layers). Norms and activations are not
    counted, as FlopCounterMode does not count them; the attention part is
    given apart because the counter sees it only where the fused attention
    kernel has a FLOP formula (flash and memory-efficient kernels on CUDA).
    """
    grid = vit.image_size // vit.patch_size
    tokens, width = grid * grid, vit.hidden_size
    flops = 2 * tokens * width * 3 * vit.patch_size**2
    attention = 0
    for layer in range(vit.num_hidden_layers):
        window = grid if layer in vit.global_attn_indexes else vit.window_size
        windows = (-(-grid // window)) ** 2  # windowed layers pad the grid to whole windows
        span = window * window
        flops += 2 * windows * span * width * 4 * width  # q, k, v, o
        flops += 2 * tokens * 2 * width * vit.intermediate_size  # fc1, fc2 (unpadded)
        attention += 2 * windows * 2 * span * span * width  # q k^T and attention x v
    return flops + attention, attention


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job holds, from the model config (see ``estimate``)."""

    feature_store: int  # GPU: tracker features of every slice, for the whole job
    per_tracked_slice: int  # GPU: what one tracker session keeps per slice and object
    session: int  # GPU: one structure's session (sessions do not overlap)
    full_res_masks_freed: int  # GPU: per session, had full-resolution masks been kept
    detections_host: int  # host: boolean detector masks kept for the job

    @property
    def gpu(self) -> int:
        return self.feature_store + self.session


def estimate(config, slices: int, structures: int, tracked: int, instances: int,
             dtype_bytes: int) -> MemoryEstimate:
    """Memory of a job of ``structures`` each tracked over ``tracked`` slices.

    The feature store holds three levels per slice (``backbone_feature_sizes``,
    with fpn/8, fpn/4 and fpn channels, the high-resolution ones reduced by
    the tracker's ``conv_s0`` / ``conv_s1``) in the model dtype, plus one copy
    of their position encodings. Per tracked slice and object the session
    keeps the low-resolution mask logits and memory position encoding in the
    model dtype, the memory features in bfloat16 (transformers casts them)
    and the object pointer.
    """
    tracker = config.tracker_config
    sizes = [h * w for h, w in tracker.vision_config.backbone_feature_sizes]
    fpn = tracker.vision_config.fpn_hidden_size
    channels = [fpn // 8, fpn // 4, fpn]
    store = slices * sum(s * c for s, c in zip(sizes, channels, strict=True)) * dtype_bytes
    store += sum(s * fpn for s in sizes) * dtype_bytes  # position encodings, once
    memory = sizes[-1] * tracker.memory_encoder_output_channels
    per_slice = (sizes[0] * dtype_bytes + memory * 2 + memory * dtype_bytes
                 + fpn * dtype_bytes + dtype_bytes)  # masks, features, pos, pointer, score
    full_res = tracker.image_size**2 * dtype_bytes
    concepts = structures  # one concept each here
    return MemoryEstimate(store, per_slice, per_slice * tracked, full_res * tracked,
                          slices * concepts * instances * sizes[0])


def session_bytes(run: TrackerRun) -> tuple[int, int]:
    """(bytes, stored slices) of what a tracker session holds per slice."""
    total, frames = 0, 0
    for outputs in run.session.output_dict_per_obj.values():
        for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
            for stored in outputs[kind].values():
                frames += 1
                total += sum(t.numel() * t.element_size() for t in stored.values()
                             if isinstance(t, torch.Tensor))
    return total, frames


def build(dry_run: bool, device: str, batch: int) -> Sam3Engine:
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from tests.sam3_tiny import tiny_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_config(len(tokenizer)) if dry_run else Sam3VideoConfig()
    torch.manual_seed(0)
    with torch.device(device):
        model = Sam3VideoModel(config)
    dtype = "float32" if dry_run else "bfloat16"
    return Sam3Engine(model, tokenizer, Sam3Config(device=device, dtype=dtype, batch_size=batch,
                                                   score_threshold=0.0),
                      weights_sha256="random")


def encoder_rate(engine: Sam3Engine, slices: int, ct: int) -> tuple[float, int, tuple[int, int]]:
    """(slices/s, counted FLOPs of one slice, analytic (all, attention)) of the image encoder."""
    device, batch = engine.device, engine.config.batch_size
    frame = SliceFrame(ct, ct, engine.image_size)
    hu = phantom(batch, ct).hu
    pixels = frame.to_model(window_to_unit(hu, DEFAULT_WINDOW), device, engine.dtype)
    with torch.inference_mode():
        engine._vision(pixels)  # warm-up: kernels, allocator
        counter = FlopCounterMode(display=False)
        with counter:
            engine.model.detector_model.vision_encoder.backbone(pixels[:1])
        counted = int(counter.get_total_flops())
        sync(device)
        start = time.perf_counter()
        done = 0
        while done < slices:
            vision = engine._vision(pixels)
            engine.model.get_vision_features_for_tracker(vision)
            done += batch
        sync(device)
    vit = engine.model.config.detector_config.vision_config.backbone_config
    return done / (time.perf_counter() - start), counted, vit_flops(vit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, small size: check this script's arithmetic")
    parser.add_argument("--slices", type=int, default=None, help="default 200 (dry run: 6)")
    parser.add_argument("--structures", type=int, default=None, help="default 30 (dry run: 3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ct-size", type=int, default=None, help="default 512 (dry run: 48)")
    args = parser.parse_args()
    dry = args.dry_run
    slices = args.slices or (6 if dry else 200)
    structures = args.structures or (3 if dry else 30)
    ct = args.ct_size or (48 if dry else 512)
    if dry:
        torch.set_num_threads(1)
        device = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    started = time.perf_counter()
    engine = build(dry, device, args.batch if not dry else 4)
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"{'tiny' if dry else 'full-size'} SAM3, random weights: {params / 1e6:.1f}M "
          f"parameters, {engine.image_size} px, {engine.config.dtype} on {engine.device} "
          f"(built in {time.perf_counter() - started:.0f} s)")
    problems: list[str] = []

    rate, counted, (analytic, attention) = encoder_rate(engine, 4 if dry else 64, ct)
    seen = ("with attention" if abs(counted - analytic) <= 1e-3 * analytic else
            "without attention" if abs(counted - (analytic - attention)) <= 1e-3 * analytic
            else None)
    print(f"image encoder: {rate:.2f} slices/s; ViT {analytic / 1e9:.3f} GFLOP per slice "
          f"analytic ({attention / analytic:.0%} attention), counter "
          f"{counted / 1e9:.3f} ({seen or 'MISMATCH'})")
    if seen is None:
        problems.append(f"ViT FLOPs: counted {counted}, analytic {analytic} "
                        f"({analytic - attention} without attention)")
    achieved = rate * analytic
    if device == "cuda":
        peak, how = gpu_peak(engine.device, "bfloat16")
        gemm = measured_matmul_peak(engine.device, engine.dtype)
        share = f" = {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        print(f"achieved {achieved / 1e12:.1f} TFLOP/s (ViT only){share} ({how}); "
              f"measured 8192^3 bf16 GEMM {gemm / 1e12:.0f} TFLOP/s")
        torch.cuda.reset_peak_memory_stats(engine.device)
        base = torch.cuda.memory_allocated(engine.device)
    else:
        print(f"achieved {achieved / 1e9:.2f} GFLOP/s (ViT only)")

    volume = phantom(slices, ct)
    names = [f"Organ{i}" for i in range(structures)]
    request = [Structure(n, (1, 2, 3), engine="sam3", concepts=(f"organ {i}",))
               for i, n in enumerate(names)]
    sync(engine.device)
    start = time.perf_counter()
    with torch.inference_mode():
        results = engine.segment(volume, request)
    sync(engine.device)
    job_s = time.perf_counter() - start
    tracked = [len(r.mask.any(axis=(1, 2)).nonzero()[0]) for r in results if r.mask is not None]
    mean_tracked = int(np.mean(tracked)) if tracked else 0
    print(f"contour job: {slices} slices x {structures} structures in {job_s:.1f} s "
          f"({job_s / structures:.2f} s per structure; {len(tracked)} drawn, "
          f"{mean_tracked} slices each on average)")

    dtype_bytes = torch.empty(0, dtype=engine.dtype).element_size()
    est = estimate(engine.model.config, slices, structures, max(mean_tracked, 1),
                   engine.config.max_instances, dtype_bytes)
    if device == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(engine.device) - base
        print(f"peak GPU memory of the job: {peak_mem / GIB:.2f} GiB above the weights "
              f"({base / GIB:.2f} GiB)")
    print(f"estimate: feature store {est.feature_store / MIB:.0f} MiB + one tracker session "
          f"{est.session / MIB:.0f} MiB ({est.per_tracked_slice / MIB:.2f} MiB per slice) "
          f"= {est.gpu / MIB:.0f} MiB on the device, plus the detector's activations; "
          f"{est.full_res_masks_freed / MIB:.0f} MiB more per session had full-resolution "
          f"masks been kept; host: detector masks up to {est.detections_host / MIB:.0f} MiB")

    from transformers import Sam3VideoConfig

    full = estimate(Sam3VideoConfig(), 200, 30, FULL_TRACKED, 4, 2)
    print(f"full size, 200 slices x 30 structures in bf16 (each tracked over {FULL_TRACKED} "
          f"slices): feature store {full.feature_store / GIB:.2f} GiB + session "
          f"{full.session / MIB:.0f} MiB = {full.gpu / GIB:.2f} GiB on the device besides the "
          f"weights and the detector's activations ({full.full_res_masks_freed / MIB:.0f} MiB "
          f"per session saved by freeing full-resolution masks); host: detector masks up to "
          f"{full.detections_host / GIB:.2f} GiB")

    if dry:  # the estimate's arithmetic against what the tiny model really allocates
        frame = SliceFrame(ct, ct, engine.image_size)
        with torch.inference_mode():
            store, hits, _ = engine._encode_and_detect(
                volume, frame, DEFAULT_WINDOW, engine._prompts(request[:1], [None]))
            held = sum(t.numel() * t.element_size() for t in [*store.levels, *store.pos])
            candidates = engine._candidates(volume, frame, request[0], False, hits, 0.0)
            seed = max((d for dets in candidates for d in dets), key=lambda d: d.score)
            run = TrackerRun(engine.model.tracker_model, store, engine.device, engine.dtype,
                             engine.tracking)
            follow(run, [seed], candidates)
        want = estimate(engine.model.config, slices, 1, 1, 1, dtype_bytes)
        session, frames = session_bytes(run)
        print(f"dry run: feature store {held} B held, {want.feature_store} B estimated; "
              f"session {session} B over {frames} slices, "
              f"{want.per_tracked_slice * frames} B estimated")
        if held != want.feature_store:
            problems.append(f"feature store: {held} B held, {want.feature_store} estimated")
        if session != want.per_tracked_slice * frames:
            problems.append(f"session: {session} B held, "
                            f"{want.per_tracked_slice * frames} estimated")
    for problem in problems:
        print(f"MISMATCH {problem}", file=sys.stderr)
    if dry and not problems:
        print("dry run: arithmetic checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
