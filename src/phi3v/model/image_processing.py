"""Phi-3-Vision image processor: the HD crop transform (loading and RGB conversion: `phi3v.model.image_io`).

Reference: the hub file ``image_processing_phi3_v.py`` of ``microsoft/Phi-3-vision-128k-instruct`` and the
``Phi3VImageProcessor`` merged into ``processing_phi3_v.py`` of ``microsoft/Phi-3.5-vision-instruct``
(``docs/phi3v-reference.md`` §4; token count §3.4 / §4.6). The transform is reproduced bit for bit without
torchvision:

1. portrait images are handled as if transposed (``Image.TRANSPOSE``), so the long side is horizontal;
2. ``scale`` = the largest integer with ``scale * ceil(scale / ratio) <= num_crops``;
3. bilinear resize to ``(new_w, new_h) = (int(scale * 336), int(new_w / ratio))`` with Pillow (what
   ``torchvision.transforms.functional.resize`` does for a PIL image);
4. white padding of the short side to a multiple of 336, centred (``top = int((tar - h) / 2)``);
5. ``ToTensor`` (``uint8 / 255``) then ``Normalize`` (``(x - mean) / std``), in that op order, float32;
6. global view = torch bicubic ``interpolate`` of the *normalised* HD tensor to 336×336;
7. row-major 336×336 crops, ``cat([global, crops])``, zero crops up to ``num_crops + 1``.

Two departures from the reference, both where the reference does not produce a usable result:
``to_rgb`` applies the EXIF orientation and scales 16-bit images instead of clipping them to white, and a resized
short side that would round to 0 px (aspect ratio above ``336 * scale``; the reference crashes) is kept at 1 px.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from phi3v.model.image_io import ImageLoadError, load_image, to_rgb

__all__ = [
    "CROP_SIZE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageLoadError",
    "Phi3VImageProcessor",
    "hd_transform_size",
    "load_image",
    "num_image_tokens",
    "to_rgb",
]

logger = logging.getLogger(__name__)

CROP_SIZE = 336
"""Side of one CLIP crop (and of the global view) in pixels."""

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WHITE = 255.0

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | np.ndarray
"""One image as ``preprocess`` accepts it: PIL image, path, encoded bytes or an HWC ``uint8`` array."""


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    """Keyword arguments of ``Phi3VImageProcessor`` beyond transformers' ``ImagesKwargs``.

    Declaring them lets ``Phi3VImageProcessor.from_pretrained(path, num_crops=4)`` pass the override to the
    constructor (and so through its validation) instead of setting the attribute afterwards.
    """

    num_crops: int
    num_img_tokens: int


# --------------------------------------------------------------------------------------------------------------
# HD transform geometry and token count
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HDPlan:
    """Geometry of the HD transform of one image, in the image's own orientation (all sizes in pixels)."""

    transposed: bool  # portrait input: the reference works on the transposed image
    resized_width: int
    resized_height: int
    pad_left: int
    pad_top: int
    width: int  # padded HD width, a multiple of CROP_SIZE
    height: int  # padded HD height, a multiple of CROP_SIZE


def _hd_plan(width: int, height: int, num_crops: int) -> _HDPlan:
    """Compute the HD transform geometry with the reference's float arithmetic (``HD_transform``, §4.2)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    _check_num_crops(num_crops)
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_long = int(scale * CROP_SIZE)
    # The reference gives 0 px here for aspect ratios above new_long (and then fails in the resize); keep 1 px.
    new_short = max(1, int(new_long / ratio))
    padded_short = int(math.ceil(new_short / CROP_SIZE) * CROP_SIZE)
    pad_before = int((padded_short - new_short) / 2)
    if transposed:
        return _HDPlan(True, new_short, new_long, pad_before, 0, padded_short, new_long)
    return _HDPlan(False, new_long, new_short, 0, pad_before, new_long, padded_short)


def hd_transform_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Size of the padded HD image the transform produces, without touching pixels.

    Mirrors ``calc_hd_transform_size`` of the reference.

    Args:
        width (int): original image width in pixels.
        height (int): original image height in pixels.
        num_crops (int): maximum number of 336×336 crops (``hd_num``), >= 1.

    Returns:
        tuple[int, int]: ``(width, height)`` of the HD image, both multiples of 336.
    """
    plan = _hd_plan(width, height, num_crops)
    return plan.width, plan.height


