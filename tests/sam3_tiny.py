"""A tiny random SAM3 (detector + tracker) and CLIP tokenizer, built in code and saved in HF format.

The directory it writes has the layout of ``facebook/sam3`` (a ``sam3_video``
config holding the image-detector and tracker configs, safetensors weights,
tokenizer files, ``preprocessor_config.json``), so the engine loads it
through the very code path used in production. The weights are random:
anything built on it checks plumbing, never segmentation quality.

Sizes are the smallest the SAM3 code accepts: the tracker's memory attention
hard-codes 64 memory channels and splits object pointers into 64-wide
tokens, so the feature width is 128; the ViT is 2 layers of width 32 on a
112 px input (8 x 8 patches).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTokenizer, Sam3VideoConfig, Sam3VideoModel
from transformers.models.sam3.configuration_sam3 import (
    Sam3Config,
    Sam3VisionConfig,
    Sam3ViTConfig,
)
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor
from transformers.models.sam3_tracker_video.configuration_sam3_tracker_video import (
    Sam3TrackerVideoConfig,
)

IMAGE_SIZE = 112
PATCH = 14
WIDTH = 128  # FPN / DETR / tracker width (see module docstring)
QUERIES = 20


# Words of the concepts tests prompt with; each gets CLIP's byte-pair merges, so it is one token.
WORDS = ("liver", "hepar", "spleen", "left", "right", "parotid", "gland", "bone", "heart",
         "lung", "trachea", "bowel")


def tiny_tokenizer(words: tuple[str, ...] = WORDS) -> CLIPTokenizer:
    """CLIP's own tokenizer class over single bytes plus byte-pair merges for ``words``.

    Like the real SAM3 vocabulary (CLIP's, 49,408 entries) it lower-cases,
    marks word ends with ``</w>``, merges known words into one token, falls back
    to bytes for anything else and pads with ``<|endoftext|>``; it just knows
    far fewer words. Built offline: nothing is downloaded.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        token = word[0]
        for i, char in enumerate(word[1:]):
            piece = char + ("</w>" if i == len(word) - 2 else "")
            if (token, piece) not in merges:
                merges.append((token, piece))
            token += piece
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_config(vocab_size: int) -> Sam3VideoConfig:
    grid = IMAGE_SIZE // PATCH

    def vision() -> Sam3VisionConfig:
        backbone = Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                 window_size=4, global_attn_indexes=[1], pretrain_image_size=56)
        return Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=WIDTH,
                                backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2,
                                                        [grid] * 2])

    small = {"hidden_size": WIDTH, "num_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, projection_dim=32,
                          max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    detector = Sam3Config(
        vision_config=vision(), text_config=text, geometry_encoder_config=dict(small),
        detr_encoder_config=dict(small),
        detr_decoder_config={**small, "num_queries": QUERIES},
        mask_decoder_config={"hidden_size": WIDTH, "num_upsampling_stages": 3,
                             "num_attention_heads": 2})
    tracker = Sam3TrackerVideoConfig(
        vision_config=vision(), image_size=IMAGE_SIZE,
        prompt_encoder_config={"hidden_size": WIDTH, "image_size": IMAGE_SIZE,
                               "patch_size": PATCH, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": WIDTH, "mlp_dim": 64, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 32},
        num_maskmem=3, memory_attention_hidden_size=WIDTH, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_encoder_hidden_size=WIDTH,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=WIDTH,
        memory_fuser_embed_dim=WIDTH, memory_fuser_intermediate_dim=64)
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker,
                           low_res_mask_size=4 * grid)


def build_tiny_sam3(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random SAM3 checkpoint + tokenizer to ``directory`` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = Sam3VideoModel(tiny_config(len(tokenizer)))
    with torch.no_grad():  # one table in Meta's weights, copied to both places by transformers
        model.tracker_model.shared_image_embedding.positional_embedding.copy_(
            model.tracker_model.prompt_encoder.shared_embedding.positional_embedding)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Sam3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory
