"""Tests for phi3v.model.image_processing: token counts, bit-exactness against the reference HD transform,
image modes, bad inputs and save/load of the processor config.

Images are made with Pillow in the tests (no binary fixtures). The reference transform is re-implemented literally
below (PIL transpose / resize / ImageOps.expand, numpy ToTensor / Normalize, torch bicubic) and independently of the
processor's code.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.model.image_processing import (
    CROP_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLoadError,
    Phi3VImageProcessor,
    hd_transform_size,
    load_image,
    num_image_tokens,
    to_rgb,
)
from reference_hd import reference_hd_image, reference_normalised, reference_pixel_values, reference_token_count

# Official preprocessor_config.json contents (reference §1.4).
PHI3_V_PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    },
    "num_crops": 16,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Phi3VProcessor",
    "num_img_tokens": 144,
}
PHI35_V_PREPROCESSOR_CONFIG = {
    "auto_map": {
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
    },
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Phi3VImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "num_crops": 4,
    "num_img_tokens": 144,
    "processor_class": "Phi3VProcessor",
}


# ---------------------------------------------------------------------------------------------------------------
# Helpers: images and the literal reference transform
# ---------------------------------------------------------------------------------------------------------------


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Seeded uniform RGB noise (the hardest case for any resize shortcut)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def constant_image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (90, 140, 200))


def white_value() -> torch.Tensor:
    """Normalised value of a 255 pixel per channel: ``(1 - mean) / std`` in float32."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32)
    return (torch.tensor(255.0) / 255 - mean) / std  # [3]


@pytest.fixture(scope="module")
def processors() -> dict[int, Phi3VImageProcessor]:
    return {k: Phi3VImageProcessor(num_crops=k) for k in (1, 4, 16)}


# ---------------------------------------------------------------------------------------------------------------
# Token counts and shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h_crops", "w_crops", "expected"),
    [(1, 1, 313), (2, 2, 757), (3, 4, 1921), (4, 3, 1933), (4, 4, 2509), (1, 16, 2473)],
)
def test_num_image_tokens_golden(h_crops: int, w_crops: int, expected: int) -> None:
    assert num_image_tokens(h_crops, w_crops) == expected
    assert reference_token_count(h_crops * 336, w_crops * 336) == expected


