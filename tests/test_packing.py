"""Padding-free packing and token budgets: packed rows are exact (losses, gradients, logits) and batches keep budgets.

Model-level tests use the tiny random model in fp32 on the CPU (SDPA with a block-diagonal causal mask); the
varlen-kernel path is checked in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from model_helpers import BOS, image_batch, prompt_ids, tiny_model
from phi3v.data.packing import TokenBudgetBatchSampler, batch_cost, pack_batch
from phi3v.model import packed

IGNORE = -100


def _samples(specs, seed=0):
    """[(ids [T], labels [T], grids)] for text-length / crop-grid specs: a prompt with images and a labelled answer."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for text_len, grids in specs:
        head = torch.randint(10, 900, (text_len,), generator=gen).tolist()
        chunks = [[BOS, *head]] + [torch.randint(10, 900, (3,), generator=gen).tolist() for _ in grids]
        ids = prompt_ids(grids, chunks)
        answer = torch.randint(10, 900, (7,), generator=gen)
        ids = torch.cat([ids, answer])
        labels = torch.full_like(ids, IGNORE)
        labels[-7:] = answer
        samples.append((ids, labels, grids))
    return samples


def _padded(samples, pad_id=0):
    longest = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.full((len(samples), longest), pad_id)
    labels = torch.full((len(samples), longest), IGNORE)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, (ids, lab, _) in enumerate(samples):
        input_ids[row, : len(ids)], labels[row, : len(ids)], mask[row, : len(ids)] = ids, lab, 1
    grids = [g for _, _, gs in samples for g in gs]
    pixel_values, image_sizes = image_batch(grids, seed=3)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }


def _per_sample_losses(logits, labels):
    """Token-mean loss of each sample: logits [B, T, V] / labels [B, T] padded, or one packed row with cu."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
    )  # [B, T-1]
    return losses, shift_labels != IGNORE


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_packed_equals_padded_losses_and_gradients_with_mixed_crop_grids():
    model = tiny_model(seed=1).train()
    samples = _samples([(20, [(1, 1)]), (5, [(1, 2)]), (40, [(2, 1)]), (9, [(1, 1), (1, 2)])])
    padded = _padded(samples)
    pack = pack_batch(padded)
    assert pack["input_ids"].shape == (1, sum(len(ids) for ids, _, _ in samples))
    assert pack["cu_seq_lens"].tolist() == [0, *torch.tensor([len(s[0]) for s in samples]).cumsum(0).tolist()]
    assert pack["position_ids"][0, : len(samples[0][0])].tolist() == list(range(len(samples[0][0])))
    assert int(pack["position_ids"][0, len(samples[0][0])]) == 0  # restarts for the second sample
    assert torch.equal(pack["pixel_values"], padded["pixel_values"])

    out_pad, grads_pad = _run(model, padded)
    out_pack, grads_pack = _run(model, pack)
    assert abs(float(out_pad.loss.detach()) - float(out_pack.loss.detach())) < 1e-6

    # per-sample losses: the packed row's tokens, split at cu_seq_lens, against each padded row
    loss_pad, keep_pad = _per_sample_losses(out_pad.logits.detach(), padded["labels"])
    loss_pack, keep_pack = _per_sample_losses(out_pack.logits.detach(), pack["labels"])
    cu = pack["cu_seq_lens"].tolist()
    for row in range(len(samples)):
        mine = loss_pack[0, cu[row] : cu[row + 1] - 1][keep_pack[0, cu[row] : cu[row + 1] - 1]]
        ref = loss_pad[row][keep_pad[row]]
        assert mine.numel() == ref.numel() == 7
        assert torch.allclose(mine.mean(), ref.mean(), atol=1e-5), (row, mine.mean(), ref.mean())
    # no packed target crosses a sample boundary: the last token of a sample predicts nothing
    for end in cu[1:-1]:
        assert int(pack["labels"][0, end]) == IGNORE

    assert grads_pad.keys() == grads_pack.keys() and len(grads_pad) > 10
    for name, grad in grads_pad.items():
        assert torch.allclose(grad, grads_pack[name], atol=1e-5, rtol=0), name


def test_longrope_factor_is_chosen_per_sample_across_the_4096_switch(monkeypatch):
    """A 4,400-token sample (long factors) and a short one (short factors) in one pack: each sample's logits equal
    its own unpadded forward, which is what batch size 1 gives."""
    model = tiny_model(seed=2)
    original = model.config.rope_parameters["original_max_position_embeddings"]
    samples = _samples([(3650, [(2, 2)]), (30, [(1, 1)])], seed=5)
    assert len(samples[0][0]) > original > len(samples[1][0])
    pack = pack_batch(_padded(samples))
    with torch.no_grad():
        packed_logits = model(**pack).logits[0]  # [N, V]
        cu = pack["cu_seq_lens"].tolist()
        start_image = 0
        for row, (ids, _, grids) in enumerate(samples):
            pixel_values, image_sizes = image_batch([g for _, _, gs in samples for g in gs], seed=3)
            alone = model(
                input_ids=ids[None],
                pixel_values=pixel_values[start_image : start_image + len(grids)],
                image_sizes=image_sizes[start_image : start_image + len(grids)],
            ).logits[0]
            start_image += len(grids)
            assert torch.allclose(packed_logits[cu[row] : cu[row + 1]], alone, atol=1e-5), row
        # one factor for the whole row (transformers' rotary: by max(position_ids) + 1) gets the short one wrong
        with monkeypatch.context() as patch:
            patch.setattr(packed, "packed_position_embeddings", lambda rotary, x, positions, cu: rotary(x, positions))
            one_factor = model(**pack).logits[0]
        assert torch.allclose(one_factor[cu[0] : cu[1]], packed_logits[cu[0] : cu[1]], atol=1e-5)
        assert not torch.allclose(one_factor[cu[1] : cu[2]], packed_logits[cu[1] : cu[2]], atol=1e-3)


def test_perturbing_one_sample_leaves_the_others_bit_equal():
    model = tiny_model(seed=3)
    samples = _samples([(12, [(1, 1)]), (30, [(1, 2)]), (8, [(2, 1)])], seed=7)
    pack = pack_batch(_padded(samples))
    changed = {key: (value.clone() if torch.is_tensor(value) else value) for key, value in pack.items()}
    cu = pack["cu_seq_lens"].tolist()
    # sample 1: other text tokens and another photo
    text = (changed["input_ids"][0, cu[1] : cu[2]] != model.config.image_token_id).nonzero().flatten()[2:]
    changed["input_ids"][0, cu[1] + text] = 777
    changed["pixel_values"][1] = torch.randn_like(changed["pixel_values"][1]) * (changed["pixel_values"][1] != 0)
    with torch.no_grad():
        before = model(**pack).logits[0]
        after = model(**changed).logits[0]
    for row in (0, 2):
        assert torch.equal(before[cu[row] : cu[row + 1]], after[cu[row] : cu[row + 1]]), row
    assert not torch.allclose(before[cu[1] : cu[2]], after[cu[1] : cu[2]])


def test_packed_inputs_are_refused_with_eager_and_with_a_mask():
    model = tiny_model(seed=0, attn_implementation="eager")
    pack = pack_batch(_padded(_samples([(5, [(1, 1)]), (6, [(1, 1)])])))
    with pytest.raises(ValueError, match="eager"):
        model(**pack)
    sdpa = tiny_model(seed=0)
    with pytest.raises(ValueError, match="no attention_mask"):
        sdpa(**pack, attention_mask=torch.ones_like(pack["input_ids"]))
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch({**_padded(_samples([(5, [(1, 1)]), (9, [(1, 1)])])), "attention_mask": torch.tensor([[0, 1]])})


def test_varlen_implementation_is_sdpa_unpacked_and_the_block_mask_packed():
    """`phi3v_varlen` (registered with transformers): unpacked forwards (generation) are SDPA's exactly; packed rows
    (SDPA sample by sample off CUDA) give the block-diagonal mask's logits and gradients."""
    name = packed.register_varlen_attention()
    sdpa, varlen = tiny_model(seed=4).train(), tiny_model(seed=4, attn_implementation=name).train()
    batch = _padded(_samples([(10, [(1, 1)]), (30, [(1, 2)]), (3, [(2, 1)])]))
    unpacked = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        assert torch.equal(sdpa(**unpacked).logits, varlen(**unpacked).logits)
    pack = pack_batch(batch)
    out_mask, grads_mask = _run(sdpa, pack)
    out_varlen, grads_varlen = _run(varlen, pack)
    assert torch.allclose(out_mask.logits, out_varlen.logits, atol=1e-5)
    assert abs(float(out_mask.loss.detach()) - float(out_varlen.loss.detach())) < 1e-6
    for key, grad in grads_mask.items():
        assert torch.allclose(grad, grads_varlen[key], atol=1e-5, rtol=0), key


