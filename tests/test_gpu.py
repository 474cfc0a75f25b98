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
