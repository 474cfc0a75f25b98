"""Image loading and deterministic RGB conversion, with Pillow and numpy only (no torch: the downloader uses it).

Every mode a product catalog can contain becomes RGB the same way every time: EXIF orientation applied, transparency
composited onto white (as transformers' `convert_to_rgb`, which the official processor uses), CMYK converted, 16-bit
images scaled to 8 bits rather than clipped to white, animated images reduced to their first frame. A file that is
not a decodable image raises `ImageLoadError` naming it.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageLoadError(ValueError):
    """An input could not be decoded as an image; the message names the source and the reason."""


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
