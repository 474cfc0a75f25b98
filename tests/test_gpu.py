"""Checks that need CUDA (skipped on CI and the CPU dev machines; run them where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from model_helpers import BOS, IMAGE_ID, image_batch, prompt_ids, tiny_model

pytestmark = pytest.mark.gpu


def test_bf16_forward_backward_on_cuda_matches_fp32_closely():
    grids = [(1, 2), (2, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=13)
    ids = prompt_ids(grids, [[BOS, 10], [11], [12]])[None]
    labels = ids.masked_fill(ids == IMAGE_ID, -100)
    fp32 = tiny_model(seed=13).cuda()
    bf16 = tiny_model(seed=13).cuda().to(torch.bfloat16).train()
    inputs = dict(input_ids=ids.cuda(), pixel_values=pixel_values.cuda(), image_sizes=image_sizes.cuda())
    with torch.no_grad():
        reference = fp32(**inputs, labels=labels.cuda()).loss
    loss = bf16(**inputs, labels=labels.cuda()).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()
    assert all(p.grad is not None for p in bf16.parameters())


def test_from_pretrained_on_cuda_in_bf16_then_generate(tmp_path):
    tiny_model(seed=17).save_pretrained(tmp_path)
    from phi3v import Phi3VForCausalLM

    model = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    grids = [(2, 2)]
    pixel_values, image_sizes = image_batch(grids, seed=17)
    ids = prompt_ids(grids, [[BOS, 10], [11]])[None]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=3, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.cuda(), pixel_values=pixel_values.cuda(), image_sizes=image_sizes.cuda(), **kwargs
        )
    assert out.shape == (1, ids.shape[1] + 6)


def test_more_processes_per_node_than_gpus_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from phi3v.train import TrainConfig, TrainingError, _preflight

    config = TrainConfig(model="unused", data="unused", output_dir=str(tmp_path / "run"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(torch.cuda.device_count() + 1))
    with pytest.raises(TrainingError, match="processes per node but"):
        _preflight(config, config.training_arguments())


def test_packed_rows_through_torch_varlen_kernels_match_padded_sdpa_in_bf16():
    """The CUDA packed path (torch.nn.attention.varlen) against padded SDPA on the same samples: close losses and
    gradients in bf16, and samples that do not see each other."""
    from phi3v.data.packing import pack_batch
    from phi3v.model import packed

    if not packed.varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    name = packed.register_varlen_attention()
    grids = [(1, 2), (2, 2), (1, 1)]
    pixel_values, image_sizes = image_batch(grids, seed=21)
    rows = [prompt_ids([g], [[BOS, 10 + i] * (3 + 5 * i), [11, 12, 13, 14]]) for i, g in enumerate(grids)]
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    labels = ids.masked_fill((ids == IMAGE_ID) | (mask == 0), -100)
    labels[:, :2] = -100
    padded = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
    pack = pack_batch(padded)
    results = {}
    for attention, batch in (("sdpa", padded), (name, pack)):
        model = tiny_model(seed=21, attn_implementation=attention).cuda().to(torch.bfloat16).train()
        inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = model(**inputs)
        out.loss.backward()
        results[attention] = (out.loss.item(), {n: p.grad.float() for n, p in model.named_parameters()})
    (loss_a, grads_a), (loss_b, grads_b) = results["sdpa"], results[name]
    assert abs(loss_a - loss_b) < 0.02 * abs(loss_a)
    for key, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[key], atol=2e-2, rtol=5e-2), key
    # isolation on the kernel path: another first sample leaves the other samples' logits bit-equal
    model = tiny_model(seed=21, attn_implementation=name).cuda().to(torch.bfloat16)
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in pack.items()}
    changed["input_ids"][0, 1] = 500
    with torch.no_grad():
        a = model(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in pack.items()}).logits[0]
        b = model(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in changed.items()}).logits[0]
    start = int(pack["cu_seq_lens"][1])
    assert torch.equal(a[start:], b[start:])
    assert not torch.equal(a[:start], b[:start])


def test_packed_training_run_on_cuda_uses_the_varlen_kernels(tmp_path, caplog):
    """A short packed bf16 run on the GPU: finite losses, padding ratio 1, the varlen implementation loaded."""
    import json

    from phi3v.model import packed
    from phi3v.train import load_train_config, train
    from train_helpers import build_prepared_catalog, build_tiny_model, tiny_config_args

    if not packed.varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    caplog.set_level("INFO", logger="phi3v.train")
    model = build_tiny_model(tmp_path / "model")
    data = build_prepared_catalog(tmp_path / "data")
    out = tmp_path / "run"
    args = tiny_config_args(
        model,
        data,
        out,
        mode="full",
        packing=True,
        max_tokens_per_batch=3000,
        bf16=True,
        max_steps=4,
        eval_strategy="no",
        save_strategy="no",
        use_cpu=False,
    )
    train(load_train_config(None, args))
    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 4 and all(row["padding_ratio"] == 1.0 for row in rows)
    assert all(row["loss"] is not None and row["loss"] == row["loss"] for row in rows)
    assert "packed rows use torch's variable-length flash kernels" in caplog.text
