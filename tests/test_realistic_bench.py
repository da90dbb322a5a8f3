"""bench/realistic.py's arithmetic and model, at toy width (same code path as the SmolVLM-256M-shaped run): token
counts, weight and KV bytes per decoding step, output comparison. No timings are asserted."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCH_MODULE = "realistic"
"""The bench/ script the shared ``bench`` fixture imports."""


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.build(bench.TINY_VISION, bench.TINY_LM)


def llama_params(c: dict) -> int:
    """A Llama's parameter count from its config, written out (tied embeddings: one vocabulary matrix)."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    attention = h * c["num_attention_heads"] * hd * 2 + h * c["num_key_value_heads"] * hd * 2  # q, o; k, v
    layer = attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorms
    vocab = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + h + vocab


def test_the_full_size_configs_are_smolvlm_256m(bench):
    assert llama_params(bench.LM) == 134_515_008  # SmolLM2-135M
    grid = bench.VISION["image_size"] // bench.VISION["patch_size"]
    assert grid == 32 and (grid // bench.SCALE) ** 2 == 64
    assert bench.LM["tie_word_embeddings"] and bench.LM["vocab_size"] == 49152
    # the toy configs keep what the arithmetic depends on: image size, patch grid, scale, vocabulary, tying
    for key in ("image_size", "patch_size"):
        assert bench.TINY_VISION[key] == bench.VISION[key]
    for key in ("vocab_size", "tie_word_embeddings"):
        assert bench.TINY_LM[key] == bench.LM[key]


def test_64_image_tokens_per_512_px_image(bench, tiny):
    assert tiny.processor.tokens_per_image == 64
    image = bench.shapes_images(1)[0]
    encoded = tiny.engine.encode(bench.turn(image, "Describe the image."))
    assert sum(t == tiny.processor.image_token_id for t in encoded.input_ids) == 64
    with torch.inference_mode():
        features = tiny.model.encode_images(torch.zeros(1, 3, 512, 512))
    assert features.shape == (1, 64, bench.TINY_LM["hidden_size"])
    assert tiny.model.projector.proj.in_features == bench.TINY_VISION["hidden_size"] * bench.SCALE**2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_per_step_count_the_tied_matrix_once(bench, dtype):
    lm = LlamaForCausalLM(LlamaConfig(**bench.TINY_LM)).to(dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    assert lm.get_input_embeddings().weight.data_ptr() == lm.get_output_embeddings().weight.data_ptr()
    for batch in (1, 8, 32):  # the whole tied matrix is read as the LM head, whatever the batch
        assert bench.weight_bytes_per_step(lm, batch) == llama_params(bench.TINY_LM) * size


def test_an_untied_input_embedding_reads_only_its_looked_up_rows(bench):
    config = {**bench.TINY_LM, "tie_word_embeddings": False}
    lm = LlamaForCausalLM(LlamaConfig(**config))
    h = config["hidden_size"]
    without_embedding = llama_params(config) - config["vocab_size"] * h
    for batch in (1, 8):
        assert bench.weight_bytes_per_step(lm, batch) == (without_embedding + batch * h) * 4


def test_the_composite_weight_bytes_are_its_language_models(bench, tiny):
    lm = tiny.model.language_model
    assert bench.weight_bytes_per_step(lm, 1) == llama_params(bench.TINY_LM) * 4


def test_kv_bytes_per_step(bench):
    config = LlamaConfig(**bench.LM)
    # keys + values × 30 layers × 3 KV heads × 64 dims × 100 positions × 8 rows × 2 bytes
    assert bench.kv_bytes_per_step(config, 8, 100, torch.bfloat16) == 2 * 30 * 3 * 64 * 100 * 8 * 2


def test_compare_counts_identical_rows_and_first_differences(bench):
    out = bench.compare([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert out == {"rows_identical": 1, "rows": 3, "first_difference": [1, 2]}


def test_both_sides_generate_the_same_greedy_tokens(bench, tiny):
    tiny.model.language_model.generation_config.eos_token_id = None
    engine = bench.Engine(tiny.model, tiny.processor, **bench.engine_modes([])["default"])
    engine.stop_ids = set()
    vlm = bench.VLM(tiny.model, tiny.processor, engine=engine)
    pics = bench.shapes_images(2)
    convs = [bench.turn(pics[i], bench.PROMPTS[i]) for i in range(2)]
    ours, theirs = bench.run_vlmkit(vlm, convs, 3), bench.run_transformers(vlm, convs, 3)
    assert [len(row) for row in ours["tokens"]] == [3, 3]
    assert ours["tokens"] == theirs["tokens"]
    assert ours["prompt"] == theirs["prompt"]
    assert ours["ttft"] > 0 and ours["decode"] > 0 and theirs["decode"] > 0


def test_the_engine_caches_are_off_in_every_mode(bench):
    has_caches = "caches" in inspect.signature(bench.Engine.__init__).parameters
    modes = bench.engine_modes(["foo=1", "bar=static"])
    assert modes["foo=1"]["foo"] == 1 and modes["bar=static"]["bar"] == "static"
    for options in modes.values():
        assert ("caches" in options) == has_caches
        if has_caches:
            assert options["caches"].image_cache_mb == 0 and options["caches"].prefix_cache_mb == 0


def test_an_engine_decode_argument_adds_its_modes(bench, monkeypatch):
    compiled = pytest.importorskip("vlmkit.inference.compiled")

    class WithDecode:
        def __init__(self, model, processor, caches=None, decode: str = "auto") -> None: ...

    monkeypatch.setattr(bench, "Engine", WithDecode)
    modes = bench.engine_modes([])
    expected = [f"decode={m}" for m in compiled.DECODE_MODES if m != "auto"]
    assert list(modes) == ["default", *expected]
    assert all(modes[name]["decode"] == name.split("=")[1] for name in expected)
