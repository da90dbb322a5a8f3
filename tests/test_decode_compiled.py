"""The static KV cache and the compiled decode step: the same tokens as eager decoding, rows joining and leaving,
the eager fallback when compiling fails, and the option's validation."""

import logging

import pytest
import torch

from conftest import compose_tiny, image_turn, qwen2_config, siglip_config
from vlmkit.errors import ConfigError
from vlmkit.inference import compiled
from vlmkit.inference.engine import Engine
from vlmkit.inference.options import GenerationOptions

PROMPTS = [
    [image_turn("Describe the image.", 1)],
    [{"role": "user", "content": "hi"}],
    [image_turn("What colour is the large shape in the picture? Tell me.", 2, (0, 0, 255))],
    [{"role": "user", "content": "How many stars are there? Count them one by one, please."}],
    [image_turn("Is there a green triangle?", 1, (0, 200, 0))],
]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3))


def scenario(engine: Engine) -> dict:
    """Rows join in three waves (a longer prompt than the running ones, more rows than the cache's slots), leave at
    different steps (budgets, a cancel), one request has n=2 sampled answers with a seed."""
    batch = engine.new_batch()
    encoded = [engine.encode(p) for p in PROMPTS]
    greedy = [GenerationOptions(max_new_tokens=m) for m in (6, 12, 9, 4, 7)]
    sampled = GenerationOptions(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3, n=2)
    out: dict = {}

    def steps(count: int) -> None:
        for _ in range(count):
            for event in batch.step():
                assert event.error is None
                if event.result is not None:
                    out[(event.index, event.choice)] = event.result.token_ids

    assert not batch.add([("a", encoded[1], greedy[1])])
    steps(2)
    assert not batch.add([("b", encoded[0], greedy[0]), ("c", encoded[2], greedy[2])])  # wider than "a"
    steps(3)
    assert not batch.add([("d", encoded[3], greedy[3]), ("e", encoded[4], sampled), ("f", encoded[1], greedy[4])])
    steps(1)
    batch.cancel({"f"})
    while batch:
        steps(1)
    return out


