"""Tokenizer parity with the official Phi-3-Vision pipeline (reference §5.2: parity tests must use the real tokenizer).

The official checkpoints ship a SentencePiece-style Llama ``tokenizer.json`` (normalizer ``Prepend("▁")`` +
``Replace(" ", "▁")``, no pre-tokenizer, byte-fallback BPE, ``<s> $A`` post-processor) with a
``tokenizer_config.json`` that says ``"tokenizer_class": "LlamaTokenizer"``. The model was trained on the ids of that
file's pipeline (what transformers 4.38's ``LlamaTokenizerFast`` ran), in which every piece of text after an added
token gets its own ``"▁"``: ``"<|user|>\\n"`` → ``<s> <|user|> ▁ <0x0A>`` (ids 1, 32010, 29871, 13). transformers 5's
``LlamaTokenizer`` (what ``AutoTokenizer`` builds) replaces the normalizer with ``Metaspace(prepend_scheme="first")``
and loses that ``"▁"``; `phi3v.model.processing.load_tokenizer` must not.

The real vocabulary is on the hub (unreachable here), so the fixture trains a small tokenizer with exactly the
official structure and id layout (``<unk> <s> </s>`` = 0..2, byte tokens ``<0x00>``..``<0xFF>`` = 3..258 so ``"\\n"``
is 13, learned ``▁``-pieces, then Phi-3's added special tokens) and compares against the raw
`tokenizers.Tokenizer.from_file` pipeline.
"""

import fnmatch
import json
import logging
import re
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

import phi3v.model.processing as processing
from phi3v.model.image_processing import Phi3VImageProcessor
from phi3v.model.processing import IGNORE_INDEX, Phi3VProcessor, load_tokenizer
from phi3v.model.tokenizer import PHI3V_CHAT_TEMPLATE, default_corpus

SPIECE = "\u2581"  # "▁", SentencePiece's word-boundary marker
BASE_TOKENS = ["<unk>", "<s>", "</s>"]
ADDED_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]
BOS_ID = 1
NEWLINE_ID = 3 + ord("\n")  # <0x0A> = 13, as in the official vocabulary

PROMPT_1 = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
PROMPT_2 = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two products.<|end|>\n<|assistant|>\n"
MULTI_TURN = (
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n"
    "<|assistant|>\nA Check Cashmere Scarf.<|end|>\n<|user|>\nAnd  its price? <|end|>\n<|assistant|>\n"
)
TEXTS = [
    "<|user|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n",
    "\nWhat is shown?",
    "",
    " leading space and  double  spaces ",
    "Product: Check Cashmere Scarf, Full Price: $1,234.50<|end|>",
    "héllo ✓ 价格<|endoftext|>",
]


