"""Phi3VForCausalLM: architecture, image-embedding layout, parity, padding, generation and gradients (tiny, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import CLIPVisionModel
from transformers.cache_utils import DynamicCache

from model_helpers import BOS, IMAGE_ID, image_batch, image_tokens, prompt_ids, tiny_model
from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.model import checkpoint
from phi3v.model.vision import merge_2x2


# -- the full-size architecture ---------------------------------------------------------------------------------------
def reference_official_shapes() -> dict[str, tuple[int, ...]]:
    """The key table of phi3v-reference.md §2.2, written out independently of the model code."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (32064, 3072),
        "model.norm.weight": (3072,),
        "lm_head.weight": (32064, 3072),
        "model.vision_embed_tokens.glb_GN": (1, 1, 4096),
        "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4096),
        "model.vision_embed_tokens.img_projection.0.weight": (3072, 4096),
        "model.vision_embed_tokens.img_projection.0.bias": (3072,),
        "model.vision_embed_tokens.img_projection.2.weight": (3072, 3072),
        "model.vision_embed_tokens.img_projection.2.bias": (3072,),
    }
    for i in range(32):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.qkv_proj.weight"] = (9216, 3072)
        shapes[p + "self_attn.o_proj.weight"] = (3072, 3072)
        shapes[p + "mlp.gate_up_proj.weight"] = (16384, 3072)
        shapes[p + "mlp.down_proj.weight"] = (3072, 8192)
        shapes[p + "input_layernorm.weight"] = (3072,)
        shapes[p + "post_attention_layernorm.weight"] = (3072,)
    v = "model.vision_embed_tokens.img_processor.vision_model."
    shapes[v + "embeddings.class_embedding"] = (1024,)
    shapes[v + "embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    shapes[v + "embeddings.position_embedding.weight"] = (577, 1024)
    for name in ("pre_layrnorm", "post_layernorm"):
        shapes[v + name + ".weight"] = (1024,)
        shapes[v + name + ".bias"] = (1024,)
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (1024, 1024)
            shapes[p + f"self_attn.{proj}.bias"] = (1024,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + norm + ".weight"] = (1024,)
            shapes[p + norm + ".bias"] = (1024,)
        shapes[p + "mlp.fc1.weight"] = (4096, 1024)
        shapes[p + "mlp.fc1.bias"] = (4096,)
        shapes[p + "mlp.fc2.weight"] = (1024, 4096)
        shapes[p + "mlp.fc2.bias"] = (1024,)
    return shapes


@pytest.mark.parametrize("name", ["tiny", "phi-3.5-vision-instruct"])
def test_meta_built_model_has_no_parameter_storage_and_the_real_buffers(name):
    """`build_on_meta`: parameters on meta, every buffer real and equal to an ordinarily built model's (rotary
    frequencies incl. longrope's, CLIP position ids), and nothing outside this thread's construction affected."""
    import threading

    config = Phi3VConfig.from_name(name)
    built_elsewhere: dict[str, str] = {}

    def build_linear_meanwhile() -> None:  # another thread builds while the meta model is being constructed
        built_elsewhere["device"] = nn.Linear(4, 4).weight.device.type

    register_parameter = nn.Module.register_parameter
    thread = threading.Thread(target=build_linear_meanwhile)
    with torch.device("meta"):  # the thread does not inherit this thread's device context
        thread.start()
        thread.join()
    model = checkpoint.build_on_meta(Phi3VForCausalLM, config)
    assert built_elsewhere == {"device": "cpu"}
    assert nn.Module.register_parameter is register_parameter
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # no device context left behind
    assert all(p.device.type == "meta" for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())
    if name == "tiny":  # an ordinary build to compare with (the full size would take 16 GB)
        reference = dict(Phi3VForCausalLM(config).named_buffers())
    else:  # the buffers alone: the same modules built on the CPU
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        rotary = Phi3RotaryEmbedding(config)
        reference = {"model.rotary_emb." + k: v for k, v in rotary.named_buffers()}
        reference["model.vision_embed_tokens.img_processor.embeddings.position_ids"] = torch.arange(577)[None]
    assert sorted(buffers) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(buffers[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", ["phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"])
def test_full_size_meta_model_has_exactly_the_official_keys_and_shapes(name):
    model = checkpoint.build_on_meta(Phi3VForCausalLM, Phi3VConfig.from_name(name))
    assert all(p.device.type == "meta" for p in model.parameters())
    ours = checkpoint.official_shapes(model)
    expected = reference_official_shapes()
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: ours[k] for k in expected if ours[k] != expected[k]} == {}
    # One embedding copy: the hub shard sizes (8.29 GB in bf16) imply 4,146,621,440 parameters (reference §2.2).
    assert sum(math.prod(s) for s in ours.values()) == 4_146_621_440
    # The computed CLIP stops at hidden_states[-2]: 23 layers built, the 24th and post_layernorm only stored.
    assert len(model.vision.img_processor.encoder.layers) == 23
    assert not hasattr(model.vision.img_processor, "post_layernorm")
    assert sorted({k.split(".")[2] for k in model.vision.unused_clip_weights if k.startswith("encoder.")}) == ["23"]


# -- the image embedding ----------------------------------------------------------------------------------------------
def test_merge_2x2_order_matches_the_reference_layout():
    C = 2
    crops = torch.arange(2 * 576 * C, dtype=torch.float32).reshape(2, 576, C)  # two crops side by side (h=1, w=2)
    merged = merge_2x2(crops, h_crops=1, w_crops=2)
    assert merged.shape == (1, 12, 24, 4 * C)
    patch = crops.reshape(2, 24, 24, C)
    for crop, r, c in [(0, 0, 0), (0, 5, 11), (1, 0, 0), (1, 11, 3)]:
        cell = merged[0, r, crop * 12 + c]
        expected = torch.cat([patch[crop, 2 * r + dy, 2 * c + dx] for dy in (0, 1) for dx in (0, 1)])
        assert torch.equal(cell, expected)


def reference_image_features(model: Phi3VForCausalLM, pixel_values, image_sizes) -> torch.Tensor:
    """Reference §3, written as loops: full CLIP on *all* crops (padding too), hidden_states[-2], no CLS, explicit
    2x2 concatenation, row separators, sub_glb order, projection."""
    vision = model.vision
    config = model.config.vision_config
    clip = CLIPVisionModel(config).eval()
    state = {k: v for k, v in vision.img_processor.state_dict().items()}
    state.update(vision.unused_clip_weights)
    clip.load_state_dict(state, strict=True)
    n, crops = pixel_values.shape[:2]
    with torch.no_grad():
        hidden = clip(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    feats = hidden[:, 1:].reshape(n, crops, 24, 24, -1)  # n, crops, 24, 24, C
    out = []
    for i in range(n):
        h, w = (int(x) // 336 for x in image_sizes[i])

        def cell(crop, r, c, i=i):
            return torch.cat([feats[i, crop, 2 * r + dy, 2 * c + dx] for dy in (0, 1) for dx in (0, 1)])

        tokens = []
        for row in range(12 * h):
            for col in range(12 * w):
                crop = 1 + (row // 12) * w + (col // 12)
                tokens.append(cell(crop, row % 12, col % 12))
            tokens.append(vision.sub_GN.reshape(-1))
        tokens.append(vision.glb_GN.reshape(-1))
        for row in range(12):
            tokens.extend(cell(0, row, col) for col in range(12))
            tokens.append(vision.sub_GN.reshape(-1))
        out.append(torch.stack(tokens))
    with torch.no_grad():
        return vision.img_projection(torch.cat(out))


def test_image_features_match_a_loop_reimplementation_of_the_reference():
    model = tiny_model(seed=1)
    grids = [(2, 2), (1, 3), (1, 1)]  # a batch mixing crop grids
    pixel_values, image_sizes = image_batch(grids, num_crops=4, seed=1)
    with torch.no_grad():
        ours = model.vision(pixel_values, image_sizes)
    expected = reference_image_features(model, pixel_values, image_sizes)
    assert ours.shape == (sum(image_tokens(h, w) for h, w in grids), model.config.hidden_size)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_clip_features_are_hidden_states_minus_two_without_cls():
    model = tiny_model(seed=2)
    clip = CLIPVisionModel(model.config.vision_config).eval()
    state = dict(model.vision.img_processor.state_dict())
    state.update(model.vision.unused_clip_weights)
    clip.load_state_dict(state, strict=True)
    crops = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        expected = clip(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = model.vision.clip_features(crops)
        last = clip(crops).last_hidden_state[:, 1:]
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, last)  # the last layer really is skipped


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (1, 4), (4, 1), (2, 1)])
def test_feature_count_is_the_reference_token_count(grid):
    model = tiny_model()
    pixel_values, image_sizes = image_batch([grid], num_crops=4)
    with torch.no_grad():
        features = model.vision(pixel_values, image_sizes)
    assert features.shape[0] == image_tokens(*grid)


def test_features_fill_the_placeholders_in_order():
    model = tiny_model(seed=3)
    grids = [(1, 2), (1, 1)]
    pixel_values, image_sizes = image_batch(grids, seed=3)
    ids = prompt_ids(grids, [[BOS, 7, 9], [20, 21], [4]])[None]
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixel_values, image_sizes)
        features = model.vision(pixel_values, image_sizes)
        text = model.model.embed_tokens(ids)
    is_image = ids[0] == IMAGE_ID
    assert torch.equal(embeds[0, is_image], features)
    assert torch.equal(embeds[0, ~is_image], text[0, ~is_image])
    # image 1's run starts right after the first chunk, image 2's after image 1 + its BOS-led chunk
    first = image_tokens(1, 2)
    assert torch.equal(embeds[0, 3 : 3 + first], features[:first])


def test_placeholder_count_mismatch_is_a_clear_error():
    model = tiny_model()
    pixel_values, image_sizes = image_batch([(1, 1)])
    ids = torch.tensor([[BOS] + [IMAGE_ID] * (image_tokens(1, 1) - 1) + [BOS]])
    with pytest.raises(ValueError, match=r"312 image placeholder tokens .* give 313 features"):
        model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="need 5 crops"):
        model(input_ids=ids, pixel_values=pixel_values[:, :3], image_sizes=torch.tensor([[672, 672]]))


# -- the language model around it -------------------------------------------------------------------------------------
def test_padding_invariance_left_and_right():
    model = tiny_model(seed=4)
    grids = [(1, 1), (1, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=4)
    short = prompt_ids(grids[:1], [[BOS, 7], [11, 12]])
    long = prompt_ids(grids[1:], [[BOS, 7, 10, 9], [11, 12, 13, 14, 15]])
    with torch.no_grad():
        alone = model(input_ids=short[None], pixel_values=pixel_values[:1], image_sizes=image_sizes[:1]).logits[0]
    pad = long.numel() - short.numel()
    for side in ("right", "left"):
        filler = torch.full((pad,), 3)
        padded = torch.cat([short, filler]) if side == "right" else torch.cat([filler, short])
        mask = torch.cat([torch.ones_like(short), torch.zeros(pad, dtype=torch.long)])
        if side == "left":
            mask = mask.flip(0)
        ids = torch.stack([padded, long])
        attention_mask = torch.stack([mask, torch.ones_like(long)])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                image_sizes=image_sizes,
            ).logits
        real = logits[0, :-pad] if side == "right" else logits[0, pad:]
        torch.testing.assert_close(real, alone, rtol=1e-4, atol=1e-5)


def test_generate_with_cache_equals_without_cache():
    model = tiny_model(seed=5)
    grids = [(1, 1), (2, 1)]
    pixel_values, image_sizes = image_batch(grids, seed=5)
    a = prompt_ids(grids[:1], [[BOS, 7, 10, 9, 10, 11], [12]])
    b = prompt_ids(grids[1:], [[BOS, 7], [12, 13]])
    pad = b.numel() - a.numel()
    ids = torch.stack([torch.cat([torch.full((pad,), 3), a]), b])  # left padding for generation
    attention_mask = (torch.arange(ids.shape[1]) >= torch.tensor([[pad], [0]])).long()
    kwargs = dict(
        input_ids=ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=3,
        eos_token_id=None,
    )
    calls = []
    hook = model.vision.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        cached = model.generate(**kwargs, use_cache=True)
        assert len(calls) == 1  # images are encoded once, at prefill
        uncached = model.generate(**kwargs, use_cache=False)
    hook.remove()
    assert cached.shape == (2, ids.shape[1] + 8)
    assert torch.equal(cached, uncached)
    # and each row equals generating it alone (batching with padding changes nothing)
    with torch.no_grad():
        alone = model.generate(
            input_ids=b[None],
            pixel_values=pixel_values[1:],
            image_sizes=image_sizes[1:],
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=3,
            eos_token_id=None,
        )
    assert torch.equal(alone[0], cached[1])


def test_decode_step_with_cache_needs_no_images():
    model = tiny_model(seed=6)
    pixel_values, image_sizes = image_batch([(1, 1)])
    ids = prompt_ids([(1, 1)], [[BOS], [5]])[None]
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, use_cache=True)
        assert isinstance(first.cache, DynamicCache)
        step = model(input_ids=torch.tensor([[9]]), cache=first.cache, use_cache=True)
        full = model(
            input_ids=torch.cat([ids, torch.tensor([[9]])], 1), pixel_values=pixel_values, image_sizes=image_sizes
        )
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], rtol=1e-4, atol=1e-5)