def test_block_causal_mask_is_causal_within_samples_only():
    mask = packed.block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


# ------------------------------------------------------------------------------------------------- token budgets
@pytest.mark.parametrize("packed_cost", [True, False])
def test_token_budget_batches_cover_every_row_once_within_the_budget(packed_cost):
    lengths = [int(n) for n in torch.randint(300, 2600, (500,), generator=torch.Generator().manual_seed(0))]
    sampler = TokenBudgetBatchSampler(lengths, 8000, packed=packed_cost, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))  # nothing lost, nothing twice
    assert all(batch_cost([lengths[i] for i in b], packed_cost) <= 8000 for b in batches)
    assert len(batches) == len(sampler)
    stats = sampler.stats()
    assert stats["budget_use"] > 0.8, stats  # greedy filling of length-sorted rows uses the budget
    sampler.set_epoch(1)
    again = list(sampler)
    assert again != batches and sorted(map(tuple, again)) == sorted(map(tuple, batches))  # same batches, new order
    sampler.set_epoch(0)
    assert list(sampler) == batches  # deterministic per epoch (exact resume)
    same_seed = TokenBudgetBatchSampler(lengths, 8000, packed=packed_cost, seed=3)
    assert list(same_seed) == batches


def test_packed_budgets_hold_more_rows_than_padded_ones():
    lengths = [int(n) for n in torch.randint(300, 2600, (400,), generator=torch.Generator().manual_seed(1))]
    packed_batches = TokenBudgetBatchSampler(lengths, 10000, packed=True).stats()
    padded_batches = TokenBudgetBatchSampler(lengths, 10000, packed=False).stats()
    assert packed_batches["batches"] < padded_batches["batches"]


def test_a_budget_below_the_longest_row_names_it():
    with pytest.raises(ValueError, match=r"row 2, which has 900 tokens"):
        TokenBudgetBatchSampler([100, 200, 900, 300], 800, packed=True)
    with pytest.raises(ValueError, match=">= 1"):
        TokenBudgetBatchSampler([100], 0, packed=True)
