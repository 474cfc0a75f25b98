"""`phi3v tokenizer`: a small tokenizer trained on a prepared catalog, for a tiny model trained from scratch.

    phi3v tokenizer data/shop-prepared --out runs/shop-tokenizer
    phi3v init-model runs/shop-base --num-crops 1 --tokenizer runs/shop-tokenizer

The tokenizer is the byte-level BPE of `phi3v.model.tokenizer.train_tokenizer` (Phi-3's special tokens and chat
template), trained on every training answer of the catalog written with the answer template the model will learn,
plus phi3v's general corpus (chat turns, prompts, digits, punctuation), so that a title, a category or a price is a
few tokens and any other text still tokenises. `phi3v demo` trains its tokenizer with the same function.

A real Phi-3-V (``microsoft/Phi-3.5-vision-instruct``) brings its own 32k tokenizer: this is for the ``tiny`` config
(``init-model --config tiny``, vocabulary 1,024) only.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 1024  # the tiny config's vocabulary size
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """An ``--out`` the tokenizer cannot be written to; the message says why."""


def catalog_corpus(data: str | Path, answer_template: str | None = None) -> list[str]:
    """The tokenizer's training texts: every training answer of the prepared dataset ``data`` in ``answer_template``
    (default: phi3v's), plus phi3v's default corpus.

    Raises:
        DatasetError: ``data`` is not a `phi3v prepare` output with a training split (the message names it).
        ValueError: A malformed answer template.
    """
    from phi3v.data.collate import TRAIN_SPLIT, load_prepared_dataset
    from phi3v.metrics import DEFAULT_ANSWER_TEMPLATE, AnswerTemplate
    from phi3v.model.tokenizer import default_corpus

    template = AnswerTemplate(answer_template or DEFAULT_ANSWER_TEMPLATE)
    rows = load_prepared_dataset(data, (TRAIN_SPLIT,))[TRAIN_SPLIT].select_columns(["title", "category", "price"])
    answers = [template.format(row) for row in rows.to_list()]
    return [*answers, *default_corpus()]


def train_catalog_tokenizer(
    data: str | Path,
    out: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    answer_template: str | None = None,
) -> Path:
    """Train the catalog's tokenizer (`catalog_corpus`) and save it to ``out`` (``save_pretrained``).

    Args:
        data: A `phi3v prepare` output folder.
        out: The tokenizer folder: absent, empty, or an earlier tokenizer (replaced).
        vocab_size: Vocabulary size; at most the model's (1,024 for the ``tiny`` config).
        answer_template: The template the model will be trained with (default: phi3v's).

    Returns:
        `Path`: ``out``.

    Raises:
        DatasetError: ``data`` is not a prepared dataset.
        TokenizerError: ``out`` is a file, or a non-empty folder that holds no tokenizer.
        ValueError: ``vocab_size`` too small for the special tokens and bytes, or a malformed answer template.
    """
    from phi3v.model.tokenizer import PHI3_SPECIAL_TOKENS, train_tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / TOKENIZER_FILE).is_file():
        raise TokenizerError(f"--out {out} is not empty and holds no {TOKENIZER_FILE}; choose an empty or new folder")
    smallest = len(PHI3_SPECIAL_TOKENS) + 256  # the special tokens and the byte alphabet
    if vocab_size < smallest:
        raise ValueError(f"--vocab-size must be at least {smallest} (special tokens + 256 bytes), got {vocab_size}")
    corpus = catalog_corpus(data, answer_template)
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer.save_pretrained(out)
    logger.info("trained a %d-token tokenizer on %d texts of %s into %s", len(tokenizer), len(corpus), data, out)
    return out