def test_longrope_switches_to_long_factors_past_4096_positions():
    model = tiny_model()
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 4)
    rope = model.config.rope_parameters
    dim = model.config.hidden_size // model.config.num_attention_heads
    base = rope["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)
    for last, factors in [(4095, rope["short_factor"]), (4096, rope["long_factor"])]:
        cos, _ = rotary(x, torch.tensor([[last]]))
        inv_freq = 1.0 / (torch.tensor(factors) * base)
        scale = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))  # sqrt(17/12), reference §6.2
        expected = torch.cos(last * inv_freq) * scale
        torch.testing.assert_close(cos[0, 0, : dim // 2], expected, rtol=1e-4, atol=1e-4)


def test_sdpa_and_eager_agree():
    grids = [(1, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=7)
    ids = prompt_ids(grids, [[BOS, 7], [10]])[None]
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_model(seed=7, attn_implementation=impl)
        assert model.vision.img_processor.config._attn_implementation == impl
        with torch.no_grad():
            outs.append(model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


# -- training ---------------------------------------------------------------------------------------------------------
def _loss(model, seed=8):
    grids = [(1, 1), (1, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=seed)
    ids = prompt_ids(grids, [[BOS, 7], [10, 9], [10, 11, 12]])[None]
    labels = ids.clone()
    labels[ids == IMAGE_ID] = -100
    return model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels).loss


def test_every_trainable_parameter_gets_a_gradient():
    model = tiny_model(seed=8).train()
    _loss(model).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []
    names = {n for n, _ in model.named_parameters()}
    last = model.config.vision_config.num_hidden_layers - 1  # features come from hidden_states[-2]
    assert any(f".img_processor.encoder.layers.{last - 1}." in n for n in names)  # CLIP layers in use are trained
    assert not any("post_layernorm" in n or f".encoder.layers.{last}." in n for n in names)  # the unused tail is not


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = tiny_model(seed=9).train()
    ckpt = tiny_model(seed=9).train()
    ckpt.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    assert all(layer.gradient_checkpointing for layer in ckpt.vision.img_processor.encoder.layers)
    a, b = _loss(plain), _loss(ckpt)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for (name, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_adapters_on_lm_clip_and_projector_all_receive_gradients():
    peft = pytest.importorskip("peft")
    model = tiny_model(seed=10)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
    targets += ["fc2", "img_projection.0", "img_projection.2"]
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    lora.train()
    _loss(lora).backward()
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("img_processor" in n for n in trainable) and any("img_projection" in n for n in trainable)
    assert any("qkv_proj" in n for n in trainable)
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.any()] == []


def test_generation_across_the_4096_longrope_switch_refeeds_the_images():
    """Phi3 drops the cache when a sequence first passes original_max_position_embeddings (short -> long rope
    factors) and recomputes the prefix: the images must enter again then, and the result must equal no-cache."""
    model = tiny_model(seed=14)
    grids = [(2, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=14)
    filler = [10 + (i % 50) for i in range(4090 - image_tokens(2, 2) - 3)]
    ids = prompt_ids(grids, [[BOS, 11], filler])[None]  # 4090 tokens: generation crosses 4096
    assert ids.shape[1] == 4090
    kwargs = dict(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=10)
    kwargs.update(do_sample=False, pad_token_id=3, eos_token_id=None)
    calls = []
    hook = model.vision.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        cached = model.generate(**kwargs, use_cache=True)
    hook.remove()
    assert len(calls) == 2  # prefill, then the recomputed prefix past 4096
    with torch.no_grad():
        uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_expansion_for_beams_keeps_each_samples_own_images():
    """Beam search / num_return_sequences repeat samples; a sample's several images must stay together."""
    model = tiny_model(seed=15)
    grids = [(1, 1), (1, 2), (2, 1)]  # sample 0 has images 0 and 1, sample 1 has image 2
    pixel_values, image_sizes = image_batch(grids, seed=15)
    a = prompt_ids(grids[:2], [[BOS, 11], [12], [13]])
    b = prompt_ids(grids[2:], [[BOS, 11], [12]])
    b = torch.cat([torch.full((a.numel() - b.numel(),), 3), b])
    ids = torch.stack([a, b])
    expanded_ids, kwargs = model._expand_inputs_for_generation(
        expand_size=2, input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes
    )
    assert image_sizes[[0, 1, 0, 1, 2, 2]].tolist() == kwargs["image_sizes"].tolist()
    with torch.no_grad():
        once = model.embed_inputs(ids, pixel_values, image_sizes)
        twice = model.embed_inputs(expanded_ids, kwargs["pixel_values"], kwargs["image_sizes"])
    # same values (not bit for bit: a batch of 6 images may take other CPU kernels than a batch of 3 on many cores)
    torch.testing.assert_close(twice, once.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        beams = model.generate(
            input_ids=a[None],
            pixel_values=pixel_values[:2],
            image_sizes=image_sizes[:2],
            num_beams=2,
            num_return_sequences=2,
            max_new_tokens=4,
            pad_token_id=3,
            eos_token_id=None,
        )
    assert beams.shape == (2, a.numel() + 4)


def test_default_generation_config_keeps_the_config_token_ids():
    model = checkpoint.build_on_meta(Phi3VForCausalLM, Phi3VConfig.from_name("phi-3-vision-128k-instruct"))
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 32000)
