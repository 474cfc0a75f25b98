"""`Phi3VImageEmbedding`: CLIP tower, 2x2 merge, learnable separators and projector of Phi-3-Vision.

Reference: `Phi3ImageEmbedding` in the hub's `image_embedding_phi3_v.py` (3-V after PR #53 / 3.5-V), with its
`hd_feature_transform`, `reshape_hd_patches_2x2merge` and `add_image_newline`; ../shared/docs/phi3v-reference.md §3.

For each image the processor gives a global 336-px view and `h x w` row-major 336-px crops of the padded HD image:

1. CLIP ViT-L/14-336 runs on the real crops only (the processor's zero padding crops are skipped: their features are
   never used), and features are taken from `hidden_states[-2]` without CLS -> 24x24 patches of 1024.
   The last CLIP layer and `post_layernorm` are not built at all: they are not computed (and, unused, they would
   break DDP). Their checkpoint tensors are kept as-is in `unused_clip_weights` so a save writes them back.
2. 2x2 merge: 24x24x1024 -> 12x12x4096; sub-crops are tiled row-major into one (12h)x(12w) grid.
3. `sub_GN` ends every row (of the sub grid and of the global grid); layout `sub_glb`:
   [sub rows] + [glb_GN] + [global rows]  ->  12h(12w+1) + 1 + 12*13 = (hw+1)*144 + 1 + (h+1)*12 tokens.
4. `img_projection` = Linear(4096, 3072) -> GELU -> Linear(3072, 3072).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .configuration import Phi3VConfig
from .image_processing import num_image_tokens


def merge_2x2(features: torch.Tensor, h_crops: int, w_crops: int) -> torch.Tensor:
    """Concatenate each 2x2 block of patch features and tile crops row-major (reference §3.2).

    Args:
        features: ``[N, L, C]`` patch features of ``N = n * h_crops * w_crops`` crops, ``L = H * H`` patches.
        h_crops: crops per column of the grid.
        w_crops: crops per row of the grid.

    Returns:
        ``[n, h_crops * H/2, w_crops * H/2, 4C]``; the 4C vector of cell (r, c) holds patches
        (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) in that order.
    """
    N, L, C = features.shape
    H = int(L**0.5)
    n = N // (h_crops * w_crops)
    x = features.reshape(N, H // 2, 2, H // 2, 2, C)  # N, 12, 2, 12, 2, C
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(N, -1, 4 * C)  # N, 144, 4C
    x = x.reshape(n, h_crops, w_crops, H // 2, H // 2, 4 * C)  # n, h, w, 12, 12, 4C
    x = x.permute(0, 1, 3, 2, 4, 5)  # n, h, 12, w, 12, 4C
    return x.reshape(n, h_crops * H // 2, w_crops * H // 2, 4 * C)  # n, 12h, 12w, 4C


class ImageSeparators(nn.Module):
    """The two learned separators: `glb_GN` between the sub grid and the global grid, `sub_GN` at each row's end.

    A module of their own (checkpoint keys stay `model.vision_embed_tokens.glb_GN` / `.sub_GN`: `checkpoint.py`
    renames) so that peft can train and save them with the projector (``modules_to_save``, which takes modules, not
    bare parameters); `forward` returns them, so a peft copy replaces them in the computation too.
    """

    def __init__(self, width: int):
        super().__init__()
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.glb_GN, self.sub_GN  # [1, 1, 4C], [1, 1, 1, 4C]


class Phi3VImageEmbedding(nn.Module):
    """Images -> a sequence of LM-width features per image, in the order the processor's placeholders expect.

    Parameter names are the official ones under `model.vision_embed_tokens.` (the CLIP tower's are CLIPVisionModel's,
    which transformers 5 names without the checkpoint's `vision_model.` prefix; see `checkpoint.py`).
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision_config = config.vision_config
        total_layers = vision_config.num_hidden_layers
        self.num_used_layers = total_layers + config.vision_layer_idx + 1  # hidden_states[-2] -> 23 of 24 layers
        used_config = CLIPVisionConfig(**{**vision_config.to_dict(), "num_hidden_layers": self.num_used_layers})
        used_config._attn_implementation = config._attn_implementation
        self.img_processor = CLIPVisionModel(used_config)
        del self.img_processor.post_layernorm  # not computed: features come before it

        width = vision_config.hidden_size * 4  # after the 2x2 merge
        self.separators = ImageSeparators(width)
        self.img_projection = nn.Sequential(
            nn.Linear(width, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.crop_size = vision_config.image_size
        self.num_img_tokens = config.num_img_tokens
        # Checkpoint tensors of the parts not computed (CLIP layers after `layer_idx`, `post_layernorm`), by their name
        # inside CLIPVisionModel. Plain tensors, not parameters: no optimizer, DDP or PEFT ever sees them.
        self.unused_clip_weights: dict[str, torch.Tensor] = self._init_unused_clip_weights(vision_config)

    def _init_unused_clip_weights(self, vision_config: CLIPVisionConfig) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for index in range(self.num_used_layers, vision_config.num_hidden_layers):
            layer = CLIPEncoderLayer(vision_config)
            for key, value in layer.state_dict().items():
                tensors[f"encoder.layers.{index}.{key}"] = value.detach()
        norm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        tensors["post_layernorm.weight"] = norm.weight.detach()
        tensors["post_layernorm.bias"] = norm.bias.detach()
        return tensors

    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP patch features of ``[N, 3, 336, 336]`` crops from ``hidden_states[layer_idx]``, CLS dropped."""
        clip = self.img_processor
        hidden = clip.embeddings(crops)  # [N, 1 + 576, C]
        hidden = clip.pre_layrnorm(hidden)
        hidden = clip.encoder(inputs_embeds=hidden).last_hidden_state  # [N, 577, C] = hidden_states[-2]
        return hidden[:, 1:]  # [N, 576, C]

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Project images into LM-width features.

        Args:
            pixel_values: ``[n, num_crops + 1, 3, 336, 336]``: global view, then row-major crops, then zero padding.
            image_sizes: ``[n, 2]`` padded HD (height, width) of each image, multiples of 336.

        Returns:
            ``[sum of tokens of all images, hidden_size]``, image after image.
        """
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, self.crop_size, self.crop_size):
            raise ValueError(
                f"pixel_values must be [images, crops, 3, {self.crop_size}, {self.crop_size}], "
                f"got {tuple(pixel_values.shape)}"
            )
        if image_sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(f"image_sizes must be [{pixel_values.shape[0]}, 2], got {tuple(image_sizes.shape)}")
        grids = [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]
        for index, (h, w) in enumerate(grids):
            if h < 1 or w < 1 or 1 + h * w > pixel_values.shape[1]:
                raise ValueError(
                    f"image {index}: image_sizes {image_sizes[index].tolist()} need {1 + h * w} crops, "
                    f"pixel_values hold {pixel_values.shape[1]}"
                )
        dtype = self.img_processor.embeddings.patch_embedding.weight.dtype  # CLIP's, also when projections are 4-bit
        crops = torch.cat([pixel_values[i, : 1 + h * w] for i, (h, w) in enumerate(grids)])  # [M, 3, 336, 336]
        features = self.clip_features(crops.to(dtype))  # [M, 576, C]

        glb, sub_row = self.separators()  # glb_GN [1, 1, 4C], sub_GN [1, 1, 1, 4C]
        sequences = []
        start = 0
        for h, w in grids:
            image = features[start : start + 1 + h * w]  # [1 + hw, 576, C]
            start += 1 + h * w
            sub = _with_row_separators(merge_2x2(image[1:], h, w), sub_row)  # [12h(12w+1), 4C]
            global_view = _with_row_separators(merge_2x2(image[:1], 1, 1), sub_row)  # [12*13, 4C]
            sequences.append(torch.cat([sub, glb[0], global_view]))  # sub_glb order
        return self.img_projection(torch.cat(sequences))  # [tokens, hidden]

    def image_token_counts(self, image_sizes: torch.Tensor) -> list[int]:
        """Tokens of each image (``[n, 2]`` padded HD sizes), in the processor's formula."""
        return [
            num_image_tokens(int(h) // self.crop_size, int(w) // self.crop_size, self.num_img_tokens)
            for h, w in image_sizes.tolist()
        ]

    @property
    def glb_GN(self) -> nn.Parameter:  # noqa: N802 (the official name)
        return self.separators.glb_GN

    @property
    def sub_GN(self) -> nn.Parameter:  # noqa: N802 (the official name)
        return self.separators.sub_GN


def _with_row_separators(grid: torch.Tensor, separator: torch.Tensor) -> torch.Tensor:
    """Append `sub_GN` to every row of a ``[1, rows, cols, 4C]`` grid -> ``[rows * (cols + 1), 4C]``."""
    _, rows, _, width = grid.shape
    newline = separator.expand(1, rows, 1, width)  # [1, rows, 1, 4C]
    return torch.cat([grid, newline], dim=2).reshape(-1, width)
