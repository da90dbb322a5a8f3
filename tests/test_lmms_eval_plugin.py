"""The lmms-eval model plugin (``--model vlmkit``) against the real lmms-eval (0.7.3, installed without its
dependencies by ``make setup``; docs/evaluation.md), on a tiny random VLM.

Requests are lmms-eval's own ``Instance`` objects with the argument layout its ``ConfigurableTask.construct_requests``
builds (``api/task.py``): ``generate_until`` ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``,
``loglikelihood`` ``(context, continuation, doc_to_visual, doc_id, task, split)``; outputs are read back through
``unwrap_generation_output`` as its evaluator does. The end-to-end run of lmms-eval's CLI on a local task is
``tests/test_lmms_eval_harness.py``."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from lmms_eval.api.instance import Instance, unwrap_generation_output
from lmms_eval.api.registry import MODEL_REGISTRY
from lmms_eval.models import get_model, get_model_manifest

from conftest import compose_tiny, qwen2_config, siglip_config, solid_image
from vlmkit.api import VLM
from vlmkit.errors import ConfigError
from vlmkit.interop import lmms_eval as plugin

TASK = "tiny_yes_no"
DOCS = [
    {"image": solid_image((200, 30, 30)), "question": "Is the square red?", "answer": "yes"},
    {"image": solid_image((30, 30, 200)), "question": "Is the square red?", "answer": "no"},
    {"image": None, "question": "How many stars are there?", "answer": "3"},
]


def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def doc_to_text(doc):
    return f"<image>\n{doc['question']}\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


def build(vlm, monkeypatch, model_args="model=tiny-random", **additional):
    """What ``simple_evaluate`` does for ``--model vlmkit --model_args ...``: the class the model registry
    resolves (through vlmkit's entry point), built from the arg string plus the CLI's batch size and device."""
    import vlmkit

    monkeypatch.setattr(vlmkit, "load", lambda *a, **k: vlm)
    lm = get_model("vlmkit").create_from_arg_string(model_args, {"batch_size": "2", "device": None, **additional})
    lm.task_dict = {TASK: {"test": DOCS}}
    return lm


def requests(kind, arguments):
    return [Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})
            for i, args in enumerate(arguments)]  # fmt: skip


def test_the_plugin_registers_as_vlmkit():
    manifest = get_model_manifest("vlmkit")  # read from the lmms_eval.models entry point in pyproject.toml
    assert (manifest.model_id, manifest.simple_class_path) == ("vlmkit", "vlmkit.interop.lmms_eval.VlmkitLMM")
    assert get_model("vlmkit") is plugin.VlmkitLMM
    assert MODEL_REGISTRY["vlmkit"] is plugin.VlmkitLMM


def test_generate_until_answers_like_chat(vlm, monkeypatch):
    lm = build(vlm, monkeypatch)
    assert lm.batch_size == 2
    gen = {"until": ["\n\n"], "max_new_tokens": 6, "temperature": 0, "top_p": 1.0, "num_beams": 1,
           "do_sample": False}  # fmt: skip
    outputs = lm.generate_until(requests("generate_until", [
        (doc_to_text(doc), gen, doc_to_visual, i, TASK, "test") for i, doc in enumerate(DOCS)
    ]))  # fmt: skip
    expected = []
    for doc in DOCS:
        parts = [{"type": "image", "image": doc["image"]}] if doc["image"] is not None else []
        text = doc_to_text(doc).replace("<image>", "").strip()  # the plugin places the images itself
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
        expected.append(vlm.generate_batch([messages], max_new_tokens=6, stop=["\n\n"])[0])
    unwrapped = [unwrap_generation_output(o) for o in outputs]
    assert [text for text, _ in unwrapped] == [r.text for r in expected]
    assert [(c.input_tokens, c.output_tokens) for _, c in unwrapped] == [
        (r.prompt_tokens, r.completion_tokens) for r in expected
    ]


def test_loglikelihood_is_lmms_evals_mean_token_loss(vlm, monkeypatch):
    """The continuation's tokens after the prompt: minus the mean of the logprobs greedy generation reports for
    the same tokens, and ``is_greedy`` true for (a prefix of) the greedy continuation that tokenizes back to
    itself; lmms-eval's delimiter space before the continuation does not change it."""
    lm = build(vlm, monkeypatch)
    tokenizer = vlm.processor.tokenizer
    greedy = vlm.generate_batch([[{"role": "user", "content": "hi"}]], max_new_tokens=6, logprobs=0)[0]
    k = max(
        n
        for n in range(7)
        if tokenizer(tokenizer.decode(greedy.token_ids[:n]), add_special_tokens=False)["input_ids"]
        == greedy.token_ids[:n]
    )
    assert k >= 1  # byte-level pieces of a random model don't always tokenize back; a prefix does
    continuation = tokenizer.decode(greedy.token_ids[:k])
    outputs = lm.loglikelihood(requests("loglikelihood", [
        ("hi", continuation, doc_to_visual, 2, TASK, "test"),
        ("hi", " " + continuation, doc_to_visual, 2, TASK, "test"),
        ("hi", " purple", doc_to_visual, 2, TASK, "test"),
    ]))  # fmt: skip
    (loss, is_greedy), (spaced, spaced_greedy), (other, other_greedy) = [unwrap_generation_output(o)[0]
                                                                         for o in outputs]  # fmt: skip
    assert loss == pytest.approx(-sum(t.logprob for t in greedy.logprobs[:k]) / k, abs=1e-4) and is_greedy
    assert (spaced, spaced_greedy) == (loss, is_greedy)
    assert other > 0 and not other_greedy
    with_image = lm.loglikelihood(requests("loglikelihood", [(doc_to_text(DOCS[0]), lambda doc: doc["answer"],
                                                               doc_to_visual, 0, TASK, "test")]))  # fmt: skip
    assert unwrap_generation_output(with_image[0])[0][0] > 0


def test_a_failing_request_fails_only_itself(vlm, monkeypatch, caplog):
    lm = build(vlm, monkeypatch)
    docs = [{"image": solid_image(), "question": "Is it red?", "answer": "yes"},
            {"image": solid_image(size=(1, 40_000)), "question": "Is it red?", "answer": "yes"}]  # fmt: skip
    lm.task_dict = {TASK: {"test": docs}}
    gen = {"max_new_tokens": 3, "temperature": 0}
    outputs = lm.generate_until(requests("generate_until", [
        (doc["question"], gen, doc_to_visual, i, TASK, "test") for i, doc in enumerate(docs)
    ]))  # fmt: skip
    alone = vlm.generate_batch([[{"role": "user", "content": [{"type": "image", "image": docs[0]["image"]},
                                                              {"type": "text", "text": "Is it red?"}]}]],
                               max_new_tokens=3)[0].text  # fmt: skip
    assert [unwrap_generation_output(o)[0] for o in outputs] == [alone, ""]
    assert "tiny_yes_no/test/1 failed" in caplog.text


def test_unsupported_arguments_are_refused(vlm, monkeypatch):
    lm = build(vlm, monkeypatch)
    for gen, match in [({"num_beams": 4}, "num_beams=4"), ({"image_aspect_ratio": "pad"}, "image_aspect_ratio")]:
        with pytest.raises(ConfigError, match=match):
            lm.generate_until(requests("generate_until", [(doc_to_text(DOCS[0]), gen, doc_to_visual, 0, TASK, "test")]))
    with pytest.raises(ConfigError, match="unknown vlmkit model_args colour"):
        build(vlm, monkeypatch, "model=tiny-random,colour=red")
    with pytest.raises(ConfigError, match="batch_size='auto'"):
        build(vlm, monkeypatch, batch_size="auto")
    with pytest.raises(ConfigError, match="does not run multi-round"):
        lm.generate_until_multi_round([])
    assert plugin.generation_options({"do_sample": False, "temperature": 0.7}, 9)["temperature"] == 0.0


def test_without_lmms_eval_the_plugin_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "lmms_eval" or n.startswith("lmms_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    monkeypatch.delitem(sys.modules, "vlmkit.interop.lmms_eval")
    bare = importlib.import_module("vlmkit.interop.lmms_eval")
    with pytest.raises(ConfigError, match=r"pip install --no-deps lmms-eval==0\.7\.3"):
        bare.VlmkitLMM()
