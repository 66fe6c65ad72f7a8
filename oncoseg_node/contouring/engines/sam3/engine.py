"""SAM3 engine: text-prompted organs-at-risk through a (LoRA-adapted) detector-tracker.

Imported only when ``engine.name`` is ``sam3`` (torch, transformers and peft
load here). Onco-Seg deployment pattern B: each structure is prompted by its
text concepts; SAM3's detector finds it on the slices and its tracker carries
it through the volume, slices treated as video frames.

Per series, every slice is encoded once (the ViT, the expensive part) in
Onco-Seg's CT window: a structure's ``hu_window`` shapes its box prompts,
never what the model sees; only an explicit ``model_window`` adds another
pass. The detector runs every concept of the protocol on those
features, and the tracker features are kept for tracking. Text features are
cached by concept text, so a protocol's concepts are encoded once per
engine lifetime and a changed protocol simply brings new keys.

Per structure: detections of its concepts are merged per slice, those
matching a negative concept or lying on the wrong side of the patient
(patient coordinates, LPS: +x is the patient's left) are dropped, the best
one seeds the tracker (with the other instances of its slice only for a
``parts: many`` structure), which runs both ways until the structure ends,
re-anchored on confident detections (``follow``). When the result
misses the expected volume, the next unexplained detection is tried. The
two sides of a paired organ then compete for pixels (``pairs``).
A structure without any detection over the threshold is reported
absent with its best score: nothing is drawn from noise.

Geometric prompts: a ``box_prompter`` (slice -> CT pixel boxes for a
structure, e.g. intensity-based boxes from the classical engine) can be
given to :meth:`Sam3Engine.from_config`; those slices are prompted with text
and boxes together. ``registry.build_engines`` passes the intensity-based
prompter of ``prompts.py``, which boxes only structures whose
protocol entry has an ``hu_window``. A structure's ``prompt`` chooses:
``text`` never asks for boxes, ``text+boxes`` adds them where found, and
``boxes`` (checkpoints trained without text) prompts only the slices that
have boxes, with the boxes alone: no concept text, SAM3's geometry-only
placeholder in the text slot (``select.BOXES_ONLY_TEXT``); the tracker
carries the structure beyond those slices as for any seed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from oncoseg_node.config import Sam3Config
from oncoseg_node.contouring.engines.base import StructureResult
from oncoseg_node.contouring.engines.classical.blocks import Block
from oncoseg_node.contouring.engines.classical.postprocess import postprocess_block
from oncoseg_node.contouring.engines.sam3.follow import FollowSettings, TrackerRun, follow
from oncoseg_node.contouring.engines.sam3.load import (
    DTYPES,
    AdapterInfo,
    cast_model,
    check_device,
    load_base,
    merge_adapter,
    sha256_files,
    weight_files,
)
from oncoseg_node.contouring.engines.sam3.nms import mask_nms, pairwise_mask_iou
from oncoseg_node.contouring.engines.sam3.pairs import compete, pair_key
from oncoseg_node.contouring.engines.sam3.preprocess import (
    DEFAULT_WINDOW,
    SliceFrame,
    window_to_unit,
)
from oncoseg_node.contouring.engines.sam3.select import (
    BOXES_ONLY_TEXT,
    PromptKey,
    concepts,
    instances,
    negative_concepts,
    prompt_keys,
)
from oncoseg_node.contouring.engines.sam3.track import (
    Detection,
    FeatureStore,
    Track,
    next_seed,
)
from oncoseg_node.contouring.mask_crop import MaskCrop
from oncoseg_node.contouring.protocols import Structure
from oncoseg_node.contouring.sanity import body_midline_x, crop_volume_cc
from oncoseg_node.contouring.volume import Volume

Box = tuple[float, float, float, float]  # CT pixel indices (row0, col0, row1, col1), inclusive
# Geometric prompts: slice index -> boxes for a structure (e.g. the classical engine's
# intensity-based boxes). None or an empty mapping means text only.
BoxPrompter = Callable[[Volume, Structure], Mapping[int, Sequence[Box]] | None]

TEXT_LENGTH = 32  # SAM3's processors pad every prompt to 32 tokens
TEXT_CACHE_SIZE = 512
SEED_ATTEMPTS = 3  # instances tried when the tracked volume misses the expected range


@dataclass(frozen=True)
class _Choice:
    track: Track
    seeds_tried: int


@dataclass(frozen=True)
class _Prompt:
    key: PromptKey  # (text sent, structure name when boxes make it specific)
    concept: str
    boxes: Mapping[int, Sequence[Box]] | None = None
    boxes_only: bool = False  # only the slices with boxes are prompted


def _fits(structure: Structure, cc: float) -> bool:
    """Whether ``cc`` lies in the structure's expected volume range (always, without one)."""
    return structure.volume_cc is None or structure.volume_cc[0] <= cc <= structure.volume_cc[1]