# Moderate sizes are processed for real; (width, height).
PROCESSED_SIZES = [(1, 1), (10, 10), (336, 336), (640, 480), (480, 640), (800, 600), (600, 800), (3000, 50), (50, 3000)]


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize(("width", "height"), PROCESSED_SIZES)
def test_token_counts_and_shapes_processed(
    processors: dict[int, Phi3VImageProcessor], width: int, height: int, num_crops: int
) -> None:
    processor = processors[num_crops]
    out = processor(constant_image(width, height))
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].shape == (1, 2)
    assert out["image_sizes"].dtype == torch.int64
    h, w = out["image_sizes"][0].tolist()
    assert h % CROP_SIZE == 0 and w % CROP_SIZE == 0
    h_crops, w_crops = h // CROP_SIZE, w // CROP_SIZE
    assert 1 <= h_crops * w_crops <= num_crops
    assert (w, h) == hd_transform_size(width, height, num_crops)
    tokens = out["num_img_tokens"]
    assert isinstance(tokens, list) and len(tokens) == 1
    assert tokens[0] == reference_token_count(h, w) == num_image_tokens(h_crops, w_crops)
    assert tokens[0] == processor.num_image_tokens_for_size(width, height)
    # Orientation: the long side of the HD image follows the long side of the input.
    if width > height:
        assert w >= h
    elif height > width:
        assert h >= w


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize(
    ("width", "height"),
    [(5000, 4000), (4000, 5000), (20000, 20000), (12000, 30), (30, 12000), (7, 100000), (4032, 3024), (1, 2)],
)
def test_token_counts_without_processing(width: int, height: int, num_crops: int) -> None:
    processor = Phi3VImageProcessor(num_crops=num_crops)
    hd_w, hd_h = hd_transform_size(width, height, num_crops)
    assert hd_w % CROP_SIZE == 0 and hd_h % CROP_SIZE == 0
    assert 1 <= (hd_w // CROP_SIZE) * (hd_h // CROP_SIZE) <= num_crops
    assert processor.num_image_tokens_for_size(width, height) == reference_token_count(hd_h, hd_w)
    # A transposed image gives the transposed HD size.
    assert hd_transform_size(height, width, num_crops) == (hd_h, hd_w)


def test_token_count_examples(processors: dict[int, Phi3VImageProcessor]) -> None:
    # square at num_crops 4 -> 2x2 crops -> 757 (vLLM test value)
    out = processors[4](constant_image(900, 900))
    assert out["image_sizes"][0].tolist() == [672, 672]
    assert out["num_img_tokens"] == [757]
    # 4:3 landscape at num_crops 16 -> 3x4 (h x w) crops -> 1921; portrait -> 4x3 -> 1933
    out = processors[16]([constant_image(800, 600), constant_image(600, 800)])
    assert out["image_sizes"].tolist() == [[1008, 1344], [1344, 1008]]
    assert out["num_img_tokens"] == [1921, 1933]
    # square at 16 -> 4x4 -> 2509; 16:1 -> 1x16 -> 2473
    assert processors[16].num_image_tokens_for_size(2000, 2000) == 2509
    assert processors[16].num_image_tokens_for_size(1600, 100) == 2473
    assert processors[1].num_image_tokens_for_size(1, 1) == 313


def test_batch_of_mixed_inputs(processors: dict[int, Phi3VImageProcessor], tmp_path) -> None:
    img = noise_image(400, 300, seed=3)
    path = tmp_path / "photo.png"
    img.save(path)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    out = processors[4]([img, str(path), path, buffer.getvalue(), np.asarray(img)])
    assert out["pixel_values"].shape == (5, 5, 3, CROP_SIZE, CROP_SIZE)
    for i in range(1, 5):
        assert torch.equal(out["pixel_values"][i], out["pixel_values"][0])
    assert out["image_sizes"].tolist() == [[672, 672]] * 5  # 400x300 -> 672x504, padded to 672x672
    assert processors[4].preprocess(img, return_tensors=None)["image_sizes"] == [[672, 672]]
    np_out = processors[4].preprocess(img, return_tensors="np")
    assert isinstance(np_out["pixel_values"], np.ndarray) and np_out["image_sizes"].dtype == np.int64


# ---------------------------------------------------------------------------------------------------------------
# Exactness against the literal reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "seed"),
    [
        (517, 389, 4, 0),  # landscape, downscale, vertical padding
        (389, 517, 4, 1),  # portrait: the reference transposes, resizes, pads, transposes back
        (700, 700, 16, 2),  # square upscale to 4x4
        (1003, 251, 16, 3),  # wide, 1x? crops with padding
        (251, 1003, 16, 4),  # tall
        (45, 31, 1, 5),  # tiny upscale
        (33, 2, 4, 6),  # extreme aspect ratio
    ],
)
def test_bit_exact_against_reference(
    processors: dict[int, Phi3VImageProcessor], width: int, height: int, num_crops: int, seed: int
) -> None:
    img = noise_image(width, height, seed)
    expected, expected_size = reference_pixel_values(img, num_crops)
    out = processors[num_crops](img)
    assert out["image_sizes"][0].tolist() == expected_size
    assert torch.equal(out["pixel_values"][0], expected)


def test_crops_are_row_major_windows_and_padding_is_zero(processors: dict[int, Phi3VImageProcessor]) -> None:
    img = noise_image(1000, 700, seed=7)  # num_crops 16 -> 3 x 4 crops, 4 zero crops
    out = processors[16](img)["pixel_values"][0]  # [17, 3, 336, 336]
    hd = reference_normalised(reference_hd_image(img, 16))  # [3, 1008, 1344]
    assert hd.shape == (3, 1008, 1344)
    h_crops, w_crops = 3, 4
    for k in range(h_crops * w_crops):
        row, col = divmod(k, w_crops)
        window = hd[:, row * 336 : (row + 1) * 336, col * 336 : (col + 1) * 336]
        assert torch.equal(out[1 + k], window), f"crop {k} is not window ({row}, {col})"
    assert torch.count_nonzero(out[1 + h_crops * w_crops :]) == 0
    # The global view is the bicubic resize of the normalised HD tensor (not of the uint8 image).
    expected_global = torch.nn.functional.interpolate(hd.unsqueeze(0), size=(336, 336), mode="bicubic")[0]
    assert torch.equal(out[0], expected_global)


