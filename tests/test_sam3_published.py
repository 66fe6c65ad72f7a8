"""A checkpoint as Onco-Seg publishes it, layered over a base folder, read without running code.

The checkpoint is a Lightning ``.ckpt`` of Meta's image model
(``tests/sam3_lightning.py``) made from the tiny random SAM3 of
``tests/sam3_tiny.py``; the base folder is that model's own folder.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from oncoseg_node.cli import main  # noqa: E402
from oncoseg_node.config import Sam3Config  # noqa: E402
from oncoseg_node.contouring.engines.sam3.checkpoint import layer_checkpoint  # noqa: E402
from oncoseg_node.contouring.engines.sam3.convert import meta_to_transformers  # noqa: E402
from oncoseg_node.contouring.engines.sam3.engine import Sam3Engine  # noqa: E402
from oncoseg_node.contouring.engines.sam3.safe_read import read_pickled  # noqa: E402
from oncoseg_node.errors import EngineError  # noqa: E402
from tests.sam3_cases import STRUCTURES, one_thread, phantom, tiny_dir  # noqa: E402, F401
from tests.sam3_lightning import (  # noqa: E402
    COPIED_HEAD,
    ONCO_SEG_HPARAMS,
    PLAIN_HEAD,
    meta_image_state,
    onco_seg_style,
    write_lightning_checkpoint,
)


@pytest.fixture(scope="module")
def meta_dir(tiny_dir: Path, tmp_path_factory) -> Path:
    from tests.sam3_meta import write_meta_checkpoint

    return write_meta_checkpoint(tiny_dir, tmp_path_factory.mktemp("meta") / "sam3-meta")


@pytest.fixture(scope="module")
def states(meta_dir: Path) -> tuple[dict, dict]:
    """(peft-wrapped, merged by hand) Meta image-model states of the tiny model."""
    return onco_seg_style(meta_image_state(meta_dir))


@pytest.fixture(scope="module")
def onco_ckpt(states, tmp_path_factory) -> Path:
    return write_lightning_checkpoint(tmp_path_factory.mktemp("onco") / "last.ckpt", states[0],
                                      hyper_parameters=ONCO_SEG_HPARAMS)


class RunsCode:
    """Unpickling this would call ``call(argument)``: it must never happen."""

    def __init__(self, call, argument: str) -> None:
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("call", ["os.system", "builtins.exec"])
def test_a_checkpoint_carrying_a_callable_is_refused_and_never_run(
        states, tiny_dir: Path, tmp_path: Path, call: str):
    marker = tmp_path / "ran"
    payload = (RunsCode(os.system, f"touch {marker}") if call == "os.system"
               else RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').write('x')"))
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", states[0],
                                      hyper_parameters=ONCO_SEG_HPARAMS,
                                      extra={"callbacks": {"x": payload}})
    name = "posix.system" if call == "os.system" else "builtins.exec"
    with pytest.raises(EngineError, match=f"{ckpt}: refused.*{name}"):
        read_pickled(ckpt)
    config = Sam3Config(base_dir=tiny_dir, checkpoint=ckpt, device="cpu", dtype="float32")
    with pytest.raises(EngineError, match=name):
        Sam3Engine.from_config(config)
    assert main(["weights", "check", str(ckpt), "--base", str(tiny_dir)]) == 2
    assert not marker.exists()


def test_lightning_hyper_parameters_are_read_as_plain_dicts(onco_ckpt: Path):
    loaded = read_pickled(onco_ckpt)
    assert type(loaded["hyper_parameters"]) is dict
    assert type(loaded["hyper_parameters"]["lora"]) is dict
    assert loaded["hyper_parameters"]["lora"]["lora_alpha"] == 8
    assert loaded["epoch"] == 3 and loaded["global_step"] == 120


def _expected(merged: dict) -> dict:
    return meta_to_transformers({"detector." + k: v for k, v in merged.items()})


def test_peft_wrapped_lightning_checkpoint_lands_merged_over_the_base(
        states, onco_ckpt: Path, tiny_dir: Path):
    model, tokenizer, report = layer_checkpoint(tiny_dir, onco_ckpt)
    assert model is not None and tokenizer is not None, report.problems
    got = model.state_dict()
    want = _expected(states[1])
    assert set(want) <= set(got)
    wrong = [k for k, v in want.items() if not torch.allclose(got[k], v, atol=1e-6)]
    assert wrong == []
    # the trained heads are the trained copies, not the originals
    head = "detector_model.dot_product_scoring.query_proj.weight"
    original = states[0][f"{COPIED_HEAD}.original_module.weight"]
    assert torch.equal(got[head], states[0][f"{COPIED_HEAD}.modules_to_save.default.weight"])
    assert not torch.equal(got[head], original)
    assert torch.equal(got["detector_model.mask_decoder.instance_projection.weight"],
                       states[1][f"{PLAIN_HEAD}.weight"])
    # the tracker comes from the base folder, untouched
    from transformers import Sam3VideoModel

    base = Sam3VideoModel.from_pretrained(tiny_dir, local_files_only=True).state_dict()
    tracker = [k for k in got if k.startswith("tracker_model.")]
    assert tracker and all(torch.equal(got[k], base[k]) for k in tracker)
    lora = report.lora
    assert (lora.wrapped, lora.rank, lora.alpha, lora.targets, lora.modules) == (
        True, 4, 8.0, ["proj", "qkv"], 5)
    assert lora.alpha_source == "hyper_parameters.lora.lora_alpha"
    assert report.layout == "Meta's sam3 image model (no detector. prefix)"
    assert report.groups["tracker"].from_base > 0 and report.groups["tracker"].from_checkpoint == 0
    assert all(c.missing == 0 and c.mismatched == 0 for c in report.groups.values())
    assert report.groups["vision backbone (ViT)"].from_checkpoint > 0
    assert report.from_base == ["tracker"]


def test_a_checkpoint_merged_before_saving_gives_the_same_model(
        states, onco_ckpt: Path, tiny_dir: Path, tmp_path: Path):
    merged = write_lightning_checkpoint(tmp_path / "merged.ckpt", states[1], peft_model=False)
    a, _, report = layer_checkpoint(tiny_dir, merged)
    b, _, _ = layer_checkpoint(tiny_dir, onco_ckpt)
    assert a is not None and b is not None
    assert not report.lora.wrapped and report.lora.rank is None
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_lora_alpha_from_config_when_the_checkpoint_lacks_it(states, tiny_dir: Path,
                                                             tmp_path: Path):
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", states[0],
                                      hyper_parameters={"learning_rate": 1e-4})
    config = Sam3Config(base_dir=tiny_dir, checkpoint=ckpt, device="cpu", dtype="float32")
    with pytest.raises(EngineError, match="engine.sam3.lora_alpha: not set.*r=4"):
        Sam3Engine.from_config(config)
    model, _, report = layer_checkpoint(tiny_dir, ckpt, lora_alpha=8.0)
    assert model is not None and report.lora.alpha_source == "engine.sam3.lora_alpha"
    want = _expected(states[1])
    got = model.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())


def test_a_configured_alpha_that_contradicts_the_checkpoint_is_refused(onco_ckpt: Path,
                                                                       tiny_dir: Path):
    model, _, report = layer_checkpoint(tiny_dir, onco_ckpt, lora_alpha=16.0)
    assert model is None
    assert "engine.sam3.lora_alpha: 16.0 but the checkpoint's" in report.problems[0]


def test_a_part_neither_checkpoint_nor_base_supplies_is_refused_by_name(
        onco_ckpt: Path, tiny_dir: Path, tmp_path: Path):
    bare = tmp_path / "base-without-weights"
    shutil.copytree(tiny_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    model, _, report = layer_checkpoint(bare, onco_ckpt)
    assert model is None
    assert report.groups["tracker"].missing > 0
    assert report.problems and "randomly initialised parts: tracker" in report.problems[-1]
    config = Sam3Config(base_dir=bare, checkpoint=onco_ckpt, device="cpu", dtype="float32")
    with pytest.raises(EngineError, match="randomly initialised parts: tracker"):
        Sam3Engine.from_config(config)


def test_a_tensor_of_the_wrong_shape_is_refused(states, tiny_dir: Path, tmp_path: Path):
    state = dict(states[1])
    state[f"{PLAIN_HEAD}.weight"] = torch.zeros(3, 3)
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", state, peft_model=False)
    model, _, report = layer_checkpoint(tiny_dir, ckpt)
    assert model is None and report.groups["mask decoder"].mismatched == 1
    assert "mask decoder: detector_model.mask_decoder.instance_projection.weight" in \
        report.problems[0]


def test_engine_runs_on_the_published_checkpoint(onco_ckpt: Path, tiny_dir: Path):
    config = Sam3Config(base_dir=tiny_dir, checkpoint=onco_ckpt, device="cpu", dtype="float32",
                        batch_size=4, score_threshold=0.0)
    engine = Sam3Engine.from_config(config)
    assert engine.description.startswith(f"SAM3 last.ckpt over {tiny_dir.name} sha256:")
    results = engine.segment(phantom(), STRUCTURES[:1])
    assert len(results) == 1
    plain = Sam3Engine.from_config(Sam3Config(base_dir=tiny_dir, device="cpu", dtype="float32"))
    assert plain.description.startswith(f"SAM3 {tiny_dir.name} sha256:")


def test_weights_check_reports_what_the_checkpoint_holds(onco_ckpt: Path, tiny_dir: Path,
                                                         capsys):
    assert main(["weights", "check", str(onco_ckpt), "--base", str(tiny_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["would_start"] is True and report["problems"] == []
    assert report["lora"]["rank"] == 4 and report["lora"]["alpha"] == 8.0
    assert report["lora"]["targets"] == ["proj", "qkv"] and report["lora"]["wrapped"] is True
    assert report["groups"]["DETR decoder"]["missing"] == 0
    assert report["from_base"] == ["tracker"]
    assert [f["role"] for f in report["files"]] == ["base", "checkpoint"]
    assert all(len(f["sha256"]) == 64 for f in report["files"])
    assert report["dtypes"] == ["float32"]
    assert main(["weights", "check", str(onco_ckpt), "--base", str(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "r=4 alpha=8 (hyper_parameters.lora.lora_alpha) on proj, qkv" in text
    assert text.rstrip().endswith("would start: yes")
    assert main(["weights", "check", str(onco_ckpt)]) == 2
    assert "no base folder (--base)" in capsys.readouterr().out
    assert main(["weights", "check", str(tiny_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["from_base"]


def test_weights_check_on_an_adapter_folder_over_a_base(tiny_dir: Path, tmp_path: Path, capsys):
    from tests.sam3_cases import make_adapter

    adapter = make_adapter(tiny_dir, tmp_path / "lora")
    assert main(["weights", "check", str(adapter), "--base", str(tiny_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["lora"]["rank"], report["lora"]["alpha"]) == (16, 32)
    assert report["files"][-1]["role"] == "adapter"
    assert main(["weights", "check", str(adapter)]) == 2
    assert "needs --base" in capsys.readouterr().out


def test_config_takes_base_dir_checkpoint_and_lora_alpha(tmp_path: Path, onco_ckpt: Path,
                                                         tiny_dir: Path):
    from oncoseg_node.config import load_config
    from oncoseg_node.errors import ConfigError

    repo = Path(__file__).resolve().parent.parent
    head = f"state_dir: state\nprotocols: {repo / 'config' / 'protocols.yaml'}\n"
    path = tmp_path / "node.yaml"
    path.write_text(head + f"engine: {{name: sam3, sam3: {{base_dir: {tiny_dir}, "
                    f"checkpoint: {onco_ckpt}, lora_alpha: 8}}}}\n")
    sam3 = load_config(path).engine.sam3
    assert (sam3.base_dir, sam3.checkpoint, sam3.lora_alpha) == (tiny_dir, onco_ckpt, 8)
    path.write_text(head + f"engine: {{name: sam3, sam3: {{base_dir: {tiny_dir}, "
                    f"model_dir: {tiny_dir}, lora_alpha: -1}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = "\n".join(info.value.problems)
    assert "engine.sam3.base_dir: set together with model_dir" in problems
    assert "engine.sam3.lora_alpha: -1" in problems
    path.write_text(head + "engine: {name: sam3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any("engine.sam3.base_dir: required" in p for p in info.value.problems)


@pytest.mark.parametrize("layout", ["meta", "transformers"])
def test_a_whole_model_file_over_a_base_without_weights(meta_dir: Path, tiny_dir: Path,
                                                        tmp_path: Path, layout: str):
    """Meta's sam3.pt or transformers' safetensors as the checkpoint: nothing left to the base."""
    bare = tmp_path / "base-without-weights"
    shutil.copytree(tiny_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    ckpt = meta_dir / "sam3.pt" if layout == "meta" else tiny_dir / "model.safetensors"
    model, _, report = layer_checkpoint(bare, ckpt)
    assert model is not None, report.problems
    assert report.from_base == [] and not report.base_has_weights
    assert all(c.missing == 0 and c.unused == 0 for c in report.groups.values())
    from transformers import Sam3VideoModel

    want = Sam3VideoModel.from_pretrained(tiny_dir, local_files_only=True).state_dict()
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_model_under_any_attribute_of_the_lightning_module(states, tiny_dir: Path,
                                                               tmp_path: Path):
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", states[0],
                                      hyper_parameters=ONCO_SEG_HPARAMS, holder="sam3",
                                      other_tensors={"criterion.class_weights": torch.ones(2)})
    model, _, report = layer_checkpoint(tiny_dir, ckpt)
    assert model is not None, report.problems
    assert report.lora.modules == 5 and report.groups["other"].unused == 1
    got = model.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in _expected(states[1]).items())


def test_a_lightning_checkpoint_in_a_model_dir_says_where_it_belongs(
        onco_ckpt: Path, tiny_dir: Path, tmp_path: Path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(onco_ckpt, folder / "sam3.pt")
    config = Sam3Config(model_dir=folder, device="cpu", dtype="float32")
    with pytest.raises(EngineError, match="a PyTorch Lightning checkpoint: name it in "
                                          "engine.sam3.checkpoint"):
        Sam3Engine.from_config(config)
