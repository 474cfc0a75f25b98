"""Batched greedy answers from a Phi-3-V model, optionally held to the answer template's grammar.

Used by `phi3v evaluate`, the training generation check (`phi3v.train.GenerationCheck`) and `phi3v predict`, so all
three decode the same way:

- Images are sorted by their token count (from their size, `num_image_tokens_for_size`) and batched in that order,
  so a batch pads little; answers come back in input order.
- One prompt, left padding, greedy decoding with the KV cache, stopping at ``<|end|>`` or ``<|endoftext|>``; at most
  ``max_new_tokens`` new tokens.
- The next batch's images are decoded and HD-transformed on a background thread while the model generates.
- An image that fails to load (truncated file, bomb, ...) is reported by index and the run goes on without it.

`TemplateConstraint` (``--constrained``) makes every answer a string of the template's language: literal text as
written, the category one of a fixed vocabulary (the training split's), the price a plain number. At each step it
keeps, per sample, the highest-scoring token that leaves the text a valid prefix of that language (the end token
only once the answer is complete): greedy decoding restricted to the grammar, so answers always parse.
"""

from __future__ import annotations

import logging
import math
import string
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import regex
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from phi3v.metrics import AnswerTemplate

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 200
PRICE_PATTERN = r"[0-9]{1,9}(?:\.[0-9]{1,2})?"
_CANDIDATES_PER_STEP = 4096  # tokens tried per sample and step before giving up and ending the answer


