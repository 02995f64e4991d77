"""A tiny random SAM 3 saved as a Hugging Face checkpoint directory (model type ``sam3_video``), built with
transformers' own classes, plus a small CLIP-style BPE vocabulary trained on label-like phrases.

Test-only: needs ``transformers``. transformers' SAM 3 calls ``torchvision.ops.roi_align`` for box prompts
and torchvision does not import beside our torch, so :func:`reference_model` gives the reference model the
line-by-line port of torchvision's kernel in ``sam3_reference_roi_align`` (the narrowest replacement: one
module attribute of transformers' SAM 3 modelling, nothing else changed).
"""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

CORPUS = [
    "cat", "dog", "tabby cat", "yellow school bus", "person", "car", "traffic light", "bicycle", "tree",
    "building", "road sign", "red apple", "green leaf", "sky", "water", "boat", "horse", "sheep", "cow",
    "bird", "chair", "table", "bottle", "cup", "Golden Retriever", "license plate", "crosswalk",
]
VOCAB_SIZE = 600


def train_vocabulary(directory: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a CLIP-style BPE (byte alphabet, ``</w>`` word ends) trained on CORPUS."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from ml_backend.sam3.tokenizer import CLIP_SPLIT, END_TOKEN, START_TOKEN

    tokenizer = Tokenizer(BPE(unk_token=END_TOKEN, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[START_TOKEN, END_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(directory))
    vocab = json.loads((directory / "vocab.json").read_text())
    # CLIP's vocabulary also holds every byte with a word end ("a</w>"): a phrase ending in any byte stays encodable.
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(char + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    return directory / "vocab.json", directory / "merges.txt"


def tiny_config(vocab_size: int, *, image_size: int = 112, hidden: int = 32, vision_layers: int = 2,
                queries: int = 10, start_id: int = 0, end_id: int = 1):
    from transformers import Sam3Config

    grid = image_size // 14
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                 patch_size=14, window_size=4, global_attn_indexes=[vision_layers - 1],
                                 pretrain_image_size=56),
            fpn_hidden_size=hidden, backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2]),
        # SAM 3's text tower uses gelu (transformers' CLIPTextConfig default is quick_gelu).
        text_config=dict(model_type="clip_text_model", vocab_size=vocab_size, hidden_size=hidden,
                         intermediate_size=2 * hidden, projection_dim=hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, hidden_act="gelu",
                         bos_token_id=start_id, eos_token_id=end_id, pad_token_id=end_id),
        geometry_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2,
                                     intermediate_size=2 * hidden),
        detr_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2,
                                 intermediate_size=2 * hidden),
        detr_decoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2,
                                 intermediate_size=2 * hidden, num_queries=queries),
        mask_decoder_config=dict(hidden_size=hidden, num_attention_heads=2),
    )


def save_tiny_checkpoint(directory: Path, *, seed: int = 0, weight_scale: float = 1.0, **config) -> Path:
    """A Hugging Face SAM 3 checkpoint directory as facebook/sam3 lays it out (sam3_video config,
    ``detector_model.`` weights, tokenizer files). ``weight_scale`` > 1 spreads the random weights so that
    scores are not all ~0.5 and masks not all empty."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer, Sam3Model, Sam3VideoConfig

    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = train_vocabulary(directory / "bpe")
    vocab = json.loads(vocab_file.read_text())
    torch.manual_seed(seed)
    detector = tiny_config(len(vocab), start_id=vocab["<|startoftext|>"], end_id=vocab["<|endoftext|>"], **config)
    model = Sam3Model(detector).eval()
    if weight_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.ndim >= 2:
                    param.mul_(weight_scale)
    video = Sam3VideoConfig(detector_config=detector.to_dict()).to_dict()
    video["architectures"] = ["Sam3VideoModel"]
    (directory / "config.json").write_text(json.dumps(video, indent=1))
    save_file({f"detector_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file)).save_pretrained(str(directory))
    return directory


def reference_model(directory: Path):
    """transformers' ``Sam3Model`` loaded from the checkpoint, RoIAlign served by the torchvision port."""
    from sam3_reference_roi_align import roi_align

    modeling = importlib.import_module("transformers.models.sam3.modeling_sam3")
    modeling.torchvision = types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=roi_align))
    return modeling.Sam3Model.from_pretrained(str(directory)).eval()
