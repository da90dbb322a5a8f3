"""The backend contract (vlmkit.backends.Backend), one suite run on every registered backend.

Each backend is a tiny random model built offline: vlmkit's own (SigLIP + Qwen2 composed), a transformers
Qwen2-VL checkpoint loaded by path, and the native model exported to OpenVINO (skipped without the extra).
Backend-specific behaviour (KV-cache trimming, parity with transformers' own ``generate``, OpenVINO's parity with
PyTorch) stays in test_engine.py, test_hf_backend.py and test_openvino.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import compose_tiny, image_turn, qwen2_config, siglip_config
from test_engine import CONVERSATIONS
from vlmkit.api import VLM
from vlmkit.backends import EXPORT, TRAIN, Backend
from vlmkit.errors import ProcessingError
from vlmkit.inference.options import GenerationOptions


def _native() -> VLM:
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


def _transformers(tmp_path_factory) -> VLM:
    from test_hf_backend import build_qwen2_vl, load_vlm

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("contract") / "qwen2_vl"
    build_qwen2_vl(folder)
    return load_vlm(folder)


def _openvino(tmp_path_factory) -> VLM:
    """The native model exported to OpenVINO (fp32) and loaded from its folder."""
    pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
    import vlmkit
    from vlmkit.interop.openvino_export import export_openvino

    native = _native()
    folder = export_openvino(native.model, native.processor, tmp_path_factory.mktemp("contract") / "openvino")
    return vlmkit.load(str(folder))


@pytest.fixture(scope="module", params=["native", "transformers", "openvino"])
def vlm(request, tmp_path_factory) -> VLM:
    loaders = {"native": lambda: _native(), "transformers": lambda: _transformers(tmp_path_factory),
               "openvino": lambda: _openvino(tmp_path_factory)}  # fmt: skip
    loaded = loaders[request.param]()
    loaded.kind = request.param
    return loaded


@pytest.fixture(scope="module")
def engine(vlm) -> Backend:
    return vlm.engine


def run_to_end(batch, collected, texts=None):
    while batch:
        for event in batch.step():
            assert event.error is None, event.error
            if texts is not None:
                texts[event.index] = texts.get(event.index, "") + event.text
            if event.result is not None:
                collected[event.index] = event.result


def test_the_contract_is_complete(engine):
    for name in ("processor", "context_length", "stop_ids", "capabilities", "encode", "generate", "stream_batch",
                 "new_batch"):  # fmt: skip
        assert hasattr(engine, name), name
    assert engine.context_length > 0 and engine.stop_ids
    for name in ("tokenizer", "image_access", "max_pixels"):
        assert hasattr(engine.processor, name), name


def test_capabilities(vlm):
    expected = {EXPORT, TRAIN} if vlm.kind == "native" else set()
    assert set(vlm.engine.capabilities) == expected


def test_encode_counts_image_tokens(engine):
    encoded = [engine.encode(c) for c in CONVERSATIONS[:4]]
    assert [len(e.image_token_counts) for e in encoded] == [2, 0, 1, 0]
    assert all(count > 0 for e in encoded for count in e.image_token_counts)
    results = [engine.generate([c], GenerationOptions(max_new_tokens=2))[0] for c in CONVERSATIONS[:4]]
    assert [len(e.input_ids) for e in encoded] == [r.prompt_tokens for r in results]


def test_batched_greedy_equals_one_by_one(engine):
    options = GenerationOptions(max_new_tokens=12)
    batched = engine.generate(CONVERSATIONS, options)
    assert len({tuple(r.token_ids) for r in batched}) > 2  # the rows really differ
    for conversation, result in zip(CONVERSATIONS, batched, strict=True):
        alone = engine.generate([conversation], options)[0]
        assert (result.token_ids, result.text, result.prompt_tokens, result.completion_tokens) == (
            alone.token_ids, alone.text, alone.prompt_tokens, alone.completion_tokens
        )  # fmt: skip


def test_finish_reasons_counts_and_stop_tokens(engine):
    result = engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=5))[0]
    assert result.finish_reason == "length" and result.completion_tokens == 5 == len(result.token_ids)
    first = result.token_ids[0]
    engine.stop_ids.add(first)
    try:
        stopped = engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=5))[0]
    finally:
        engine.stop_ids.discard(first)
    assert stopped.finish_reason == "stop" and stopped.text == "" and stopped.completion_tokens == 1


def test_rows_have_their_own_budgets(engine):
    options = [GenerationOptions(max_new_tokens=n) for n in (3, 9, 1, 6, 2)]
    results = engine.generate(CONVERSATIONS, options)
    assert [r.completion_tokens for r in results] == [3, 9, 1, 6, 2]
    full = engine.generate(CONVERSATIONS, GenerationOptions(max_new_tokens=9))
    for short, long in zip(results, full, strict=True):
        assert long.token_ids[: short.completion_tokens] == short.token_ids


def test_stream_concatenates_to_the_full_text(engine):
    options = GenerationOptions(max_new_tokens=20)
    texts, results = {}, {}
    for event in engine.stream_batch(CONVERSATIONS[:3], options):
        texts[event.index] = texts.get(event.index, "") + event.text
        if event.result is not None:
            results[event.index] = event.result
    full = engine.generate(CONVERSATIONS[:3], options)
    assert [texts[i] for i in range(3)] == [r.text for r in full] == [results[i].text for i in range(3)]


def test_stop_strings_cut_text_and_stream(vlm):
    base = vlm.generate_batch(CONVERSATIONS[:1], max_new_tokens=30)[0].text
    stop = base[len(base) // 2 :][:2]
    assert stop
    expected = base[: base.find(stop)]
    cut = vlm.generate_batch(CONVERSATIONS[:1], max_new_tokens=30, stop=[stop])[0]
    assert cut.text == expected and cut.finish_reason == "stop"
    assert "".join(vlm.stream(CONVERSATIONS[0], max_new_tokens=30, stop=[stop])) == expected


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    sample = GenerationOptions(max_new_tokens=10, temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.2,
                               seed=7)  # fmt: skip
    a = engine.generate(CONVERSATIONS, sample)
    b = engine.generate(CONVERSATIONS[::-1], sample)[::-1]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    alone = engine.generate(CONVERSATIONS[:1], sample)[0]
    assert alone.token_ids == a[0].token_ids
    others = {tuple(engine.generate(CONVERSATIONS[:1], sample.__class__(**{**vars(sample), "seed": s}))[0].token_ids)
              for s in range(4)}  # fmt: skip
    assert len(others) > 1


def test_a_running_batch_takes_requests_at_any_step_and_cancels(engine):
    options = GenerationOptions(max_new_tokens=8)
    long = GenerationOptions(max_new_tokens=200)  # the row cancelled midway
    solo = {i: engine.generate([c], options)[0] for i, c in enumerate(CONVERSATIONS)}
    batch = engine.new_batch()
    first = [(0, engine.encode(CONVERSATIONS[0]), options), (1, engine.encode(CONVERSATIONS[1]), long)]
    assert batch.add(first) == []
    results, texts = {}, {}
    for _ in range(2):
        for event in batch.step():
            texts[event.index] = texts.get(event.index, "") + event.text
            if event.result is not None:
                results[event.index] = event.result
    finished_before_cancel = 1 in results  # a backend may run ahead of its steps (transformers' worker thread)
    batch.add([(2, engine.encode(CONVERSATIONS[2]), options), (3, engine.encode(CONVERSATIONS[3]), options)])
    batch.cancel({1})
    assert 1 not in batch.keys and {2, 3} <= set(batch.keys)
    run_to_end(batch, results, texts)
    assert set(results) - {1} == {0, 2, 3} and (1 in results) == finished_before_cancel
    for key in (0, 2, 3):
        assert results[key].token_ids == solo[key].token_ids, key
        assert texts[key] == results[key].text


def test_a_prompt_over_the_context_is_refused(engine):
    with pytest.raises(ProcessingError, match="context"):
        engine.encode([{"role": "user", "content": "word " * (engine.context_length + 10)}])


def test_processor_policy_names(vlm):
    from vlmkit.errors import ImageError
    from vlmkit.processing.images import ImageAccess

    previous = vlm.processor.image_access
    vlm.processor.image_access = ImageAccess(allow_local=False)
    try:
        with pytest.raises(ImageError, match="local paths are not allowed"):
            vlm.engine.encode([image_turn("x") | {"content": [{"type": "image", "image": "/tmp/x.png"}]}])
    finally:
        vlm.processor.image_access = previous


def test_no_deprecated_transformers_api(engine, caplog):
    """transformers announces renames (``past_key_values`` → ``cache``) through its logger before removing the
    old name; a generation through either backend must not hear one (FutureWarnings are errors in pytest.ini)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").warning_once.cache_clear()
    caplog.set_level(logging.WARNING)
    engine.generate(CONVERSATIONS[:2], GenerationOptions(max_new_tokens=3))
    batch = engine.new_batch()
    batch.add([(0, engine.encode(CONVERSATIONS[0]), GenerationOptions(max_new_tokens=3))])
    run_to_end(batch, {})
    assert not [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]