def num_image_tokens(h_crops: int, w_crops: int, num_img_tokens: int = 144) -> int:
    """Number of ``<|image|>`` tokens for an HD image of ``h_crops × w_crops`` crops.

    ``(h*w + 1) * 144 + 1 + (h + 1) * 12``: the sub-crop grid of ``12h`` rows of ``12w + 1`` tokens (each row ends
    with the ``sub_GN`` separator), one ``glb_GN`` token, and the global view's 12 rows of 13 tokens
    (reference §3.4 / §4.6).

    Args:
        h_crops (int): crops along the height (HD height // 336).
        w_crops (int): crops along the width (HD width // 336).
        num_img_tokens (int): tokens per crop after the 2×2 merge (144 = 12²); must be a perfect square.

    Returns:
        int: the token count.
    """
    side = math.isqrt(num_img_tokens)
    if side * side != num_img_tokens:
        raise ValueError(f"num_img_tokens must be a perfect square, got {num_img_tokens}")
    return (h_crops * w_crops + 1) * num_img_tokens + 1 + (h_crops + 1) * side


def _check_num_crops(num_crops: int) -> None:
    """Raise a ValueError unless ``num_crops`` is an integer >= 1."""
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"num_crops must be an integer >= 1, got {num_crops!r}")


# --------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------


def _empty_float32(*shape: int) -> torch.Tensor:
    """Uninitialised float32 tensor whose memory numpy allocates.

    numpy advises transparent huge pages for large allocations on Linux; torch's CPU allocator does not (unless
    ``THP_MEM_ALLOC_ENABLE=1``). Filling a fresh 20 MB buffer then costs hundreds instead of thousands of page
    faults, which is most of the copy time on machines with expensive faults (measured in benchmarks/RESULTS.md).
    """
    return torch.from_numpy(np.empty(shape, dtype=np.float32))


_SCRATCH = threading.local()


