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
written, the category one of a fixed vocabulary (the training split's), the price a plain number. The grammar is
compiled by xgrammar and applied as a token bitmask for the whole batch at every step (greedy decoding restricted to
the grammar), with a budget rule that closes every answer within ``max_new_tokens``; answers always parse.
"""

from __future__ import annotations

import json
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

from phi3v.metrics import PRICE_TEXT_PATTERN, AnswerTemplate
from phi3v.progress import Progress

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 200
PRICE_PATTERN = PRICE_TEXT_PATTERN  # the grammar's price rule below spells the same


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
        truncated: Input indices whose answer reached ``max_new_tokens`` without an end token.
    """

    answers: dict[int, str] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    new_tokens: int = 0
    truncated: set[int] = field(default_factory=set)

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
        progress: Show progress (`phi3v.progress.Progress`: a bar on a terminal, else log lines; a string is its
            label).

    Returns:
        `Generation`: answers by index, image failures by index, time and token counts.
    """
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
    label = progress if isinstance(progress, str) else "generating"
    bar = Progress(len(order), label, unit="img", enabled=bool(progress))
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
                            [constraint.logits_processor(prompt_length, max_new_tokens)]
                            if constraint is not None
                            else []
                        ),
                    )
                new = output[:, prompt_length:]  # [B, new tokens]
                result.new_tokens += _count_until_end(new, end_ids)
                ended = torch.isin(new, torch.tensor(end_ids, device=new.device)).any(dim=1).tolist()
                result.truncated.update(i for i, done in zip(kept, ended, strict=True) if not done)
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
def _ebnf_string(text: str) -> str:
    """An EBNF string literal (xgrammar's syntax: double quotes, backslash escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _class_char(char: str) -> str:
    """A character for inside an EBNF character class."""
    return {"\n": "\\n", "\\": "\\\\", "]": "\\]", "^": "\\^", "-": "\\-", "[": "\\["}.get(char, char)


class TemplateConstraint:
    """The answer template as a grammar (xgrammar), applied as a token mask inside `generate` for the whole batch.

    The language: the template's literal text exactly as written; ``{title}`` text on one line of 1 to
    ``title_max_chars`` characters without the first character of the literal after it (a comma in the default
    template), so that literal ends it — a catalog title with a comma loses it in a constrained answer, which the
    title scores count; ``{category}`` one of ``categories`` exactly; ``{price}`` digits
    (at most 9) with an optional decimal part of one or two digits; then an end token.

    Every answer closes within ``max_new_tokens`` (`ConstrainedDecoding`), whatever the model's scores:

    - text the grammar fixes (literals, the rest of a category once only one fits) is written with the longest
      vocabulary tokens that spell it (xgrammar's jump-forward string), as a tokenizer would, not one character at
      a time;
    - the title, the only unbounded field, is closed — the literal after it written — as soon as the steps left are
      no more than the most the rest of the answer can take (`reserve`).

    There is no fallback: a step where the grammar allows no token raises `ConstraintError`.

    Why xgrammar: it compiles the template's grammar against the whole vocabulary once (~0.1 s for 32k tokens) and
    fills a batch's token bitmasks in C++ per step; the mask is applied to the logits with its own kernel. It is the
    engine vLLM, SGLang and TensorRT-LLM use. outlines compiles regexes to token automata too, but its index for a
    free-text field over a 32k vocabulary is much slower to build, and lm-format-enforcer walks a character trie in
    Python per step.

    Args:
        template: The `AnswerTemplate` the model was trained on.
        tokenizer: The model's tokenizer (xgrammar reads its vocabulary).
        categories: The allowed categories (e.g. the training split's), non-empty when the template has one.
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
        self.categories = sorted({c for c in categories if c}, key=lambda c: (-len(c), c))
        if "category" in template.fields and not self.categories:
            raise ValueError("constrained decoding needs at least one category (the training split has none)")
        if not end_ids:
            raise ValueError("constrained decoding needs an end token (<|end|> or the EOS token)")
        self.template = template
        self.tokenizer = tokenizer
        self.end_ids = list(end_ids)
        self.title_max_chars = title_max_chars
        self.segments = [(literal, name) for literal, name, _spec, _conv in string.Formatter().parse(template.template)]
        self.ebnf = self._grammar()
        self._compiled: dict[int, Any] = {}  # vocabulary size -> (compiled grammar, token bytes)
        self._spellers: dict[int, _Speller] = {}

    # -- the grammar
    def _following_literal(self, position: int) -> str:
        return self.segments[position + 1][0] if position + 1 < len(self.segments) else ""

    def _grammar(self) -> str:
        rules = {}
        root: list[str] = []
        for position, (literal, name) in enumerate(self.segments):
            if literal:
                root.append(_ebnf_string(literal))
            if name is None:
                continue
            root.append(name)
            if name == "title":
                excluded = "".join(_class_char(c) for c in ("\n", self._following_literal(position)[:1]) if c)
                rules["title"] = f"[^{excluded}]{{1,{self.title_max_chars}}}"
            elif name == "category":
                rules["category"] = " | ".join(_ebnf_string(c) for c in self.categories)
            else:
                rules["price"] = '[0-9]{1,9} ("." [0-9]{1,2})?'
        lines = [f"root ::= {' '.join(root)}"] + [f"{name} ::= {rule}" for name, rule in rules.items()]
        return "\n".join(lines)

    def compiled(self, vocab_size: int) -> tuple[Any, list[bytes]]:
        """The grammar compiled for a vocabulary of ``vocab_size`` logits, and every token's bytes."""
        if vocab_size not in self._compiled:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=vocab_size, stop_token_ids=self.end_ids
            )
            grammar = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(self.ebnf)
            self._compiled[vocab_size] = (grammar, [bytes(t) for t in info.decoded_vocab])
        return self._compiled[vocab_size]

    def speller(self, vocab_size: int) -> _Speller:
        """Longest-token spelling over this vocabulary (built once per vocabulary size)."""
        if vocab_size not in self._spellers:
            _, vocab = self.compiled(vocab_size)
            self._spellers[vocab_size] = _Speller(vocab, self.special_ids(vocab_size))
        return self._spellers[vocab_size]

    def matcher(self, vocab_size: int | None = None) -> Any:
        import xgrammar as xgr

        grammar, _ = self.compiled(vocab_size or len(self.tokenizer))
        return xgr.GrammarMatcher(grammar)

    def state(self, text: str) -> str:
        """``"complete"`` (the whole answer), ``"prefix"`` (can still become one) or ``"invalid"``."""
        matcher = self.matcher()
        if not matcher.accept_string(text):
            return "invalid"
        return "complete" if matcher.is_completed() else "prefix"

    # -- the budget
    def reserve(self, vocab_size: int) -> dict[str, int]:
        """Upper bounds of the tokens each part of an answer takes: ``head`` (text before the title), ``tail`` (the
        rest after the title, end token included, plus three tokens in which a title may finish a character split
        over byte tokens), and ``total`` without a title. Fixed text counts its
        longest-token spelling plus one (xgrammar may leave its last token to the model); a category its bytes (the
        model may spell it a byte at a time until only one fits); a price 12 (one token per character)."""
        spell = self.speller(vocab_size)
        costs: list[int] = []
        for literal, name in self.segments:
            costs.append(len(spell.tokens(literal)) + 1 if literal else 0)
            if name == "category":
                costs.append(max(len(c.encode()) for c in self.categories))
            elif name == "price":
                costs.append(12)
            elif name == "title":
                costs.append(-1)  # marker
        if -1 not in costs:
            return {"head": sum(costs) + 1, "tail": 0, "total": sum(costs) + 1}
        cut = costs.index(-1)
        return {"head": sum(costs[:cut]), "tail": sum(costs[cut + 1 :]) + 1 + 3, "total": -1}

    def special_ids(self, vocab_size: int) -> set[int]:
        _, vocab = self.compiled(vocab_size)
        special = set(self.tokenizer.all_special_ids) | {
            i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }
        return special | {i for i, token in enumerate(vocab) if not token}

    def logits_processor(self, prompt_length: int, max_new_tokens: int) -> LogitsProcessor:
        """A `LogitsProcessor` for one `generate` call whose prompts are ``prompt_length`` tokens (left padded)."""
        return ConstrainedDecoding(self, prompt_length, max_new_tokens)


class ConstraintError(RuntimeError):
    """Constrained decoding reached a state the grammar cannot continue (a bug, never a silent fallback)."""


class _Speller:
    """Longest-token spelling of fixed text over a vocabulary's byte strings."""

    def __init__(self, vocab: list[bytes], special: set[int]) -> None:
        self.ids: dict[bytes, int] = {}
        for i, token in enumerate(vocab):
            if i not in special and token not in self.ids:
                self.ids[token] = i
        self.longest = max((len(t) for t in self.ids), default=1)

    def first(self, text: bytes) -> int | None:
        for k in range(min(len(text), self.longest), 0, -1):
            if text[:k] in self.ids:
                return self.ids[text[:k]]
        return None

    def tokens(self, text: str) -> list[int]:
        data, out = text.encode(), []
        while data:
            token = self.first(data)
            if token is None:
                raise ConstraintError(f"the vocabulary cannot spell {data!r}")
            out.append(token)
            data = data[len(self._bytes(token)) :]
        return out

    def _bytes(self, token: int) -> bytes:
        return next(t for t, i in self.ids.items() if i == token)


class ConstrainedDecoding(LogitsProcessor):
    """Grammar masks (xgrammar) for one batched `generate` call, with the budget rules of `TemplateConstraint`."""

    def __init__(self, constraint: TemplateConstraint, prompt_length: int, max_new_tokens: int) -> None:
        self.constraint = constraint
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.matchers: list[Any] = []
        self.forced: list[list[int]] = []
        self.head = self.tail = 0
        self.spell: _Speller | None = None
        self.title_position = next((p for p, (_, n) in enumerate(constraint.segments) if n == "title"), None)

    def _start(self, batch: int, vocab_size: int) -> None:
        import xgrammar as xgr

        grammar, vocab = self.constraint.compiled(vocab_size)
        self.vocab = vocab
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
        self.forced = [[] for _ in range(batch)]
        self.past_title = [False] * batch
        self.bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
        self.spell = self.constraint.speller(vocab_size)
        reserve = self.constraint.reserve(vocab_size)
        self.head, self.tail = reserve["head"], reserve["tail"]
        needed = reserve["total"] if reserve["total"] > 0 else reserve["head"] + 1 + reserve["tail"]
        if needed > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} is too small for a constrained answer of this template, "
                f"which can take up to {needed} tokens with this vocabulary; raise --max-new-tokens"
            )
        if self.title_position is not None:
            following = self.constraint._following_literal(self.title_position)
            self.title_stop = following[:1] or None
            self.close_tokens = self.spell.tokens(following) if following else [self.constraint.end_ids[0]]

    def _title_text(self, row: int, ids: list[int]) -> str:
        """The title written so far while the answer is inside it (at least one character), else ``""``."""
        if self.title_position is None or self.past_title[row]:
            return ""
        text = b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")
        head = self._title_start(text)
        if head is None or len(text) <= head:
            return ""
        title = text[head:]
        if self.title_stop is not None and self.title_stop in title:
            self.past_title[row] = True  # the title is over for good: no more decoding of this row
            return ""
        return title

    def _title_start(self, text: str) -> int | None:
        """Where the title starts in ``text`` (None before it): after the fields and literals that precede it."""
        position = 0
        for literal, name in self.constraint.segments[: self.title_position + 1]:
            if not text.startswith(literal, position):
                return None
            position += len(literal)
            if name == "title":
                return position
            if name == "category":
                match = next((c for c in self.constraint.categories if text.startswith(c, position)), None)
                if match is None:
                    return None
                position += len(match)
            elif name == "price":
                digits = regex.match(PRICE_PATTERN, text[position:])
                if digits is None:
                    return None
                position += digits.end()
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import xgrammar as xgr

        batch, vocab_size = scores.shape
        generated = input_ids[:, self.prompt_length :].tolist()  # [B, steps so far]
        step = len(generated[0]) if generated else 0
        if step == 0:
            self._start(batch, vocab_size)
        remaining = self.max_new_tokens - step  # this step included
        forced: dict[int, int] = {}
        choosing: list[int] = []
        for row, ids in enumerate(generated):
            matcher = self.matchers[row]
            if ids and not matcher.is_terminated() and not matcher.accept_token(ids[-1]):
                raise ConstraintError(f"row {row}: token {ids[-1]} was generated but the grammar refuses it")
            if matcher.is_terminated():
                continue  # finished: generate pads this row; its scores are left alone
            title = self._title_text(row, ids)
            # close the title (write the literal after it) once the rest needs every step left; a character split
            # over byte tokens is finished first (the grammar allows only its continuation bytes)
            if not self.forced[row] and title and remaining <= self.tail and not title.endswith("\ufffd"):
                self.forced[row] = list(self.close_tokens)
            if self.forced[row]:
                forced[row] = self.forced[row].pop(0)
                continue
            jump = matcher.find_jump_forward_string()
            token = self.spell.first(jump.encode()) if jump else None
            if token is not None:
                forced[row] = token  # text the grammar fixes; the matcher checks the token when it is accepted
            else:
                choosing.append(row)
        for row in choosing:  # the rows that choose among several tokens (xgrammar's threaded batch fill was no
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)  # faster on 2 cores beside torch's threads)
        dead = ~(self.bitmask[choosing] != 0).any(dim=1)  # a row whose mask allows nothing
        if bool(dead.any()):
            raise ConstraintError(f"rows {[choosing[i] for i in dead.nonzero().flatten().tolist()]}: no token allowed")
        if choosing:  # the grammar's mask on the rows that choose
            xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), indices=choosing)
        if forced:  # one token allowed: keep just its score
            rows = list(forced)
            tokens = torch.tensor([forced[row] for row in rows], device=scores.device)
            index = torch.tensor(rows, device=scores.device)
            keep = scores[index, tokens]
            scores[index] = -math.inf
            scores[index, tokens] = keep
        return scores