# -- the API names of issue 19 (n, logprobs, continue_final_message, max_length, JSON mode, raw prompts) -------
def test_n_answers_are_seeded_per_choice(engine):
    """vLLM's ``n`` / transformers' ``num_return_sequences``: each answer is a row of its own, seeded by
    ``choice_seed(seed, j)`` (choice 0: the seed itself), results grouped per conversation."""
    from vlmkit.inference.rows import choice_seed

    sample = GenerationOptions(max_new_tokens=6, temperature=1.0, seed=5)
    results = engine.generate(CONVERSATIONS[:2], [GenerationOptions(max_new_tokens=6, temperature=1.0, seed=5, n=3),
                                                  GenerationOptions(max_new_tokens=4)])  # fmt: skip
    assert [r.choice for r in results] == [0, 1, 2, 0]
    for j in range(3):
        alone = engine.generate(CONVERSATIONS[:1], sample.__class__(**{**vars(sample), "seed": choice_seed(5, j)}))
        assert results[j].token_ids == alone[0].token_ids
    assert results[3].token_ids == engine.generate(CONVERSATIONS[1:2], GenerationOptions(max_new_tokens=4))[0].token_ids
    greedy = engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=5, n=2))
    assert greedy[0].token_ids == greedy[1].token_ids


def test_a_running_batch_decodes_n_answers_per_request(engine):
    batch = engine.new_batch()
    options = GenerationOptions(max_new_tokens=4, temperature=1.0, seed=1, n=2)
    batch.add([(0, engine.encode(CONVERSATIONS[0]), options), (1, engine.encode(CONVERSATIONS[3]), options)])
    batch.cancel({1})
    finished = []
    while batch:
        finished += [(e.index, e.choice) for e in batch.step() if e.result is not None]
    assert sorted(finished) in ([(0, 0), (0, 1)], [(0, 0), (0, 1), (1, 0), (1, 1)])  # 1 may have run ahead
    assert (0, 0) in finished and (0, 1) in finished