def test_white_padding_value(processors: dict[int, Phi3VImageProcessor]) -> None:
    white = white_value().view(3, 1, 1)
    # 700x300 at num_crops 4: resized to 672x288, padded to 672x336 with 24 white rows at the top and bottom.
    out = processors[4](constant_image(700, 300))
    assert out["image_sizes"][0].tolist() == [336, 672]
    for crop in out["pixel_values"][0, 1:3]:
        assert torch.equal(crop[:, :24, :], white.expand(3, 24, 336))
        assert torch.equal(crop[:, -24:, :], white.expand(3, 24, 336))
        assert not torch.equal(crop[:, 24:25, :], white.expand(3, 1, 336))
    # Portrait: white columns on the left and right instead.
    out = processors[4](constant_image(300, 700))
    assert out["image_sizes"][0].tolist() == [672, 336]
    for crop in out["pixel_values"][0, 1:3]:
        assert torch.equal(crop[:, :, :24], white.expand(3, 336, 24))
        assert torch.equal(crop[:, :, -24:], white.expand(3, 336, 24))


def test_numpy_input_matches_pil(processors: dict[int, Phi3VImageProcessor]) -> None:
    img = noise_image(123, 77, seed=8)
    a = processors[4](img)["pixel_values"]
    b = processors[4](np.asarray(img))["pixel_values"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Image modes
# ---------------------------------------------------------------------------------------------------------------


def _assert_deterministic(image: Image.Image) -> None:
    processor = Phi3VImageProcessor(num_crops=1)
    first = processor(image.copy())["pixel_values"]
    second = processor(image.copy())["pixel_values"]
    assert torch.equal(first, second)


def test_rgba_transparent_becomes_white() -> None:
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., :3] = (10, 20, 30)
    arr[..., 3] = 255
    arr[0, 0] = (10, 20, 30, 0)  # fully transparent
    arr[0, 1] = (0, 0, 0, 128)  # half transparent black over white -> 127
    image = Image.fromarray(arr, mode="RGBA")
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (127, 127, 127)
    assert rgb.getpixel((2, 0)) == (10, 20, 30)
    _assert_deterministic(image)


def test_la_and_pa_transparency_becomes_white() -> None:
    la = Image.new("LA", (4, 4), (50, 255))
    la.putpixel((0, 0), (50, 0))
    rgb = to_rgb(la)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (50, 50, 50)
    _assert_deterministic(la)

    pa = Image.new("P", (4, 4), 1)
    pa.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pa = pa.convert("PA")
    alpha = Image.new("L", (4, 4), 255)
    alpha.putpixel((3, 3), 0)
    pa.putalpha(alpha)
    assert pa.mode == "PA"
    rgb = to_rgb(pa)
    assert rgb.getpixel((3, 3)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (10, 200, 30)
    _assert_deterministic(pa)


def test_palette_with_transparency_becomes_white() -> None:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((2, 2), 0)
    image.info["transparency"] = 0
    rgb = to_rgb(image)
    assert rgb.getpixel((2, 2)) == (255, 255, 255)  # not black
    assert rgb.getpixel((0, 0)) == (200, 10, 10)
    # Same through a PNG round trip (tRNS chunk).
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    assert load_image(buffer.getvalue()).getpixel((2, 2)) == (255, 255, 255)
    # Without transparency the palette colour is kept.
    del image.info["transparency"]
    assert to_rgb(image).getpixel((2, 2)) == (0, 0, 0)
    _assert_deterministic(image)


def test_cmyk_l_and_1_modes() -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 0, 0))  # magenta ink
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 255)
    grey = Image.new("L", (4, 4), 77)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((1, 1), 1)
    rgb = to_rgb(bilevel)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 1)) == (255, 255, 255)
    for image in (cmyk, grey, bilevel):
        assert to_rgb(image).mode == "RGB"
        _assert_deterministic(image)


