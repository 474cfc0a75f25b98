"""A tiny Phi-3-style tokenizer that the project trains itself (tests, demo, small offline experiments).

The official Phi-3-Vision tokenizer is a 32k Llama SentencePiece model (reference §1.5, §5.3) that lives on the
Hugging Face hub, which is not reachable from CI. This module trains a small **byte-level BPE** with the
`tokenizers` library instead, keeping the properties the rest of the package relies on:

- the same special tokens (``<unk> <s> </s> <|endoftext|> <|assistant|> <|system|> <|end|> <|user|> <|image|>``),
  at fixed compact ids 0..8 (the official ids are 0, 1, 2 and 32000/32001/32006/32007/32010/32044);
- a BOS ``<s>`` prepended to every encoded text, like the Llama/Phi-3 SentencePiece tokenizer, so the processor's
  per-chunk tokenisation (reference §5.2) puts a BOS at the start of every chunk exactly as the official one does;
- bos ``<s>``, eos = pad ``<|endoftext|>``, unk ``<unk>`` (reference §1.5 ``special_tokens_map.json``);
- the Phi-3-V chat template, verbatim (reference §1.5);
- special tokens are never split, and byte-level BPE can encode any string without ``<unk>``.

The result is a `transformers.PreTrainedTokenizerFast` that saves with ``save_pretrained(dir)`` and reloads with
``AutoTokenizer.from_pretrained(dir)`` offline.

Example::

    tokenizer = train_tokenizer(default_corpus(), vocab_size=1024)
    tokenizer("<|user|>\\nhello").input_ids  # [1, 7, ...]
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

#: Special tokens of the tiny tokenizer, in id order: ``PHI3_SPECIAL_TOKENS[i]`` has id ``i``.
PHI3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",  # 0 (official 0)
    "<s>",  # 1 (official 1)
    "</s>",  # 2 (official 2)
    "<|endoftext|>",  # 3 (official 32000)
    "<|assistant|>",  # 4 (official 32001)
    "<|system|>",  # 5 (official 32006)
    "<|end|>",  # 6 (official 32007)
    "<|user|>",  # 7 (official 32010)
    "<|image|>",  # 8 (official 32044, see reference §5.3)
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"

#: Chat template of Phi-3-Vision-128k-instruct, verbatim (reference §1.5). It emits no BOS: the BOS comes from
#: tokenisation. ``'\n'`` inside the Jinja string literals is a Jinja escape, hence the raw Python string.
PHI3V_CHAT_TEMPLATE: str = (
    r"{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    r"{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    r"{{- '<|assistant|>\n' -}}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer with Phi-3's special tokens and chat template.

    Training is deterministic: the same texts (in the same order) give the same vocabulary and merges. A few
    hundred strings train in well under a second on 2 CPU cores.

    Args:
        texts (`Iterable[str]`): Training corpus, e.g. `default_corpus()`.
        vocab_size (`int`, *optional*, defaults to 1024): Upper bound of the vocabulary size, special tokens and
            the 256 byte symbols included. A small corpus may stop below it (no pair left occurring twice).

    Returns:
        `transformers.PreTrainedTokenizerFast`: The tokenizer; ids 0..8 are `PHI3_SPECIAL_TOKENS`, encoding
        prepends ``<s>`` (id 1) unless ``add_special_tokens=False``, ``chat_template`` is `PHI3V_CHAT_TEMPLATE`.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the special tokens and the byte alphabet, or ``texts`` is empty.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(PHI3_SPECIAL_TOKENS) + len(alphabet)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (special tokens + 256 bytes), got {vocab_size}")
    corpus = [text for text in texts if text]
    if not corpus:
        raise ValueError("train_tokenizer needs at least one non-empty text")

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(PHI3_SPECIAL_TOKENS),  # added first, in order → ids 0..8
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            # Llama/Phi-3 style: BOS before every sequence, no EOS.
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    for token_id, token in enumerate(PHI3_SPECIAL_TOKENS):
        if backend.token_to_id(token) != token_id:  # guards against a change in the trainer's id assignment
            raise RuntimeError(f"special token {token!r} got id {backend.token_to_id(token)}, expected {token_id}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[t for t in PHI3_SPECIAL_TOKENS if t not in {BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN}],
        padding_side="right",
    )
    tokenizer.chat_template = PHI3V_CHAT_TEMPLATE
    logger.info("trained a byte-level BPE tokenizer: %d tokens from %d texts", len(tokenizer), len(corpus))
    return tokenizer


_CATEGORIES = {
    "WOMAN": ["OUTERWEAR", "BAGS", "ACCESSORIES", "CLOTHES", "SHOES", "CASHMERE SCARVES"],
    "MAN": ["OUTERWEAR", "BAGS", "ACCESSORIES", "CLOTHES", "SHOES", "CASHMERE SCARVES"],
    "KIDS": ["CLOTHES", "OUTERWEAR", "ACCESSORIES", "SHOES"],
}
_LEAVES = [
    "QUILTED JACKETS",
    "PUFFER JACKETS",
    "COATS",
    "PONCHOS & CAPES",
    "SHOULDER",
    "WALLETS & CARD CASES",
    "TROUSERS & SHORTS",
    "SNEAKERS",
    "N.A.",
]
_ADJECTIVES = ["Check", "Cropped", "Quilted", "Micro", "Vintage", "Oversized", "Classic", "Striped", "Monogram"]
_MATERIALS = ["Cashmere", "Nylon", "Leather", "Cotton", "Wool", "Silk", "Denim", "Gabardine", "Suede"]
_ITEMS = ["Scarf", "Jacket", "Trench Coat", "Sling Bag", "Card Case", "Cushion", "Shirt", "Dress", "Sneaker", "Cap"]
_QUESTIONS = [
    "What is shown in this image?",
    "Describe the product in this photo.",
    "What is the full price of this product?",
    "Which category does this item belong to?",
    "Give the product name, category and price.",
    "What product is this and how much does it cost?",
]
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "This is a photo of a product from an online catalog.",
    "The image shows a single item on a white background.",
    "Prices are listed in US dollars (USD), including tax where applicable.",
    "Answer with the product title, the category and the full price.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 250 1,000 12.50 99.99 2023-11-17.",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ | @ # $ % & * + = < > ~ `",
]


def wide_corpus(num_words: int = 24000, seed: int = 0) -> list[str]:
    """`default_corpus` plus ``num_words`` random letter-and-digit words, each three times, in lines of 12.

    A BPE trained on it (`train_tokenizer(wide_corpus(), vocab_size=32064)`) merges the words whole, so its vocabulary
    is of Phi-3's order (~30k tokens, the real one has 32,011): for tests and benchmarks whose cost grows with the
    vocabulary (constrained decoding's token masks), offline.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(num_words)] * 3
    rng.shuffle(words)
    return [*default_corpus(), *(" ".join(words[i : i + 12]) for i in range(0, len(words), 12))]


def default_corpus(num_products: int = 240, seed: int = 0) -> list[str]:
    """A deterministic, product-catalog-like training corpus for `train_tokenizer`.

    It mixes catalog lines ("Product: ..., Category: ..., Full Price: ..."), chat-formatted prompts with
    ``<|image_N|>`` tags and assistant answers (rendered with the Phi-3-V template format), and sentences covering
    digits, punctuation and common words.

    Args:
        num_products (`int`, *optional*, defaults to 240): Number of synthetic products (about 3 strings each).
        seed (`int`, *optional*, defaults to 0): Seed of the private random generator.

    Returns:
        `list[str]`: The corpus, identical for identical arguments.
    """
    rng = random.Random(seed)
    corpus: list[str] = list(_SENTENCES)
    for _ in range(num_products):
        gender = rng.choice(sorted(_CATEGORIES))
        category = rng.choice(_CATEGORIES[gender])
        leaf = rng.choice(_LEAVES)
        title = f"{rng.choice(_ADJECTIVES)} {rng.choice(_MATERIALS)} {rng.choice(_ITEMS)}"
        price = rng.choice([rng.randint(1, 99) * 10, rng.randint(100, 9999), rng.randint(10, 999) * 5])
        cents = rng.choice(["", ".00", ".50", ".99"])
        code = rng.randint(34_500_000, 80_900_000)
        answer = f"Product: {title}, Category: {gender} > {category} > {leaf}, Full Price: ${price:,}{cents}"
        question = rng.choice(_QUESTIONS)
        prompt = f"<|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n"
        corpus.append(answer)
        corpus.append(prompt + answer + "<|end|>\n")
        corpus.append(f"{title} (item {code}) costs {price} USD; it is listed under {category.lower()}.")
    corpus.append(
        "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>"
    )
    corpus.append("<s></s><|endoftext|><|image|>")
    return corpus
