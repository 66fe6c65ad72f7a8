"""Write a SAM3 checkpoint in Meta's original layout (``sam3.pt``), for the conversion tests.

Written from the module names of Meta's ``sam3`` code (``ViT`` blocks with a
fused ``attn.qkv`` and ``attn.proj``, ``nn.MultiheadAttention`` ``in_proj``
weights, CLIP ``resblocks``, SAM2 tracker names such as ``maskmem_backbone``
and ``sam_mask_decoder``), independently of the node's converter: the tests
check that the converter turns this back into the transformers layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

# transformers name (in memory) -> Meta name, applied in order; \d groups keep layer numbers
DETECTOR = (
    (r"^vision_encoder\.backbone\.embeddings\.position_embeddings$",
     "backbone.vision_backbone.trunk.pos_embed"),
    (r"^vision_encoder\.backbone\.embeddings\.patch_embeddings\.projection\.",
     "backbone.vision_backbone.trunk.patch_embed.proj."),
    (r"^vision_encoder\.backbone\.layer_norm\.", "backbone.vision_backbone.trunk.ln_pre."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.layer_norm(\d)\.",
     r"backbone.vision_backbone.trunk.blocks.\1.norm\2."),
    (r"vision_encoder\.backbone\.layers\.(\d+)\.attention\.o_proj\.",
     r"backbone.vision_backbone.trunk.blocks.\1.attn.proj."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.attention\.qkv\.",
     r"backbone.vision_backbone.trunk.blocks.\1.attn.qkv."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.mlp\.",
     r"backbone.vision_backbone.trunk.blocks.\1.mlp."),
    (r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.proj1\.",
     r"backbone.vision_backbone.convs.\1.conv_1x1."),
    (r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.proj2\.",
     r"backbone.vision_backbone.convs.\1.conv_3x3."),
    (r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.scale_layers\.2\.",
     r"backbone.vision_backbone.convs.\1.dconv_2x2_1."),
    (r"^vision_encoder\.neck\.fpn_layers\.(\d+)\.scale_layers\.0\.",
     r"backbone.vision_backbone.convs.\1.SCALE0."),
    (r"^text_encoder\.text_model\.embeddings\.token_embedding\.",
     "backbone.language_backbone.encoder.token_embedding."),
    (r"^text_encoder\.text_model\.embeddings\.position_embedding\.weight$",
     "backbone.language_backbone.encoder.positional_embedding"),
    (r"^text_encoder\.text_model\.final_layer_norm\.",
     "backbone.language_backbone.encoder.ln_final."),
    (r"^text_encoder\.text_projection\.weight$",
     "backbone.language_backbone.encoder.text_projection"),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.attn.out_proj."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.qkv_",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.attn.in_proj_"),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.ln_\2."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.mlp.c_fc."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.",
     r"backbone.language_backbone.encoder.transformer.resblocks.\1.mlp.c_proj."),
    (r"^text_projection\.", "backbone.language_backbone.resizer."),
    (r"^geometry_encoder\.layers\.(\d+)\.cross_attn\.",
     r"input_geometry_encoder.encode.\1.cross_attn_image."),
    (r"^geometry_encoder\.layers\.(\d+)\.self_attn\.",
     r"input_geometry_encoder.encode.\1.self_attn."),
    (r"^geometry_encoder\.layers\.(\d+)\.mlp\.fc(\d)\.",
     r"input_geometry_encoder.encode.\1.linear\2."),
    (r"^geometry_encoder\.layers\.(\d+)\.layer_norm(\d)\.",
     r"input_geometry_encoder.encode.\1.norm\2."),
    (r"^geometry_encoder\.vision_layer_norm\.", "input_geometry_encoder.img_pre_norm."),
    (r"^geometry_encoder\.prompt_layer_norm\.", "input_geometry_encoder.norm."),
    (r"^geometry_encoder\.output_layer_norm\.", "input_geometry_encoder.encode_norm."),
    (r"^geometry_encoder\.", "input_geometry_encoder."),
    (r"^detr_encoder\.layers\.(\d+)\.cross_attn\.",
     r"transformer.encoder.layers.\1.cross_attn_image."),
    (r"^detr_encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"^detr_encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"^detr_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"transformer.encoder.layers.\1.norm\2."),
    (r"^detr_decoder\.presence_head\.layer(\d)\.",
     "transformer.decoder.presence_token_head.layers.L\\1."),
    (r"^detr_decoder\.presence_layer_norm\.", "transformer.decoder.presence_token_out_norm."),
    (r"^detr_decoder\.output_layer_norm\.", "transformer.decoder.norm."),
    (r"^detr_decoder\.box_head\.layer(\d)\.", r"transformer.decoder.bbox_embed.layers.L\1."),
    (r"^detr_decoder\.ref_point_head\.layer(\d)\.",
     r"transformer.decoder.ref_point_head.layers.L\1."),
    (r"^detr_decoder\.box_rpb_embed_(x|y)\.layer(\d)\.",
     r"transformer.decoder.boxRPB_embed_\1.layers.L\2."),
    (r"^detr_decoder\.layers\.(\d+)\.text_cross_attn\.", r"transformer.decoder.layers.\1.ca_text."),
    (r"^detr_decoder\.layers\.(\d+)\.vision_cross_attn\.",
     r"transformer.decoder.layers.\1.cross_attn."),
    (r"^detr_decoder\.layers\.(\d+)\.self_attn\.", r"transformer.decoder.layers.\1.self_attn."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"^detr_decoder\.layers\.(\d+)\.vision_cross_attn_layer_norm\.",
     r"transformer.decoder.layers.\1.norm1."),
    (r"^detr_decoder\.layers\.(\d+)\.text_cross_attn_layer_norm\.",
     r"transformer.decoder.layers.\1.catext_norm."),
    (r"^detr_decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"transformer.decoder.layers.\1.norm2."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^detr_decoder\.", "transformer.decoder."),
    (r"^dot_product_scoring\.text_mlp\.layer(\d)\.", r"dot_prod_scoring.prompt_mlp.layers.L\1."),
    (r"^dot_product_scoring\.text_mlp_out_norm\.", "dot_prod_scoring.prompt_mlp.out_norm."),
    (r"^dot_product_scoring\.text_proj\.", "dot_prod_scoring.prompt_proj."),
    (r"^dot_product_scoring\.query_proj\.", "dot_prod_scoring.hs_proj."),
    (r"^mask_decoder\.pixel_decoder\.", "segmentation_head.pixel_decoder."),
    (r"^mask_decoder\.mask_embedder\.layers\.",
     "segmentation_head.mask_predictor.mask_embed.layers."),
    (r"^mask_decoder\.instance_projection\.", "segmentation_head.instance_seg_head."),
    (r"^mask_decoder\.semantic_projection\.", "segmentation_head.semantic_seg_head."),
    (r"^mask_decoder\.prompt_cross_attn_norm\.", "segmentation_head.cross_attn_norm."),
    (r"^mask_decoder\.prompt_cross_attn\.", "segmentation_head.cross_attend_prompt."),
    (r"\.qkv_(weight|bias)$", r".in_proj_\1"),  # nn.MultiheadAttention
    (r"\.o_proj\.", ".out_proj."),
)
TRACKER = (
    (r"^object_pointer_proj\.", "obj_ptr_proj."),
    (r"^mask_decoder\.", "sam_mask_decoder."), (r"prompt_encoder\.", "sam_prompt_encoder."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+|pred_obj_score_head|obj_ptr_proj)"
     r"\.layers\.0\.", r"\1.layers.1."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+|pred_obj_score_head|obj_ptr_proj)"
     r"\.proj_in\.", r"\1.layers.0."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+|pred_obj_score_head|obj_ptr_proj)"
     r"\.proj_out\.", r"\1.layers.2."),
    (r"\.mlp\.proj_in\.", ".mlp.lin1."), (r"\.mlp\.proj_out\.", ".mlp.lin2."),
    (r"upscale_conv1\.", "output_upscaling.0."), (r"upscale_layer_norm\.", "output_upscaling.1."),
    (r"upscale_conv2\.", "output_upscaling.3."),
    (r"mask_embed\.conv1\.",
     "mask_downscaling.0."), (r"mask_embed\.layer_norm1\.", "mask_downscaling.1."),
    (r"mask_embed\.conv2\.",
     "mask_downscaling.3."), (r"mask_embed\.layer_norm2\.", "mask_downscaling.4."),
    (r"mask_embed\.conv3\.", "mask_downscaling.6."),
    (r"shared_embedding\.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
    (r"memory_attention\.layer_norm\.", "transformer.encoder.norm."),
    (r"memory_attention\.", "transformer.encoder."),
    (r"memory_encoder\.mask_downsampler\.layers\.(\d)\.conv\.",
     r"maskmem_backbone.mask_downsampler.encoder.C\1."),
    (r"memory_encoder\.mask_downsampler\.layers\.(\d)\.layer_norm\.",
     r"maskmem_backbone.mask_downsampler.encoder.N\1."),
    (r"memory_encoder\.mask_downsampler\.final_conv\.",
     "maskmem_backbone.mask_downsampler.encoder.12."),
    (r"memory_encoder\.feature_projection\.", "maskmem_backbone.pix_feat_proj."),
    (r"memory_encoder\.projection\.", "maskmem_backbone.out_proj."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.depthwise_conv\.",
     r"maskmem_backbone.fuser.layers.\1.dwconv."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.pointwise_conv(\d)\.",
     r"maskmem_backbone.fuser.layers.\1.pwconv\2."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.layer_norm\.",
     r"maskmem_backbone.fuser.layers.\1.norm."),
    (r"memory_encoder\.memory_fuser\.layers\.(\d+)\.scale$",
     r"maskmem_backbone.fuser.layers.\1.gamma"),
    (r"layer_norm(\d)\.", r"norm\1."), (r"layer_norm_final_attn\.", "norm_final_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"memory_temporal_positional_encoding", "maskmem_tpos_enc"),
    (r"no_memory_embedding", "no_mem_embed"), (r"no_memory_positional_encoding", "no_mem_pos_enc"),
    (r"no_object_pointer", "no_obj_ptr"),
    (r"occlusion_spatial_embedding_parameter", "no_obj_embed_spatial"),
    (r"temporal_positional_encoding_projection_layer", "obj_ptr_tpos_proj"),
)


def _fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detector q/k/v projections as Meta stores them: ``attention.qkv.*`` or ``qkv_*``.

    The tracker's attentions keep separate q, k and v projections in Meta's code too.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = re.match(r"(.*)\.([qkv])_proj\.(weight|bias)$", key)
        if match is None or key.startswith("tracker_model."):
            out[key] = tensor
            continue
        if match.group(2) != "q":
            continue
        base, kind = match.group(1), match.group(3)
        fused = torch.cat([state[f"{base}.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{base}.qkv.{kind}" if base.endswith(".attention") else f"{base}.qkv_{kind}"] = fused
    return out


def to_meta_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``Sam3VideoModel`` state dict renamed and reshaped as Meta's checkpoint."""
    fused = _fuse(dict(state))
    two_step = re.compile(r"(.*fpn_layers\.\d+)\.scale_layers\.2\.")  # 4x: two transposed convs
    scaled = {m.group(1) for k in fused if (m := two_step.match(k))}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in fused.items():
        if key == "tracker_model.shared_image_embedding.positional_embedding":
            continue  # Meta keeps it once, in the prompt encoder
        if key.startswith("tracker_neck."):
            neck = "vision_encoder.neck." + key[len("tracker_neck."):]
            meta = "detector." + _apply(DETECTOR, neck).replace(".convs.", ".sam2_convs.")
            level = re.match(r"(tracker_neck\.fpn_layers\.\d+)", key)
            two = level is not None and level.group(1) in scaled
        elif key.startswith("detector_model."):
            meta = "detector." + _apply(DETECTOR, key[len("detector_model."):])
            level = re.match(r"detector_model\.(vision_encoder\.neck\.fpn_layers\.\d+)", key)
            two = level is not None and ("detector_model." + level.group(1)) in scaled
        else:
            meta = "tracker." + _apply(TRACKER, key[len("tracker_model."):])
            two = False
        meta = meta.replace(".SCALE0.", ".dconv_2x2_0." if two else ".dconv_2x2.")
        meta = re.sub(r"\.L(\d)\.", lambda m: f".{int(m.group(1)) - 1}.", meta)
        meta = re.sub(r"encoder\.C(\d)\.", lambda m: f"encoder.{3 * int(m.group(1))}.", meta)
        meta = re.sub(r"encoder\.N(\d)\.", lambda m: f"encoder.{3 * int(m.group(1)) + 1}.", meta)
        if meta.endswith("trunk.pos_embed"):
            tensor = torch.cat([torch.zeros_like(tensor[:, :1]), tensor], dim=1)  # class token
        elif meta.endswith("encoder.text_projection"):
            tensor = tensor.T.contiguous()
        elif meta.endswith("sam_prompt_encoder.point_embed.weight"):
            for i, row in enumerate(tensor):
                out[f"tracker.sam_prompt_encoder.point_embeddings.{i}.weight"] = row[None].clone()
            continue
        out[meta] = tensor.clone()
    return out


def _apply(rules, key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def write_meta_checkpoint(hf_dir: Path, out_dir: Path) -> Path:
    """``out_dir`` with the config, tokenizer and preprocessing of ``hf_dir`` and ``sam3.pt``."""
    import shutil

    from transformers import Sam3VideoModel

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in hf_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, out_dir / path.name)
    model = Sam3VideoModel.from_pretrained(hf_dir, local_files_only=True)
    state = {k: v for k, v in model.state_dict().items()
             if k in dict(model.named_parameters()) or k in _persistent_buffers(model)}
    torch.save({"model": to_meta_layout(state)}, out_dir / "sam3.pt")
    return out_dir


def _persistent_buffers(model) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names
