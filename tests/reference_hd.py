"""The reference HD transform written out literally: the oracle of the image-processor tests and the baseline of
benchmarks/processor.py.

Reference: `HD_transform`, `padding_336` and `Phi3VImageProcessor.preprocess` of the hub's `image_processing_phi3_v.py`
(../shared/docs/phi3v-reference.md §4), with torchvision's PIL resize/pad spelled out in Pillow and ToTensor/Normalize
as torchvision's torch ops. Deliberately independent of phi3v's own code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def reference_hd_image(img: Image.Image, hd_num: int) -> Image.Image:
    """``HD_transform`` of the reference, with torchvision's PIL resize/pad spelled out in Pillow."""
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    if img.size != (new_w, new_h):  # torchvision.transforms.functional.resize returns the input when sizes match
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    # padding_336: white, vertically centred
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    bottom = tar - new_h - top
    img = ImageOps.expand(img, border=(0, top, 0, bottom), fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def reference_normalised(hd_img: Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor`` then ``Normalize``, op for op: HWC uint8 -> CHW float32 / 255, then in-place
    ``sub_(mean).div_(std)``; returns ``[3, H, W]``."""
    hd = torch.from_numpy(np.array(hd_img, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(-1, 1, 1)
    return hd.sub_(mean).div_(std)  # [3, H, W]


def reference_pixel_values(img: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int]]:
    hd = reference_normalised(reference_hd_image(img.convert("RGB"), num_crops))  # [3, H, W]
    h, w = hd.shape[1:]
    global_image = torch.nn.functional.interpolate(hd.unsqueeze(0), size=(336, 336), mode="bicubic")
    crops = hd.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    out = torch.cat([global_image, crops])
    if out.shape[0] < num_crops + 1:
        out = torch.cat([out, torch.zeros(num_crops + 1 - out.shape[0], 3, 336, 336)])
    return out, [h, w]


def reference_token_count(h: int, w: int) -> int:
    """Formula as written in the reference after hub PR #51 (§4.6)."""
    return int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12)
