"""Padding-free batches and token budgets for training (`packing`, `max_tokens_per_batch` in the train config).

- `pack_batch` turns a right-padded training batch into one row: the samples back to back, ``position_ids``
  restarting at 0 for each, ``cu_seq_lens`` (cumulative lengths) for the model to keep them apart
  (`phi3v.model.packed`), labels exactly as padded (answer + ``<|end|>``; every sample's first label is -100, so no
  sample's first token is the target of the previous one), images in the same order (they fill placeholders in
  order). ``pixel_values`` and ``image_sizes`` are unchanged.
- `TokenBudgetBatchSampler` fills batches up to a token budget from the known per-row lengths
  (`phi3v.data.collate.sequence_lengths`), so a step's memory follows the budget, not the largest photos drawn. The
  cost of a batch is what it puts through the model: ``sum(lengths)`` packed, ``len(batch) * max(lengths)`` padded.

Why written here: transformers' samplers fix the number of samples per batch (`LengthGroupedSampler`) or per
optimizer step (`BatchRebalanceSampler`); none bounds the tokens of a batch, and `DataCollatorWithFlattening` packs
text only (no image tensors, no per-sample rotary factor).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
MEGABATCH = 50  # batches' worth of rows sorted by length together (as transformers' LengthGroupedSampler)


def pack_batch(batch: Any) -> Any:
    """One packed row from a right-padded `build_training_batch` output (a `BatchFeature` or dict).

    Returns:
        The same type with ``input_ids`` / ``labels`` / ``position_ids`` ``[1, N]`` (N = real tokens),
        ``cu_seq_lens`` ``[n + 1]`` int32, ``max_seq_len`` (int), and the batch's ``pixel_values`` /
        ``image_sizes``; no ``attention_mask``.
    """
    mask = batch["attention_mask"].bool()  # [B, T]
    if bool((mask[:, :-1] < mask[:, 1:]).any()):
        raise ValueError("pack_batch needs right-padded rows (padding_side='right')")
    lengths = mask.sum(dim=1)  # [B]
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX  # a sample's first token is never a target (it is BOS / prompt anyway)
    positions = torch.arange(mask.shape[1]).expand_as(mask)  # [B, T]
    packed = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask", "labels")}
    packed["input_ids"] = batch["input_ids"][mask][None]  # [1, N]
    packed["labels"] = labels[mask][None]  # [1, N]
    packed["position_ids"] = positions[mask][None]  # [1, N]
    packed["cu_seq_lens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)  # [B + 1]
    packed["max_seq_len"] = int(lengths.max())
    return type(batch)(packed) if not isinstance(batch, dict) else packed


def batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Tokens a batch of these lengths puts through the model."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


class TokenBudgetBatchSampler:
    """Batches of dataset indices whose cost (`batch_cost`) stays within ``max_tokens``.

    The batches are drawn once from ``seed``: a seeded shuffle, cut into mega-batches of about `MEGABATCH` batches'
    worth of rows, each sorted by length (longest first, so similar lengths share a batch) and filled greedily up to
    the budget. Every epoch then visits the same batches in a new order (``seed + epoch``), so the number of batches
    per epoch is fixed (the Trainer's step count, schedules and exact ``--resume`` rely on it) and a resumed run sees
    the same batches as an uninterrupted one. Under several processes accelerate deals the batches round-robin and
    repeats the first ones at the end, so every rank gets the same number.

    Args:
        lengths: Token count of every row.
        max_tokens: The budget per batch.
        packed: Cost as packed rows (sum of lengths) or as a padded batch (count x longest).
        seed: Seed of the draw and of the per-epoch order.
        max_batch_size: An optional cap on rows per batch as well.

    Raises:
        ValueError: A row longer than the budget (its index and length named), or a budget below 1.
    """

    batch_size = None  # variable-size batches (accelerate's BatchSamplerShard reads this)
    drop_last = False

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        packed: bool,
        seed: int = 0,
        max_batch_size: int | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens}")
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("no rows to batch")
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > max_tokens:
            raise ValueError(
                f"max_tokens_per_batch={max_tokens} is smaller than train row {longest}, which has "
                f"{lengths[longest]} tokens; raise the budget to at least {lengths[longest]} (or lower num_crops)"
            )
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.packed = packed
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.epoch = 0
        self.batches = self._draw()

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        """Itself: accelerate forwards ``set_epoch`` to ``batch_sampler.sampler`` when it wraps this one."""
        return self

    def _draw(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed).shuffle(order)
        mean = sum(self.lengths) / len(self.lengths)
        rows_per_batch = max(1, int(self.max_tokens // max(mean, 1)))
        chunk = max(1, MEGABATCH * rows_per_batch)
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            rows = sorted(order[start : start + chunk], key=lambda i: -self.lengths[i])
            current: list[int] = []
            total = longest = 0
            for i in rows:
                n = self.lengths[i]
                cost = total + n if self.packed else (len(current) + 1) * max(longest, n)
                full = self.max_batch_size is not None and len(current) >= self.max_batch_size
                if current and (full or cost > self.max_tokens):
                    batches.append(current)
                    current, total, longest = [], 0, 0
                current.append(i)
                total, longest = total + n, max(longest, n)
            if current:
                batches.append(current)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        random.Random(self.seed + self.epoch).shuffle(order)
        for i in order:
            yield list(self.batches[i])

    def stats(self) -> dict[str, float]:
        """Rows, batches, mean rows per batch and mean budget use (cost / budget) of the draw."""
        costs = [batch_cost([self.lengths[i] for i in b], self.packed) for b in self.batches]
        return {
            "rows": len(self.lengths),
            "batches": len(self.batches),
            "rows_per_batch": len(self.lengths) / len(self.batches),
            "budget_use": sum(costs) / (len(costs) * self.max_tokens),
            "largest_batch_cost": max(costs),
        }