def test_logprobs_are_raw_and_consistent(engine):
    """The model's log-softmax before sampling adjustments (vLLM's default): a greedy token is its step's top
    token, and the first step's numbers don't depend on temperature or on the rest of the batch."""
    greedy = engine.generate(CONVERSATIONS[:2], GenerationOptions(max_new_tokens=5, logprobs=2))
    for result in greedy:
        assert len(result.logprobs) == len(result.token_ids)
        for entry in result.logprobs:
            assert entry.top[0].token_id == entry.token_id and entry.top[0].logprob == entry.logprob
            assert entry.top[0].logprob >= entry.top[1].logprob and entry.logprob <= 0
    sampled = engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=3, logprobs=2, temperature=1.7,
                                                                   seed=3))[0]  # fmt: skip
    first, other = greedy[0].logprobs[0].top, sampled.logprobs[0].top
    assert [t.token_id for t in first] == [t.token_id for t in other]
    assert [t.logprob for t in first] == pytest.approx([t.logprob for t in other], abs=1e-4)
    assert engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=2))[0].logprobs is None


def test_continue_final_message_and_max_length(vlm):
    prefill = [{"role": "user", "content": "How many stars are there?"}, {"role": "assistant", "content": "There are"}]
    encoded = vlm.engine.encode(prefill, continue_final_message=True)
    assert vlm.processor.tokenizer.decode(encoded.input_ids).endswith("assistant\nThere are")
    result = vlm.generate_batch([prefill], continue_final_message=True, max_length=len(encoded.input_ids) + 3)[0]
    assert result.prompt_tokens == len(encoded.input_ids) and result.completion_tokens <= 3
    with pytest.raises(ProcessingError, match="must be the assistant's"):
        vlm.engine.encode(prefill[:1], continue_final_message=True)


def test_json_mode_by_constrained_decoding(vlm):
    """``response_format`` json_schema (OpenAI's shape), enforced with llguidance on both backends: a random
    model still writes JSON that parses and fits the schema."""
    import json

    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(3):
        result = vlm.generate_batch(CONVERSATIONS[:1], response_format=fmt, temperature=1.0, seed=seed,
                                    max_new_tokens=30)[0]  # fmt: skip
        value = json.loads(result.text)
        assert result.finish_reason == "stop" and set(value) == {"ok", "n"} and 0 <= value["n"] <= 9
    anything = vlm.generate_batch(CONVERSATIONS[3:4], response_format={"type": "json_object"}, max_new_tokens=12)
    assert anything[0].text.startswith("{")


def test_a_raw_prompt_has_no_template(engine):
    """``encode_prompt``: the legacy completions' raw text (the tokenizer's own special tokens added)."""
    tokenizer = engine.processor.tokenizer
    encoded = engine.encode_prompt("How many stars are there?")
    assert encoded.input_ids == tokenizer("How many stars are there?")["input_ids"] and not encoded.image_token_counts
    results = engine.generate([encoded, engine.encode_prompt("hi")], GenerationOptions(max_new_tokens=4, n=2))
    assert [r.prompt_tokens for r in results] == [len(encoded.input_ids)] * 2 + [len(tokenizer("hi")["input_ids"])] * 2
    with pytest.raises(ProcessingError, match="empty"):
        engine.encode_prompt("")


def test_a_chat_template_override(vlm):
    """transformers' ``chat_template`` argument: this call's prompt rendered with another Jinja template."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")  # fmt: skip
    conversation = [{"role": "user", "content": "How many stars are there?"}]
    encoded = vlm.engine.encode(conversation, chat_template=template)
    text = vlm.processor.tokenizer.decode(encoded.input_ids, skip_special_tokens=False)
    assert text == "<|im_start|>user: How many stars are there?<|im_end|><|im_start|>assistant: "
    result = vlm.generate_batch([conversation], chat_template=template, max_new_tokens=3)[0]
    assert result.prompt_tokens == len(encoded.input_ids)
