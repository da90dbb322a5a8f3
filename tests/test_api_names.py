"""The names people already use, on vlmkit's Python API: batched ``chat``, per-row option lists, transformers'
and vLLM's option names, ``continue_final_message``, a ``chat_template`` override, and logprobs checked against
the model's own forward pass. (Both backends: tests/test_backend_contract.py.)"""

from __future__ import annotations

import pytest
import torch

from conftest import compose_tiny, image_turn, qwen2_config, siglip_config
from vlmkit.api import VLM
from vlmkit.errors import ConfigError, ProcessingError
from vlmkit.inference.options import GenerationOptions, options_per_row
from vlmkit.inference.rows import choice_seed

C1 = [image_turn("Describe the image.")]
C2 = [{"role": "user", "content": "How many stars are there?"}]


@pytest.fixture(scope="module")
def vlm() -> VLM:
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


def test_chat_batches_a_list_of_conversations(vlm):
    """The rule: a list of message dicts is one conversation (a str back); a list of conversations or of prompt
    strings is a batch (a list back, in order)."""
    one = vlm.chat(C1, max_new_tokens=6)
    two = vlm.chat(C2, max_new_tokens=6)
    assert isinstance(one, str)
    assert vlm.chat([C1, C2], max_new_tokens=6) == [one, two]
    prompts = vlm.chat(["How many stars are there?", "hi"], max_new_tokens=4)
    assert prompts == [vlm.chat("How many stars are there?", max_new_tokens=4), vlm.chat("hi", max_new_tokens=4)]
    image = C1[0]["content"][0]["image"]
    assert vlm.chat(["Describe the image.", "hi"], images=[[image], None], max_new_tokens=6)[0] == one


@pytest.mark.parametrize(
    "messages, images, match",
    [
        ([], None, "non-empty list"),
        ([C1[0], C2], None, "not a mix"),
        ([C1, C2], [[None]], "inside the messages' content parts"),
        (["a", "b"], ["x.png", "y.png"], "images as a list of 2 lists"),
        (42, None, "got int"),
    ],
)
def test_ambiguous_chat_input_is_refused(vlm, messages, images, match):
    with pytest.raises(ConfigError, match=match):
        vlm.chat(messages, images=images, max_new_tokens=2)


def test_per_row_option_lists(vlm):
    results = vlm.generate_batch([C1, C2], max_new_tokens=[2, 5], temperature=[0, 1.0], seed=[None, 3])
    assert [r.completion_tokens for r in results] == [2, 5]
    assert results[1].token_ids == vlm.generate_batch([C2], max_new_tokens=5, temperature=1.0, seed=3)[0].token_ids
    rows = options_per_row(2, stop=[["a"], None], top_k=5)
    assert [o.stop for o in rows] == [("a",), ()] and {o.top_k for o in rows} == {5}
    assert options_per_row(2, stop=["a", "b"])[1].stop == ("a", "b")  # a list of strings: every row's stops
    with pytest.raises(ConfigError, match="max_new_tokens has 3 values for 2 conversations"):
        vlm.chat([C1, C2], max_new_tokens=[1, 2, 3])
    with pytest.raises(ConfigError, match="a single conversation was given"):
        vlm.chat(C1, max_new_tokens=[1, 2])


def test_transformers_and_vllm_names(vlm):
    """transformers' ``GenerationConfig`` (max_length = prompt + new tokens, do_sample, num_return_sequences,
    pipelines' generate_kwargs) and vLLM's ``SamplingParams`` (max_tokens, n, logprobs) names."""
    prompt = len(vlm.engine.encode(C2).input_ids)
    assert vlm.generate_batch([C2], max_length=prompt + 3)[0].completion_tokens == 3
    assert vlm.chat(C2, max_tokens=4) == vlm.chat(C2, max_new_tokens=4)
    assert vlm.chat(C2, do_sample=False, max_new_tokens=4) == vlm.chat(C2, max_new_tokens=4)
    assert vlm.chat(C2, do_sample=True, seed=2, max_new_tokens=6) == vlm.chat(C2, temperature=1.0, seed=2,
                                                                             max_new_tokens=6)  # fmt: skip
    assert vlm.chat(C2, generate_kwargs={"max_new_tokens": 3, "do_sample": True, "seed": 1}) == vlm.chat(
        C2, max_new_tokens=3, temperature=1.0, seed=1
    )
    four = vlm.chat(C2, num_return_sequences=2, do_sample=True, seed=1, max_new_tokens=4)
    assert four == vlm.chat(C2, n=2, temperature=1.0, seed=1, max_new_tokens=4) and len(four) == 2
    assert vlm.chat([C1, C2], n=1, max_new_tokens=2) == [[vlm.chat(C1, max_new_tokens=2)],
                                                         [vlm.chat(C2, max_new_tokens=2)]]  # fmt: skip
    with pytest.raises(ProcessingError, match="max_length=3 .* leaves no room"):
        vlm.chat(C2, max_length=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 3, "max_new_tokens": 3}, "max_tokens and max_new_tokens are the same option"),
        ({"max_length": 30, "max_new_tokens": 3}, "not both"),
        ({"do_sample": False, "temperature": 0.7}, "do_sample=False is greedy decoding"),
        ({"do_sample": True, "temperature": 0}, "do_sample=True needs a temperature > 0"),
        ({"do_sample": "yes"}, "do_sample must be True or False"),
        ({"generate_kwargs": {"top_k": 3}, "top_k": 2}, "given both directly and in generate_kwargs"),
        ({"num_beams": 4}, "unknown generation option.*num_beams.*valid options: max_new_tokens.*do_sample"),
        ({"n": 0}, "n .num_return_sequences. must be a positive integer"),
        ({"logprobs": 21}, "logprobs must be None or the number of top alternatives, 0 to 20"),
        ({"response_format": {"type": "yaml"}}, "response_format must be"),
        ({"continue_final_message": True}, "how a conversation becomes a prompt"),
    ],
)
def test_name_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationOptions.from_kwargs(**kwargs)