def _build_llama_style_tokenizer(folder: Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``preprocessor_config.json`` shaped like Phi-3-V's."""
    # Learn "▁"-prefixed word pieces (as SentencePiece does); "\n" stays out of the vocabulary (byte fallback).
    corpus = [re.sub(r"<\|\w+\|>|</?s>|\n", " ", text).strip() for text in default_corpus(num_products=60)]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="always", split=True)
    learner.train_from_iterator(
        [t for t in corpus if t], trainers.BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False)
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(BASE_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), normalizers.Replace(" ", SPIECE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BASE_TOKENS + ADDED_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))

    added_tokens_decoder = {
        str(backend.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in BASE_TOKENS + ADDED_TOKENS
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": "<s>",
        "chat_template": PHI3V_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    Phi3VImageProcessor(num_crops=4).save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A checkpoint-like folder: Phi-3-style Llama tokenizer files and an image processor config only."""
    folder = tmp_path_factory.mktemp("phi3_llama_tokenizer")
    _build_llama_style_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def raw(llama_folder) -> Tokenizer:
    """The hub pipeline: the ``tokenizer.json`` file run by the `tokenizers` library as written."""
    return Tokenizer.from_file(str(llama_folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def processor(llama_folder) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(llama_folder)


def raw_reference_ids(raw: Tokenizer, text: str, counts: list[int], image_id: int) -> list[int]:
    """Reference §5.2 on the raw pipeline: every chunk between image tags encoded (with BOS), image runs between."""
    chunks = re.split(r"<\|image_\d+\|>", text)
    ids = list(raw.encode(chunks[0]).ids)
    for n, chunk in zip(counts, chunks[1:], strict=True):
        ids += [image_id] * n + raw.encode(chunk).ids
    return ids


# ---------------------------------------------------------------------------------------------------- the premise
def test_raw_pipeline_emits_the_space_piece_after_every_special_token(raw):
    space, user, end = raw.token_to_id(SPIECE), raw.token_to_id("<|user|>"), raw.token_to_id("<|end|>")
    assert raw.encode("<|user|>\n").ids == [BOS_ID, user, space, NEWLINE_ID]  # official: 1, 32010, 29871, 13
    assert raw.encode("<|end|>\n", add_special_tokens=False).ids == [end, space, NEWLINE_ID]
    assert raw.encode("\n").ids == [BOS_ID, space, NEWLINE_ID]
    assert raw.encode("").ids == [BOS_ID]


def test_auto_tokenizer_loses_the_space_piece(llama_folder, raw):
    """Why `load_tokenizer` exists. If this fails, transformers keeps the file's pipeline again for LlamaTokenizer."""
    auto = AutoTokenizer.from_pretrained(llama_folder)
    assert type(auto).__name__ == "LlamaTokenizer"
    assert auto("<|user|>\n").input_ids != raw.encode("<|user|>\n").ids
    assert (
        auto(PROMPT_1.replace("<|image_1|>\n", "")).input_ids != raw.encode(PROMPT_1.replace("<|image_1|>\n", "")).ids
    )


# ---------------------------------------------------------------------------------------------------- load_tokenizer
@pytest.mark.parametrize("text", TEXTS)
def test_load_tokenizer_encodes_exactly_like_the_file(llama_folder, raw, text):
    tokenizer = load_tokenizer(llama_folder)
    assert tokenizer(text).input_ids == raw.encode(text).ids
    assert tokenizer(text, add_special_tokens=False).input_ids == raw.encode(text, add_special_tokens=False).ids
    ids = raw.encode(text).ids
    assert tokenizer.decode(ids) == raw.decode(ids, skip_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == raw.decode(ids, skip_special_tokens=True)


def test_load_tokenizer_keeps_the_config_metadata(llama_folder, raw, caplog):
    with caplog.at_level(logging.INFO, logger="phi3v.model.processing"):
        tokenizer = load_tokenizer(llama_folder)
    assert any("as written" in r.getMessage() for r in caplog.records)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<unk>",
    )
    assert tokenizer.bos_token_id == BOS_ID
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == raw.token_to_id("<|endoftext|>")
    assert tokenizer.chat_template == PHI3V_CHAT_TEMPLATE
    assert tokenizer.padding_side == "right"
    for token in ADDED_TOKENS:
        added = tokenizer.added_tokens_decoder[raw.token_to_id(token)]
        assert (added.content, added.special, added.rstrip, added.lstrip) == (token, True, False, False)
    assert len(tokenizer) == raw.get_vocab_size()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == PROMPT_1


def test_load_tokenizer_round_trips_through_save_pretrained(llama_folder, raw, tmp_path):
    load_tokenizer(llama_folder).save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert reloaded(text).input_ids == raw.encode(text).ids


def test_load_tokenizer_without_tokenizer_json_falls_back_to_auto_tokenizer(tiny_tokenizer, tmp_path, caplog):
    tiny_tokenizer.save_pretrained(tmp_path)
    calls = []

    def fake_auto(folder, *args, **kwargs):
        calls.append(Path(folder))
        return tiny_tokenizer

    (tmp_path / "tokenizer.json").unlink()  # as if only a SentencePiece tokenizer.model were there
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="phi3v.model.processing"):
        mp.setattr(processing.AutoTokenizer, "from_pretrained", fake_auto)
        assert load_tokenizer(tmp_path) is tiny_tokenizer
    assert calls == [tmp_path]
    assert any("AutoTokenizer" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- the processor
@pytest.mark.parametrize(
    "text,sizes",
    [
        (PROMPT_1, [(1500, 1500)]),
        (PROMPT_2, [(1500, 1500), (3000, 400)]),
        (MULTI_TURN, [(800, 600)]),
        ("Describe<|image_1|>", [(336, 336)]),  # trailing image: an empty last chunk → [BOS]
        ("<|user|>\nNo image at all.<|end|>\n<|assistant|>\n", []),
    ],
)
def test_processor_matches_the_raw_pipeline_chunk_by_chunk(processor, raw, make_image, text, sizes):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)] or None
    out = processor(text, images=images)
    counts = [int(n) for n in processor.image_processor(images)["num_img_tokens"]] if images else []
    image_id = raw.token_to_id("<|image|>")
    assert processor.image_token_id == image_id
    assert out["input_ids"][0].tolist() == raw_reference_ids(raw, text, counts, image_id)


