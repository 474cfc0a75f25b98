"""Phi-3-Vision image processor: image loading, RGB conversion and the HD crop transform.

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

import io
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
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

logger = logging.getLogger(__name__)

CROP_SIZE = 336
"""Side of one CLIP crop (and of the global view) in pixels."""

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = 255.0

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | np.ndarray
"""One image as ``preprocess`` accepts it: PIL image, path, encoded bytes or an HWC ``uint8`` array."""


class ImageLoadError(ValueError):
    """An input could not be decoded as an image; the message names the source and the reason."""


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    """Keyword arguments of ``Phi3VImageProcessor`` beyond transformers' ``ImagesKwargs``.

    Declaring them lets ``Phi3VImageProcessor.from_pretrained(path, num_crops=4)`` pass the override to the
    constructor (and so through its validation) instead of setting the attribute afterwards.
    """

    num_crops: int
    num_img_tokens: int


# --------------------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# --------------------------------------------------------------------------------------------------------------


def _describe_source(source: object, name: str | None) -> str:
    """Return the label used in error messages for ``source``."""
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return filename or f"<PIL {source.mode} image {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _check_pixel_limit(image: Image.Image, label: str) -> None:
    """Refuse images above ``Image.MAX_IMAGE_PIXELS`` before decoding them (decompression-bomb guard).

    Pillow itself only raises above twice the limit and merely warns in between; a catalog pipeline should not
    decode such an image at all.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageLoadError(
            f"{label}: refusing to decode a {width}x{height} image ({width * height} pixels > "
            f"Image.MAX_IMAGE_PIXELS = {limit}); possible decompression bomb"
        )


def load_image(source: Image.Image | str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Open and fully decode an image, then convert it to RGB with :func:`to_rgb`.

    Args:
        source (Image.Image | str | os.PathLike | bytes): a path, the encoded file content, or a PIL image
            (a lazily opened one is decoded here).
        name (str | None): label for error messages; defaults to the path (or a short description).

    Returns:
        Image.Image: a decoded image in mode ``"RGB"``.

    Raises:
        ImageLoadError: the source is not a decodable image (unknown format, empty or truncated data, a
            decompression bomb, an unsupported mode, a missing file). The message names the source and the
            reason; the original exception is chained.
        TypeError: ``source`` has an unsupported type.
    """
    label = _describe_source(source, name)
    try:
        if isinstance(source, Image.Image):
            source.load()  # no-op for decoded images; Pillow's own bomb check ran in Image.open
            return to_rgb(source)
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageLoadError(f"{label}: empty input (0 bytes)")
            with Image.open(io.BytesIO(bytes(source))) as image:
                _check_pixel_limit(image, label)
                image.load()  # decode now, so truncated data fails here and not later
                return to_rgb(image)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise ImageLoadError(f"{label}: empty file (0 bytes)")
            with Image.open(path) as image:
                _check_pixel_limit(image, label)
                image.load()
                return to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{label}: possible decompression bomb: {exc}") from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{label}: file not found") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(f"{label}: not a recognised image format") from exc
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error ...
        raise ImageLoadError(f"{label}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    raise TypeError(f"{label}: expected a path, bytes or a PIL image, got {type(source).__name__}")


def _has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency (an alpha band, or a palette / grey transparency entry)."""
    bands = image.getbands()
    if "A" in bands or "a" in bands:
        return True
    return image.mode in ("P", "L", "1") and image.info.get("transparency") is not None


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Alpha-composite onto white, exactly as transformers' ``convert_to_rgb`` does."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any image mode a catalog can contain to 8-bit RGB, deterministically.

    Rules, in order:

    * animated images (GIF, WebP, APNG): the first frame is used;
    * the EXIF orientation (tag 0x0112, 2..8) is applied with ``ImageOps.exif_transpose``;
    * ``RGB``: returned as is (the same object when no orientation had to be applied);
    * an alpha band (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) or a transparency entry on ``P``/``L``/``1``
      (``"transparency" in image.info``): alpha-composited onto **white** (what transformers' ``convert_to_rgb``
      does; the official processor runs it through ``do_convert_rgb``);
    * 16-bit integer modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): the 0..65535 range is mapped to 8 bits by
      ``value >> 8``; mode ``I`` (32-bit) is clipped to 0..65535 first. Pillow's own conversion clips at 255,
      which turns almost every 16-bit photo white;
    * ``F`` (float): clipped to 0..255 (NaN -> 0) and truncated to ``uint8``;
    * everything else (``CMYK``, ``YCbCr``, ``L``, ``1``, ``P`` without transparency, ...): ``convert("RGB")``.

    Args:
        image (Image.Image): a decoded (or lazily opened) PIL image.

    Returns:
        Image.Image: an image in mode ``"RGB"``.

    Raises:
        ValueError: Pillow cannot convert the mode to RGB (e.g. ``LAB``).
    """
    if getattr(image, "is_animated", False) and image.tell() != 0:
        image.seek(0)
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)

    mode = image.mode
    if mode == "RGB":
        return image
    if _has_alpha(image):
        return _composite_on_white(image)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image)  # [H, W] uint16 (any byte order) or int32
        if mode == "I":
            values = np.clip(values, 0, 65535)
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)  # [H, W]
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image), nan=0.0)  # [H, W] float32
        grey = np.clip(values, 0.0, 255.0).astype(np.uint8)  # [H, W]
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


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
