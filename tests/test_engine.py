import pytest
import torch

from conftest import compose_tiny, image_turn, make_tokenizer, qwen2_config, siglip_config
from vlmkit.errors import ConfigError, ProcessingError
from vlmkit.inference.detokenize import IncrementalDetokenizer
from vlmkit.inference.engine import Engine
from vlmkit.inference.options import GenerationOptions
from vlmkit.inference.sampling import apply_repetition_penalty, filter_top_k_top_p

CONVERSATIONS = [
    [image_turn("Describe the image.", 2)],
    [{"role": "user", "content": "How many stars are there? Tell me now."}],
    [image_turn("What colour?", 1, (0, 0, 255))],
    [{"role": "user", "content": "hi"}],
    [image_turn("Is there a green triangle in the image?", 1, (0, 200, 0))],
]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model, processor = compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3))
    return Engine(model, processor)


def test_image_tokens_count_in_the_prompt(engine):
    result = engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=2))[0]
    text_only = engine.processor.encode(
        [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}]
    )
    assert result.prompt_tokens == len(text_only.input_ids) + 2 * 16 + 2  # two images of 16 tokens + two "\n" joins


def test_stream_comes_in_several_pieces(engine):
    pieces = [e.text for e in engine.stream_batch(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=30))]
    assert len([p for p in pieces if p]) > 1


def test_generation_runs_without_autograd(engine):
    seen = []
    handle = engine.model.language_model.register_forward_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    )
    try:
        engine.generate(CONVERSATIONS[:2], GenerationOptions(max_new_tokens=3))
    finally:
        handle.remove()
    assert seen and all(grad is False and inference for grad, inference in seen)


def test_prompt_longer_than_context_and_budget_clipped():
    model, processor = compose_tiny(lm=qwen2_config(max_position_embeddings=40))
    engine = Engine(model, processor)
    with pytest.raises(
        ProcessingError, match=r"conversation 0: the prompt has \d+ tokens \(images included\) but .* 40"
    ):
        engine.generate([[image_turn("Describe the image in great detail please.", 2)]], GenerationOptions())
    short = [{"role": "user", "content": "hi"}]
    n = len(engine.encode(short).input_ids)
    result = engine.generate([short], GenerationOptions(max_new_tokens=500))[0]
    assert result.finish_reason in ("length", "stop") and n + result.completion_tokens <= 40


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
        ({"temperature": -1}, "temperature must be ≥ 0"),
        ({"top_p": 0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be ≥ 0"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"max_tokns": 3}, "unknown generation option.*max_tokns.*valid options: max_new_tokens"),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GenerationOptions.from_kwargs(**kwargs)


def test_sampling_filters_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seen = torch.tensor([True, True, False, False])
    assert apply_repetition_penalty(logits.clone(), seen, 2.0).tolist() == [1.0, -2.0, 0.5, 3.0]
    top2 = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isinf(top2[[1, 2]]).all() and top2[[0, 3]].tolist() == [2.0, 3.0]
    # probabilities ≈ [0.25, 0.01, 0.06, 0.68]: top_p 0.7 keeps 3.0 and 2.0 (0.68 < 0.7), drops the rest
    nucleus = filter_top_k_top_p(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(nucleus).tolist() == [True, False, False, True]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.5)).tolist() == [False, False, False, True]


def test_detokenizer_never_splits_multibyte_characters():
    tokenizer = make_tokenizer()
    text = "naïve façade 東京 👍 ok — 漢字テスト"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level pieces: some characters span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_holds_back_possible_stop_prefix():
    tokenizer = make_tokenizer()
    ids = tokenizer("red circle. blue square", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=(". blue",))
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.finish() == "red circle"
    assert detok.stopped


def run_to_end(batch, collected):
    while batch:
        for event in batch.step():
            if event.result is not None:
                collected[event.index] = event.result


def test_cancelled_rows_leave_and_others_are_unaffected(engine):
    options = GenerationOptions(max_new_tokens=10)
    solo = engine.generate([CONVERSATIONS[2]], options)[0]
    batch = engine.new_batch()
    batch.add([("a", engine.encode(CONVERSATIONS[0]), options), ("b", engine.encode(CONVERSATIONS[2]), options)])
    batch.step()
    batch.cancel({"a"})
    assert batch.keys == ["b"] and batch.mask.shape[0] == 1
    assert batch.mask[0, 0] == 1  # the padding only row "a" needed was trimmed
    results = {}
    run_to_end(batch, results)
    assert list(results) == ["b"] and results["b"].token_ids == solo.token_ids


EXTREMES = [{"top_p": 1e-300}, {"temperature": 1e-45}, {"temperature": 1e-45, "top_p": 1e-300}]


@pytest.mark.parametrize("extreme", EXTREMES)
def test_extreme_sampling_options_give_a_token_not_nan(extreme):
    """top_p that is 0 in float32, or a temperature that overflows the logits, fall back to the likeliest token."""
    from vlmkit.inference.sampling import choose_token

    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    options = GenerationOptions(**{"temperature": 1.0, **extreme})
    picks = {choose_token(logits, options, None, torch.Generator().manual_seed(s)) for s in range(20)}
    assert picks == {1}


def test_one_extreme_request_does_not_change_the_others(engine):
    solo = engine.generate(CONVERSATIONS[:2], GenerationOptions(max_new_tokens=8))
    mixed = engine.generate(
        CONVERSATIONS[:2] + CONVERSATIONS[:2],
        [GenerationOptions(max_new_tokens=8)] * 2
        + [GenerationOptions(max_new_tokens=8, temperature=1.0, top_p=1e-300, seed=2**63 - 1),
           GenerationOptions(max_new_tokens=8, temperature=1e-45, seed=0)],
    )  # fmt: skip
    assert [r.token_ids for r in mixed[:2]] == [r.token_ids for r in solo]
    assert all(r.completion_tokens > 0 for r in mixed[2:])


@pytest.mark.parametrize("seed", [2**70, -1, 1.5])
def test_out_of_range_seed_is_refused(seed):
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        GenerationOptions(temperature=1.0, seed=seed)
