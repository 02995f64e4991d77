"""Convert an official Segment Anything checkpoint (``sam_vit_*.pth``) into a keras-hub preset.

The architecture is read from the checkpoint's tensor shapes, so the three official
sizes and any smaller or custom configuration of the same family convert alike.
Every official tensor is mapped onto exactly one keras-hub variable and every
keras-hub variable receives exactly one tensor; anything else is an error, never a
silently half-initialised model.

Two numbers are not stored in any tensor shape:

* the image encoder's attention heads come from the width of the relative position
  tables (``rel_pos_h`` is ``(2 * size - 1, head_dim)``), so ``heads = dim // head_dim``
  (vit_b: 12 heads of 64, vit_l: 16 of 64, vit_h: 16 of 80);
* the mask decoder's attention heads cannot be read at all: official SAM always uses
  8, and so does this converter (``DECODER_NUM_HEADS``).

Pixel normalisation: the official model normalises 0-255 pixels with the ImageNet
mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375); keras-hub's ViTDet
backbone normalises [0, 1] pixels with (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225),
which are exactly those values divided by 255. The preset's image converter therefore
scales pixels by 1/255, as keras-hub's own SAM presets do.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)
from ml_backend.errors import ModelSourceError

logger = logging.getLogger(__name__)

DECODER_NUM_HEADS = 8  # official SAM's TwoWayTransformer; not recoverable from shapes
ATTENTION_DOWNSAMPLE_RATE = 2  # keras-hub's SAMMaskDecoder supports only this rate
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

_REQUIRED_KEYS = (
    "image_encoder.patch_embed.proj.weight",
    "image_encoder.pos_embed",
    "image_encoder.neck.0.weight",
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "prompt_encoder.no_mask_embed.weight",
    "prompt_encoder.mask_downscaling.3.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
)


@dataclass(frozen=True)
class SamArchitecture:
    """Everything needed to build one SAM, as read from a checkpoint."""

    image_size: int
    patch_size: int
    encoder_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_mlp_dim: int
    encoder_qkv_bias: bool
    window_size: int
    global_attention_indices: tuple[int, ...]
    prompt_dim: int  # neck output channels = prompt embedding = mask decoder width
    mask_in_channels: int
    decoder_depth: int
    decoder_num_heads: int
    decoder_mlp_dim: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official 1024 input)."""
        return self.image_size // self.patch_size


