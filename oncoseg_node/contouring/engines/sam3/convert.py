"""Meta's original SAM3 checkpoint layout, converted to the transformers layout at load.

Meta publishes SAM3 as ``sam3.pt`` in the layout of its own code
(``detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight``,
``tracker.maskmem_backbone...``): fused ``attn.qkv`` and ``in_proj`` weights,
``attn.proj``, a class-token row in the ViT position table, a transposed CLIP
projection. The rename table below is the key mapping of transformers' own
conversion (``models/sam3_video/convert_sam3_video_to_hf.py``, not shipped in
the wheel): the same patterns, applied in the same order, plus the prefixes
of the published file (``detector.``, ``tracker.``, ``input_geometry_encoder.``)
next to the internal ones that script expects (``sam3_model.``,
``sam2_predictor.model.``). Fused projections are split into q, k and v along
the output dimension, as that script does.

LoRA adapters trained on that layout (``attn.qkv``, ``attn.proj``) are
converted the same way; a fused-qkv adapter becomes three adapters sharing
its A matrix, each with its third of B, which is exactly the fused update.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

# (published or internal prefix, transformers prefix)
PREFIXES = (("detector.", "detector_model."), ("sam3_model.", "detector_model."),
            ("tracker.", "tracker_model."), ("sam2_predictor.model.", "tracker_model."))
D = r"(detector_model\.)"  # every detector rule keeps the prefix it matched

# Detector: regular expressions, applied in order to each key.
DETECTOR_RULES: tuple[tuple[str, str], ...] = tuple((D + p, r"\1" + r) for p, r in (
    (r"input_geometry_encoder\.", "geometry_encoder."),
    (r"backbone\.vision_backbone\.trunk\.", "vision_encoder.backbone."),
    (r"vision_encoder\.backbone\.pos_embed",
     "vision_encoder.backbone.embeddings.position_embeddings"),
    (r"vision_encoder\.backbone\.patch_embed\.proj\.",
     "vision_encoder.backbone.embeddings.patch_embeddings.projection."),
    (r"vision_encoder\.backbone\.ln_pre\.", "vision_encoder.backbone.layer_norm."),
    (r"vision_encoder\.backbone\.blocks\.(\d+)\.norm1\.",
     r"vision_encoder.backbone.layers.\2.layer_norm1."),
    (r"vision_encoder\.backbone\.blocks\.(\d+)\.norm2\.",
     r"vision_encoder.backbone.layers.\2.layer_norm2."),
    (r"vision_encoder\.backbone\.blocks\.(\d+)\.attn\.qkv\.",
     r"vision_encoder.backbone.layers.\2.attention.qkv."),
    (r"vision_encoder\.backbone\.blocks\.(\d+)\.attn\.proj\.",
     r"vision_encoder.backbone.layers.\2.attention.o_proj."),
    (r"vision_encoder\.backbone\.blocks\.(\d+)\.attn\.freqs_cis",
     r"vision_encoder.backbone.layers.\2.rotary_emb.rope_embeddings"),
    (r"vision_encoder\.backbone\.blocks\.(\d+)\.mlp\.", r"vision_encoder.backbone.layers.\2.mlp."),
    (r"backbone\.vision_backbone\.neck\.fpn\.(\d+)\.", r"vision_encoder.neck.fpn_layers.\2."),
    (r"backbone\.vision_backbone\.(sam2_)?convs\.(\d+)\.dconv_2x2_0\.",
     r"vision_encoder.\2neck.fpn_layers.\3.scale_layers.0."),
    (r"backbone\.vision_backbone\.(sam2_)?convs\.(\d+)\.dconv_2x2_1\.",
     r"vision_encoder.\2neck.fpn_layers.\3.scale_layers.2."),
    (r"backbone\.vision_backbone\.(sam2_)?convs\.(\d+)\.(dconv|maxpool)_2x2\.",
     r"vision_encoder.\2neck.fpn_layers.\3.scale_layers.0."),
    (r"backbone\.vision_backbone\.(sam2_)?convs\.(\d+)\.conv_1x1\.",
     r"vision_encoder.\2neck.fpn_layers.\3.proj1."),
    (r"backbone\.vision_backbone\.(sam2_)?convs\.(\d+)\.conv_3x3\.",
     r"vision_encoder.\2neck.fpn_layers.\3.proj2."),
    (r"vision_encoder\.sam2_neck\.", "vision_encoder.tracker_neck."),
    (r"backbone\.language_backbone\.encoder\.", "text_encoder."),
    (r"text_encoder\.token_embedding\.", "text_encoder.text_model.embeddings.token_embedding."),
    (r"text_encoder\.positional_embedding",
     "text_encoder.text_model.embeddings.position_embedding.weight"),
    (r"text_encoder\.ln_final\.", "text_encoder.text_model.final_layer_norm."),
    (r"text_encoder\.text_projection$", "text_encoder.text_projection.weight"),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_",
     r"text_encoder.text_model.encoder.layers.\2.self_attn.in_proj_"),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.",
     r"text_encoder.text_model.encoder.layers.\2.self_attn.out_proj."),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.ln_(\d)\.",
     r"text_encoder.text_model.encoder.layers.\2.layer_norm\3."),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.",
     r"text_encoder.text_model.encoder.layers.\2.mlp.fc1."),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.",
     r"text_encoder.text_model.encoder.layers.\2.mlp.fc2."),
    (r"backbone\.language_backbone\.resizer\.", "text_projection."),
    (r"geometry_encoder\.encode\.(\d+)\.cross_attn_image\.out_proj\.",
     r"geometry_encoder.layers.\2.cross_attn.o_proj."),
    (r"geometry_encoder\.encode\.(\d+)\.cross_attn_image\.",
     r"geometry_encoder.layers.\2.cross_attn."),
    (r"geometry_encoder\.encode\.(\d+)\.self_attn\.out_proj\.",
     r"geometry_encoder.layers.\2.self_attn.o_proj."),
    (r"geometry_encoder\.encode\.(\d+)\.self_attn\.", r"geometry_encoder.layers.\2.self_attn."),
    (r"geometry_encoder\.encode\.(\d+)\.linear(\d)\.", r"geometry_encoder.layers.\2.mlp.fc\3."),
    (r"geometry_encoder\.encode\.(\d+)\.norm(\d)\.", r"geometry_encoder.layers.\2.layer_norm\3."),
    (r"geometry_encoder\.img_pre_norm\.", "geometry_encoder.vision_layer_norm."),
    (r"geometry_encoder\.norm\.", "geometry_encoder.prompt_layer_norm."),
    (r"geometry_encoder\.encode_norm\.", "geometry_encoder.output_layer_norm."),
    (r"transformer\.encoder\.layers\.(\d+)\.(cross_attn_image|cross_attn)\.out_proj\.",
     r"detr_encoder.layers.\2.cross_attn.o_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.(cross_attn_image|cross_attn)\.",
     r"detr_encoder.layers.\2.cross_attn."),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"detr_encoder.layers.\2.self_attn.o_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"detr_encoder.layers.\2.self_attn."),
    (r"transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"detr_encoder.layers.\2.mlp.fc\3."),
    (r"transformer\.encoder\.layers\.(\d+)\.norm(\d)\.", r"detr_encoder.layers.\2.layer_norm\3."),
    (r"transformer\.decoder\.(query_embed|reference_points|instance_query_embed|"
     r"instance_reference_points|presence_token)\.", r"detr_decoder.\2."),
    (r"transformer\.decoder\.presence_token_head\.layers\.0\.",
     "detr_decoder.presence_head.layer1."),
    (r"transformer\.decoder\.presence_token_head\.layers\.1\.",
     "detr_decoder.presence_head.layer2."),
    (r"transformer\.decoder\.presence_token_head\.layers\.2\.",
     "detr_decoder.presence_head.layer3."),
    (r"transformer\.decoder\.presence_token_out_norm\.", "detr_decoder.presence_layer_norm."),
    (r"transformer\.decoder\.norm\.", "detr_decoder.output_layer_norm."),
    (r"transformer\.decoder\.(instance_)?bbox_embed\.layers\.0\.",
     r"detr_decoder.\2box_head.layer1."),
    (r"transformer\.decoder\.(instance_)?bbox_embed\.layers\.1\.",
     r"detr_decoder.\2box_head.layer2."),
    (r"transformer\.decoder\.(instance_)?bbox_embed\.layers\.2\.",
     r"detr_decoder.\2box_head.layer3."),
    (r"transformer\.decoder\.ref_point_head\.layers\.0\.", "detr_decoder.ref_point_head.layer1."),
    (r"transformer\.decoder\.ref_point_head\.layers\.1\.", "detr_decoder.ref_point_head.layer2."),
    (r"transformer\.decoder\.boxRPB_embed_(x|y)\.layers\.0\.",
     r"detr_decoder.box_rpb_embed_\2.layer1."),
    (r"transformer\.decoder\.boxRPB_embed_(x|y)\.layers\.1\.",
     r"detr_decoder.box_rpb_embed_\2.layer2."),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"detr_decoder.layers.\2.self_attn.o_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.", r"detr_decoder.layers.\2.self_attn."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_text\.out_proj\.",
     r"detr_decoder.layers.\2.text_cross_attn.o_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_text\.", r"detr_decoder.layers.\2.text_cross_attn."),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.out_proj\.",
     r"detr_decoder.layers.\2.vision_cross_attn.o_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.",
     r"detr_decoder.layers.\2.vision_cross_attn."),
    (r"transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"detr_decoder.layers.\2.mlp.fc\3."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.",
     r"detr_decoder.layers.\2.vision_cross_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.catext_norm\.",
     r"detr_decoder.layers.\2.text_cross_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.",
     r"detr_decoder.layers.\2.self_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.", r"detr_decoder.layers.\2.mlp_layer_norm."),
    (r"dot_prod_scoring\.prompt_mlp\.layers\.0\.", "dot_product_scoring.text_mlp.layer1."),
    (r"dot_prod_scoring\.prompt_mlp\.layers\.1\.", "dot_product_scoring.text_mlp.layer2."),
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.", "dot_product_scoring.text_mlp_out_norm."),
    (r"dot_prod_scoring\.prompt_proj\.", "dot_product_scoring.text_proj."),
    (r"dot_prod_scoring\.hs_proj\.", "dot_product_scoring.query_proj."),
    (r"segmentation_head\.pixel_decoder\.", "mask_decoder.pixel_decoder."),
    (r"segmentation_head\.(mask_predictor\.)?mask_embed\.layers\.",
     "mask_decoder.mask_embedder.layers."),
    (r"segmentation_head\.instance_seg_head\.", "mask_decoder.instance_projection."),
    (r"segmentation_head\.semantic_seg_head\.", "mask_decoder.semantic_projection."),
    (r"segmentation_head\.cross_attend_prompt\.out_proj\.",
     "mask_decoder.prompt_cross_attn.o_proj."),
    (r"segmentation_head\.cross_attend_prompt\.", "mask_decoder.prompt_cross_attn."),
    (r"segmentation_head\.cross_attn_norm\.", "mask_decoder.prompt_cross_attn_norm."),
))

# Tracker: plain substring renames, in order (transformers' KEYS_TO_MODIFY_MAPPING and the
# renames of its adapt_internal_ckpt), then the numbered-layer rules below.
TRACKER_RENAMES: tuple[tuple[str, str], ...] = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"), ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"), ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("dwconv", "depthwise_conv"), ("pwconv", "pointwise_conv"), ("fuser", "memory_fuser"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("obj_ptr_tpos_proj", "temporal_positional_encoding_projection_layer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ("sam_prompt_encoder", "prompt_encoder"), ("sam_mask_decoder", "mask_decoder"),
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"), ("gamma", "scale"),
    ("image_encoder.neck", "vision_encoder.neck"), ("image_encoder", "vision_encoder.backbone"),
    ("neck.0", "neck.conv1"), ("neck.1", "neck.layer_norm1"), ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"), ("pix_feat_proj", "feature_projection"),
    ("patch_embed.proj", "patch_embed.projection"), ("no_mem_embed", "no_memory_embedding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"), ("obj_ptr", "object_pointer"),
    (".norm", ".layer_norm"), ("trunk.", ""), ("out_proj", "o_proj"),
    ("transformer.encoder", "memory_attention"), ("maskmem_backbone", "memory_encoder"),
    ("memory_encoder.o_proj.", "memory_encoder.projection."),
    ("mlp.lin1", "mlp.proj_in"), ("mlp.lin2", "mlp.proj_out"),
)
# three-layer MLPs: layers.0 -> proj_in, layers.1 -> layers.0, layers.2 -> proj_out
THREE_LAYER_MLPS = re.compile(
    r"(output_hypernetworks_mlps\.\d+|pred_obj_score_head|object_pointer_proj)\.layers\.(\d)\.")
MASK_DOWNSAMPLER = re.compile(r"(memory_encoder\.mask_downsampler\.)encoder\.(\d+)\.")
DROPPED = re.compile(r"rotary_emb\.rope_embeddings$")  # precomputed in Meta's code, rebuilt here


def is_meta_layout(keys: Iterable[str]) -> bool:
    """Whether checkpoint keys use Meta's prefixes rather than transformers'."""
    return any(k.startswith(tuple(p for p, _ in PREFIXES)) for k in keys)


def convert_key(key: str, downsampler_last: int = 12) -> str:
    """One Meta-layout key in the transformers layout (before fused projections are split)."""
    for old, new in PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("detector_model."):
        for pattern, replacement in DETECTOR_RULES:
            key = re.sub("^" + pattern, replacement, key)
        return re.sub(r"^detector_model\.vision_encoder\.tracker_neck\.", "tracker_neck.", key)
    if key.startswith("tracker_model."):
        for old, new in TRACKER_RENAMES:
            key = key.replace(old, new)
        key = THREE_LAYER_MLPS.sub(
            lambda m: m.group(1) + "." + ("proj_in", "layers.0", "proj_out")[int(m.group(2))]
            + ".", key)

        def downsampler(m: re.Match) -> str:
            index = int(m.group(2))
            if index == downsampler_last:
                return m.group(1) + "final_conv."
            return m.group(1) + f"layers.{index // 3}." + ("conv.", "layer_norm.")[index % 3]
        return MASK_DOWNSAMPLER.sub(downsampler, key)
    return key


def _split_fused(key: str) -> tuple[str, str, str] | None:
    """The q, k and v keys a fused projection key splits into; None for any other key."""
    if ".attention.qkv." in key:
        return tuple(key.replace(".qkv.", f".{p}_proj.") for p in "qkv")  # type: ignore[return-value]
    match = re.search(r"\.in_proj_(weight|bias)$", key)
    if match:
        base = key[: match.start()]
        return tuple(f"{base}.{p}_proj.{match.group(1)}" for p in "qkv")  # type: ignore[return-value]
    return None


def meta_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Meta-layout state dict as the transformers ``Sam3VideoModel`` names and shapes it."""
    last = [int(m.group(1)) for k in state
            if (m := re.search(r"mask_downsampler\.encoder\.(\d+)\.", k))]
    out: dict[str, torch.Tensor] = {}
    for old, tensor in state.items():
        key = convert_key(old, max(last, default=12))
        if DROPPED.search(key):
            continue
        split = _split_fused(key)
        if split is not None:
            for name, part in zip(split, torch.chunk(tensor, 3, dim=0), strict=True):
                out[name] = part.contiguous()
        elif key.endswith("vision_encoder.backbone.embeddings.position_embeddings"):
            out[key] = tensor[:, 1:, :]  # Meta's table has a class-token row the model lacks
        elif key.endswith("text_encoder.text_projection.weight"):
            out[key] = tensor.T.contiguous()  # stored (width, projection) in Meta's CLIP
        else:
            out[key] = tensor
    points = sorted((k for k in out if re.search(r"prompt_encoder\.point_embed\.\d+\.weight$", k)),
                    key=lambda k: int(k.rsplit(".", 2)[1]))
    if points:
        out[points[0].rsplit(".", 2)[0] + ".weight"] = torch.cat([out.pop(k) for k in points])
    shared = "tracker_model.prompt_encoder.shared_embedding.positional_embedding"
    if shared in out:
        out["tracker_model.shared_image_embedding.positional_embedding"] = out[shared]
    return out


