"""Checkpoint I/O in the official Phi-3-V safetensors layout.

Reference: the key table of ../shared/docs/phi3v-reference.md §2.2 (confirmed by vLLM, SGLang, MLC-LLM and the
transformers PR converter) and the mapping onto stock transformers classes of §2.3.

The official checkpoints and phi3v's modules share every name except one prefix and two keys: transformers 5's
`CLIPVisionModel` has no `vision_model` submodule, so CLIP's keys lose that level, and the two separators sit in a
`separators` module (so peft can train them). `KEY_RENAMES` is the whole map. Two kinds of official
keys have no phi3v parameter:

- `model.vision_embed_tokens.wte.weight` may appear in re-saves: the remote code's `wte` *is* `model.embed_tokens`,
  so the tensor is a duplicate; it is shape-checked and dropped (`SHARED_KEYS`);
- CLIP's layers after `layer_idx` and `post_layernorm` are stored but never computed: they are kept verbatim in
  `Phi3VImageEmbedding.unused_clip_weights` and written back on save, so round trips are lossless.

Loading reads each shard's header first (names and shapes of every tensor: unknown, missing or mis-shaped keys fail
with their names before any data is read), then streams tensors one at a time into the target dtype and device.
Weights are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from .modeling import Phi3VForCausalLM

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")

# (official prefix, phi3v prefix): the only renames between the checkpoint and phi3v's modules.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.vision_embed_tokens.img_processor.vision_model.", "model.vision_embed_tokens.img_processor."),
    # the separators live in a module of their own (`vision.ImageSeparators`), so peft can train them
    ("model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.separators.glb_GN"),
    ("model.vision_embed_tokens.sub_GN", "model.vision_embed_tokens.separators.sub_GN"),
)
# Official key -> the phi3v parameter it duplicates: shape-checked, then dropped (or used, when a re-save stored only
# the duplicate).
SHARED_KEYS: dict[str, str] = {"model.vision_embed_tokens.wte.weight": "model.embed_tokens.weight"}
CLIP_PREFIX = "model.vision_embed_tokens.img_processor."  # phi3v name of the CLIP tower


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: the message names the keys or files."""


def to_official_name(name: str) -> str:
    """phi3v parameter name -> official checkpoint key."""
    for official, ours in KEY_RENAMES:
        if name.startswith(ours):
            return official + name[len(ours) :]
    return name


def from_official_name(key: str) -> str:
    """Official checkpoint key -> phi3v parameter name."""
    for official, ours in KEY_RENAMES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return key


