"""SAM3 engine throughput at full size: slice encoding, prompting and tracking, vs device peak.

Builds the full-size SAM3 (860M parameters, 1008 px input) with random
weights - speed does not depend on the weights - and times the three parts
of the engine's path on a synthetic 512 x 512 CT:

- feature extraction: ViT + necks per slice, done once per series (slices/s);
- prompting: the detector on cached features, once per structure concept and
  slice ((structure, slice) prompts/s);
- tracking: one tracker step per structure and slice (steps/s).

FLOPs are counted by torch's FlopCounterMode (matmul, conv, attention) in
the timed run itself, so achieved FLOP/s is exact for the counted ops and
conservative overall. The device peak is printed with how it was estimated.

    .venv/bin/python bench/sam3_throughput.py                 # CPU: 1 slice, under 5 minutes
    .venv/bin/python bench/sam3_throughput.py --device cuda --dtype bfloat16 --slices 32
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from oncoseg_node.config import Sam3Config  # noqa: E402
from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine, _Prompt  # noqa: E402
from oncoseg_node.contouring.engines.sam3.preprocess import SliceFrame, window_to_unit  # noqa: E402
from oncoseg_node.contouring.engines.sam3.track import FeatureStore, SliceSession  # noqa: E402
from oncoseg_node.contouring.volume import Volume  # noqa: E402

# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, FLOP/s.
GPU_PEAKS = {
    "H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12},
}


def cpu_peak(dtype: str) -> tuple[float, str]:
    """Theoretical fp32 peak of the cores this process may use, and how it was derived.

    cores x clock x FLOP/cycle, with FLOP/cycle = SIMD fp32 lanes x 2 (FMA) x 2
    FMA units (typical of server cores; an assumption, not read from the CPU).
    bfloat16 is not counted faster: without AMX, CPUs compute it at fp32 rate.
    """
    cores = len(os.sched_getaffinity(0))
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if info else set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    clock = max(mhz) * 1e6 if mhz else 2.0e9
    per_cycle = lanes * 2 * 2
    amx = ""
    if "amx_bf16" in flags and dtype != "float32":
        amx = " (AMX present: bf16 could go faster)"
    how = (f"{cores} cores x {clock / 1e9:.2f} GHz (cpu MHz in /proc/cpuinfo) x {per_cycle} "
           f"FLOP/cycle ({lanes} fp32 lanes {'AVX-512' if lanes == 16 else 'AVX2'} x FMA x 2 "
           f"units, assumed){amx}; {model.group(1).strip() if model else platform.processor()}")
    return cores * clock * per_cycle, how


def gpu_peak(device: torch.device, dtype: str) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if all(part in name for part in key.split()):
            return peaks[dtype], f"{name}: data-sheet dense {dtype} peak ({key})"
    return None, f"{name}: no data-sheet peak known to this script"


def measured_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large GEMM: what this device really sustains for the dominant op."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    reps = 2 if device.type == "cpu" else 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phantom(slices: int, size: int) -> Volume:
    rng = np.random.default_rng(0)
    hu = rng.normal(0.0, 300.0, (slices, size, size)).astype(np.float32)
    return Volume(hu=hu, positions=np.array([[0.0, 0.0, 2.5 * k] for k in range(slices)]),
                  row_direction=np.array([1.0, 0, 0]), col_direction=np.array([0, 1.0, 0]),
                  pixel_spacing=(1.0, 1.0), sop_instance_uids=tuple(map(str, range(slices))),
                  sop_class_uid="", study_instance_uid="", series_instance_uid="",
                  frame_of_reference_uid="", patient_position="HFS", header=Dataset())


def timed(device: torch.device, fn):
    """Run ``fn`` once under a FLOP counter; return (seconds, FLOPs, result)."""
    counter = FlopCounterMode(display=False)
    sync(device)
    start = time.perf_counter()
    with counter:
        result = fn()
    sync(device)
    return time.perf_counter() - start, counter.get_total_flops(), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--slices", type=int, default=None,
                        help="default: 1 on CPU (about a minute each), 16 on GPU")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--track-steps", type=int, default=1)
    parser.add_argument("--ct-size", type=int, default=512)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.slices = args.slices or (16 if on_gpu else 1)
    args.track_steps = max(1, args.track_steps)

    from transformers import Sam3VideoConfig, Sam3VideoModel

    from tests.sam3_tiny import tiny_tokenizer

    started = time.perf_counter()
    torch.manual_seed(0)
    model = Sam3VideoModel(Sam3VideoConfig())
    params = sum(p.numel() for p in model.parameters())
    config = Sam3Config(device=args.device, dtype=dtype, batch_size=args.slices)
    engine = Sam3Engine(model, tiny_tokenizer(), config, weights_sha256="random")
    device = engine.device
    print(f"full-size SAM3, random weights: {params / 1e6:.0f}M parameters, "
          f"{engine.image_size} px input, {dtype} on {device} "
          f"(built in {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads)")

    volume = phantom(args.slices, args.ct_size)
    frame = SliceFrame(args.ct_size, args.ct_size, engine.image_size)
    # one spare slot: the tracker needs a frame beyond the seed even when one slice is encoded
    store = FeatureStore(args.slices + 1, device)
    with torch.inference_mode():
        pixels = frame.to_model(window_to_unit(volume.hu), device, engine.dtype)
        if device.type == "cuda":  # warm-up: kernel selection, allocator (a CPU needs none,
            engine._vision(pixels[:1])  # and one full-size slice costs it about a minute)
            sync(device)

        def encode():
            vision = engine._vision(pixels)
            feats, pos = engine.model.get_vision_features_for_tracker(vision)
            store.put(0, feats, pos)
            return vision, feats, pos

        enc_s, enc_flops, (vision, feats, pos) = timed(device, encode)
        store.put(args.slices, [f[:, :1] for f in feats], pos)
        prompts = [_Prompt((f"organ {i}", None), f"organ {i}") for i in range(args.structures)]
        hits = {p.key: [[] for _ in range(args.slices)] for p in prompts}
        best = {p.key: np.zeros(args.slices) for p in prompts}
        rows = list(range(args.slices))
        for p in prompts:
            engine._text(p.concept)  # text features are cached across series: not timed

        def prompt_all():
            for p in prompts:
                engine._detect(vision, rows, 0, frame, p, False, hits[p.key], best[p.key])

        det_s, det_flops, _ = timed(device, prompt_all)
        session = SliceSession(store, device, engine.dtype)
        low = 4 * engine.image_size // 14
        seed = torch.zeros(1, 1, low, low)
        seed[..., low // 3: low // 2, low // 3: low // 2] = 1
        session.add_mask_inputs(session.obj_id_to_idx(0), 0, seed)
        session.obj_with_new_inputs = [0]
        engine.model.tracker_model(inference_session=session, frame_idx=0)
        steps = [1 + i % args.slices for i in range(args.track_steps)]

        def track():
            for z in steps:
                engine.model.tracker_model(inference_session=session, frame_idx=z)

        trk_s, trk_flops, _ = timed(device, track)

    if device.type == "cuda":
        peak, how = gpu_peak(device, dtype)
    else:
        peak, how = cpu_peak(dtype)
    gemm = measured_matmul_peak(device, engine.dtype)
    print(f"device peak: {peak / 1e12:.2f} TFLOP/s - {how}" if peak else f"device peak: {how}")
    print(f"measured {'2048' if device.type == 'cpu' else '8192'}^3 GEMM: "
          f"{gemm / 1e12:.2f} TFLOP/s")
    rows_out = [
        ("feature extraction", args.slices / enc_s, "slices/s", enc_s, enc_flops),
        ("prompting (detector)", args.structures * args.slices / det_s,
         "structure-slices/s", det_s, det_flops),
        ("tracking", len(steps) / trk_s, "steps/s", trk_s, trk_flops),
    ]
    for name, rate, unit, seconds, flops in rows_out:
        achieved = flops / seconds
        share = f", {achieved / peak:.1%} of peak" if peak else ""
        print(f"{name:22s} {rate:9.3f} {unit:18s} {seconds:7.1f} s  "
              f"{flops / 1e12:7.2f} TFLOP  {achieved / 1e12:6.3f} TFLOP/s{share}")
    per_slice = enc_s / args.slices
    per_prompt = det_s / (args.structures * args.slices)
    per_step = trk_s / max(1, len(steps))
    # a structure is prompted on every slice and tracked over about a third of the series
    estimate = 150 * per_slice + 20 * 150 * per_prompt + 20 * 50 * per_step
    print(f"estimate for a 150-slice CT with 20 structures: {estimate / 60:.1f} min "
          f"(150 encodings, 3000 prompts, ~1000 tracker steps)")


if __name__ == "__main__":
    main()
