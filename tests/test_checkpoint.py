"""Checkpoint I/O in the official layout: round trips, bad checkpoints, dtypes, hub failures, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_helpers import BOS, image_batch, prompt_ids, tiny_model
from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.model import checkpoint
from phi3v.model.checkpoint import CheckpointError


def saved_keys(folder) -> dict[str, tuple[int, ...]]:
    keys = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            keys.update({k: tuple(reader.get_slice(k).get_shape()) for k in reader.keys()})  # noqa: SIM118
    return keys


def assert_same_weights(a: Phi3VForCausalLM, b: Phi3VForCausalLM) -> None:
    sa, sb = checkpoint.official_state_dict(a), checkpoint.official_state_dict(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert different == []


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model(seed=11)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder, max_shard_size="300KB")
    return model, folder


def test_save_writes_the_official_layout(saved):
    model, folder = saved
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keys = saved_keys(folder)
    assert keys == checkpoint.official_shapes(model)
    assert set(index["weight_map"]) == set(keys)
    assert {folder / f for f in index["weight_map"].values()} == set(folder.glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_all(folder).values())
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight" in keys
    assert "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight" in keys
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.mlp.fc1.weight" in keys  # unused
    assert not any(k.endswith("inv_freq") or k.endswith("position_ids") for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Phi3VForCausalLM"] and config["torch_dtype"] == "float32"
    assert (folder / "generation_config.json").is_file()


def load_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def test_save_load_round_trip_is_bit_exact(saved):
    model, folder = saved
    loaded = Phi3VForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert_same_weights(model, loaded)
    grids = [(1, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=11)
    ids = prompt_ids(grids, [[BOS, 10], [11]])[None]
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        b = loaded(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    assert torch.equal(a, b)


def test_load_then_save_keeps_every_tensor_including_the_unused_clip_tail(saved, tmp_path):
    _, folder = saved
    loaded = Phi3VForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path)  # one file this time
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    before, after = load_all(folder), load_all(tmp_path)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_bf16_save_and_load_and_dtype_conversion(saved, tmp_path):
    model, folder = saved
    as_bf16 = Phi3VForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in as_bf16.vision.unused_clip_weights.values()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in checkpoint.official_state_dict(model).items()}
    got = checkpoint.official_state_dict(as_bf16)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert as_bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are not down-cast
    as_bf16.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = Phi3VForCausalLM.from_pretrained(tmp_path)  # dtype="auto" -> the checkpoint's bf16
    assert again.dtype == torch.bfloat16
    assert_same_weights(as_bf16, again)


def test_resaving_with_fewer_shards_removes_stale_ones(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    many = len(list(tmp_path.glob("model-*.safetensors")))
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) < many
    assert Phi3VForCausalLM.from_pretrained(tmp_path) is not None


# -- bad checkpoints --------------------------------------------------------------------------------------------------
def single_file_copy(saved, tmp_path, edit) -> str:
    model, _ = saved
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_key_fails_with_its_name(saved, tmp_path):
    key = "model.layers.1.mlp.down_proj.weight"
    folder = single_file_copy(saved, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing keys: {key}"):
        Phi3VForCausalLM.from_pretrained(folder)


def test_unexpected_key_fails_with_its_name(saved, tmp_path):
    folder = single_file_copy(saved, tmp_path, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.9\.extra\.weight"):
        Phi3VForCausalLM.from_pretrained(folder)


def test_misshaped_key_fails_with_its_name_and_shapes(saved, tmp_path):
    key = "model.vision_embed_tokens.glb_GN"
    folder = single_file_copy(saved, tmp_path, lambda t: t.update({key: torch.zeros(1, 1, 64)}))
    with pytest.raises(CheckpointError, match=r"glb_GN \(checkpoint \[1, 1, 64\], model \[1, 1, 128\]\)"):
        Phi3VForCausalLM.from_pretrained(folder)


def test_extra_shared_wte_key_is_tolerated_but_shape_checked(saved, tmp_path):
    model, _ = saved
    wte = "model.vision_embed_tokens.wte.weight"
    folder = single_file_copy(saved, tmp_path, lambda t: t.update({wte: t["model.embed_tokens.weight"].clone()}))
    assert_same_weights(model, Phi3VForCausalLM.from_pretrained(folder))
    single_file_copy(saved, tmp_path, lambda t: t.update({wte: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"wte\.weight"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_pickled_weights_are_refused_and_missing_shards_named(saved, tmp_path):
    _, folder = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"safetensors only"):
        Phi3VForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing: .*model-00001-of-"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_bad_arguments_and_paths(saved, tmp_path):
    _, folder = saved
    with pytest.raises(ValueError, match="device_map"):
        Phi3VForCausalLM.from_pretrained(folder, device_map="auto")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Phi3VForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_hub_id_offline_fails_at_once_with_a_clear_message():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest before huggingface_hub is imported
    with pytest.raises(OSError, match=r"could not get 'microsoft/Phi-3-vision-128k-instruct' from the Hugging Face"):
        Phi3VForCausalLM.from_pretrained("microsoft/Phi-3-vision-128k-instruct")


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://phi3v-no-such-host.invalid", "does not resolve"),  # no DNS: only the (empty) cache is consulted
        ("http://127.0.0.1:9", "could not get"),  # resolves, but the connection is refused
    ],
)
def test_unreachable_hub_fails_with_a_clear_message(endpoint, reason, tmp_path, monkeypatch):
    """Not offline mode: the hub cannot be reached. Must fail with one clear error rather than retry for minutes."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    with pytest.raises(OSError, match=reason) as info:
        Phi3VForCausalLM.from_pretrained("microsoft/Phi-3.5-vision-instruct", cache_dir=tmp_path)
    assert "from the Hugging Face hub" in str(info.value) and "pass the folder" in str(info.value)


