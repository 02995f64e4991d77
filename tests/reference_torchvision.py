"""A stand-in for the few torchvision functions transformers' SAM 3 *processor* calls, test oracle only.

torchvision does not import beside our torch (see tests/sam3_factory.py), and transformers' image processors
need it. :func:`install` puts a ``torchvision`` module tree in ``sys.modules`` whose functions are line-by-line
ports of torchvision 0.28's tensor kernels (``transforms/v2/functional/_geometry.py: resize_image``,
``_misc.py: normalize_image``, ``_color.py: grayscale_to_rgb_image``) and ``ops.roi_align`` from
``sam3_reference_roi_align``; everything around them is transformers' own code, unchanged. It must be installed
before ``transformers`` is first imported (transformers decides once whether torchvision is there), so the
reference pipeline runs in its own process (``sam3_reference_pipeline.py``).
"""

from __future__ import annotations

import enum
import importlib.machinery
import sys
import types

import torch
from torch.nn.functional import interpolate

VERSION = "0.28.0"  # the release whose kernels are ported


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _do_native_uint8_resize_on_cpu(interpolation: InterpolationMode) -> bool:
    if interpolation == InterpolationMode.BILINEAR:
        return "AVX2" in torch.backends.cpu.get_cpu_capability()
    return interpolation == InterpolationMode.BICUBIC


def resize(image: torch.Tensor, size: list[int], interpolation=InterpolationMode.BILINEAR, max_size=None,
           antialias: bool | None = True) -> torch.Tensor:
    """torchvision's ``resize_image`` for a tensor and an explicit (height, width)."""
    if isinstance(interpolation, int):
        raise NotImplementedError("the port takes an InterpolationMode")
    assert max_size is None and len(size) == 2
    antialias = False if antialias is None else antialias
    align_corners = None
    if interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        align_corners = False
    else:
        antialias = False
    shape = image.shape
    numel = image.numel()
    num_channels, old_height, old_width = shape[-3:]
    new_height, new_width = int(size[0]), int(size[1])
    if (new_height, new_width) == (old_height, old_width):
        return image
    if numel > 0:
        dtype = image.dtype
        acceptable_dtypes = [torch.float32, torch.float64]
        if interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
            acceptable_dtypes.append(torch.uint8)
        elif image.device.type == "cpu" and _do_native_uint8_resize_on_cpu(interpolation):
            acceptable_dtypes.append(torch.uint8)
        image = image.reshape(-1, num_channels, old_height, old_width)
        strides = image.stride()
        if image.is_contiguous(memory_format=torch.channels_last) and image.shape[0] == 1 and numel != strides[0]:
            new_strides = list(strides)
            new_strides[0] = numel
            image = image.as_strided((1, num_channels, old_height, old_width), new_strides)
        need_cast = dtype not in acceptable_dtypes
        if need_cast:
            image = image.to(dtype=torch.float32)
        image = interpolate(image, size=[new_height, new_width], mode=interpolation.value,
                            align_corners=align_corners, antialias=antialias)
        if need_cast:
            if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
                image = image.clamp_(min=0, max=255)
            if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
                image = image.round_()
            image = image.to(dtype=dtype)
    return image.reshape(shape[:-3] + (num_channels, new_height, new_width))


def normalize(image: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    """torchvision's ``normalize_image``."""
    if not image.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {image.dtype}.")
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def grayscale_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """torchvision's ``grayscale_to_rgb_image``."""
    if image.shape[-3] >= 3:
        return image
    return image.expand(image.shape[:-3] + (3,) + image.shape[-2:])


def _unavailable(*args, **kwargs):
    raise NotImplementedError("not ported: the SAM 3 reference pipeline does not call it")


def install() -> None:
    """Register the stand-in; call before importing transformers."""
    from sam3_reference_roi_align import roi_align

    def module(name: str, **attributes) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__spec__ = importlib.machinery.ModuleSpec(name, None)
        made.__file__ = __file__
        made.__dict__.update(attributes)
        sys.modules[name] = made
        return made

    v2_functional = module("torchvision.transforms.v2.functional", resize=resize, normalize=normalize,
                           grayscale_to_rgb=grayscale_to_rgb, InterpolationMode=InterpolationMode,
                           pad=_unavailable, crop=_unavailable, to_dtype=_unavailable)
    v2 = module("torchvision.transforms.v2", functional=v2_functional)
    functional = module("torchvision.transforms.functional", pil_to_tensor=_unavailable)
    transforms = module("torchvision.transforms", v2=v2, functional=functional, InterpolationMode=InterpolationMode)
    boxes = module("torchvision.ops.boxes", batched_nms=_unavailable)
    ops = module("torchvision.ops", boxes=boxes, roi_align=roi_align)
    io = module("torchvision.io", decode_image=_unavailable)
    module("torchvision", __version__=VERSION, transforms=transforms, ops=ops, io=io)