def test_processor_keeps_the_space_piece_around_image_runs(processor, raw, make_image):
    space = raw.token_to_id(SPIECE)
    user, end, assistant = (raw.token_to_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    ids = processor(PROMPT_1, images=[make_image(1500, 1500)])["input_ids"][0].tolist()
    image_id = processor.image_token_id
    assert ids[:4] == [BOS_ID, user, space, NEWLINE_ID]  # "<|user|>\n" before the image
    after = ids[4 + 757 :]
    assert after[:3] == [BOS_ID, space, NEWLINE_ID]  # the chunk after the image: its own BOS, then "▁\n"
    assert after[-6:] == [end, space, NEWLINE_ID, assistant, space, NEWLINE_ID]
    assert ids[4 : 4 + 757] == [image_id] * 757


def test_training_labels_cover_exactly_the_answer_and_end(processor, raw, make_image):
    images = [make_image(1500, 1500, seed=1), make_image(3000, 400, seed=2), make_image(800, 600, seed=3)]
    prompts = [PROMPT_2, PROMPT_1]
    answers = ["Product: Check Cashmere Scarf, Full Price: $1,234.50", "Nylon  Jacket"]
    batch = processor.build_training_batch(prompts, answers, images=images)
    counts = [int(n) for n in processor.image_processor(images)["num_img_tokens"]]
    per_sample_counts = [counts[:2], counts[2:]]
    end = raw.token_to_id("<|end|>")
    image_id = processor.image_token_id
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids = raw_reference_ids(raw, prompt, per_sample_counts[row], image_id)
        full_ids = raw_reference_ids(raw, prompt + answer + "<|end|>", per_sample_counts[row], image_id)
        assert full_ids[: len(prompt_ids)] == prompt_ids  # "▁\n" after <|assistant|> does not merge with the answer
        mask = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][mask].tolist()
        labels = batch["labels"][row][mask].tolist()
        assert ids == full_ids
        assert labels == [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        answer_ids = [label for label in labels if label != IGNORE_INDEX]
        assert answer_ids[-1] == end
        assert raw.decode(answer_ids, skip_special_tokens=False) == answer + "<|end|>"
        assert (batch["labels"][row][~mask] == IGNORE_INDEX).all()


def test_processor_round_trips_through_save_pretrained(processor, raw, make_image, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    image = make_image(1500, 1500)
    expected = raw_reference_ids(raw, PROMPT_1, [757], raw.token_to_id("<|image|>"))
    assert loaded(PROMPT_1, images=[image])["input_ids"][0].tolist() == expected


# ---------------------------------------------------------------------------------------------------- hub download
def test_processor_hub_download_excludes_the_weights(llama_folder, monkeypatch):
    import huggingface_hub

    captured = {}

    def fake_snapshot_download(**kwargs):
        captured.update(kwargs)
        return str(llama_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = Phi3VProcessor.from_pretrained("microsoft/Phi-3-vision-128k-instruct", revision="main")
    assert captured["repo_id"] == "microsoft/Phi-3-vision-128k-instruct" and captured["revision"] == "main"
    patterns = captured["allow_patterns"]
    assert patterns == processing.PROCESSOR_HUB_ALLOW_PATTERNS

    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    for name in ("model-00001-of-00002.safetensors", "model.safetensors", "pytorch_model.bin", "model.pt"):
        assert not fetched(name), name
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert fetched(name), name
    assert loaded.tokenizer("<|user|>\n").input_ids[-2:] == [loaded.tokenizer.convert_tokens_to_ids(SPIECE), 13]