def test_loading_streams_into_the_target_dtype_without_a_full_fp32_copy(tmp_path):
    """Peak memory while loading a ~240 MB fp32 checkpoint as bf16 stays well under the fp32 size on top of the
    bf16 model: weights go tensor by tensor into bf16, parameters are never materialised and randomly initialised."""
    overrides = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=8)
    overrides.update(num_attention_heads=32, num_key_value_heads=32)  # head_dim 16: the tiny rope factors fit
    config = Phi3VConfig.from_name("tiny", **overrides)
    Phi3VForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40MB")
    fp32_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    script = textwrap.dedent(
        f"""
        import resource, torch
        from phi3v import Phi3VForCausalLM
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = Phi3VForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.bfloat16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before, sum(p.numel() * p.element_size() for p in model.parameters()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    peak_increase, bf16_bytes = map(int, result.stdout.split())
    assert bf16_bytes < fp32_bytes * 0.55
    assert peak_increase < bf16_bytes + 0.5 * fp32_bytes, (peak_increase, bf16_bytes, fp32_bytes)


def test_load_state_dict_accepts_the_official_layout_as_trainer_resume_does(saved):
    """Trainer reloads checkpoints with `model.load_state_dict(<tensors of the saved files>)`."""
    model, folder = saved
    other = tiny_model(seed=99)
    result = other.load_state_dict(load_all(folder), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_weights(model, other)  # CLIP (renamed keys) and the unused CLIP tail included
    other.load_state_dict(tiny_model(seed=5).state_dict())  # phi3v names still load as they are


def test_a_resave_holding_only_the_shared_wte_loads_it_as_the_embedding(saved, tmp_path):
    model, _ = saved

    def only_wte(tensors):
        tensors["model.vision_embed_tokens.wte.weight"] = tensors.pop("model.embed_tokens.weight")

    folder = single_file_copy(saved, tmp_path, only_wte)
    assert_same_weights(model, Phi3VForCausalLM.from_pretrained(folder))


def test_behind_a_proxy_the_dns_precheck_gives_no_verdict(monkeypatch):
    import huggingface_hub.constants

    from phi3v.model import hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://phi3v-no-such-host.invalid")
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert hub.unresolvable_hub_host() == "phi3v-no-such-host.invalid"
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert hub.unresolvable_hub_host() is None


def test_a_random_checkpoint_takes_the_image_token_id_of_its_tokenizer(tiny_tokenizer, tmp_path, make_image):
    """A tokenizer with `<|image|>` elsewhere (a trained BPE on a full-size config): model and processor agree."""
    from phi3v.model.processing import Phi3VProcessor
    from phi3v.model.random_init import write_random_checkpoint

    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    swap = {"<|image|>": 5, "<|system|>": 8}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = tmp_path / "tokenizer" / name
        data = json.loads(path.read_text())
        for entry in [*data.get("added_tokens", []), *data.get("added_tokens_decoder", {}).values()]:
            entry["id"] = swap.get(entry["content"], entry.get("id"))
        if "added_tokens_decoder" in data:
            data["added_tokens_decoder"] = {
                str(swap.get(entry["content"], int(key))): entry for key, entry in data["added_tokens_decoder"].items()
            }
        vocab = data.get("model", {}).get("vocab", {})
        vocab.update({token: index for token, index in swap.items() if token in vocab})
        path.write_text(json.dumps(data))
    folder = write_random_checkpoint(tmp_path / "model", "tiny", tokenizer_folder=tmp_path / "tokenizer")
    processor = Phi3VProcessor.from_pretrained(folder)
    model = Phi3VForCausalLM.from_pretrained(folder)
    assert processor.image_token_id == model.config.image_token_id == 5
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is it?"}])
    inputs = processor(prompt, images=[make_image(300, 200)])
    assert int((inputs["input_ids"] == 5).sum()) > 100
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()  # the image features found their placeholders
