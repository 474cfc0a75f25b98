"""Batched answer generation (`phi3v.generation`) on the tiny random model: batching and length sorting do not change
the answers, a bad image is reported without stopping the run, and constrained decoding only produces answers the
template parses."""

from __future__ import annotations

import datasets
import pytest
import torch

from phi3v.generation import TemplateConstraint, end_token_ids, generate_answers
from phi3v.metrics import AnswerTemplate

CATEGORIES = ["BAGS", "COATS", "HATS"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from phi3v.model.modeling import Phi3VForCausalLM
    from phi3v.model.processing import Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = Phi3VProcessor.from_pretrained(tiny_model_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    return model, processor, prompt


@pytest.fixture(scope="module")
def photos(tiny_dataset_dir):
    split = datasets.load_from_disk(str(tiny_dataset_dir / "dataset" / "train"))
    return [split[i]["image"] for i in range(9)]  # square, wide and tall photos: three token counts


def test_batched_sorted_answers_equal_one_at_a_time(tiny, photos):
    model, processor, prompt = tiny
    sizes = {i: image.size for i, image in enumerate(photos)}
    assert len({processor.image_processor.num_image_tokens_for_size(*s) for s in sizes.values()}) == 3
    indices = list(range(len(photos)))
    batched = generate_answers(
        model, processor, prompt, indices, photos.__getitem__, sizes=sizes, batch_size=4, max_new_tokens=12
    )
    single = generate_answers(model, processor, prompt, indices, photos.__getitem__, batch_size=1, max_new_tokens=12)
    assert batched.answers == single.answers
    assert sorted(batched.answers) == indices and not batched.failures
    assert len(set(batched.answers.values())) > 1, "a random model still answers different images differently"
    assert 0 < batched.new_tokens <= 12 * len(photos)


def test_a_failing_image_is_reported_and_the_rest_answered(tiny, photos):
    model, processor, prompt = tiny

    def load(i):
        if i == 2:
            raise OSError("image file is truncated (3 bytes not processed)")
        return photos[i]

    result = generate_answers(model, processor, prompt, range(5), load, batch_size=2, max_new_tokens=4)
    assert sorted(result.answers) == [0, 1, 3, 4]
    assert list(result.failures) == [2] and "truncated" in result.failures[2]


@pytest.fixture(scope="module")
def constraint(tiny):
    _, processor, _ = tiny
    return TemplateConstraint(
        AnswerTemplate(), processor.tokenizer, CATEGORIES, end_token_ids(processor), title_max_chars=30
    )


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("", "prefix"),
        ("Prod", "prefix"),
        ("Product: Navy Check Coat, Category: CO", "prefix"),
        ("Product: Navy Check Coat, Category: COATS, Full Price: 1890.", "prefix"),
        ("Product: Navy Check Coat, Category: COATS, Full Price: 1890", "complete"),
        ("Product: Navy Check Coat, Category: COATS, Full Price: 1890.5", "complete"),
        ("Product: Navy Check Coat, Category: SHOES", "invalid"),  # not a training category
        ("Product: Navy, Category: COATS, Full Price: 1,890", "invalid"),  # a number, no separators
        ("Product: Navy, Category: COATS, Full Price: 18.905", "invalid"),
        ("Produce", "invalid"),
        ("Product: " + "x" * 31, "invalid"),  # longer than title_max_chars
        ("Product: a\nb", "invalid"),
    ],
)
def test_constraint_language(constraint, text, state):
    assert constraint.state(text) == state


def test_constrained_answers_always_parse(tiny, photos, constraint):
    model, processor, prompt = tiny
    template = AnswerTemplate()
    free = generate_answers(model, processor, prompt, range(4), photos.__getitem__, batch_size=4, max_new_tokens=16)
    assert not any(template.parse(a).ok for a in free.answers.values()), "a random model does not follow the template"
    held = generate_answers(
        model, processor, prompt, range(4), photos.__getitem__, batch_size=4, max_new_tokens=120, constraint=constraint
    )
    for answer in held.answers.values():
        parsed = template.parse(answer)
        assert parsed.ok, answer
        assert parsed.category in CATEGORIES and parsed.price > 0 and len(parsed.title) <= 30


def test_generated_tokens_are_counted_up_to_the_end_token():
    from phi3v.generation import _count_until_end

    new = torch.tensor([[5, 5, 5, 5], [5, 6, 5, 5], [3, 9, 9, 9]])  # no end; ends at 2; ends at 1
    assert _count_until_end(new, [6, 3]) == 4 + 2 + 1


@pytest.fixture(scope="module")
def phi3_sized():
    """A tiny random model with Phi-3's 32,064-logit vocabulary and a byte-level BPE trained to ~32k tokens here."""
    from phi3v.model.configuration import Phi3VConfig
    from phi3v.model.image_processing import Phi3VImageProcessor
    from phi3v.model.modeling import Phi3VForCausalLM
    from phi3v.model.processing import Phi3VProcessor
    from phi3v.model.tokenizer import train_tokenizer, wide_corpus

    tokenizer = train_tokenizer(wide_corpus(), vocab_size=32064)
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tokenizer)
    torch.manual_seed(0)
    config = Phi3VConfig.from_name("tiny", vocab_size=32064)
    config.image_token_id = processor.image_token_id
    config._attn_implementation = "sdpa"
    model = Phi3VForCausalLM(config).eval()
    prompt = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>What is shown in this image?"}])
    return model, processor, prompt


def test_constrained_answers_close_within_64_tokens_with_a_phi3_sized_vocabulary(phi3_sized, make_image):
    """200 answers of a random-weight model (the grammar does all the work): all parse, every category from the
    vocabulary, every answer complete (its end token) within the default 64 new tokens."""
    model, processor, prompt = phi3_sized
    assert len(processor.tokenizer) > 20000, len(processor.tokenizer)  # a vocabulary of Phi-3's order
    categories = ["BAGS", "COATS", "HATS", "SCARVES", "SHIRTS", "SHOES", "TROUSERS", "READY-TO-WEAR"]
    constraint = TemplateConstraint(
        AnswerTemplate(), processor.tokenizer, categories, end_token_ids(processor), title_max_chars=200
    )  # a 200-character title alone would not fit in 64 tokens: the budget rule must close it
    images = [make_image(64 + 8 * (i % 5), 64 + 8 * (i % 3), seed=i) for i in range(200)]
    result = generate_answers(
        model,
        processor,
        prompt,
        range(200),
        images.__getitem__,
        batch_size=25,
        max_new_tokens=64,
        constraint=constraint,
    )
    template = AnswerTemplate()
    assert sorted(result.answers) == list(range(200)) and not result.failures
    assert not result.truncated  # every answer's end token came within the 64 new tokens
    for answer in result.answers.values():
        parsed = template.parse(answer)
        assert parsed.ok and parsed.category in categories and parsed.price is not None, answer
        assert constraint.state(answer) == "complete", answer
    assert result.new_tokens <= 64 * 200
    titles = {template.parse(a).title for a in result.answers.values()}
    assert len(titles) > 100  # the model, not the grammar, chose the titles