def official_state_dict(
    model: Phi3VForCausalLM, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors under their official keys, the not-computed CLIP tail included."""
    tensors = state_dict if state_dict is not None else model.state_dict()
    out = {to_official_name(name): tensor for name, tensor in tensors.items()}
    clip_dtype = model.vision.img_processor.embeddings.patch_embedding.weight.dtype
    for name, tensor in model.vision.unused_clip_weights.items():
        out[to_official_name(CLIP_PREFIX + name)] = tensor.to(clip_dtype)
    return out


def official_shapes(model: Phi3VForCausalLM) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for every tensor the checkpoint must hold (works on a meta-device model)."""
    return {key: tuple(tensor.shape) for key, tensor in official_state_dict(model).items()}


def build_on_meta(model_cls: type[Phi3VForCausalLM], config: Any) -> Phi3VForCausalLM:
    """`model_cls(config)` with every parameter on the meta device (no memory, no init cost) and real CPU buffers.

    The model is constructed under ``torch.device("meta")``, torch's own device context (a thread-local function
    mode: nothing is patched, other threads build as usual). The non-persistent buffers (rotary inverse frequencies,
    CLIP position ids) are in no checkpoint, so they then get CPU storage and their values from the `_init_weights` of
    the innermost transformers model owning them: transformers' own recipe (`_move_missing_keys_from_meta_to_device`,
    then initialisation). An init op on the same modules' meta parameters does nothing. `load_official_checkpoint`
    then assigns each parameter.
    """
    from transformers import PreTrainedModel

    with torch.device("meta"):
        model = model_cls(config)
    owners: dict[nn.Module, PreTrainedModel] = {}
    for owner in model.modules():  # outer models first: an inner model (CLIPVisionModel) overrides its part
        if isinstance(owner, PreTrainedModel):
            owners.update({module: owner for module in owner.modules() if module._buffers})
    for module, owner in owners.items():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
        owner._init_weights(module)
    left = [name for name, buffer in model.named_buffers() if buffer.device.type == "meta"]
    if left:  # a module whose buffers its model's `_init_weights` does not compute
        raise CheckpointError(f"{model_cls.__name__}: buffers not computed off the meta device: {', '.join(left)}")
    return model


# -- locating files ---------------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed in the index are missing: {', '.join(missing)}")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(f"{folder}: only pickled weights found; phi3v loads safetensors only (never unpickles)")
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


# -- loading ----------------------------------------------------------------------------------------------------------
def scan_official_checkpoint(model: Phi3VForCausalLM, folder: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """Check a checkpoint against `model` from the shard headers alone (no tensor data is read).

    Returns:
        official key -> (file, key stored in that file), for every tensor the model needs.

    Raises:
        CheckpointError: naming every unexpected, missing, mis-shaped or duplicated key.
    """
    folder = Path(folder)
    expected = official_shapes(model)
    found: dict[str, tuple[Path, str]] = {}
    shared: dict[str, tuple[Path, str]] = {}
    unexpected, misshaped, duplicated = [], [], []
    for file in _weight_files(folder):
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (a safetensors reader, not a dict)
                shape = tuple(reader.get_slice(key).get_shape())
                target = expected.get(key) or expected.get(SHARED_KEYS.get(key, ""))
                if target is None:
                    unexpected.append(key)
                elif shape != target:
                    misshaped.append(f"{key} (checkpoint {list(shape)}, model {list(target)})")
                elif key in found or key in shared:
                    duplicated.append(key)
                elif key in SHARED_KEYS:
                    shared[SHARED_KEYS[key]] = (file, key)
                else:
                    found[key] = (file, key)
    for target, source in shared.items():
        found.setdefault(target, source)  # a re-save that kept only `wte` (the remote code's alias)
    missing = sorted(set(expected) - set(found))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(sorted(unexpected))}")
    if misshaped:
        problems.append(f"mis-shaped keys: {', '.join(sorted(misshaped))}")
    if duplicated:
        problems.append(f"keys in several shards: {', '.join(sorted(duplicated))}")
    if problems:
        raise CheckpointError(f"{folder} does not match {type(model).__name__}: " + "; ".join(problems))
    return found


def load_official_checkpoint(
    model: Phi3VForCausalLM, folder: str | os.PathLike, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> None:
    """Stream an official checkpoint into `model` (built by `build_on_meta` or materialised).

    Every header is checked first (`scan_official_checkpoint`); then tensors are read one at a time, straight into
    `dtype` on `device`.
    """
    folder = Path(folder)
    found = scan_official_checkpoint(model, folder)
    unused = model.vision.unused_clip_weights
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, (file, stored) in found.items():
        by_file.setdefault(file, []).append((key, stored))
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as reader:
            for key, stored in keys:
                name = from_official_name(key)
                tensor = reader.get_tensor(stored)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if name.startswith(CLIP_PREFIX) and name[len(CLIP_PREFIX) :] in unused:
                    unused[name[len(CLIP_PREFIX) :]] = tensor  # kept on the CPU, only written back
                else:
                    _set_parameter(model, name, tensor.to(device))
    logger.info("loaded %d tensors from %d file(s) in %s", len(found), len(by_file), folder)


def official_state_dict_pre_hook(model: Phi3VForCausalLM, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook: accept official-layout keys (as written by `save_pretrained`).

    Official names are mapped to phi3v's, the shared `wte` duplicate is dropped, and the not-computed CLIP tail goes
    to `unused_clip_weights`; phi3v names pass unchanged. Trainer's resume and best-model reload rely on this.
    """
    unused = model.vision.unused_clip_weights
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        if local in SHARED_KEYS:
            tensor = state_dict.pop(key)
            state_dict.setdefault(prefix + SHARED_KEYS[local], tensor)
            continue
        name = from_official_name(local)
        if name.startswith(CLIP_PREFIX) and name[len(CLIP_PREFIX) :] in unused:
            unused[name[len(CLIP_PREFIX) :]] = state_dict.pop(key).detach().clone()
        elif name != local:
            state_dict[prefix + name] = state_dict.pop(key)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:  # cannot happen after pass 1; kept as a guard against a model/map drift
        raise CheckpointError(f"{name}: no such parameter in {type(model).__name__}")


# -- saving -----------------------------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: use bytes or e.g. '4GB', '500MB'")
    unit = match.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def save_official_checkpoint(
    model: Phi3VForCausalLM,
    folder: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Write safetensors shards (+ index when more than one) in the official layout; returns the files written.

    Each file is written to a temporary name and renamed, and shards of an earlier save that the new one does not
    use are removed, so the folder never mixes two saves.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = official_state_dict(model, state_dict)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    written = []
    for name, shard in zip(names, shards, strict=True):
        data = {key: tensor.detach().to("cpu").contiguous() for key, tensor in shard.items()}
        _atomic(folder / name, lambda tmp, data=data: save_file(data, tmp, metadata={"format": "pt"}))
        written.append(folder / name)
    index = folder / WEIGHTS_INDEX_NAME
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        payload = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
        _atomic(index, lambda tmp: Path(tmp).write_text(payload + "\n"))
        written.append(index)
    elif index.exists():
        index.unlink()
    for stale in folder.iterdir():
        if SHARD_PATTERN.match(stale.name) and stale.name not in names:
            stale.unlink()
    logger.info("saved %d tensors in %d shard(s) to %s", len(tensors), len(shards), folder)
    return written


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
