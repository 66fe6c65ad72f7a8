"""LoRA fine-tuning on a tiny, randomly initialised SAM3 and phantom-derived cases.

The base model is random, so nothing here says the adapter makes better
contours: these tests check that training lowers the loss it optimises, that
a resumed run equals an uninterrupted one, that the split keeps each patient
on one side, that unusable cases are skipped with their reason, and that the
adapter written is the one the engine loads and shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the sam3 extra is part of the test install")

from oncoseg_node.commissioning.finetune.cases import (  # noqa: E402
    TrainingCase,
    load_cases,
    split_by_patient,
)
from oncoseg_node.commissioning.phantom import make_phantom, write_phantom  # noqa: E402
from oncoseg_node.rtstruct.profiles import get_profile  # noqa: E402
from oncoseg_node.rtstruct.selfcheck import save_verified  # noqa: E402
from oncoseg_node.rtstruct.writer import GenerationInfo, RoiMask, build_rtstruct  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.sam3_tiny import build_tiny_sam3  # noqa: E402

PROTOCOLS = """
structures:
  Heart: {color: [255, 0, 0], type: ORGAN, engine: sam3, concepts: [heart]}
protocols: [{name: heart-sam3, priority: 1, structures: [Heart]}]
fallback: heart-sam3
"""
SMALL = {"slices": 8, "rows": 64, "columns": 64, "pixel_spacing": (6.0, 6.0)}


def write_case(root: Path, name: str, patient: str, seed: int, rois: dict[str, str],
               reference_of: str | None = None) -> Path:
    """A case folder: phantom CT in ct/ and its truth as reference.dcm (names as given)."""
    folder = root / name
    phantom = write_phantom(folder / "ct", patient_id=patient, seed=seed, **SMALL)
    volume = phantom.volume
    if reference_of is not None:  # the structure set of another patient's series
        volume = make_phantom(patient_id=reference_of, seed=seed + 100, **SMALL).volume
    masks = [RoiMask(label, (255, 0, 0), "ORGAN", phantom.truth[truth])
             for label, truth in rois.items()]
    info = GenerationInfo("manual", "approved", "clinic", "0")
    save_verified(build_rtstruct(volume, masks, info, get_profile("generic")),
                  folder / "reference.dcm", volume, get_profile("generic"))
    return folder


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    cases = root / "cases"
    write_case(cases, "a", "P1", 1, {"HEART": "Heart"})
    write_case(cases, "b", "P2", 2, {"HEART": "Heart"})
    write_case(cases, "c", "P2", 3, {"HEART": "Heart"})  # same patient, second series
    write_case(cases, "d", "P3", 4, {"HEART": "Heart"})
    write_case(cases, "other-series", "P4", 5, {"HEART": "Heart"}, reference_of="P9")
    write_case(cases, "no-match", "P5", 6, {"Spleen": "Bones"})
    (root / "aliases.yaml").write_text("HEART: Heart\n")
    (root / "protocols.yaml").write_text(PROTOCOLS)
    model = build_tiny_sam3(root / "tiny-sam3")
    config = write_config(root, protocols=str(root / "protocols.yaml"),
                          engine={"name": "sam3", "sam3": {
                              "model_dir": str(model), "device": "cpu", "dtype": "float32",
                              "batch_size": 4, "score_threshold": 0.0}})
    return root, config


def finetune(material, out: Path, *extra: str) -> subprocess.CompletedProcess:
    root, config = material
    command = [sys.executable, "-m", "oncoseg_node.cli", "finetune", "--config", str(config),
               "--cases", str(root / "cases"), "--alias-map", str(root / "aliases.yaml"),
               "--out", str(out), "--learning-rate", "1e-2", "--accumulate", "2",
               "--checkpoint-every", "6", "--validation-fraction", "0.34", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_unusable_cases_are_skipped_with_their_reason(material):
    root, _ = material
    cases, skipped = load_cases(root / "cases", ["Heart"], {"HEART": "Heart"})
    reasons = {s.name: s.reason for s in skipped}
    assert sorted(c.name for c in cases) == ["a", "b", "c", "d"]
    assert "structure set references" in reasons["other-series"]
    assert "not the CT series" in reasons["other-series"]
    assert reasons["no-match"].startswith("no structure matches Heart")


def test_a_patient_is_never_in_both_splits():
    volume = make_phantom(slices=2, rows=16, columns=16).volume
    cases = [TrainingCase(f"c{i}", f"P{i % 7}", volume, {}, "") for i in range(40)]
    for seed in range(20):
        train, validation = split_by_patient(cases, 0.3, seed)
        assert train and validation
        assert not {c.patient_id for c in train} & {c.patient_id for c in validation}
        assert len(train) + len(validation) == len(cases)


def test_training_lowers_the_loss_resumes_exactly_and_the_engine_loads_the_adapter(
        material, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = finetune(material, straight, "--steps", "24")
    assert "skipped other-series: structure set references" in done.stdout
    assert "skipped no-match: no structure matches" in done.stdout
    steps = [json.loads(line) for line in done.stdout.splitlines()
             if line.startswith('{"event": "finetune_step"')]
    assert [s["step"] for s in steps] == list(range(1, 25))  # JSON lines off a terminal
    provenance = json.loads((straight / "provenance.json").read_text())
    figures = provenance["validation"]
    assert figures["training_loss_end"] < figures["training_loss_start"]
    train = set(provenance["cases"]["train_patients"])
    held_out = set(provenance["cases"]["validation_patients"])
    assert held_out and not train & held_out
    assert provenance["steps"] == 24 and provenance["structures"] == ["Heart"]
    assert set(provenance["cases"]["skipped"]) == {"other-series", "no-match"}
    assert json.loads((straight / "adapter_config.json").read_text())["r"] == 16
    assert provenance["base_model"]["setting"] == "engine.sam3.model_dir"
    assert provenance["base_model"]["layout"] == "transformers Sam3VideoModel"

    # stopped after 12 steps, then resumed to 24: the same weights as never stopping
    finetune(material, stopped, "--steps", "12")
    resumed = finetune(material, stopped, "--steps", "24", "--resume")
    assert "resumed at step 12" in resumed.stdout
    a, b = adapter_tensors(straight), adapter_tensors(stopped)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)

    report = (straight / "report.csv").read_text().splitlines()
    assert report[0].startswith("case,structure,dice_base")
    assert any(",Heart," in line for line in report[1:])
    assert "validation patients" in (straight / "report.html").read_text()

    engines_see_the_adapter(material, straight)


def engines_see_the_adapter(material, adapter: Path) -> None:
    """The adapter merges in the engine, changes its masks and is named in each ROI."""
    from dataclasses import replace

    from oncoseg_node.config import load_config
    from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine
    from oncoseg_node.contouring.protocols import load_protocols

    _, config_path = material
    config = load_config(config_path)
    structure = load_protocols(config.protocols).library["Heart"]
    base = Sam3Engine.from_config(config.engine.sam3)
    adapted = Sam3Engine.from_config(replace(config.engine.sam3, adapter_dir=adapter))
    volume = make_phantom(patient_id="P7", seed=9, **SMALL).volume
    (ours,) = base.segment(volume, [structure])
    (theirs,) = adapted.segment(volume, [structure])
    as_array = [np.zeros(volume.shape, bool) if r.mask is None else r.mask
                for r in (ours, theirs)]
    assert not np.array_equal(*as_array)
    info = GenerationInfo("sam3", adapted.description, "heart-sam3", "0123456789ab",
                          models={"sam3": adapted.description},
                          short_models={"sam3": adapted.short_id})
    assert adapted.adapter is not None
    assert f"lora {adapted.adapter.sha256[:8]}" in info.describe("sam3")
    assert len(info.describe("sam3")) <= 64


@pytest.fixture
def one_thread():
    """The tiny model's ops lose to thread contention on a shared CPU (seconds, not tens)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trains_over_a_checkpoint_layered_on_base_dir_and_names_what_it_trained_over(
        material, tmp_path, one_thread):
    """engine.sam3.base_dir + checkpoint (an Onco-Seg-style Lightning file), as the engine
    loads them; the adapter is accepted by adapter_dir and by ``weights check``."""
    import io
    from dataclasses import replace

    from oncoseg_node.commissioning.finetune.command import (
        FinetuneRequest,
        describe_weights,
        load_weights,
        run_finetune,
    )
    from oncoseg_node.commissioning.finetune.report import SideBySide, to_html
    from oncoseg_node.commissioning.finetune.trainer import TrainSettings
    from oncoseg_node.config import load_config
    from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine
    from oncoseg_node.contouring.engines.sam3.load import sha256_files
    from oncoseg_node.contouring.engines.sam3.weights_check import check, render_text
    from oncoseg_node.contouring.protocols import load_protocols
    from tests.sam3_lightning import (
        ONCO_SEG_HPARAMS,
        meta_image_state,
        onco_seg_style,
        write_lightning_checkpoint,
    )
    from tests.sam3_meta import write_meta_checkpoint

    root, _ = material
    base = root / "tiny-sam3"
    wrapped, _ = onco_seg_style(meta_image_state(write_meta_checkpoint(base, tmp_path / "meta")))
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", wrapped,
                                      hyper_parameters=ONCO_SEG_HPARAMS)
    config = load_config(write_config(
        tmp_path, protocols=str(root / "protocols.yaml"),
        engine={"name": "sam3", "sam3": {"base_dir": str(base), "checkpoint": str(ckpt),
                                         "device": "cpu", "dtype": "float32",
                                         "batch_size": 4, "score_threshold": 0.0}}))
    out, printed = tmp_path / "adapter", io.StringIO()
    provenance = run_finetune(config, FinetuneRequest(
        cases=root / "cases", out=out, aliases={"HEART": "Heart"}, steps=2,
        validation_fraction=0.0,
        settings=TrainSettings(steps=2, accumulate=1, checkpoint_every=2, learning_rate=1e-2)),
        printed)
    weights = provenance["base_model"]
    assert weights["setting"] == "engine.sam3.base_dir"
    assert weights["checkpoint"]["layout"] == "Meta's sam3 image model (no detector. prefix)"
    assert weights["checkpoint"]["lora"]["rank"] == 4 and weights["checkpoint"]["lora"][
        "alpha"] == 8
    roles = {f["role"]: f for f in weights["files"]}
    assert roles["checkpoint"]["sha256"] == sha256_files([ckpt])
    assert roles["base"]["sha256"] == sha256_files([base / "model.safetensors"])
    assert f"sha256 {sha256_files([ckpt])}" in printed.getvalue()
    assert "Meta's sam3 image model" in printed.getvalue()
    written = json.loads((out / "provenance.json").read_text())
    assert written["base_model"] == json.loads(json.dumps(weights))
    page = to_html(SideBySide([], []), "t", describe_weights(weights))
    assert f"sha256 {sha256_files([ckpt])}" in page and f"{ckpt} (Meta&#x27;s sam3" in page

    # the engine over base + checkpoint takes the adapter; weights check accepts the folder
    engine = Sam3Engine.from_config(replace(config.engine.sam3, adapter_dir=out))
    assert engine.adapter is not None and engine.adapter.rank == 16
    assert engine.weights_sha256 == weights["sha256"]  # the model it was trained over
    heart = load_protocols(config.protocols).library["Heart"]
    (result,) = engine.segment(make_phantom(patient_id="P7", seed=9, **SMALL).volume, [heart])
    assert result.score is not None
    report = check(out, base)
    assert report["would_start"], report["problems"]
    assert report["lora"]["rank"] == 16
    over = check(out, base, checkpoint=ckpt)  # the adapter over the model it was trained on
    assert over["would_start"], over["problems"]
    assert (over["lora"]["rank"], over["checkpoint"]["lora"]["rank"]) == (16, 4)
    assert {f["role"] for f in over["files"]} == {"base", "checkpoint", "adapter"}
    assert "under" in render_text(over) and "would start: yes" in render_text(over)

    # base_dir alone (no checkpoint) is the base the engine reads too
    _, _, plain = load_weights(replace(config.engine.sam3, checkpoint=None))
    assert (plain["setting"], plain["layout"], plain["checkpoint"]) == (
        "engine.sam3.base_dir", "transformers Sam3VideoModel", None)
    assert plain["sha256"] == sha256_files([base / "model.safetensors"])
