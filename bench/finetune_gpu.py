"""LoRA fine-tuning speed and memory at full size, beside inference of the same model.

Builds the full-size SAM3 (random weights: speed and memory do not depend on
them) in bfloat16 on CUDA, wraps its detector with the engine's LoRA exactly
as ``oncoseg-node finetune`` does (ViT gradient checkpointing on), and times
optimiser steps on synthetic 512 x 512 CT slices of the phantom. The peer,
measured in the same run on the same device and inputs, is the detector's
inference forward pass: the ratio says how many inference passes one
training sample costs. Peak GPU memory is torch's own allocator peak.

    .venv/bin/python bench/finetune_gpu.py                # CUDA, full size, bf16
    .venv/bin/python bench/finetune_gpu.py --dry-run      # CPU, tiny model: checks the arithmetic
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from oncoseg_node.commissioning.finetune.cases import TrainingCase  # noqa: E402
from oncoseg_node.commissioning.finetune.samples import concept_of, pixels  # noqa: E402
from oncoseg_node.commissioning.finetune.trainer import FineTuner, TrainSettings  # noqa: E402
from oncoseg_node.commissioning.phantom import make_phantom  # noqa: E402
from oncoseg_node.contouring.protocols import Structure  # noqa: E402

HEART = Structure("Heart", (255, 0, 0), engine="sam3", concepts=("heart",))


def build(dry_run: bool):  # -> (model, tokenizer, device, dtype, rows)
    from tests.sam3_tiny import build_tiny_sam3, tiny_tokenizer

    if dry_run:
        from oncoseg_node.contouring.engines.sam3.load import load_base

        model, tokenizer = load_base(build_tiny_sam3(Path(tempfile.mkdtemp()) / "tiny"))
        return model, tokenizer, torch.device("cpu"), torch.float32, 64
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    from transformers import Sam3VideoConfig, Sam3VideoModel

    torch.manual_seed(0)
    model = Sam3VideoModel(Sam3VideoConfig())
    return model, tiny_tokenizer(), torch.device("cuda"), torch.bfloat16, 512


def timed(fn, repeats: int, device: torch.device) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer, device, dtype, rows = build(args.dry_run)
    phantom = make_phantom(slices=4, rows=rows, columns=rows, pixel_spacing=(500 / rows,) * 2)
    case = TrainingCase("bench", "P", phantom.volume, {"Heart": phantom.truth["Heart"]}, "")
    settings = TrainSettings(accumulate=args.accumulate, checkpoint_every=10**9)
    tuner = FineTuner(model, tokenizer, {"Heart": HEART}, [case], settings, device, dtype)
    params = sum(p.numel() for p in tuner.peft.parameters())
    lora = sum(p.numel() for p in tuner.trainable.values())
    print(f"SAM3 detector {params / 1e6:.1f}M parameters, LoRA {lora / 1e6:.3f}M trainable, "
          f"{tuner.image_size} px, {dtype} on {device}, accumulate {args.accumulate}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(tuner.train_step, args.steps, device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ids, attn = tuner._prompt(concept_of(HEART))
    image = pixels(case, 0, tuner.image_size, device, dtype)

    def inference() -> None:
        with torch.no_grad():
            tuner.peft.eval()
            tuner.peft(pixel_values=image, input_ids=ids, attention_mask=attn)

    infer_s = timed(inference, args.steps, device)
    sample_s = step_s / args.accumulate
    ratio = sample_s / infer_s
    # the arithmetic, checked: samples/s is accumulate over step time; the ratio is
    # one training sample against one inference pass of the same input
    assert abs(args.accumulate / step_s - 1 / sample_s) < 1e-9 * (1 / sample_s)
    assert tuner.step == args.steps + 1  # the warm-up step counts as a step
    print(f"training: {1 / step_s:.3f} steps/s, {1 / sample_s:.2f} samples/s "
          f"({sample_s * 1e3:.1f} ms a sample)")
    print(f"peer, inference forward of the same detector: {infer_s * 1e3:.1f} ms a slice")
    print(f"ratio: one training sample = {ratio:.2f} inference passes")
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS (CPU dry run)"
    print(f"{memory}: {peak / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