# --- loading ---------------------------------------------------------------------------


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official SAM checkpoint on the CPU, refusing anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"SAM checkpoint {path} does not exist.")
    try:
        # Memory-map zip-format files (all official ones): a 2.5 GB vit_h then needs no second copy in RAM.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ModelSourceError(
            f"{path} is not a readable PyTorch checkpoint: the file is damaged, truncated or of another "
            f"format (torch said {exc.__class__.__name__}: {_first_line(exc)})."
        ) from exc
    state_dict = _unwrap(loaded)
    if state_dict is None:
        raise ModelSourceError(f"{path} is not a SAM checkpoint: it holds a {type(loaded).__name__}, not tensors.")
    missing = [key for key in _REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise ModelSourceError(
            f"{path} is not an official SAM checkpoint: it lacks {', '.join(missing[:3])}"
            f"{' and more' if len(missing) > 3 else ''}."
        )
    return state_dict


def _unwrap(loaded: object) -> dict[str, torch.Tensor] | None:
    """The tensor dict, also when saved as ``{"model": ...}``/``{"state_dict": ...}`` or from DataParallel."""
    if isinstance(loaded, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return None
    return {str(key).removeprefix("module."): value for key, value in loaded.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"


# --- architecture ----------------------------------------------------------------------


def _count(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in state_dict if (m := regex.match(key))})


def infer_sam_architecture(state_dict: dict[str, torch.Tensor]) -> SamArchitecture:
    """Read a SAM's configuration from its tensor shapes (see the module docstring)."""
    try:
        return _infer(state_dict)
    except KeyError as exc:
        raise ModelSourceError(f"Not a SAM checkpoint: tensor {exc.args[0]} is missing.") from exc


def _infer(sd: dict[str, torch.Tensor]) -> SamArchitecture:
    encoder_dim, in_channels, patch_size, _ = sd["image_encoder.patch_embed.proj.weight"].shape
    if in_channels != 3:
        raise ModelSourceError(f"SAM checkpoint's image encoder takes {in_channels} channels, not RGB.")
    _, grid_h, grid_w, _ = sd["image_encoder.pos_embed"].shape
    if grid_h != grid_w:
        raise ModelSourceError(f"SAM checkpoint has a non-square {grid_h}x{grid_w} position embedding.")
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
    if depth == 0:
        raise ModelSourceError("SAM checkpoint has no image encoder blocks.")

    global_rel_len = 2 * grid_h - 1
    window_sizes: set[int] = set()
    global_indices: list[int] = []
    head_dims: set[int] = set()
    for i in range(depth):
        rel_len, head_dim = sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape
        head_dims.add(int(head_dim))
        if rel_len == global_rel_len:
            global_indices.append(i)
        else:
            window_sizes.add((int(rel_len) + 1) // 2)
    if len(window_sizes) > 1 or len(head_dims) != 1:
        raise ModelSourceError(
            f"SAM checkpoint mixes window sizes {sorted(window_sizes)} or head sizes {sorted(head_dims)}."
        )
    head_dim = head_dims.pop()
    if encoder_dim % head_dim:
        raise ModelSourceError(f"SAM encoder width {encoder_dim} is not a multiple of its head size {head_dim}.")
    # Without windowed blocks every block is global; a window as large as the grid is the same computation.
    window_size = window_sizes.pop() if window_sizes else int(grid_h)

    prompt_dim = int(sd["prompt_encoder.no_mask_embed.weight"].shape[1])
    neck_out = int(sd["image_encoder.neck.0.weight"].shape[0])
    decoder_dim = int(sd["mask_decoder.iou_token.weight"].shape[1])
    if not prompt_dim == neck_out == decoder_dim:
        raise ModelSourceError(
            f"SAM checkpoint's widths disagree: encoder output {neck_out}, prompts {prompt_dim}, decoder {decoder_dim}."
        )
    cross_dim = int(sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0])
    if cross_dim * ATTENTION_DOWNSAMPLE_RATE != prompt_dim:
        raise ModelSourceError(
            f"SAM checkpoint's decoder cross-attention width {cross_dim} is not {prompt_dim} // "
            f"{ATTENTION_DOWNSAMPLE_RATE}; keras-hub's SAM cannot represent it."
        )
    if cross_dim % DECODER_NUM_HEADS:
        raise ModelSourceError(
            f"SAM decoder attention width {cross_dim} does not split into {DECODER_NUM_HEADS} heads."
        )
    return SamArchitecture(
        image_size=int(grid_h * patch_size),
        patch_size=int(patch_size),
        encoder_dim=int(encoder_dim),
        encoder_depth=depth,
        encoder_num_heads=int(encoder_dim // head_dim),
        encoder_mlp_dim=int(sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]),
        encoder_qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
        window_size=window_size,
        global_attention_indices=tuple(global_indices),
        prompt_dim=prompt_dim,
        mask_in_channels=int(sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
        decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        decoder_num_heads=DECODER_NUM_HEADS,
        decoder_mlp_dim=int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        num_multimask_outputs=int(sd["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
        iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
    )


# --- keras-hub model -------------------------------------------------------------------


def build_segmenter(arch: SamArchitecture):
    """A randomly initialised ``keras_hub.models.SAMImageSegmenter`` of this architecture."""
    import keras_hub

    size = arch.image_size
    image_encoder = keras_hub.models.ViTDetBackbone(
        hidden_size=arch.encoder_dim,
        num_layers=arch.encoder_depth,
        intermediate_dim=arch.encoder_mlp_dim,
        num_heads=arch.encoder_num_heads,
        global_attention_layer_indices=list(arch.global_attention_indices),
        image_shape=(size, size, 3),
        patch_size=arch.patch_size,
        num_output_channels=arch.prompt_dim,
        use_bias=arch.encoder_qkv_bias,
        window_size=arch.window_size,
    )
    prompt_encoder = keras_hub.layers.SAMPromptEncoder(
        hidden_size=arch.prompt_dim,
        image_embedding_size=(arch.embedding_size, arch.embedding_size),
        input_image_size=(size, size),
        mask_in_channels=arch.mask_in_channels,
    )
    mask_decoder = keras_hub.layers.SAMMaskDecoder(
        hidden_size=arch.prompt_dim,
        num_layers=arch.decoder_depth,
        intermediate_dim=arch.decoder_mlp_dim,
        num_heads=arch.decoder_num_heads,
        embedding_dim=arch.prompt_dim,
        num_multimask_outputs=arch.num_multimask_outputs,
        iou_head_depth=arch.iou_head_depth,
        iou_head_hidden_dim=arch.iou_head_hidden_dim,
    )
    backbone = keras_hub.models.SAMBackbone(
        image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder
    )
    # keras-hub's own SAM presets carry this converter: pixels / 255, then the backbone's ImageNet statistics.
    converter = keras_hub.layers.SAMImageConverter(image_size=(size, size), scale=1.0 / 255)
    preprocessor = keras_hub.models.SAMImageSegmenterPreprocessor(image_converter=converter)
    return keras_hub.models.SAMImageSegmenter(backbone=backbone, preprocessor=preprocessor)


# --- weight mapping --------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _linear(t: torch.Tensor) -> torch.Tensor:
    return t.T  # torch (out, in) -> keras (in, out)


def _conv(t: torch.Tensor) -> torch.Tensor:
    # torch Conv2d (out, in, kh, kw) -> keras (kh, kw, in, out); torch ConvTranspose2d
    # (in, out, kh, kw) -> keras Conv2DTranspose (kh, kw, out, in): the same permutation.
    return t.permute(2, 3, 1, 0)


def _layers_of(sequential, kind) -> list:
    return [layer for layer in sequential.layers if isinstance(layer, kind)]


def _weight_plan(segmenter) -> Iterator[tuple[str, object, Transform]]:
    """(official key, keras variable, transform) for every variable of the segmenter."""
    import keras
    from keras_hub.src.models.vit_det.vit_layers import (
        AddPositionalEmbedding,
        ViTDetPatchingAndEmbedding,
        WindowedTransformerEncoder,
    )

    def dense(prefix: str, layer) -> Iterator[tuple[str, object, Transform]]:
        yield f"{prefix}.weight", layer.kernel, _linear
        if layer.bias is not None:
            yield f"{prefix}.bias", layer.bias, _same

    def conv(prefix: str, layer) -> Iterator[tuple[str, object, Transform]]:
        yield f"{prefix}.weight", layer.kernel, _conv
        if layer.bias is not None:
            yield f"{prefix}.bias", layer.bias, _same

    def norm(prefix: str, layer) -> Iterator[tuple[str, object, Transform]]:
        yield f"{prefix}.weight", layer.gamma, _same
        yield f"{prefix}.bias", layer.beta, _same

    def mlp(prefix: str, sequential) -> Iterator[tuple[str, object, Transform]]:
        for j, layer in enumerate(_layers_of(sequential, keras.layers.Dense)):
            yield from dense(f"{prefix}.layers.{j}", layer)

    def attention(prefix: str, layer) -> Iterator[tuple[str, object, Transform]]:
        for official, ours in (("q_proj", "query_proj"), ("k_proj", "key_proj"), ("v_proj", "value_proj")):
            yield from dense(f"{prefix}.{official}", getattr(layer, ours))
        yield from dense(f"{prefix}.out_proj", layer.out_proj)

    backbone = segmenter.backbone
    encoder = backbone.image_encoder
    e = "image_encoder"
    (patching,) = [layer for layer in encoder.layers if isinstance(layer, ViTDetPatchingAndEmbedding)]
    yield from conv(f"{e}.patch_embed.proj", patching.projection)
    (position,) = [layer for layer in encoder.layers if isinstance(layer, AddPositionalEmbedding)]
    yield f"{e}.pos_embed", position.pos_embed, _same
    blocks = [layer for layer in encoder.layers if isinstance(layer, WindowedTransformerEncoder)]
    for i, block in enumerate(blocks):
        b = f"{e}.blocks.{i}"
        yield from norm(f"{b}.norm1", block.layer_norm1)
        yield from dense(f"{b}.attn.qkv", block.attention.qkv)
        yield from dense(f"{b}.attn.proj", block.attention.projection)
        yield f"{b}.attn.rel_pos_h", block.attention.add_decomposed_relative_pe.rel_pos_h, _same
        yield f"{b}.attn.rel_pos_w", block.attention.add_decomposed_relative_pe.rel_pos_w, _same
        yield from norm(f"{b}.norm2", block.layer_norm2)
        lin1, lin2 = _layers_of(block.mlp_block.dense_net, keras.layers.Dense)
        yield from dense(f"{b}.mlp.lin1", lin1)
        yield from dense(f"{b}.mlp.lin2", lin2)
    neck = encoder.neck.layers  # conv 1x1, norm, conv 3x3, norm
    yield from conv(f"{e}.neck.0", neck[0])
    yield from norm(f"{e}.neck.1", neck[1])
    yield from conv(f"{e}.neck.2", neck[2])
    yield from norm(f"{e}.neck.3", neck[3])

    prompts = backbone.prompt_encoder
    p = "prompt_encoder"
    yield (
        f"{p}.pe_layer.positional_encoding_gaussian_matrix",
        prompts.positional_embedding_layer.positional_encoding_gaussian_matrix,
        _same,
    )
    for k, name in enumerate(
        ("background_point_embed", "foreground_point_embed", "top_left_corner_embed", "bottom_right_corner_embed")
    ):
        yield f"{p}.point_embeddings.{k}.weight", getattr(prompts, name).embeddings, _same
    yield f"{p}.not_a_point_embed.weight", prompts.not_a_point_embed.embeddings, _same
    yield f"{p}.no_mask_embed.weight", prompts.no_mask_embed.embeddings, _same
    down = prompts.mask_downscaler.layers  # conv, norm, act, conv, norm, act, conv (official indices alike)
    for k in (0, 3, 6):
        yield from conv(f"{p}.mask_downscaling.{k}", down[k])
    for k in (1, 4):
        yield from norm(f"{p}.mask_downscaling.{k}", down[k])

    decoder = backbone.mask_decoder
    d = "mask_decoder"
    t = f"{d}.transformer"
    for i, layer in enumerate(decoder.transformer.layers):
        li = f"{t}.layers.{i}"
        yield from attention(f"{li}.self_attn", layer.self_attention)
        yield from norm(f"{li}.norm1", layer.layer_norm1)
        yield from attention(f"{li}.cross_attn_token_to_image", layer.cross_attention_token_to_image)
        yield from norm(f"{li}.norm2", layer.layer_norm2)
        lin1, lin2 = _layers_of(layer.mlp_block.mlp_block, keras.layers.Dense)
        yield from dense(f"{li}.mlp.lin1", lin1)
        yield from dense(f"{li}.mlp.lin2", lin2)
        yield from norm(f"{li}.norm3", layer.layer_norm3)
        yield from attention(f"{li}.cross_attn_image_to_token", layer.cross_attention_image_to_token)
        yield from norm(f"{li}.norm4", layer.layer_norm4)
    yield from attention(f"{t}.final_attn_token_to_image", decoder.transformer.final_attention_token_to_image)
    yield from norm(f"{t}.norm_final_attn", decoder.transformer.final_layer_norm)
    yield f"{d}.iou_token.weight", decoder.iou_token.embeddings, _same
    yield f"{d}.mask_tokens.weight", decoder.mask_tokens.embeddings, _same
    up = decoder.output_upscaling.layers  # conv-transpose, norm, act, conv-transpose, act
    yield from conv(f"{d}.output_upscaling.0", up[0])
    yield from norm(f"{d}.output_upscaling.1", up[1])
    yield from conv(f"{d}.output_upscaling.3", up[3])
    for k, hyper in enumerate(decoder.output_hypernetworks_mlps):
        yield from mlp(f"{d}.output_hypernetworks_mlps.{k}", hyper.mlp_block)
    yield from mlp(f"{d}.iou_prediction_head", decoder.iou_prediction_head.mlp_block)


def _check_pixel_statistics(state_dict: dict[str, torch.Tensor], used: Counter) -> None:
    """Some exports carry the (non-persistent) normalisation buffers; accept only the standard ones."""
    for key, expected in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
        if key in state_dict:
            if not np.allclose(state_dict[key].float().flatten().numpy(), expected, atol=1e-3):
                raise ModelSourceError(
                    f"SAM checkpoint uses {key}={state_dict[key].flatten().tolist()}; only the standard "
                    f"ImageNet statistics {expected} are supported."
                )
            used[key] += 1


def port_weights(segmenter, state_dict: dict[str, torch.Tensor]) -> None:
    """Assign every official tensor to its keras-hub variable, checking the mapping is one-to-one."""
    used: Counter[str] = Counter()
    assigned: Counter[int] = Counter()
    for key, variable, transform in _weight_plan(segmenter):
        if key not in state_dict:
            raise ModelSourceError(f"SAM checkpoint lacks tensor {key} (needed by {variable.path}).")
        value = transform(state_dict[key].detach().to(torch.float32)).contiguous().numpy()
        if tuple(variable.shape) != value.shape:
            raise ModelSourceError(
                f"SAM checkpoint tensor {key} has shape {tuple(state_dict[key].shape)}, which does not fit "
                f"{variable.path} {tuple(variable.shape)}."
            )
        variable.assign(value)
        used[key] += 1
        assigned[id(variable)] += 1
    _check_pixel_statistics(state_dict, used)
    unused = sorted(set(state_dict) - set(used))
    if unused:
        raise ModelSourceError(
            f"SAM checkpoint has {len(unused)} tensors this converter does not understand: {', '.join(unused[:5])}"
            f"{' ...' if len(unused) > 5 else ''}."
        )
    twice = sorted(key for key, n in used.items() if n > 1)
    unset = [v.path for v in segmenter.weights if assigned[id(v)] != 1]
    if twice or unset:  # a bug in the plan above, never the checkpoint's fault
        raise ModelSourceError(f"SAM conversion is inconsistent: reused {twice}, unassigned {unset[:5]}.")


# --- end to end ------------------------------------------------------------------------


def convert_state_dict(state_dict: dict[str, torch.Tensor]):
    """Build a keras-hub ``SAMImageSegmenter`` holding the weights of an official state dict."""
    arch = infer_sam_architecture(state_dict)
    logger.info("SAM architecture: %s", arch)
    segmenter = build_segmenter(arch)
    port_weights(segmenter, state_dict)
    return segmenter


def convert_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the keras-hub preset of an official SAM checkpoint to ``out_dir`` and return it.

    The preset is written to a temporary directory beside ``out_dir`` and renamed into
    place, so an interrupted conversion never leaves a half-written preset behind.
    """
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelSourceError(f"{out_dir} already exists and is not empty; choose a new directory.")
    state_dict = load_official_state_dict(checkpoint_path)
    segmenter = convert_state_dict(state_dict)
    del state_dict
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        segmenter.save_to_preset(str(staging))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / "preset")
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote keras-hub SAM preset %s from %s", out_dir, checkpoint_path)
    return out_dir