def _scratch_hd(channels: int, height: int, width: int) -> torch.Tensor:
    """Per-thread reusable float32 buffer for the HD tensor, viewed as ``[channels, height, width]``.

    The HD tensor only lives inside one ``preprocess`` call (the output gets copies of it), so the buffer is
    reused: writing into already-mapped memory avoids the page faults of a fresh 20 MB allocation per image. The
    buffer keeps the size of the largest HD image seen in the thread (at most ``num_crops`` × 1.35 MB).
    """
    numel = channels * height * width
    buffer = getattr(_SCRATCH, "hd", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _empty_float32(numel)
        _SCRATCH.hd = buffer
    return buffer[:numel].view(channels, height, width)


def _resize_like_reference(image: Image.Image, plan: _HDPlan) -> Image.Image:
    """Bilinear resize giving the same pixels as the reference's ``resize(transpose?(image))``.

    Pillow resamples horizontally first and vertically second, rounding to 8 bits in between. The reference
    transposes portrait images before resizing, so for them the first pass runs along the original *vertical*
    axis. Two single-axis resizes in that order (vertical, then horizontal) give the identical result without
    transposing the image twice.

    Args:
        image (Image.Image): RGB image in its own orientation.
        plan (_HDPlan): geometry from ``_hd_plan``.

    Returns:
        Image.Image: RGB image of size ``(plan.resized_width, plan.resized_height)``.
    """
    size = (plan.resized_width, plan.resized_height)
    if image.size == size:
        return image
    if not plan.transposed:
        return image.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    if height != plan.resized_height:
        image = image.resize((width, plan.resized_height), Image.Resampling.BILINEAR)
    if width != plan.resized_width:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


class Phi3VImageProcessor(BaseImageProcessor):
    """Phi-3-Vision / Phi-3.5-Vision HD image processor (global view + up to ``num_crops`` 336×336 crops).

    Loads the official ``preprocessor_config.json`` files as they are (extra keys such as ``auto_map``,
    ``processor_class`` and ``image_processor_type`` are accepted; ``auto_map`` is dropped because it points at
    remote code this native class replaces).

    Args:
        num_crops (int): maximum number of crops (``hd_num``), >= 1. 16 for Phi-3-V, 4 for Phi-3.5-V.
        image_mean (Sequence[float] | None): per-channel mean for ``Normalize`` (None: OpenAI CLIP mean).
        image_std (Sequence[float] | None): per-channel std for ``Normalize`` (None: OpenAI CLIP std).
        do_convert_rgb (bool): convert inputs with :func:`to_rgb` (EXIF orientation, alpha onto white, 16-bit
            scaling). If False, PIL inputs only go through ``image.convert("RGB")``.
        num_img_tokens (int): tokens per crop after the 2×2 merge (144).
        **kwargs: passed to ``BaseImageProcessor`` (set as attributes).
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 1,
        image_mean: Sequence[float] | None = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] | None = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        num_img_tokens: int = 144,
        **kwargs: Any,
    ) -> None:
        auto_map = kwargs.pop("auto_map", None)
        if auto_map is not None:
            logger.debug("Ignoring auto_map %s: Phi3VImageProcessor is a native class", auto_map)
        super().__init__(**kwargs)
        _check_num_crops(num_crops)
        num_image_tokens(1, 1, num_img_tokens)  # validates num_img_tokens
        self.num_crops = num_crops
        self.image_mean = self._channel_values(image_mean, OPENAI_CLIP_MEAN, "image_mean")
        self.image_std = self._channel_values(image_std, OPENAI_CLIP_STD, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.do_convert_rgb = bool(do_convert_rgb)
        self.num_img_tokens = num_img_tokens

    @staticmethod
    def _channel_values(values: Sequence[float] | float | None, default: list[float], name: str) -> list[float]:
        """Return ``values`` as a list of 3 floats (a scalar is broadcast, None means ``default``)."""
        if values is None:
            return list(default)
        if isinstance(values, (int, float)):
            return [float(values)] * 3
        out = [float(v) for v in values]
        if len(out) != 3:
            raise ValueError(f"{name} must have 3 values (one per RGB channel), got {out}")
        return out

    # ---- token counts ----------------------------------------------------------------------------------------

    def num_image_tokens_for_size(self, width: int, height: int) -> int:
        """Number of image tokens for an image of the given original size, without processing it.

        Args:
            width (int): original width in pixels.
            height (int): original height in pixels.

        Returns:
            int: the token count the processor's ``num_img_tokens`` output would give.
        """
        hd_width, hd_height = hd_transform_size(width, height, self.num_crops)
        return num_image_tokens(hd_height // CROP_SIZE, hd_width // CROP_SIZE, self.num_img_tokens)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """Alias of :meth:`num_image_tokens_for_size` under the reference's name."""
        return self.num_image_tokens_for_size(width, height)

    # ---- preprocessing --------------------------------------------------------------------------------------

    def _as_rgb_image(self, image: ImageSource) -> Image.Image:
        """Turn one accepted input into an RGB PIL image."""
        if isinstance(image, np.ndarray):
            if (
                image.dtype != np.uint8
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
            ):
                raise ValueError(
                    f"numpy images must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                    f"got {image.dtype} {list(image.shape)}"
                )
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[:, :, 0]
            image = Image.fromarray(np.ascontiguousarray(image))
            return to_rgb(image) if self.do_convert_rgb else image.convert("RGB")
        if isinstance(image, Image.Image):
            if not self.do_convert_rgb:
                return image if image.mode == "RGB" else image.convert("RGB")
            return load_image(image)  # an RGB image without EXIF orientation comes back as the same object
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            return load_image(image)
        raise TypeError(
            f"unsupported image type {type(image).__name__}: expected a PIL image, path, bytes or HWC uint8 array"
        )

    def _normalisation_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as float32 ``[3, 1, 1]`` tensors, built the way torchvision's ``Normalize`` builds them."""
        mean = torch.as_tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
        std = torch.as_tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
        return mean, std

    def _hd_tensor(self, image: Image.Image, plan: _HDPlan, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Resize, pad, ``ToTensor`` and ``Normalize`` one RGB image into its float32 HD tensor ``[3, H, W]``."""
        resized = _resize_like_reference(image, plan)
        pixels = np.asarray(resized)  # [h, w, 3] uint8, read-only view of a bytes copy
        planar = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, h, w] uint8, writable
        hd = _scratch_hd(3, plan.height, plan.width)  # [3, H, W]
        top, left = plan.pad_top, plan.pad_left
        bottom, right = top + plan.resized_height, left + plan.resized_width
        # ToTensor: float32(x) / 255, written straight into the HD buffer (the uint8 -> float32 cast and the division
        # are the same per-element ops as torchvision's ``img.to(float32).div(255)``). White padding: 255 / 255 = 1.
        hd[:, :top].fill_(_WHITE / 255)
        hd[:, bottom:].fill_(_WHITE / 255)
        hd[:, top:bottom, :left].fill_(_WHITE / 255)
        hd[:, top:bottom, right:].fill_(_WHITE / 255)
        torch.div(planar, 255, out=hd[:, top:bottom, left:right])
        # Normalize: (x - mean) / std, same ops and order as torchvision (sub_ then div_), in place.
        hd.sub_(mean)
        hd.div_(std)
        return hd

    def _fill_crops(self, image: Image.Image, out: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> list[int]:
        """Write the global view and the crops of one image into ``out`` ([num_crops + 1, 3, 336, 336]).

        Returns:
            list[int]: the padded HD size ``[height, width]``.
        """
        plan = _hd_plan(image.size[0], image.size[1], self.num_crops)
        hd = self._hd_tensor(image, plan, mean, std)  # [3, H, W]
        h_crops, w_crops = plan.height // CROP_SIZE, plan.width // CROP_SIZE
        n_sub = h_crops * w_crops
        global_view = F.interpolate(hd.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic")  # [1, 3, 336, 336]
        out[0].copy_(global_view[0])
        # [3, hc*336, wc*336] -> [hc, wc, 3, 336, 336], row-major crop order
        crops = hd.view(3, h_crops, CROP_SIZE, w_crops, CROP_SIZE).permute(1, 3, 0, 2, 4)
        out[1 : 1 + n_sub].view(h_crops, w_crops, 3, CROP_SIZE, CROP_SIZE).copy_(crops)
        out[1 + n_sub :].zero_()
        return [plan.height, plan.width]

    def preprocess(
        self,
        images: ImageSource | Sequence[ImageSource],
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Apply the HD transform to one image or a list of images.

        Args:
            images (ImageSource | Sequence[ImageSource]): one image or a list; each a PIL image, a path, encoded
                bytes or an HWC ``uint8`` array.
            return_tensors (str | None): ``"pt"`` (default) for torch tensors, ``"np"`` for numpy arrays, None to
                keep ``image_sizes`` as a list of ``[height, width]`` lists (``pixel_values`` stays a tensor).
            **kwargs: accepted for compatibility with transformers' processor plumbing; keys whose value is None
                are ignored, anything else raises.

        Returns:
            BatchFeature: ``pixel_values`` float32 ``[n, num_crops + 1, 3, 336, 336]`` (global view first, then the
            row-major crops, then zero crops), ``image_sizes`` int64 ``[n, 2]`` = padded HD ``(height, width)``,
            ``num_img_tokens`` ``list[int]``.

        Raises:
            ImageLoadError: an input is not a decodable image.
            TypeError: an input has an unsupported type, or an unknown keyword argument was given.
        """
        unknown = sorted(key for key, value in kwargs.items() if value is not None)
        if unknown:
            raise TypeError(f"Phi3VImageProcessor.preprocess got unsupported arguments: {unknown}")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if isinstance(images, (list, tuple)):
            image_list = list(images)
        else:
            image_list = [images]
        if not image_list:
            raise ValueError("no images given")

        rgb_images = [self._as_rgb_image(image) for image in image_list]
        mean, std = self._normalisation_constants()
        batch_shape = (len(rgb_images), self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        pixel_values = _empty_float32(*batch_shape)  # [n, num_crops + 1, 3, 336, 336]
        image_sizes = [self._fill_crops(image, pixel_values[i], mean, std) for i, image in enumerate(rgb_images)]
        token_counts = [num_image_tokens(h // CROP_SIZE, w // CROP_SIZE, self.num_img_tokens) for h, w in image_sizes]
        data: dict[str, Any] = {
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "num_img_tokens": token_counts,
        }
        if return_tensors in ("pt", "np"):
            data["image_sizes"] = torch.tensor(image_sizes, dtype=torch.int64)  # [n, 2]
        if return_tensors == "np":
            data["pixel_values"] = pixel_values.numpy()
            data["image_sizes"] = data["image_sizes"].numpy()
        return BatchFeature(data=data)

    def __call__(
        self, images: ImageSource | Sequence[ImageSource], return_tensors: str | None = "pt", **kwargs: Any
    ) -> BatchFeature:
        """Same as :meth:`preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def calc_num_image_tokens(self, images: ImageSource | Sequence[ImageSource]) -> list[int]:
        """Token counts for images (reference name); only their sizes are used, pixels are not processed.

        Args:
            images (ImageSource | Sequence[ImageSource]): one image or a list, as for :meth:`preprocess`.

        Returns:
            list[int]: one token count per image.
        """
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        return [self.num_image_tokens_for_size(*self._as_rgb_image(image).size) for image in image_list]