class Sam3Engine:
    """SAM3 detector + tracker on one device; ``segment()`` is pure after construction."""

    name = "sam3"

    def __init__(self, model, tokenizer, config: Sam3Config, *, weights_sha256: str,
                 adapter: AdapterInfo | None = None,
                 box_prompter: BoxPrompter | None = None) -> None:
        self.device = check_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.model = cast_model(model, self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.config = config
        self.weights_sha256 = weights_sha256
        self.adapter = adapter
        self.box_prompter = box_prompter
        vcfg = model.config
        self.image_size = int(vcfg.image_size)
        self.nms_iou = float(vcfg.det_nms_thresh)
        self.assoc_iou = float(vcfg.assoc_iou_thresh)
        self.tracking = FollowSettings.from_model(vcfg, config.track_gap_slices)
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_config(cls, config: Sam3Config, *,
                    box_prompter: BoxPrompter | None = None) -> Sam3Engine:
        """Load weights (and merge the adapter) from local files; EngineError on any problem."""
        check_device(config.device)  # before minutes of loading, not after
        base, setting = ((config.base_dir, "engine.sam3.base_dir") if config.base_dir is not None
                         else (config.model_dir, "engine.sam3.model_dir"))
        if config.checkpoint is not None:
            from oncoseg_node.contouring.engines.sam3.checkpoint import load_layered

            model, tokenizer, report = load_layered(base, Path(config.checkpoint),
                                                    config.lora_alpha, setting=setting)
            weights = report.identity
        else:
            model, tokenizer = load_base(base, setting=setting)
            assert base is not None  # load_base raised otherwise
            weights = sha256_files(weight_files(Path(base)))
        adapter = merge_adapter(model, config.adapter_dir) if config.adapter_dir else None
        return cls(model, tokenizer, config, weights_sha256=weights, adapter=adapter,
                   box_prompter=box_prompter)

    @property
    def description(self) -> str:
        model_dir = Path(self.config.base_dir or self.config.model_dir or "?")
        text = f"SAM3 {model_dir.name} sha256:{self.weights_sha256[:12]}"
        if self.config.checkpoint is not None:
            text = (f"SAM3 {Path(self.config.checkpoint).name} over {model_dir.name} "
                    f"sha256:{self.weights_sha256[:12]}")
        if self.adapter is not None:
            text += (f" + LoRA {self.adapter.path.name} sha256:{self.adapter.sha256[:12]}"
                     f" r{self.adapter.rank} merged")
        return text

    @property
    def short_id(self) -> str:
        """Weights and adapter hashes, short enough for every ROIGenerationDescription."""
        if self.adapter is None:
            return f"SAM3 {self.weights_sha256[:8]}"
        return f"{self.weights_sha256[:8]}+lora {self.adapter.sha256[:8]}"

    def supports(self, structure: Structure) -> bool:
        """A structure with a text concept, or one prompted by boxes alone."""
        return structure.prompting == "boxes" or bool(concepts(structure))

    # -- the job ---------------------------------------------------------------

    @torch.inference_mode()
    def segment(self, volume: Volume, structures: Sequence[Structure]) -> list[StructureResult]:
        """One result per structure, in order; masks are boolean ``(z, y, x)`` on the CT grid."""
        results: dict[int, StructureResult] = {}
        groups: dict[tuple[float, float], list[int]] = {}
        for i, structure in enumerate(structures):
            if not self.supports(structure):
                results[i] = StructureResult(structure.name, None, note="no text concept")
            elif structure.prompting == "boxes" and self.box_prompter is None:
                results[i] = StructureResult(structure.name, None,
                                             note="prompt: boxes, but no box prompter")
            else:
                # hu_window shapes box prompts only; the model sees its training window
                window = tuple(structure.model_window or DEFAULT_WINDOW)
                groups.setdefault(window, []).append(i)  # type: ignore[arg-type]
        midline = (body_midline_x(volume)
                   if any(s.laterality in ("left", "right") for s in structures) else 0.0)
        frame = SliceFrame(volume.shape[1], volume.shape[2], self.image_size)
        chosen: dict[int, _Choice] = {}
        # one encoding pass per distinct model window (almost always just the default)
        for window, members in groups.items():
            boxes = {i: self._boxes(volume, structures[i]) for i in members}
            prompts = self._prompts([structures[i] for i in members], list(boxes.values()))
            store, hits, best = self._encode_and_detect(volume, frame, window, prompts)
            for i in members:
                if structures[i].prompting == "boxes" and boxes[i] is None:
                    results[i] = StructureResult(
                        structures[i].name, None, score=0.0,
                        note="not found: no box prompt (hu_window found it on no slice)")
                    continue
                choice = self._choose(volume, frame, structures[i], boxes[i] is not None,
                                      store, hits, best, midline)
                if isinstance(choice, StructureResult):
                    results[i] = choice
                elif pair_key(structures[i]) is None:  # drawn now: its logits are freed
                    results[i] = self._result(volume, frame, structures[i], choice)
                else:  # the other side may still come: both compete first
                    chosen[i] = choice
            del store
        results.update(self._finish(volume, frame, structures, chosen))
        return [results[i] for i in range(len(structures))]

    def _finish(self, volume: Volume, frame: SliceFrame, structures: Sequence[Structure],
                chosen: Mapping[int, _Choice]) -> dict[int, StructureResult]:
        """Results of the tracked sides of paired organs, once both have competed for pixels."""
        sides: dict[str, list[int]] = {}
        for i in chosen:
            key = pair_key(structures[i])
            if key is not None:
                sides.setdefault(key, []).append(i)
        for members in sides.values():
            if len(members) > 1:
                compete([chosen[i].track for i in members])
        return {i: self._result(volume, frame, structures[i], choice)
                for i, choice in chosen.items()}

    def _boxes(self, volume: Volume, structure: Structure) -> Mapping[int, Sequence[Box]] | None:
        if self.box_prompter is None or structure.prompt == "text":  # unset: as the prompter says
            return None
        boxes = {z: b for z, b in (self.box_prompter(volume, structure) or {}).items() if b}
        return boxes or None

    @staticmethod
    def _prompts(structures: Sequence[Structure],
                 boxes: Sequence[Mapping[int, Sequence[Box]] | None]) -> list[_Prompt]:
        prompts: dict[PromptKey, _Prompt] = {}
        for structure, sboxes in zip(structures, boxes, strict=True):
            if structure.prompting == "boxes":
                if sboxes:
                    key: PromptKey = (BOXES_ONLY_TEXT, structure.name)
                    prompts[key] = _Prompt(key, BOXES_ONLY_TEXT, sboxes, boxes_only=True)
                continue
            for concept in concepts(structure):
                key = (concept, structure.name if sboxes else None)
                prompts.setdefault(key, _Prompt(key, concept, sboxes))
            for concept in negative_concepts(structure):
                prompts.setdefault((concept, None), _Prompt((concept, None), concept))
        return list(prompts.values())

    def _text(self, concept: str) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._text_cache.get(concept)
        if cached is not None:
            self._text_cache.move_to_end(concept)
            return cached
        enc = self.tokenizer([concept], padding="max_length", max_length=TEXT_LENGTH,
                             truncation=True, return_tensors="pt")
        ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        features = self.model.detector_model.get_text_features(input_ids=ids, attention_mask=attn)
        self._text_cache[concept] = (features.pooler_output, attn)
        if len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return features.pooler_output, attn

    def _vision(self, pixels: torch.Tensor) -> Sam3VisionEncoderOutput:
        """ViT + detector neck for a batch of slices (the once-per-slice cost)."""
        encoder = self.model.detector_model.vision_encoder
        hidden = encoder.backbone(pixels).last_hidden_state
        side = self.image_size // encoder.config.backbone_config.patch_size
        spatial = hidden.view(hidden.shape[0], side, side, -1).permute(0, 3, 1, 2)
        fpn, pos = encoder.neck(spatial)
        return Sam3VisionEncoderOutput(last_hidden_state=hidden, fpn_hidden_states=fpn,
                                       fpn_position_encoding=pos)

    def _encode_and_detect(self, volume: Volume, frame: SliceFrame, window: tuple[float, float],
                           prompts: Sequence[_Prompt]):
        n = volume.shape[0]
        store = FeatureStore(n, self.device)
        hits: dict[PromptKey, list[list[Detection]]] = {
            p.key: [[] for _ in range(n)] for p in prompts}
        best = {p.key: np.zeros(n) for p in prompts}
        step = max(1, int(self.config.batch_size))
        for z0 in range(0, n, step):
            z1 = min(n, z0 + step)
            pixels = frame.to_model(window_to_unit(volume.hu[z0:z1], window), self.device,
                                    self.dtype)
            vision = self._vision(pixels)
            feats, pos = self.model.get_vision_features_for_tracker(vision)
            store.put(z0, feats, pos)
            for prompt in prompts:
                boxed = [b for b in range(z1 - z0) if prompt.boxes and prompt.boxes.get(z0 + b)]
                plain = ([] if prompt.boxes_only
                         else [b for b in range(z1 - z0) if b not in boxed])
                for rows, with_boxes in ((plain, False), (boxed, True)):
                    if rows:
                        self._detect(vision, rows, z0, frame, prompt, with_boxes,
                                     hits[prompt.key], best[prompt.key])
        return store, hits, best

    def _detect(self, vision: Sam3VisionEncoderOutput, rows: list[int], z0: int,
                frame: SliceFrame, prompt: _Prompt, with_boxes: bool,
                hits: list[list[Detection]], best: np.ndarray) -> None:
        text, attn = self._text(prompt.concept)
        idx = torch.tensor(rows, device=self.device)
        sub = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(f.index_select(0, idx) for f in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.index_select(0, idx)
                                        for p in vision.fpn_position_encoding))
        kwargs = {}
        if with_boxes:
            assert prompt.boxes is not None
            per_row = [[frame.box_to_model(b) for b in prompt.boxes[z0 + r]] for r in rows]
            width = max(len(b) for b in per_row)
            boxes = torch.zeros(len(rows), width, 4)
            labels = torch.full((len(rows), width), -10, dtype=torch.long)  # -10: padding
            for r, row_boxes in enumerate(per_row):
                boxes[r, : len(row_boxes)] = torch.tensor(row_boxes)
                labels[r, : len(row_boxes)] = 1
            kwargs = {"input_boxes": boxes.to(self.device, self.dtype),
                      "input_boxes_labels": labels.to(self.device)}
        out = self.model.detector_model(
            vision_embeds=sub,
            text_embeds=BaseModelOutputWithPooling(pooler_output=text.expand(len(rows), -1, -1)),
            attention_mask=attn.expand(len(rows), -1), **kwargs)
        # SAM3's detection score: query probability times the image-level presence
        probs = (out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid())
        threshold = float(self.config.score_threshold)
        for r, row in enumerate(rows):
            z = z0 + row
            best[z] = max(best[z], float(probs[r].max()))
            candidates = torch.nonzero(probs[r] >= threshold).flatten()
            if candidates.numel() == 0:
                continue
            masks = out.pred_masks[r].index_select(0, candidates) > 0
            keep = mask_nms(masks, probs[r][candidates], self.nms_iou,
                            max_keep=self.config.max_instances,
                            max_candidates=self.config.max_queries)
            hits[z].extend(Detection(z, float(probs[r][candidates[k]]), masks[k].cpu())
                           for k in keep.tolist())

    # -- one structure -----------------------------------------------------------

    def _candidates(self, volume: Volume, frame: SliceFrame, structure: Structure,
                    boxed: bool, hits, midline: float) -> list[list[Detection]]:
        """Per slice: the structure's instances after merging, negatives and laterality."""
        return instances(volume, frame, structure, hits, boxed=boxed, midline=midline,
                         nms_iou=self.nms_iou, max_instances=self.config.max_instances)

    def _choose(self, volume: Volume, frame: SliceFrame, structure: Structure, boxed: bool,
                store: FeatureStore, hits, best, midline: float) -> _Choice | StructureResult:
        """The track that best explains the structure, or an absent result saying why."""
        threshold = float(self.config.score_threshold)
        candidates = self._candidates(volume, frame, structure, boxed, hits, midline)
        top = max((float(best[key].max()) for key in prompt_keys(structure, boxed)),
                  default=0.0)
        tried: list[tuple[Track, float]] = []
        for _ in range(SEED_ATTEMPTS):
            seed = next_seed(candidates, [t for t, _ in tried], self.assoc_iou)
            if seed is None:
                break
            track = self._track(store, seed, candidates, structure)
            cc = crop_volume_cc(volume, self._mask(volume, frame, structure, track))
            tried.append((track, cc))
            if _fits(structure, cc):
                break
        if not tried:
            if top >= threshold:  # detected, but every instance was rejected
                why = (f"all detections (best score {top:.2f}) on the wrong side of the patient"
                       " or outranked by a negative concept")
            else:
                why = f"best detection score {top:.2f} < threshold {threshold:.2f}"
            return StructureResult(structure.name, None, score=top, note=f"not found: {why}")
        fits = [t for t, cc in tried if _fits(structure, cc)]
        track = (fits or sorted((t for t, _ in tried), key=lambda t: -t.score))[0]
        return _Choice(track, len(tried))

    @staticmethod
    def _mask(volume: Volume, frame: SliceFrame, structure: Structure,
              track: Track) -> MaskCrop:
        """The tracked mask after clean-up, as its crop: only the tracked slices are built."""
        if not track.logits:
            return MaskCrop.of(np.zeros((0, 0, 0), dtype=bool), shape=volume.shape)
        z0, z1 = min(track.logits), max(track.logits) + 1
        slab = np.zeros((z1 - z0, *volume.shape[1:]), dtype=bool)
        for z, logits in track.logits.items():
            slab[z - z0] = frame.logits_to_ct(torch.from_numpy(logits)[None])[0]
        box = (slice(z0, z1), slice(0, volume.shape[1]), slice(0, volume.shape[2]))
        # the physicists' clean-up applies to every engine; judge the volume after it
        cleaned = postprocess_block(volume, Block(box, slab), structure.postprocess)
        if cleaned is None:
            return MaskCrop.of(np.zeros((0, 0, 0), dtype=bool), shape=volume.shape)
        origin = (cleaned.box[0].start, cleaned.box[1].start, cleaned.box[2].start)
        return MaskCrop.of(cleaned.array, volume.shape, origin)

    def _result(self, volume: Volume, frame: SliceFrame, structure: Structure,
                choice: _Choice) -> StructureResult:
        track = choice.track
        mask = self._mask(volume, frame, structure, track)
        if mask.empty:
            return StructureResult(structure.name, None, score=track.score,
                                   note="tracked mask vanished on the CT grid")
        slices = sorted(track.logits)
        flags = []
        if track.score < float(self.config.low_score_flag):
            flags.append(f"low SAM3 score {track.score:.2f} < {self.config.low_score_flag:.2f}")
        note = (f"slices {slices[0]}-{slices[-1]}, {choice.seeds_tried} seed(s) tried, "
                f"{crop_volume_cc(volume, mask):.1f} cc")
        return StructureResult(structure.name, mask, score=track.score, flags=tuple(flags),
                               note=note)

    def _track(self, store: FeatureStore, seed: Detection,
               candidates: Sequence[Sequence[Detection]], structure: Structure) -> Track:
        """Seed the tracker on the seed slice and propagate both ways.

        A one-part organ follows only its seed: any other detection above the
        threshold on that slice is something else. A ``parts: many`` structure
        follows every distinct instance on the seed slice.
        """
        seeds = [seed]
        if structure.parts == "many":
            seeds = [d for d in candidates[seed.z]
                     if d is seed or float(pairwise_mask_iou(d.mask[None], seed.mask[None])[0, 0])
                     < self.assoc_iou][: self.config.max_instances]
            seeds.sort(key=lambda d: d is not seed)  # the seed first
        run = TrackerRun(self.model.tracker_model, store, self.device, self.dtype, self.tracking)
        return follow(run, seeds, candidates)