def end_token_ids(processor: Any) -> list[int]:
    """Ids that end an answer: ``<|end|>`` (the chat turn's end) and the tokenizer's EOS (``<|endoftext|>``)."""
    ids = [processor.end_token_id, processor.tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


@dataclass
class Generation:
    """Answers of one `generate_answers` call.

    Attributes:
        answers: Decoded answer per input index (special tokens dropped, whitespace stripped).
        failures: Error message per input index whose image did not load.
        seconds: Wall time of the whole call.
        new_tokens: Tokens generated (all samples, up to and including the end token).
    """

    answers: dict[int, str] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    new_tokens: int = 0

    @property
    def images_per_second(self) -> float:
        return len(self.answers) / self.seconds if self.seconds > 0 else math.nan


def _load_batch(
    indices: Sequence[int], load_image: Callable[[int], Image.Image], processor: Any, prompt: str
) -> tuple[list[int], dict[int, str], Any]:
    """Decode the batch's images (a failing one is left out and reported) and run the processor on the rest."""
    kept: list[int] = []
    images: list[Image.Image] = []
    failures: dict[int, str] = {}
    for i in indices:
        try:
            image = load_image(i)
            image.load()  # decode now: a truncated file fails here, not inside the processor
        except Exception as err:  # any decoder error is a data failure of this row only
            failures[i] = f"{type(err).__name__}: {err}"
            continue
        kept.append(i)
        images.append(image)
    if not kept:
        return kept, failures, None
    batch = processor([prompt] * len(kept), images=images, padding_side="left", return_tensors="pt")
    return kept, failures, batch


def generate_answers(
    model: torch.nn.Module,
    processor: Any,
    prompt: str,
    indices: Sequence[int],
    load_image: Callable[[int], Image.Image],
    *,
    sizes: dict[int, tuple[int, int]] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    constraint: TemplateConstraint | None = None,
    synced_gpus: bool = False,
    progress: bool | str = False,
) -> Generation:
    """Greedy answers to ``prompt`` for each image, in batches of similar token counts.

    Args:
        model: A `Phi3VForCausalLM` (or a peft model around one), on its device.
        processor: Its `Phi3VProcessor`.
        prompt: The chat-formatted prompt (`Phi3VProcessor.apply_chat_template` with the generation prompt), one
            ``<|image_1|>`` tag.
        indices: Which images to answer (keys of the result).
        load_image: Returns the PIL image of an index (called on a background thread); may raise for a bad image.
        sizes: ``(width, height)`` per index, to sort by token count without decoding; None keeps input order.
        batch_size: Images per `generate` call.
        max_new_tokens: Answer length bound.
        constraint: Hold answers to the template's grammar (`TemplateConstraint`).
        synced_gpus: Several processes generate in lock step (sharded models); every process must then make the same
            number of calls.
        progress: Show a progress bar (a string is its label).

    Returns:
        `Generation`: answers by index, image failures by index, time and token counts.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    order = list(indices)
    if sizes is not None:
        tokens = processor.image_processor.num_image_tokens_for_size
        order.sort(key=lambda i: -tokens(*sizes[i]))  # longest first: an out-of-memory batch fails at once
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    end_ids = end_token_ids(processor)
    result = Generation()
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=progress if isinstance(progress, str) else "generating", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_load_batch, batches[0], load_image, processor, prompt) if batches else None
            for number in range(len(batches)):
                kept, failures, batch = pending.result()
                pending = (
                    pool.submit(_load_batch, batches[number + 1], load_image, processor, prompt)
                    if number + 1 < len(batches)
                    else None
                )
                result.failures.update(failures)
                for i, reason in failures.items():
                    logger.warning("image %d failed to load, left out: %s", i, reason)
                if batch is None:
                    bar.update(len(failures))
                    continue
                batch = batch.to(device)
                prompt_length = batch["input_ids"].shape[1]
                with torch.inference_mode():
                    output = model.generate(
                        **batch,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=end_ids,
                        pad_token_id=processor.pad_token_id,
                        use_cache=True,
                        synced_gpus=synced_gpus,
                        logits_processor=LogitsProcessorList(
                            [constraint.logits_processor(prompt_length)] if constraint is not None else []
                        ),
                    )
                new = output[:, prompt_length:]  # [B, new tokens]
                result.new_tokens += _count_until_end(new, end_ids)
                texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
                for i, text in zip(kept, texts, strict=True):
                    result.answers[i] = text.strip()
                bar.update(len(kept) + len(failures))
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - started
    return result


def _count_until_end(new: torch.Tensor, end_ids: list[int]) -> int:
    """Generated tokens per row up to and including the first end token, summed."""
    is_end = torch.isin(new, torch.tensor(end_ids, device=new.device))  # [B, T]
    never = torch.full((new.shape[0],), new.shape[1], dtype=torch.long, device=new.device)  # no end: all counted
    length = torch.where(is_end.any(1), is_end.int().argmax(1).long() + 1, never)
    return int(length.sum())


def blank_like(image: Image.Image, colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A flat image of the same size (same crop grid and token count): the image-ablation input."""
    return Image.new("RGB", image.size, colour)


# ------------------------------------------------------------------------------------------------ constrained decoding
class TemplateConstraint:
    """The answer template as a grammar, for decoding that can only produce parsable answers.

    The language: the template's literal text exactly as written; ``{title}`` any text on one line of at most
    ``title_max_chars`` characters that does not contain the literal following it; ``{category}`` one of
    ``categories`` exactly as spelled there; ``{price}`` digits with an optional decimal part of one or two digits.
    Every answer of the language is bounded, so with a large enough ``max_new_tokens`` every answer completes.

    Args:
        template: The `AnswerTemplate` the model was trained on.
        tokenizer: The model's tokenizer (decodes candidate tokens).
        categories: The allowed categories (e.g. the training split's), non-empty.
        end_ids: Tokens that end an answer (`end_token_ids`); allowed only once the answer is complete.
        title_max_chars: Longest title allowed (e.g. the training split's longest plus a margin).
    """

    def __init__(
        self,
        template: AnswerTemplate,
        tokenizer: Any,
        categories: Sequence[str],
        end_ids: Sequence[int],
        title_max_chars: int = TITLE_MAX_CHARS,
    ) -> None:
        categories = sorted({c for c in categories if c}, key=lambda c: (-len(c), c))
        if "category" in template.fields and not categories:
            raise ValueError("constrained decoding needs at least one category (the training split has none)")
        pattern = r"\s?"
        parts = list(string.Formatter().parse(template.template))
        for position, (literal, name, _spec, _conversion) in enumerate(parts):
            pattern += regex.escape(literal)
            if name is None:
                continue
            following = parts[position + 1][0] if position + 1 < len(parts) else ""
            if name == "title":
                stop = f"(?!{regex.escape(following)})" if following else ""
                pattern += f"(?:{stop}[^\\n]){{1,{title_max_chars}}}"
            elif name == "category":
                pattern += "(?:" + "|".join(regex.escape(c) for c in categories) + ")"
            else:
                pattern += PRICE_PATTERN
        self.pattern = regex.compile(pattern)
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        }

    def state(self, text: str) -> str:
        """``"complete"`` (the whole answer), ``"prefix"`` (can still become one) or ``"invalid"``."""
        match = self.pattern.fullmatch(text, partial=True)
        if match is None:
            return "invalid"
        return "prefix" if match.partial else "complete"

    def allowed(self, generated: list[int], token: int, before: str | None = None) -> bool:
        """Whether ``token`` may follow the ``generated`` ids (``before``: their decoded text, if known)."""
        if before is None:
            before = self.tokenizer.decode(generated, skip_special_tokens=True)
        if token in self.end_ids:
            return self.state(before) == "complete"
        if token in self.special_ids:
            return False
        text = self.tokenizer.decode([*generated, token], skip_special_tokens=True)
        return text != before and self.state(text) != "invalid"

    def logits_processor(self, prompt_length: int) -> LogitsProcessor:
        """A `LogitsProcessor` for one `generate` call whose prompts are ``prompt_length`` tokens (left padded)."""
        return _GrammarLogitsProcessor(self, prompt_length)


class _GrammarLogitsProcessor(LogitsProcessor):
    """Keeps, per row, only the best-scoring token `TemplateConstraint.allowed` accepts (greedy decoding)."""

    def __init__(self, constraint: TemplateConstraint, prompt_length: int) -> None:
        self.constraint = constraint
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :].tolist()  # [B, steps so far]
        ranked = scores.argsort(dim=-1, descending=True)[:, :_CANDIDATES_PER_STEP].tolist()
        out = torch.full_like(scores, -math.inf)
        fallback = min(self.constraint.end_ids)
        for row, ids in enumerate(generated):
            if any(i in self.constraint.end_ids for i in ids):  # finished: generate pads this row anyway
                out[row] = scores[row]
                continue
            before = self.constraint.tokenizer.decode(ids, skip_special_tokens=True)
            choice = next((t for t in ranked[row] if self.constraint.allowed(ids, t, before)), fallback)
            out[row, choice] = scores[row, choice]
        return out
