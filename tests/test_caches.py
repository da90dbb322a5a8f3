"""The image-feature and KV prefix caches: bounded LRU stores, keys that fold image hashes in, and generation that
gives the same greedy tokens with the caches as without them (hits, misses, both in one batch, later chat turns,
multi-view images cut by a block boundary, n > 1, rows joining a running batch, eviction under a tiny bound)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import clip_config, compose_tiny, qwen2_config, siglip_config
from vlmkit.config import ViewsConfig
from vlmkit.errors import ConfigError
from vlmkit.inference.caches import ByteLRU, CacheConfig
from vlmkit.inference.engine import Engine, length_groups
from vlmkit.inference.image_cache import ImageRun, pixel_digest
from vlmkit.inference.options import GenerationOptions
from vlmkit.inference.prefix_cache import block_hashes

GREEDY = GenerationOptions(max_new_tokens=8)


def picture(colour, size=(40, 30), stripe=7):
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], stripe):
        for y in range(size[1]):
            image.putpixel((x, y), (255 - colour[0], (x * 5) % 256, (y * 9) % 256))
    return image


RED, BLUE, GREEN = picture((200, 30, 30)), picture((30, 30, 200)), picture((30, 200, 30), (50, 37))


def ask(text, *images):
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
    }


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3))


def engines(model, processor, **sizes):
    """The same model without caches and with them (``sizes``: CacheConfig fields)."""
    return Engine(model, processor, CacheConfig.off()), Engine(model, processor, CacheConfig(**sizes))


def tokens(engine, conversations, options=GREEDY):
    return [r.token_ids for r in engine.generate(conversations, options)]


# ------------------------------------------------------------------------------------------------ stores


def test_byte_lru_keeps_the_recently_used_within_its_bound():
    store: ByteLRU[str] = ByteLRU(100)
    assert store.put("a", "A", 40) and store.put("b", "B", 40)
    assert store.get("a") == "A"  # "b" is now the least recently used
    store.put("c", "C", 40)
    assert "b" not in store and store.get("a") == "A" and store.get("c") == "C"
    assert store.get("b") is None
    assert not store.put("huge", "H", 101)  # larger than the whole bound: not kept, nothing evicted for it
    assert store.stats() == {"lookups": 4, "hits": 3, "hit_rate": 0.75, "entries": 2, "bytes": 80,
                             "capacity_bytes": 100, "inserts": 3, "evictions": 1}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"prefix_cache_mb": -1}, "prefix_cache_mb must be"), ({"image_cache_mb": "big"}, "image_cache_mb must be"),
     ({"image_cache_mb": True}, "image_cache_mb must be"), ({"block_size": 0}, "block_size must be")],
)  # fmt: skip
def test_cache_options_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CacheConfig(**kwargs)


def test_block_keys_fold_in_the_images_behind_placeholders():
    ids = [1, 2, 3, 4] + [9] * 6 + [5, 6, 7, 8]  # placeholders (9) at 4..9, blocks of 4
    pixels_a, pixels_b = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    a = ImageRun(pixel_digest(pixels_a, (4, 4)), pixels_a, (4, 4), tuple(range(4, 10)))
    b = ImageRun(pixel_digest(pixels_b, (4, 4)), pixels_b, (4, 4), tuple(range(4, 10)))
    keys_a, keys_b = block_hashes(ids, [a], 4), block_hashes(ids, [b], 4)
    assert len(keys_a) == 3  # whole blocks only
    assert keys_a[0] == keys_b[0]  # the text before the image
    assert keys_a[1] != keys_b[1] and keys_a[2] != keys_b[2]  # the image's blocks, and every block after them
    assert block_hashes(ids, [a], 4) == keys_a  # deterministic
    assert block_hashes([7, 7, 7, 7, *ids[4:]], [a], 4)[1] != keys_a[1]  # a block's key depends on its prefix
    assert pixel_digest(pixels_a, (4, 4)) != pixel_digest(pixels_a, (8, 8))  # the original size counts too


# ------------------------------------------------------------------------------------------------ engine


def test_a_different_image_behind_the_same_placeholders_never_shares_a_block(parts):
    plain, cached = engines(*parts, block_size=4)
    red, blue = [ask("What colour is the circle?", RED)], [ask("What colour is the circle?", BLUE)]
    tokens(cached, [red])
    before = cached.encode(blue).input_ids.index(cached.processor.image_token_id)
    assert tokens(cached, [blue]) == tokens(plain, [blue])
    stats = cached.cache_stats()["prefix"]
    assert stats["hits"] == 1 and stats["hit_tokens"] == before // 4 * 4  # only the blocks before the image
    assert tokens(cached, [red]) == tokens(plain, [red])  # and the red image's own blocks are still its own
    usable = (len(cached.encode(red).input_ids) - 1) // 4 * 4  # the last token is always computed
    assert cached.cache_stats()["prefix"]["hit_tokens"] - stats["hit_tokens"] == usable


def test_a_batch_mixing_hits_and_misses_gives_the_same_tokens(parts):
    plain, cached = engines(*parts, block_size=4)
    first = [ask("Describe the image.", RED)]
    tokens(cached, [first])
    batch = [first, [ask("How many stars are there?", BLUE)], [ask("Describe the image.", RED, GREEN)],
             [ask("Is there a red circle?")]]  # fmt: skip
    assert tokens(cached, batch) == tokens(plain, batch)
    assert cached.cache_stats()["prefix"]["hits"] >= 2
    assert cached.cache_stats()["image"]["hits"] >= 1  # RED again, after the text block it shares with ``first``


def test_length_groups_split_rows_that_compute_very_different_lengths():
    assert length_groups([100, 10, 95, 12], min_saved=64) == [[0, 2], [3, 1]]
    assert length_groups([100, 10], min_saved=91) == [[0, 1]]  # saves 90 padding tokens: not worth a pass
    assert length_groups([100, 60, 51], min_saved=1) == [[0, 1, 2]]  # none at most half the longest
    assert length_groups([80, 40, 20, 10], min_saved=1) == [[0], [1], [2], [3]]  # each half the one before
    assert length_groups([80, 40, 20, 10]) == [[0], [1, 2, 3]]  # the second split would save 50 tokens of 64
    assert length_groups([7]) == [[0]]


def test_a_mostly_cached_row_is_prefilled_apart_from_uncached_ones_with_the_same_tokens(parts, monkeypatch):
    plain, cached = engines(*parts, block_size=4)
    long = [ask("Describe the image in detail: every shape, its colour, its size and where it is. " * 3, RED)]
    tokens(cached, [long])  # now all but its last block is cached
    batch = [
        [ask("Describe the image in detail, every shape and every colour, twice over. " * 3, BLUE)],
        long,
        [ask("Describe every shape, its colour, its size and where it is, in the image. " * 3, GREEN)],
    ]
    passes = []
    original = type(cached.new_batch())._forward_reusing

    def counting(self, samples, may_split=True, may_group=True):
        passes.append(len(samples))
        return original(self, samples, may_split, may_group)

    monkeypatch.setattr(type(cached.new_batch()), "_forward_reusing", counting)
    assert tokens(cached, batch) == tokens(plain, batch)
    assert passes == [3, 2, 1]  # the whole batch, then the two uncached rows, then the cached one alone


def test_rows_of_one_batch_sharing_an_image_prefix_reuse_the_first_ones_blocks(parts):
    plain, cached = engines(*parts, block_size=4)
    batch = [[ask(q, RED)] for q in ("Describe the image.", "How many stars are there?", "Where is the square?")]
    batch.insert(1, [ask("What colour is it?", BLUE)])
    assert tokens(cached, batch) == tokens(plain, batch)
    stats = cached.cache_stats()["prefix"]
    ids = [cached.encode(conversation).input_ids for conversation in batch]
    image = cached.processor.image_token_id

    def common(a, b, same_image):  # tokens two prompts share (placeholders only when the image is the same)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n] and (same_image or a[n] != image):
            n += 1
        return n

    expected = sum(min(common(ids[0], ids[r], r != 1) // 4, (len(ids[r]) - 1) // 4) * 4 for r in (1, 2, 3))
    assert ids[0][:4] == ids[1][:4] and stats["lookups"] == 4 and stats["hits"] == 3  # all follow the first row
    assert stats["hit_tokens"] == expected and expected > 3 * 4
    assert cached.cache_stats()["image"]["inserts"] == 2  # each image encoded once


def test_each_chat_turn_reuses_the_previous_one(parts):
    plain, cached = engines(*parts, block_size=4)
    history = [ask("Describe the image.", RED)]
    for question in ("What colour is it?", "How many stars are there?", "Where is the square?"):
        expected = tokens(plain, [history])
        assert tokens(cached, [history]) == expected
        answer = plain.processor.decode(expected[0])
        history = [*history, {"role": "assistant", "content": answer}, ask(question)]
    stats = cached.cache_stats()["prefix"]
    assert stats["lookups"] == 3 and stats["hits"] == 2
    assert stats["hit_tokens"] > 0.5 * (stats["query_tokens"] - len(cached.encode(history[:1]).input_ids))


def test_multi_view_images_cut_by_a_block_boundary(parts):
    torch.manual_seed(0)
    model, processor = compose_tiny(clip_config(), qwen2_config(initializer_range=0.3), views=ViewsConfig("anyres"))
    plain, cached = engines(model, processor, block_size=8)
    wide, tall = picture((200, 30, 30), (96, 32)), picture((30, 30, 200), (33, 100))
    one = [ask("Describe the image.", wide, tall)]
    two = [ask("Describe the image.", wide, tall), {"role": "assistant", "content": "a star"}, ask("Where is it?")]
    tokens(cached, [one])
    encoded = cached.encode(one)
    slots = [t for t, token in enumerate(encoded.input_ids) if token == processor.image_token_id]
    reused = (len(encoded.input_ids) // 8) * 8
    assert any(slots[0] < boundary <= slots[-1] for boundary in range(8, reused + 1, 8))  # an image is cut
    assert tokens(cached, [two, [ask("What colour?", tall)]]) == tokens(plain, [two, [ask("What colour?", tall)]])
    assert cached.cache_stats()["prefix"]["hit_tokens"] == reused


def test_n_answers_and_sampling_are_unchanged(parts):
    plain, cached = engines(*parts, block_size=4)
    options = GenerationOptions(max_new_tokens=6, n=3, temperature=1.0, seed=7)
    conversation = [ask("Describe the image.", RED)]
    tokens(cached, [conversation], options)
    assert tokens(cached, [conversation], options) == tokens(plain, [conversation], options)
    assert cached.cache_stats()["prefix"]["hits"] == 1


def test_a_hit_joins_a_running_batch(parts):
    plain, cached = engines(*parts, block_size=4)
    long, short = [ask("Describe the image.", RED)], [ask("Is there a red circle?", BLUE)]
    tokens(cached, [long])

    def run(engine):
        batch = engine.new_batch()
        done: dict[str, list[int]] = {}
        batch.add([("short", engine.encode(short), GREEDY)])
        events = batch.step() + batch.step()
        events += batch.add([("long", engine.encode(long), GREEDY)])  # joins two steps later, from the cache
        while True:
            done.update({e.index: e.result.token_ids for e in events if e.result is not None})
            if not batch:
                return done
            events = batch.step()

    assert run(cached) == run(plain)


def test_eviction_under_a_tiny_bound_keeps_outputs_and_the_bound(parts):
    model, processor = parts
    plain = Engine(model, processor, CacheConfig.off())
    block = 4
    layers, kv_heads = model.language_model.config.num_hidden_layers, model.language_model.config.num_key_value_heads
    head_dim = model.language_model.config.hidden_size // model.language_model.config.num_attention_heads
    block_bytes = 2 * layers * kv_heads * block * head_dim * 4
    cached = Engine(model, processor, CacheConfig(prefix_cache_mb=3 * block_bytes / (1 << 20), block_size=block))
    conversations = [[ask(q, image)] for q in ("Describe the image.", "What colour is it?") for image in (RED, BLUE)]
    for _ in range(2):
        for conversation in conversations:
            assert tokens(cached, [conversation]) == tokens(plain, [conversation])
    stats = cached.cache_stats()["prefix"]
    assert stats["blocks"] <= 3 and stats["bytes"] <= 3 * block_bytes and stats["evictions"] > 0


def test_caches_off_keep_nothing(parts):
    engine = Engine(*parts, CacheConfig.off())
    tokens(engine, [[ask("Describe the image.", RED)]])
    assert engine.cache_stats() == {"image": None, "prefix": None}


# ------------------------------------------------------------------------------------------------ users


def test_vlm_resizes_the_caches_and_a_backend_without_them_refuses(parts):
    from vlmkit.api import VLM

    vlm = VLM(*parts)
    vlm.configure_caches(prefix_cache_mb=0)
    assert vlm.cache_stats()["prefix"] is None and vlm.cache_stats()["image"] is not None
    vlm.configure_caches(prefix_cache_mb=1, block_size=8)
    assert vlm.cache_stats()["prefix"]["capacity_bytes"] == 1 << 20 and vlm.engine.cache_config.block_size == 8

    class NoCaches:  # a backend with no caches
        pass

    other = VLM(None, None, engine=NoCaches())  # type: ignore[arg-type]
    other.configure_caches(image_cache_mb=0, prefix_cache_mb=0)  # off is what it has: fine
    assert other.cache_stats() is None
    with pytest.raises(ConfigError, match="prefix_cache_mb: the NoCaches backend has no image-feature or prefix"):
        other.configure_caches(prefix_cache_mb=64)


def test_cli_cache_flags_reach_the_engine(monkeypatch):
    import argparse

    from vlmkit.commands import common

    seen = {}
    monkeypatch.setattr("vlmkit.api.load", lambda model, **kw: seen.update(kw) or type("V", (), {"notice": None})())
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    common.add_engine_args(parser)
    common.load_model(parser.parse_args(["--prefix-cache-mb", "0", "--image-cache-mb", "8"]))
    assert seen["prefix_cache_mb"] == 0 and seen["image_cache_mb"] == 8
    seen.clear()
    common.load_model(parser.parse_args([]))
    assert "prefix_cache_mb" not in seen and "image_cache_mb" not in seen  # the engine's defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefix-cache-mb", "-1"])


def test_server_metrics_show_the_caches(parts):
    from fastapi.testclient import TestClient

    from vlmkit.api import VLM
    from vlmkit.serving.server import ServerSettings, create_app

    vlm = VLM(*parts)
    vlm.configure_caches(block_size=4)
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "Describe the image."}]}
    with TestClient(create_app(vlm, ServerSettings(model_name="tiny", allowed_hosts=None, ui=False))) as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = dict(line.split(" ") for line in response.text.splitlines() if not line.startswith("#"))
    assert values["vlmkit_prefix_cache_lookups_total"] == "2" and values["vlmkit_prefix_cache_hits_total"] == "1"
    assert int(values["vlmkit_prefix_cache_bytes"]) > 0 and values["vlmkit_requests_waiting"] == "0"
    assert "vlmkit_image_cache_lookups_total" in values


def test_metrics_need_the_api_key_when_there_is_one(parts):
    from fastapi.testclient import TestClient

    from vlmkit.api import VLM
    from vlmkit.serving.server import ServerSettings, create_app

    settings = ServerSettings(model_name="tiny", api_key="sk-x", allowed_hosts=None, ui=False)
    with TestClient(create_app(VLM(*parts), settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer sk-x"}).status_code == 200


def test_evaluation_asks_the_questions_about_one_image_together(tmp_path):
    from vlmkit.evaluation.runner import run_samples
    from vlmkit.evaluation.tasks import EvalSample, get_task

    task = get_task("vqa")
    samples = [EvalSample(f"q{i}", f"question {i}", image, {"answers": ["a"]})
               for i, image in enumerate(["a.png", "b.png", "a.png", "c.png", "b.png", "a.png"])]  # fmt: skip
    batches = []

    def predictor(conversations):
        batches.append([c[0]["content"][0]["image"] for c in conversations])
        return ["a"] * len(conversations)

    report = run_samples(predictor, task, samples, batch_size=2, out_dir=tmp_path, progress=False)
    assert batches == [["a.png", "a.png"], ["a.png", "b.png"], ["b.png", "c.png"]]
    assert report["counts"]["new"] == 6