def test_static_and_compiled_match_eager_as_rows_join_and_leave(parts, monkeypatch):
    model, processor = parts
    expected = scenario(Engine(model, processor, decode="eager"))
    assert set(expected) == {("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0), ("e", 1)}
    assert expected[("e", 0)] != expected[("e", 1)]

    # the static cache decoding eagerly (what a failed compile falls back to)
    monkeypatch.setattr(compiled, "BACKEND", failing_backend)
    engine = Engine(model, processor, decode="compiled")
    assert scenario(engine) == expected

    # the compiled step (dynamo's graph run by the eager backend: inductor's own test is below)
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    engine = Engine(model, processor, decode="compiled")
    assert scenario(engine) == expected
    decoder = engine.decoder()
    assert decoder is not None and decoder.error is None
    assert {slots for slots, _ in decoder._shapes} == {1, 2, 4, 8}  # grew and shrank with the rows
    assert scenario(engine) == expected  # idle caches reused, shapes already compiled


def failing_backend(graph, example_inputs):
    raise RuntimeError("no compiler here")


def test_compile_failure_decodes_eagerly_and_logs_once(parts, monkeypatch, caplog):
    model, processor = parts
    monkeypatch.setattr(compiled, "BACKEND", failing_backend)
    engine = Engine(model, processor, decode="compiled")
    caplog.set_level(logging.WARNING, logger="vlmkit.inference.compiled")
    options = GenerationOptions(max_new_tokens=5)
    eager = Engine(model, processor, decode="eager").generate(PROMPTS[:3], options)
    assert [r.token_ids for r in engine.generate(PROMPTS[:3], options)] == [r.token_ids for r in eager]
    assert [r.token_ids for r in engine.generate(PROMPTS[:3], options)] == [r.token_ids for r in eager]
    warnings = [r.getMessage() for r in caplog.records if "compiling the decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0]
    assert engine.decoder() is None  # later batches decode with the dynamic cache


@pytest.mark.slow
def test_inductor_compiled_step_gives_the_eager_tokens(parts, monkeypatch):
    model, processor = parts
    # frozen weights and fused projections as on CPU, without the (slow to compile) GEMM autotuning
    monkeypatch.setattr(compiled, "CPU_OPTIONS", {"freezing": True, "cpp.enable_concat_linear": True})
    options = GenerationOptions(max_new_tokens=5)  # both rows to the end: one shape, one compile
    eager = Engine(model, processor, decode="eager").generate(PROMPTS[:2], options)
    engine = Engine(model, processor, decode="compiled")
    assert [r.token_ids for r in engine.generate(PROMPTS[:2], options)] == [r.token_ids for r in eager]
    decoder = engine.decoder()
    assert decoder is not None and decoder.error is None and decoder._shapes == {(2, 128)}


def test_decode_option_is_validated(parts):
    model, processor = parts
    with pytest.raises(ConfigError, match=r"decode: unknown mode 'fast'; valid: auto, compiled, eager"):
        Engine(model, processor, decode="fast")
    engine = Engine(model, processor)
    assert engine.decode == "auto" and engine.decoder() is None  # CPU: eager
    sliding = compose_tiny(siglip_config(), qwen2_config(use_sliding_window=True, sliding_window=8,
                                                         max_window_layers=0))  # fmt: skip
    with pytest.raises(ConfigError, match="decode='compiled': .*sliding-window"):
        Engine(*sliding, decode="compiled")
    assert Engine(*sliding).decoder() is None


def test_buckets():
    assert [compiled.bucket(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, 16]
    assert compiled.bucket(40, compiled.MIN_COLUMNS) == 128 and compiled.bucket(130, 128) == 256


def test_decode_option_through_the_api(parts):
    from vlmkit.api import VLM

    vlm = VLM(*parts)
    vlm.set_decode("compiled")
    assert vlm.engine.decode == "compiled"
    with pytest.raises(ConfigError, match="decode: unknown mode 'fastest'"):
        vlm.set_decode("fastest")

    class OtherEngine:  # a backend without a compiled decode step
        pass

    vlm.engine = OtherEngine()  # type: ignore[assignment]
    vlm.set_decode("eager")
    with pytest.raises(ConfigError, match="decode='compiled': the OtherEngine backend has no compiled decode step"):
        vlm.set_decode("compiled")


def test_grouped_query_attention_of_one_token_matches_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vlmkit.inference.attention import decode_sdpa_attention

    class Layer(torch.nn.Module):
        num_key_value_groups = 3

    torch.manual_seed(0)
    keys, values = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # row 0 is left-padded
    for query, step_mask in ((torch.randn(2, 6, 1, 8), mask), (torch.randn(2, 6, 10, 8), None)):
        ours, _ = decode_sdpa_attention(Layer(), query, keys, values, step_mask, scaling=0.3)
        theirs, _ = sdpa_attention_forward(Layer(), query, keys, values, step_mask, scaling=0.3)
        assert ours.shape == theirs.shape == (2, query.shape[2], 6, 8)
        torch.testing.assert_close(ours, theirs)


def test_compiled_grouped_query_steps_read_the_static_cache_without_expanding_it(monkeypatch):
    from vlmkit.inference import attention

    model, processor = compose_tiny(siglip_config(), qwen2_config())  # 4 query heads, 2 key/value heads
    config = model.language_model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    per_query_head = {(heads,), (kv_heads, heads // kv_heads)}  # repeat_kv's result and its 5-D expand
    expected = [r.token_ids for r in Engine(model, processor, decode="eager").generate(PROMPTS[:2], GREEDY3)]

    def graph_shapes() -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def recording(graph, example_inputs):  # the traced graph's tensors, run as traced
            for node in graph.graph.nodes:
                value = node.meta.get("example_value")
                if isinstance(value, torch.Tensor):
                    shapes.append(tuple(value.shape))
            return graph.forward

        monkeypatch.setattr(compiled, "BACKEND", recording)
        torch._dynamo.reset()
        engine = Engine(model, processor, decode="compiled")
        assert [r.token_ids for r in engine.generate(PROMPTS[:2], GREEDY3)] == expected
        return shapes

    def cache_sized_per_query_head(shapes):
        return [s for s in shapes if len(s) >= 4 and s[-2] == compiled.MIN_COLUMNS and s[1:-2] in per_query_head]

    shapes = graph_shapes()
    assert config._attn_implementation == attention.DECODE_ATTENTION
    assert shapes and not cache_sized_per_query_head(shapes)
    # the check sees the expansion when the step runs transformers' own sdpa attention
    model.language_model.set_attn_implementation("sdpa")
    monkeypatch.setattr(compiled, "use_decode_attention", lambda language_model: False)
    assert cache_sized_per_query_head(graph_shapes())


GREEDY3 = GenerationOptions(max_new_tokens=3)
