"""One request's failure stays its own: the rows batched with it finish as if it had never been there."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import compose_tiny, qwen2_config, siglip_config
from test_server import LiveServer, image_message
from vlmkit.api import VLM
from vlmkit.inference.options import GenerationOptions
from vlmkit.inference.rows import RowState
from vlmkit.serving.scheduler import Scheduler, Ticket
from vlmkit.serving.server import ServerSettings

ATTACKER_SEED = 13


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


@pytest.fixture
def choose_fails_for_attacker(monkeypatch):
    """Sampling raises for the attacker's rows only (what a NaN distribution did before validation caught it)."""
    real = RowState.choose

    def choose(self, logits):
        if self.options.seed == ATTACKER_SEED:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(self, logits)

    monkeypatch.setattr(RowState, "choose", choose)


def victims(engine, n=8):
    """n requests, half greedy and half seeded sampling, with the result each gets alone."""
    items = []
    for i in range(n):
        encoded = engine.encode(image_message(f"Describe image {i}."))
        opts = GenerationOptions(max_new_tokens=12, temperature=0.0 if i % 2 else 0.9, seed=100 + i)
        alone = engine.generate([image_message(f"Describe image {i}.")], opts)[0]
        items.append((encoded, opts, alone))
    return items


def run_scheduler(engine, submissions):
    """Submit (encoded, options) pairs together; returns each one's GenerationResult or exception."""
    scheduler = Scheduler(engine, max_batch=32)
    outcomes: dict[int, object] = {}
    done = threading.Event()

    def deliver_to(i):
        def deliver(event):
            if isinstance(event, BaseException) or event.result is not None:
                outcomes[i] = event if isinstance(event, BaseException) else event.result
                if len(outcomes) == len(submissions):
                    done.set()

        return deliver

    for i, (encoded, opts) in enumerate(submissions):
        scheduler.submit(Ticket(encoded, opts, deliver_to(i)))
    assert done.wait(60), f"only {len(outcomes)} of {len(submissions)} requests finished"
    assert scheduler.drain(10)
    return [outcomes[i] for i in range(len(submissions))]


def test_a_row_whose_sampling_fails_fails_alone(vlm, choose_fails_for_attacker):
    items = victims(vlm.engine)
    attacker = (items[0][0], GenerationOptions(max_new_tokens=12, temperature=0.9, seed=ATTACKER_SEED))
    submissions = [attacker, *[(e, o) for e, o, _ in items[:4]], attacker, *[(e, o) for e, o, _ in items[4:]]]
    outcomes = run_scheduler(vlm.engine, submissions)
    attacked = [outcomes[0], outcomes[5]]
    assert all(isinstance(o, RuntimeError) and "nan" in str(o) for o in attacked)
    survivors = outcomes[1:5] + outcomes[6:]
    assert [o.token_ids for o in survivors] == [alone.token_ids for _, _, alone in items]


def test_a_prefill_that_fails_for_one_request_fails_that_request_only(vlm):
    items = victims(vlm.engine)
    good = items[0][0]
    # token ids past the vocabulary: the embedding lookup fails for this row (and for any batch holding it)
    poisoned = dataclasses.replace(good, input_ids=[*good.input_ids[:-1], 10**6])
    submissions = [(poisoned, items[0][1]), *[(e, o) for e, o, _ in items]]
    outcomes = run_scheduler(vlm.engine, submissions)
    assert isinstance(outcomes[0], Exception)
    assert [o.token_ids for o in outcomes[1:]] == [alone.token_ids for _, _, alone in items]


def test_a_request_whose_state_cannot_start_fails_alone(vlm):
    items = victims(vlm.engine)
    bad = GenerationOptions(max_new_tokens=5, temperature=0.9, seed=1)
    object.__setattr__(bad, "seed", 2**70)  # past validation (e.g. a future entry point that forgets it)
    outcomes = run_scheduler(vlm.engine, [(items[0][0], bad), *[(e, o) for e, o, _ in items]])
    assert isinstance(outcomes[0], Exception)
    assert [o.token_ids for o in outcomes[1:]] == [alone.token_ids for _, _, alone in items]


def test_direct_generate_still_raises_the_rows_error(vlm, choose_fails_for_attacker):
    with pytest.raises(RuntimeError, match="nan"):
        vlm.engine.generate([image_message()], GenerationOptions(max_new_tokens=4, temperature=1, seed=ATTACKER_SEED))


def test_transformers_backend_isolates_a_failing_row(choose_fails_for_attacker, tmp_path):
    from test_hf_backend import build_qwen2_vl, load_vlm

    torch.manual_seed(0)
    build_qwen2_vl(tmp_path / "qwen")
    engine = load_vlm(tmp_path / "qwen").engine
    conversation = [{"role": "user", "content": "Describe the image."}]
    encoded = engine.encode(conversation)
    opts = [GenerationOptions(max_new_tokens=6, temperature=0.0 if i % 2 else 0.8, seed=i) for i in range(4)]
    alone = [engine.generate([conversation], o)[0] for o in opts]
    attacker = GenerationOptions(max_new_tokens=6, temperature=0.8, seed=ATTACKER_SEED)
    outcomes = run_scheduler(engine, [(encoded, o) for o in opts[:2]] + [(encoded, attacker)] +
                             [(encoded, o) for o in opts[2:]])  # fmt: skip
    assert isinstance(outcomes[2], RuntimeError)
    assert [o.token_ids for o in outcomes[:2] + outcomes[3:]] == [r.token_ids for r in alone]


@pytest.mark.parametrize(
    "attack, status",
    [({"top_p": 1e-300}, 200), ({"temperature": 1e-45}, 200), ({"seed": 2**70}, 400)],
    ids=["top_p-zero-in-float32", "temperature-overflows", "seed-overflows"],
)
def test_eight_streaming_victims_and_an_attacker_over_http(vlm, attack, status):
    """Issue 14's reproduction: 8 clients streaming while the attacker sends its request 9 times."""
    live = LiveServer(vlm, ServerSettings(model_name="tiny"))
    try:
        client = live.client()
        expected = client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=16, seed=5,
                                                  temperature=0.7).choices[0].message.content  # fmt: skip

        def victim(_):
            stream = client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=16,
                                                    seed=5, temperature=0.7, stream=True)  # fmt: skip
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        def attacker(_):
            import httpx

            body = {"model": "tiny", "messages": image_message(), "max_tokens": 16, **attack}
            return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).status_code

        with ThreadPoolExecutor(17) as pool:
            victim_runs = [pool.submit(victim, i) for i in range(8)]
            attacks = [pool.submit(attacker, i) for i in range(9)]
            texts = [f.result() for f in victim_runs]
            statuses = [f.result() for f in attacks]
        assert texts == [expected] * 8
        assert statuses == [status] * 9
    finally:
        live.stop()