def split_fused_lora(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Meta-layout LoRA (module -> (A, B)) on transformers module names, fused qkv split.

    ``B A`` of a fused qkv stacks the q, k and v updates along its output
    rows, so each projection gets the shared A and its third of B.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (a, b) in modules.items():
        key = convert_key(module + ".weight")[: -len(".weight")]
        if key.endswith(".attention.qkv"):
            for p, part in zip("qkv", torch.chunk(b, 3, dim=0), strict=True):
                out[key[: -len("qkv")] + f"{p}_proj"] = (a, part.contiguous())
        else:
            out[key] = (a, b)
    return out


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a ``.pt`` state dict (``{"model": ...}`` or bare)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    from oncoseg_node.contouring.engines.sam3.safe_read import read_pickled

    loaded = read_pickled(path)  # a checkpoint is data; never run the code a pickle could carry
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        raise ValueError("a PyTorch Lightning checkpoint: name it in engine.sam3.checkpoint, "
                         "layered over engine.sam3.base_dir")
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict):
        raise ValueError(f"holds a {type(loaded).__name__}, not a state dict")
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(read_checkpoint(path))


def load_meta_checkpoint(model_dir: Path, files: Sequence[Path]):  # -> (Sam3VideoModel, info)
    """Build the model from ``config.json`` and fill it with converted Meta-layout weights.

    ``info`` has ``missing_keys``, ``unexpected_keys`` and ``mismatched_keys``
    as ``from_pretrained(output_loading_info=True)`` reports them.
    """
    from transformers import Sam3VideoConfig, Sam3VideoModel
    from transformers.initialization import no_init_weights

    config = Sam3VideoConfig.from_pretrained(model_dir, local_files_only=True)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_checkpoint(path))
    converted = meta_to_transformers(state)
    del state
    with no_init_weights():  # every parameter comes from the checkpoint, or loading stops
        model = Sam3VideoModel(config)
    expected = model.state_dict()
    mismatched = sorted(k for k, v in converted.items()
                        if k in expected and tuple(v.shape) != tuple(expected[k].shape))
    result = model.load_state_dict({k: v for k, v in converted.items() if k not in mismatched},
                                   strict=False)
    return model.float(), {"missing_keys": list(result.missing_keys),
                           "unexpected_keys": list(result.unexpected_keys),
                           "mismatched_keys": mismatched}
