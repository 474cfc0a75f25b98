"""Tests for the project's tiny Phi-3 tokenizer (`phi3v.model.tokenizer`)."""

import pytest
from transformers import AutoTokenizer

from phi3v.model.tokenizer import PHI3_SPECIAL_TOKENS, PHI3V_CHAT_TEMPLATE, default_corpus, train_tokenizer

TEXTS = [
    "Product: Check Cashmere Scarf, Category: WOMAN > ACCESSORIES, Full Price: $1,234.50",
    "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n",
    "Unseen text: Zürich — 12,50 € (ok?) 🙂",
    "",
]


def test_special_tokens_have_fixed_ids(tiny_tokenizer):
    assert PHI3_SPECIAL_TOKENS == (
        "<unk>",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "<|assistant|>",
        "<|system|>",
        "<|end|>",
        "<|user|>",
        "<|image|>",
    )
    assert [tiny_tokenizer.convert_tokens_to_ids(t) for t in PHI3_SPECIAL_TOKENS] == list(range(9))
    assert (tiny_tokenizer.unk_token, tiny_tokenizer.unk_token_id) == ("<unk>", 0)
    assert (tiny_tokenizer.bos_token, tiny_tokenizer.bos_token_id) == ("<s>", 1)
    assert (tiny_tokenizer.eos_token, tiny_tokenizer.eos_token_id) == ("<|endoftext|>", 3)
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.pad_token_id) == ("<|endoftext|>", 3)
    assert 512 < len(tiny_tokenizer) <= 1024


def test_bos_is_prepended_like_phi3(tiny_tokenizer):
    with_bos = tiny_tokenizer("abc").input_ids
    without = tiny_tokenizer("abc", add_special_tokens=False).input_ids
    assert with_bos[0] == 1
    assert with_bos == [1, *without]
    assert 1 not in without
    assert tiny_tokenizer("").input_ids == [1]  # an empty chunk still gets its BOS (reference §5.2)
    assert tiny_tokenizer("x").input_ids[-1] != tiny_tokenizer.eos_token_id  # no EOS appended


@pytest.mark.parametrize("token_id,token", list(enumerate(PHI3_SPECIAL_TOKENS)))
def test_special_tokens_are_never_split(tiny_tokenizer, token_id, token):
    assert tiny_tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    ids = tiny_tokenizer(f"Price:{token}12 ok", add_special_tokens=False).input_ids
    assert ids.count(token_id) == 1


def test_image_tags_are_plain_text(tiny_tokenizer):
    ids = tiny_tokenizer("<|image_1|>", add_special_tokens=False).input_ids
    assert len(ids) > 1
    assert not set(ids) & set(range(len(PHI3_SPECIAL_TOKENS)))
    assert tiny_tokenizer.decode(ids) == "<|image_1|>"


def test_encode_decode_roundtrip_without_unk(tiny_tokenizer):
    for text in TEXTS:
        ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
        assert tiny_tokenizer.unk_token_id not in ids  # byte-level: anything is encodable
        assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode(tiny_tokenizer("hi<|end|>").input_ids, skip_special_tokens=True) == "hi"


def test_common_catalog_words_are_single_tokens(tiny_tokenizer):
    # The default corpus is catalog-like: its frequent words must have been merged.
    for word in ["Product", " Category", " Price"]:
        assert len(tiny_tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_save_and_reload_with_auto_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert reloaded(text).input_ids == tiny_tokenizer(text).input_ids
        assert (
            reloaded(text, add_special_tokens=False).input_ids
            == tiny_tokenizer(text, add_special_tokens=False).input_ids
        )
    assert [reloaded.convert_tokens_to_ids(t) for t in PHI3_SPECIAL_TOKENS] == list(range(9))
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (1, 3, 3)
    assert reloaded.chat_template == PHI3V_CHAT_TEMPLATE
    assert reloaded.get_vocab() == tiny_tokenizer.get_vocab()


def test_chat_template_renders_the_reference_prompt_format(tiny_tokenizer):
    single = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    assert (
        tiny_tokenizer.apply_chat_template(single, add_generation_prompt=True, tokenize=False)
        == "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
    )
    # Multi-turn format of the 3-V README (reference §5.4); no generation prompt after an assistant turn.
    multi = [
        {"role": "user", "content": "<|image_1|>\np1"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "p2"},
    ]
    assert (
        tiny_tokenizer.apply_chat_template(multi, add_generation_prompt=True, tokenize=False)
        == "<|user|>\n<|image_1|>\np1<|end|>\n<|assistant|>\nr1<|end|>\n<|user|>\np2<|end|>\n<|assistant|>\n"
    )
    assert (
        tiny_tokenizer.apply_chat_template(multi[:2], add_generation_prompt=True, tokenize=False)
        == "<|user|>\n<|image_1|>\np1<|end|>\n<|assistant|>\nr1<|end|>\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        tiny_tokenizer.apply_chat_template(system, add_generation_prompt=False, tokenize=False)
        == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
    )


def test_chat_template_is_the_verbatim_3v_template():
    assert PHI3V_CHAT_TEMPLATE == (
        "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
        "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{- '<|assistant|>\\n' -}}{% endif %}"
    )


def test_training_is_deterministic():
    corpus = default_corpus(num_products=60, seed=3)
    first = train_tokenizer(corpus, vocab_size=400)
    second = train_tokenizer(corpus, vocab_size=400)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()  # same merges too
    other = train_tokenizer(default_corpus(num_products=60, seed=4)[::-1] + ["zebra quagga"] * 5, vocab_size=400)
    assert other.get_vocab() != first.get_vocab()


def test_default_corpus_is_deterministic_and_catalog_like():
    corpus = default_corpus()
    assert corpus == default_corpus()
    assert len(corpus) >= 300
    assert any(line.startswith("Product: ") and "Full Price: $" in line for line in corpus)
    assert any("<|user|>\n<|image_1|>\n" in line and line.endswith("<|end|>\n") for line in corpus)


def test_vocab_size_is_an_upper_bound_and_validated():
    tokenizer = train_tokenizer(default_corpus(num_products=30), vocab_size=300)
    assert len(tokenizer) <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer([])