def test_logprobs_is_openai_true_or_a_count():
    assert GenerationOptions(logprobs=True).logprobs == 0 and GenerationOptions(logprobs=False).logprobs is None


def test_n_answers_have_their_own_derived_seeds(vlm):
    """Choice 0 of ``n`` is the request's seed itself; choice j is seeded by ``choice_seed(seed, j)``."""
    three = vlm.generate_batch([C1], n=3, temperature=1.0, seed=11, max_new_tokens=8)[0]
    alone = [vlm.generate_batch([C1], temperature=1.0, seed=choice_seed(11, j), max_new_tokens=8)[0] for j in range(3)]
    assert [r.token_ids for r in three] == [r.token_ids for r in alone]
    assert [r.choice for r in three] == [0, 1, 2] and len({tuple(r.token_ids) for r in three}) == 3
    assert choice_seed(11, 0) == 11 and 0 <= choice_seed(2**63 - 1, 7) < 2**63


def test_logprobs_are_the_models_log_softmax(vlm):
    """vLLM's default (``raw_logprobs``): the model's own log-softmax, before temperature, top-k/top-p and the
    repetition penalty, so a sampled run reports the same numbers a forward pass over its tokens gives."""
    result = vlm.generate_batch([C1], logprobs=3, temperature=1.3, top_k=20, repetition_penalty=1.3, seed=0,
                                max_new_tokens=6)[0]  # fmt: skip
    encoded = vlm.engine.encode(C1)
    ids = torch.tensor([encoded.input_ids + result.token_ids])
    with torch.inference_mode():
        logits = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=encoded.pixel_values).logits[0].float()  # fmt: skip
    expected = torch.log_softmax(logits[len(encoded.input_ids) - 1 : -1], dim=-1)
    assert len(result.logprobs) == len(result.token_ids) == 6
    for step, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        top = torch.topk(expected[step], 3)
        assert [t.token_id for t in entry.top] == top.indices.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    texts = b"".join(bytes(entry.bytes) for entry in result.logprobs)
    assert texts.decode("utf-8", errors="replace") == result.text  # bytes are exact, even inside a character


def test_continue_final_message_prefills_the_answer(vlm):
    """transformers' ``continue_final_message``: the last assistant message is left open (no end of turn)."""
    prefill = [*C2, {"role": "assistant", "content": "There are"}]
    encoded = vlm.engine.encode(prefill, continue_final_message=True)
    assert vlm.processor.tokenizer.decode(encoded.input_ids).endswith("<|im_start|>assistant\nThere are")
    result = vlm.generate_batch([prefill], continue_final_message=True, max_new_tokens=5)[0]
    assert result.prompt_tokens == len(encoded.input_ids)
    assert result.token_ids == vlm.engine.generate([encoded], GenerationOptions(max_new_tokens=5))[0].token_ids
    with pytest.raises(ProcessingError, match="must be the assistant's"):
        vlm.chat(C2, continue_final_message=True)
    with pytest.raises(ConfigError, match="applies to the whole call"):
        vlm.chat([prefill, prefill], continue_final_message=[True, False])


def test_chat_template_override(vlm):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")  # fmt: skip
    encoded = vlm.engine.encode(C2, chat_template=template)
    assert vlm.processor.tokenizer.decode(encoded.input_ids) == "[user] How many stars are there?<|im_end|>[assistant] "
    assert set(encoded.stop_ids) == {vlm.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                     vlm.processor.tokenizer.eos_token_id}  # fmt: skip
    result = vlm.generate_batch([C2], chat_template=template, max_new_tokens=4)[0]
    assert result.prompt_tokens == len(encoded.input_ids)


def test_stream_takes_one_answer(vlm):
    assert "".join(vlm.stream(C2, max_tokens=6)) == vlm.chat(C2, max_tokens=6)
    with pytest.raises(ConfigError, match="one answer"):
        list(vlm.stream(C2, n=2))
    with pytest.raises(ConfigError, match="one conversation"):
        list(vlm.stream([C1, C2]))
