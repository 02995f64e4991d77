"""The official ``segment-anything`` implementation, built to match a checkpoint (tests and bench only).

``segment-anything`` is a test/bench dependency (``scripts/install.sh --test``). It
imports torchvision, whose registry wheels do not import beside our CPU torch; when
torchvision is missing, :func:`install_torchvision_stand_in` registers the few names
``segment_anything`` imports. Only ``resize`` and ``to_pil_image`` are used by
``SamPredictor``: ``ResizeLongestSide.apply_image`` calls
``resize(to_pil_image(uint8_hwc_array), (h, w))``, which in torchvision is
``PIL.Image.fromarray(array)`` and ``image.resize((w, h), Image.BILINEAR)`` (PIL
resampling, antialiased when shrinking) — exactly what the stand-in does. Tensors are
resized by ``segment_anything`` with ``F.interpolate`` directly, never through
torchvision. The NMS helpers imported by the automatic mask generator are not needed
and raise if called.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import partial
from pathlib import Path

import torch

from ml_backend.sam.convert import (
    PIXEL_MEAN,
    PIXEL_STD,
    SamArchitecture,
    infer_sam_architecture,
    load_official_state_dict,
)


def install_torchvision_stand_in() -> None:
    """Register a minimal ``torchvision`` in ``sys.modules`` unless the real one imports."""
    try:
        importlib.import_module("torchvision")
        return
    except Exception:  # missing, or a build that does not match our torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    from PIL import Image

    def to_pil_image(pic, mode=None):
        return Image.fromarray(pic, mode=mode)

    def resize(img, size, interpolation=None, max_size=None, antialias=True):
        if not isinstance(img, Image.Image):
            raise TypeError("the torchvision stand-in resizes PIL images only (all SamPredictor needs)")
        height, width = size
        return img.resize((width, height), Image.BILINEAR)

    def _not_provided(*args, **kwargs):
        raise NotImplementedError("torchvision is not installed; the stand-in serves SamPredictor only")

    modules = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    }
    modules["torchvision.transforms.functional"].resize = resize
    modules["torchvision.transforms.functional"].to_pil_image = to_pil_image
    modules["torchvision.ops.boxes"].batched_nms = _not_provided
    modules["torchvision.ops.boxes"].box_area = _not_provided
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    modules["torchvision.ops"].boxes = modules["torchvision.ops.boxes"]
    sys.modules.update(modules)


def segment_anything_module():
    """Import ``segment_anything`` (with the torchvision stand-in when needed)."""
    install_torchvision_stand_in()
    try:
        return importlib.import_module("segment_anything")
    except ImportError as exc:
        raise ImportError(
            "The official segment-anything package is needed for parity tests and the benchmark: "
            "run scripts/install.sh --test (it installs segment-anything==1.0)."
        ) from exc


def build_official_sam(arch: SamArchitecture):
    """An official ``segment_anything.modeling.Sam`` of this architecture, in eval mode."""
    sa = segment_anything_module()
    mlp_ratio = arch.encoder_mlp_dim / arch.encoder_dim
    if int(arch.encoder_dim * mlp_ratio) != arch.encoder_mlp_dim:
        raise ValueError(f"encoder MLP width {arch.encoder_mlp_dim} is not expressible as a ratio of {arch.encoder_dim}")
    sam = sa.modeling.Sam(
        image_encoder=sa.modeling.ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_dim,
            img_size=arch.image_size,
            mlp_ratio=mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=arch.encoder_qkv_bias,
            use_rel_pos=True,
            global_attn_indexes=arch.global_attention_indices,
            window_size=arch.window_size,
            out_chans=arch.prompt_dim,
        ),
        prompt_encoder=sa.modeling.PromptEncoder(
            embed_dim=arch.prompt_dim,
            image_embedding_size=(arch.embedding_size, arch.embedding_size),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_channels,
        ),
        mask_decoder=sa.modeling.MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=sa.modeling.TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def load_official_sam(checkpoint_path: str | Path):
    """The official ``Sam`` with the weights of ``checkpoint_path`` (architecture read from its shapes)."""
    state_dict = load_official_state_dict(checkpoint_path)
    sam = build_official_sam(infer_sam_architecture(state_dict))
    # pixel_mean/pixel_std are non-persistent buffers of Sam; convert.py has checked any stored copy.
    sam.load_state_dict({k: v for k, v in state_dict.items() if k not in ("pixel_mean", "pixel_std")})
    return sam


def official_predictor(checkpoint_path: str | Path, device: str | None = None):
    """A ``segment_anything.SamPredictor`` over the checkpoint, the reference our engine must match."""
    sa = segment_anything_module()
    sam = load_official_sam(checkpoint_path)
    if device:
        sam.to(device)
    return sa.SamPredictor(sam)


def random_official_sam(arch: SamArchitecture, seed: int = 0):
    """An official ``Sam`` with seeded random weights, for parity tests and the benchmark.

    PyTorch's default initialisation leaves position tables at zero and layer norms at
    identity; they are perturbed too, so that converting them wrongly cannot go unnoticed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_official_sam(arch)
        with torch.no_grad():
            for name, param in sam.named_parameters():
                if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
                    param.normal_(0.0, 0.1)
                elif param.ndim == 1 and ("norm" in name or _is_layer_norm(sam, name)):
                    param.add_(torch.randn_like(param) * 0.1)
    return sam


def _is_layer_norm(sam, param_name: str) -> bool:
    module = sam.get_submodule(param_name.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d"


def save_official_checkpoint(sam, path: str | Path) -> Path:
    """Save ``sam``'s state dict the way the official ``.pth`` files are saved."""
    path = Path(path)
    torch.save(sam.state_dict(), path)
    return path
