"""Tests for `phi3v.model.processing.Phi3VProcessor` (reference §5: text handling of ``processing_phi3_v.py``)."""

import json
import logging
import pickle
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from phi3v.model.image_processing import Phi3VImageProcessor, num_image_tokens
from phi3v.model.processing import IGNORE_INDEX, OFFICIAL_IMAGE_TOKEN_ID, Phi3VProcessor, parse_image_tags

IMAGE_ID = 8  # <|image|> in the tiny tokenizer
BOS_ID = 1
PAD_ID = 3  # <|endoftext|>
END_ID = 6  # <|end|>
PROMPT_1 = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
PROMPT_2 = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two products.<|end|>\n<|assistant|>\n"


def runs_of(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of ``token_id`` in ``ids``."""
    runs, start = [], None
    for pos, tid in enumerate([*ids, None]):
        if tid == token_id and start is None:
            start = pos
        elif tid != token_id and start is not None:
            runs.append((start, pos - start))
            start = None
    return runs


def reference_ids(tokenizer, text: str, counts: list[int], image_id: int = IMAGE_ID) -> list[int]:
    """Reference §5.2 spelled out: per-chunk tokenisation (each with BOS) with placeholder runs in between."""
    pieces = re.split(r"<\|image_\d+\|>", text)
    ids = list(tokenizer(pieces[0]).input_ids)
    for n, piece in zip(counts, pieces[1:], strict=True):
        ids += [image_id] * n + tokenizer(piece).input_ids
    return ids


# ---------------------------------------------------------------------------------------------------- tokenisation
def test_single_image_run_has_the_image_token_count_and_bos_after_it(tiny_processor, tiny_tokenizer, make_image):
    out = tiny_processor(PROMPT_1, images=[make_image(1500, 1500)])
    ids = out["input_ids"][0].tolist()
    first_chunk = tiny_tokenizer("<|user|>\n").input_ids
    second_chunk = tiny_tokenizer("\nWhat is shown in this image?<|end|>\n<|assistant|>\n").input_ids
    assert first_chunk[0] == BOS_ID and second_chunk[0] == BOS_ID
    assert ids == first_chunk + [IMAGE_ID] * 757 + second_chunk  # 2x2 crops at num_crops=4 → 757 (reference §4.6)
    assert runs_of(ids, IMAGE_ID) == [(len(first_chunk), 757)]
    assert ids[len(first_chunk) + 757] == BOS_ID  # each chunk after an image starts with its own BOS
    assert ids.count(BOS_ID) == 2
    assert min(ids) >= 0  # one real placeholder id, never the reference's negative ids
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["input_ids"].dtype == torch.int64
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336) and out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].tolist() == [[672, 672]] and out["image_sizes"].dtype == torch.int64
    assert "num_img_tokens" not in out


def test_num_crops_1_gives_313_tokens(tiny_tokenizer, make_image):
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tiny_tokenizer)
    out = processor(PROMPT_1, images=make_image(1500, 1500))  # a single image need not be in a list
    ids = out["input_ids"][0].tolist()
    assert runs_of(ids, IMAGE_ID) == [(len(tiny_tokenizer("<|user|>\n").input_ids), 313)]
    assert out["pixel_values"].shape == (1, 2, 3, 336, 336)


def test_trailing_image_gets_an_empty_chunk_with_bos(tiny_processor, tiny_tokenizer, make_image):
    # The transformers PR test (reference §5.2): text + <|image_1|> → tokenizer(text) + placeholders + [BOS].
    text = "Describe"
    ids = tiny_processor(text + "<|image_1|>", images=[make_image(1500, 1500)])["input_ids"][0].tolist()
    assert ids == tiny_tokenizer(text).input_ids + [IMAGE_ID] * 757 + [BOS_ID]


def test_two_images_in_one_prompt(tiny_processor, tiny_tokenizer, make_image):
    square, wide = make_image(1500, 1500, seed=1), make_image(3000, 400, seed=2)
    out = tiny_processor(PROMPT_2, images=[square, wide])
    ids = out["input_ids"][0].tolist()
    wide_tokens = num_image_tokens(1, 4)  # 3000x400 at num_crops=4 → 1 row x 4 columns of crops
    assert wide_tokens == 745
    assert ids == reference_ids(tiny_tokenizer, PROMPT_2, [757, wide_tokens])
    (start1, len1), (start2, len2) = runs_of(ids, IMAGE_ID)
    assert (len1, len2) == (757, wide_tokens)
    assert start1 == len(tiny_tokenizer("<|user|>\n").input_ids)
    assert ids[start1 + len1 : start2] == tiny_tokenizer("\n").input_ids  # the chunk between the tags, with BOS
    assert out["image_sizes"].tolist() == [[672, 672], [336, 1344]]
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)


def test_text_without_tags_is_plain_tokenisation(tiny_processor, tiny_tokenizer):
    texts = ["Product: Check Scarf, Full Price: $450", "hi"]
    out = tiny_processor(texts)
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    expected = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["attention_mask"], expected["attention_mask"])


# ---------------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_with_different_crop_grids_is_padded(tiny_processor, tiny_tokenizer, make_image, padding_side):
    square, wide = make_image(1500, 1500, seed=1), make_image(3000, 400, seed=2)
    texts = [PROMPT_1, "<|user|>\n<|image_1|>\nA much longer question about the price and the category?<|end|>\n"]
    out = tiny_processor(texts, images=[square, wide], padding_side=padding_side)
    singles = [tiny_processor(texts[0], images=[square]), tiny_processor(texts[1], images=[wide])]
    unpadded = [s["input_ids"][0].tolist() for s in singles]
    lengths = [len(u) for u in unpadded]
    width = max(lengths)
    assert out["input_ids"].shape == (2, width)
    assert lengths[0] != lengths[1]
    for row, (ids, n) in enumerate(zip(unpadded, lengths, strict=True)):
        got = out["input_ids"][row].tolist()
        mask = out["attention_mask"][row].tolist()
        content = slice(0, n) if padding_side == "right" else slice(width - n, width)
        pad = slice(n, width) if padding_side == "right" else slice(0, width - n)
        assert got[content] == ids
        assert got[pad] == [PAD_ID] * (width - n)
        assert mask[content] == [1] * n and mask[pad] == [0] * (width - n)
    assert out["image_sizes"].tolist() == [[672, 672], [336, 1344]]
    assert torch.equal(out["pixel_values"][0], singles[0]["pixel_values"][0])
    assert torch.equal(out["pixel_values"][1], singles[1]["pixel_values"][0])
    # Per-sample image lists give the same batch as a flat list.
    nested = tiny_processor(texts, images=[[square], [wide]], padding_side=padding_side)
    assert torch.equal(nested["input_ids"], out["input_ids"])
    assert torch.equal(nested["pixel_values"], out["pixel_values"])


def test_flat_images_are_consumed_in_order_across_the_batch(tiny_processor, make_image):
    a, b, c = make_image(1500, 1500, 1), make_image(3000, 400, 2), make_image(400, 3000, 3)
    texts = [PROMPT_2, "no image here", PROMPT_1]
    out = tiny_processor(texts, images=[a, b, c])
    nested = tiny_processor(texts, images=[[a, b], [], [c]])
    assert torch.equal(out["input_ids"], nested["input_ids"])
    assert out["image_sizes"].tolist() == [[672, 672], [336, 1344], [1344, 336]]
    assert [length for _, length in runs_of(out["input_ids"][0].tolist(), IMAGE_ID)] == [757, 745]
    assert runs_of(out["input_ids"][1].tolist(), IMAGE_ID) == []
    assert [length for _, length in runs_of(out["input_ids"][2].tolist(), IMAGE_ID)] == [num_image_tokens(4, 1)]


def test_return_tensors_none_gives_lists(tiny_processor):
    out = tiny_processor(["a b c", "a"], return_tensors=None)
    assert isinstance(out["input_ids"], list)
    assert out["attention_mask"][1][-1] == 0


def test_padding_options(tiny_processor):
    out = tiny_processor(["a", "a b c"], padding="max_length", max_length=12)
    assert out["input_ids"].shape == (2, 12)
    assert tiny_processor(["a b", "c d"], padding=False)["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="different lengths"):
        tiny_processor(["a", "a b c"], padding=False)
    with pytest.raises(ValueError, match="padding_side"):
        tiny_processor("a", padding_side="middle")


# ---------------------------------------------------------------------------------------------------- truncation
def test_truncation_never_cuts_an_image_run(tiny_processor, make_image):
    image = make_image(1500, 1500)
    full = tiny_processor(PROMPT_1, images=[image])["input_ids"][0].tolist()
    last_image_pos = runs_of(full, IMAGE_ID)[0][0] + 757 - 1
    with pytest.raises(ValueError, match=r"sample 1: .*cut through an image"):
        tiny_processor(["short", PROMPT_1], images=[image], truncation=True, max_length=last_image_pos)
    # Cutting only text after the last image is allowed.
    cut = tiny_processor(PROMPT_1, images=[image], truncation=True, max_length=last_image_pos + 2)
    assert cut["input_ids"][0].tolist() == full[: last_image_pos + 2]
    # No truncation requested: long samples stay whole.
    assert tiny_processor(PROMPT_1, images=[image], max_length=10)["input_ids"].shape[1] == len(full)


# ---------------------------------------------------------------------------------------------------- bad tags
@pytest.mark.parametrize(
    "bad_text,n_images,message",
    [
        ("<|image_2|>\nWhat?", 1, "do not start at"),
        ("<|image_1|><|image_1|>\nWhat?", 2, "repeated"),
        ("<|image_2|><|image_1|>\nWhat?", 2, "out of order"),
        ("<|image_1|><|image_3|>\nWhat?", 2, "missing"),
        ("<|image_1|>\nWhat?", 2, "image tag"),  # more images than tags
        ("<|image_1|><|image_2|>\nWhat?", 1, "image tag"),  # fewer images than tags
        ("<|image_1|>\nWhat?", 0, "image tag"),  # a tag without any image
    ],
)
def test_bad_tags_raise_with_the_sample_index(tiny_processor, make_image, bad_text, n_images, message):
    image = make_image(336, 336)
    texts = ["<|image_1|>\nfine", bad_text]
    with pytest.raises(ValueError, match=rf"sample 1: .*{message}"):
        tiny_processor(texts, images=[[image], [image] * n_images])
    with pytest.raises(ValueError, match=r"sample 1: "):
        tiny_processor(texts, images=[image] * (1 + n_images))  # flat list, same counts


def test_images_without_tags_and_malformed_image_lists(tiny_processor, make_image):
    image = make_image(336, 336)
    with pytest.raises(ValueError, match=r"sample 0: 1 image\(s\) left over .*1 given for 0 tags"):
        tiny_processor("no tags", images=[image])
    with pytest.raises(ValueError, match="per-sample image lists"):
        tiny_processor(["<|image_1|>", "x"], images=[[image]])
    with pytest.raises(ValueError, match="mix"):
        tiny_processor(["<|image_1|>", "<|image_1|>"], images=[[image], image])


def test_parse_image_tags():
    assert parse_image_tags("no tags") == 0
    assert parse_image_tags("<|image_1|>a<|image_2|>b<|image_3|>") == 3
    assert parse_image_tags("<|image|> is the placeholder token, not a tag") == 0
    with pytest.raises(ValueError, match="sample 7"):
        parse_image_tags("<|image_10|>", sample_index=7)


# ---------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_training_labels_cover_exactly_the_answer_and_end(tiny_processor, tiny_tokenizer, make_image, padding_side):
    square, wide = make_image(1500, 1500, seed=1), make_image(3000, 400, seed=2)
    prompts = [PROMPT_2, PROMPT_1]
    answers = ["Product: Check Cashmere Scarf, Full Price: $1,234.50", "Nylon Jacket"]
    batch = tiny_processor.build_training_batch(
        prompts, answers, images=[square, wide, square], padding_side=padding_side
    )
    assert set(batch.keys()) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes"}
    assert batch["labels"].shape == batch["input_ids"].shape and batch["labels"].dtype == torch.int64
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids = batch["input_ids"][row]
        labels = batch["labels"][row]
        mask = batch["attention_mask"][row].bool()
        expected_answer = [*tiny_tokenizer(answer, add_special_tokens=False).input_ids, END_ID]
        # Labels are the input ids on the answer + <|end|>, -100 elsewhere.
        labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labels[labels != IGNORE_INDEX].tolist() == expected_answer
        assert ids[labels != IGNORE_INDEX].tolist() == expected_answer
        assert tiny_tokenizer.decode(labels[labels != IGNORE_INDEX]) == answer + "<|end|>"
        assert labelled == list(range(labelled[0], labelled[0] + len(expected_answer)))  # one contiguous span
        # The prompt part is exactly what the processor produces for the prompt at inference.
        images = [square, wide] if row == 0 else [square]
        prompt_ids = tiny_processor(prompt, images=images)["input_ids"][0].tolist()
        real = ids[mask].tolist()
        assert real[: len(prompt_ids)] == prompt_ids
        assert len(real) == len(prompt_ids) + len(expected_answer)
        assert (labels[~mask] == IGNORE_INDEX).all() and (ids[~mask] == PAD_ID).all()
        assert (labels[ids == IMAGE_ID] == IGNORE_INDEX).all() and (labels[ids == BOS_ID] == IGNORE_INDEX).all()
        last_real = mask.nonzero().max().item()
        assert labelled[-1] == last_real and ids[last_real] == END_ID
    if padding_side == "left":
        assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    else:
        assert batch["attention_mask"][:, 0].tolist() == [1, 1]


def test_training_batch_validation(tiny_processor, make_image):
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        tiny_processor.build_training_batch(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="sample 0: the answer contains an image tag"):
        tiny_processor.build_training_batch(["a"], ["<|image_1|>"])
    image = make_image(1500, 1500)
    with pytest.raises(ValueError, match=r"sample 0: .*cut through an image"):
        tiny_processor.build_training_batch([PROMPT_1], ["answer"], images=[image], max_length=100)
    full = tiny_processor.build_training_batch([PROMPT_1], ["answer text"], images=[image])
    n = full["input_ids"].shape[1]
    cut = tiny_processor.build_training_batch([PROMPT_1], ["answer text"], images=[image], max_length=n - 1)
    assert torch.equal(cut["input_ids"], full["input_ids"][:, : n - 1])
    assert torch.equal(cut["labels"], full["labels"][:, : n - 1])  # the answer loses its last token (<|end|>)


def test_label_boundary_falls_back_to_common_prefix_with_one_warning(tiny_tokenizer, caplog):
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tiny_tokenizer)  # fresh: warn-once state
    prompt = "<|user|>\nWhat?<|end|>\n<|assistant|>\nFull Pri"  # " Price" is one token: it merges across
    answer = "ce: $5"
    prompt_ids = tiny_tokenizer(prompt).input_ids
    full_ids = tiny_tokenizer(prompt + answer + "<|end|>").input_ids
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the premise of this test
    common = next(i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b)
    with caplog.at_level(logging.WARNING, logger="phi3v.model.processing"):
        batch = processor.build_training_batch([prompt, prompt], [answer, answer])
    assert batch["input_ids"][0].tolist() == full_ids
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * common + full_ids[common:]
    assert sum("longest common prefix" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------------- chat
def test_apply_chat_template(tiny_processor):
    conversation = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    assert tiny_processor.apply_chat_template(conversation) == PROMPT_1
    assert tiny_processor.apply_chat_template([conversation, conversation]) == [PROMPT_1, PROMPT_1]
    assert (
        tiny_processor.apply_chat_template(conversation, add_generation_prompt=False)
        == PROMPT_1[: -len("<|assistant|>\n")]
    )
    structured = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two products."}],
        }
    ]
    assert tiny_processor.apply_chat_template(structured) == PROMPT_2


def test_apply_chat_template_tokenize_matches_call(tiny_processor, make_image):
    image = make_image(800, 600)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    out = tiny_processor.apply_chat_template(conversation, tokenize=True)
    expected = tiny_processor("<|user|>\n<|image_1|>\nHi<|end|>\n<|assistant|>\n", images=[image])
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["pixel_values"], expected["pixel_values"])


def test_processor_without_tokenizer_template_uses_the_3v_template(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    bare = AutoTokenizer.from_pretrained(tmp_path)
    bare.chat_template = None
    processor = Phi3VProcessor(Phi3VImageProcessor(), bare)
    conversation = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    assert processor.apply_chat_template(conversation) == PROMPT_1


# ---------------------------------------------------------------------------------------------------- properties
def test_token_id_properties_and_decode(tiny_processor, tiny_tokenizer):
    assert tiny_processor.image_token == "<|image|>"
    assert tiny_processor.image_token_id == IMAGE_ID
    assert tiny_processor.pad_token_id == PAD_ID
    assert tiny_processor.end_token_id == END_ID
    ids = tiny_tokenizer(["Full Price: $12", "ok<|end|>"]).input_ids
    assert tiny_processor.batch_decode(ids, skip_special_tokens=True) == ["Full Price: $12", "ok"]
    assert tiny_processor.decode(ids[1]) == "<s>ok<|end|>"


def test_image_token_id_defaults_to_official_id_when_tokenizer_lacks_it():
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    processor = Phi3VProcessor(Phi3VImageProcessor(), tokenizer)
    assert processor.image_token_id == OFFICIAL_IMAGE_TOKEN_ID == 32044
    assert processor.pad_token_id == 2  # no pad token: falls back to eos
    assert processor.end_token_id is None
    assert Phi3VProcessor(Phi3VImageProcessor(), tokenizer, image_token_id=5).image_token_id == 5


# ---------------------------------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(tiny_processor, make_image, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "Phi3VProcessor"
    assert (config["image_token"], config["image_token_id"]) == ("<|image|>", IMAGE_ID)
    assert (tmp_path / "preprocessor_config.json").is_file() and (tmp_path / "tokenizer.json").is_file()

    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.num_crops == 4
    assert (loaded.image_token, loaded.image_token_id) == ("<|image|>", IMAGE_ID)
    assert loaded.chat_template == tiny_processor.chat_template
    images = [make_image(1500, 1500, 1), make_image(3000, 400, 2)]
    texts = [PROMPT_1, "<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"]
    for side in ("right", "left"):
        a = tiny_processor(texts, images=images, padding_side=side)
        b = loaded(texts, images=images, padding_side=side)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    a = tiny_processor.build_training_batch(texts, ["x", "y"], images=images)
    b = loaded.build_training_batch(texts, ["x", "y"], images=images)
    assert torch.equal(a["labels"], b["labels"])


def test_saved_image_token_id_is_restored(tiny_tokenizer, tmp_path):
    Phi3VProcessor(Phi3VImageProcessor(), tiny_tokenizer, image_token_id=5).save_pretrained(tmp_path)
    assert Phi3VProcessor.from_pretrained(tmp_path).image_token_id == 5
    assert Phi3VProcessor.from_pretrained(tmp_path, image_token_id=7).image_token_id == 7


def test_num_crops_override_at_load_time(tiny_processor, make_image, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    loaded = Phi3VProcessor.from_pretrained(tmp_path, num_crops=16, trust_remote_code=True)
    assert loaded.image_processor.num_crops == 16
    out = loaded(PROMPT_1, images=[make_image(1500, 1500)])
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert [length for _, length in runs_of(out["input_ids"][0].tolist(), IMAGE_ID)] == [2509]  # 4x4 crops
    assert Phi3VProcessor.from_pretrained(tmp_path).image_processor.num_crops == 4  # saved config untouched
    assert tiny_processor.image_processor.num_crops == 4


def test_hub_id_offline_fails_with_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # conftest sets HF_HUB_OFFLINE=1 before the hub client is imported; force it in case the caller overrode it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"could not get 'microsoft/Phi-3.5-vision-instruct' from the Hugging Face hub"):
        Phi3VProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct", cache_dir=str(tmp_path / "empty-cache"))


def test_missing_local_directory_fails_with_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="could not load a Phi3VProcessor"):
        Phi3VProcessor.from_pretrained(tmp_path)  # exists but is empty


def test_processor_pickles_for_dataloader_workers(tiny_processor, make_image):
    image = make_image(700, 500)
    clone = pickle.loads(pickle.dumps(tiny_processor))
    a = tiny_processor.build_training_batch([PROMPT_1], ["x"], images=[image])
    b = clone.build_training_batch([PROMPT_1], ["x"], images=[image])
    for key in a:
        assert torch.equal(a[key], b[key]), key