def test_16_bit_gradient_keeps_its_gradient() -> None:
    gradient = (np.arange(256, dtype=np.uint16) * 257)[None, :].repeat(8, axis=0)  # 0 .. 65535
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    for candidate in (image, load_image(buffer.getvalue(), name="gradient16.png")):
        rgb = np.asarray(to_rgb(candidate))
        assert rgb.shape == (8, 256, 3)
        np.testing.assert_array_equal(rgb[0, :, 0], np.arange(256))  # v * 257 >> 8 == v
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # Mode "I" (32-bit): clipped to 16 bits, then scaled.
    wide = Image.fromarray(np.array([[-5, 0, 256, 65535, 100000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 0, 1, 255, 255]
    floating = Image.fromarray(np.array([[-3.0, 12.7, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floating))[0, :, 0].tolist() == [0, 12, 255]
    _assert_deterministic(image)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    arr = np.full((40, 80, 3), 255, dtype=np.uint8)  # stored 80 wide x 40 high, white
    arr[:16, :16] = (255, 0, 0)  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    image = load_image(buffer.getvalue(), name="rotated.jpg")
    assert image.size == (40, 80)  # displayed: 40 wide x 80 high
    # 6 = rotate 90° clockwise for display: stored top-left -> top-right; 8 = counter-clockwise -> bottom-left.
    marker = (32, 8) if orientation == 6 else (8, 72)
    opposite = (8, 72) if orientation == 6 else (32, 8)
    r, g, b = image.getpixel(marker)
    assert r > 200 and g < 60 and b < 60
    assert min(image.getpixel(opposite)) > 200
    out = Phi3VImageProcessor(num_crops=4)(buffer.getvalue())
    assert out["image_sizes"][0].tolist() == [672, 336]  # portrait after rotation


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = load_image(buffer.getvalue(), name="anim.gif")
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (255, 0, 0)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert opened.n_frames == 2
    opened.seek(1)
    assert to_rgb(opened).getpixel((5, 5)) == (255, 0, 0)
    _assert_deterministic(load_image(buffer.getvalue()))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------


def _jpeg_bytes(width: int = 120, height: int = 90) -> bytes:
    buffer = io.BytesIO()
    noise_image(width, height, seed=9).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb as far as the header goes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("filename", "content", "reason"),
    [
        ("notes.txt", b"this is a product description, not an image\n", "not a recognised image format"),
        ("empty.jpg", b"", "empty"),
        ("page.html", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not a recognised image format"),
        ("cut.jpg", None, "truncated"),
        ("bomb.png", _png_claiming_size(100_000, 100_000), "decompression bomb"),
    ],
)
def test_bad_files_raise_image_load_error(tmp_path, filename: str, content: bytes | None, reason: str) -> None:
    if content is None:
        data = _jpeg_bytes()
        content = data[: len(data) // 2]
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert filename in str(info.value)
    # Bytes input with a name, and through the processor.
    with pytest.raises(ImageLoadError) as info:
        load_image(content, name=f"catalog/{filename}")
    assert f"catalog/{filename}" in str(info.value)
    with pytest.raises(ImageLoadError):
        Phi3VImageProcessor(num_crops=4)(str(path))
    assert isinstance(info.value, ValueError)


def test_pixel_limit_is_enforced(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "large.png"
    noise_image(100, 100).save(path)
    assert load_image(path).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="decompression bomb") as info:
        load_image(path)
    assert "large.png" in str(info.value)


def test_missing_file_and_wrong_types(tmp_path) -> None:
    with pytest.raises(ImageLoadError, match="not found") as info:
        load_image(tmp_path / "missing.jpg")
    assert "missing.jpg" in str(info.value)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Phi3VImageProcessor()(torch.zeros(3, 10, 10))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        Phi3VImageProcessor()(np.zeros((10, 10, 3), dtype=np.float32))


@pytest.mark.parametrize("num_crops", [0, -1, 1.5, True])
def test_invalid_num_crops(num_crops: object) -> None:
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=num_crops)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_crops"):
        hd_transform_size(100, 100, num_crops)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Config save / load
# ---------------------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path) -> None:
    processor = Phi3VImageProcessor(num_crops=9, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["num_crops"] == 9 and saved["image_processor_type"] == "Phi3VImageProcessor"
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, Phi3VImageProcessor)
    assert loaded.to_dict() == processor.to_dict()
    image = noise_image(500, 260, seed=10)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    # Load-time override, as users do with num_crops=4 for Phi-3.5-V.
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=4).num_crops == 4
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=0)


@pytest.mark.parametrize(("config", "num_crops"), [(PHI3_V_PREPROCESSOR_CONFIG, 16), (PHI35_V_PREPROCESSOR_CONFIG, 4)])
def test_official_preprocessor_configs_load(tmp_path, config: dict, num_crops: int) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    processor = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert processor.num_crops == num_crops
    assert processor.num_img_tokens == 144
    assert processor.do_convert_rgb is True
    assert processor.image_mean == OPENAI_CLIP_MEAN and processor.image_std == OPENAI_CLIP_STD
    out = processor(constant_image(1000, 1000))
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    assert out["num_img_tokens"] == [2509 if num_crops == 16 else 757]
    # Re-saving writes a native config: no auto_map pointing at remote code, no processor_class.
    processor.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "preprocessor_config.json").read_text())
    assert "auto_map" not in resaved and "processor_class" not in resaved
    assert resaved["num_crops"] == num_crops
