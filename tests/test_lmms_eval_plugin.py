"""The lmms-eval model plugin (``--model vlmkit``) on a local task fixture.

lmms-eval 0.7.3 can't be installed next to vlmkit's pinned torch (``pip install --dry-run lmms-eval`` would
replace torch 2.13.0 with 2.14.1 and add CUDA wheels), so this test runs the plugin against a minimal stand-in
of the interface it documents (lmms_eval 0.7.3's ``api/model.py``: ``lmms``, ``api/registry.py``:
``register_model`` / ``MODEL_REGISTRY``, ``api/instance.py``: ``Instance.args``, ``models/registry_v2.py``:
``ModelManifest``), calling it the way lmms-eval's ``evaluator.py`` does: ``lm.task_dict[task][split][doc_id]``
docs, ``generate_until`` args ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and
``loglikelihood`` args ``(context, continuation, doc_to_visual, doc_id, task, split)``."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from conftest import compose_tiny, qwen2_config, siglip_config, solid_image
from vlmkit.api import VLM
from vlmkit.errors import ConfigError

STAND_IN = {
    "lmms_eval/__init__.py": "",
    "lmms_eval/api/__init__.py": "",
    "lmms_eval/models/__init__.py": "",
    "lmms_eval/api/model.py": """
        import abc

        class CacheHook:
            def __init__(self, _):
                self.calls = []

            def add_partial(self, kind, args, result):
                self.calls.append((kind, args, result))

        class lmms(abc.ABC):
            def __init__(self):
                self._rank, self._world_size = 0, 1
                self.cache_hook = CacheHook(None)
                self.task_dict = {}

            @abc.abstractmethod
            def loglikelihood(self, requests): ...

            @abc.abstractmethod
            def generate_until(self, requests): ...

            @abc.abstractmethod
            def generate_until_multi_round(self, requests): ...

            @classmethod
            def create_from_arg_string(cls, arg_string, additional_config=None):
                args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
                return cls(**args, **(additional_config or {}))
    """,
    "lmms_eval/api/registry.py": """
        from lmms_eval.api.model import lmms

        MODEL_REGISTRY = {}

        def register_model(*names):
            def decorate(cls):
                for name in names:
                    assert issubclass(cls, lmms)
                    MODEL_REGISTRY[name] = cls
                return cls
            return decorate
    """,
    "lmms_eval/api/instance.py": """
        from dataclasses import dataclass, field

        @dataclass
        class Instance:
            request_type: str
            arguments: tuple
            idx: int
            metadata: dict = field(default_factory=dict)

            @property
            def args(self):
                return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)
    """,
    "lmms_eval/models/registry_v2.py": """
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class ModelManifest:
            model_id: str
            simple_class_path: str | None = None
            chat_class_path: str | None = None
    """,
}

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


@pytest.fixture
def lmms_eval(tmp_path, monkeypatch):
    for relative, source in STAND_IN.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "lmms_eval" or n.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "vlmkit.interop.lmms_eval", raising=False)
    plugin = importlib.import_module("vlmkit.interop.lmms_eval")
    yield plugin
    for name in [n for n in sys.modules if n.startswith(("lmms_eval", "vlmkit.interop.lmms_eval"))]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


def build(plugin, vlm, monkeypatch, **args):
    """``lmms-eval --model vlmkit --model_args ...``: the registry's class, built from the arg string."""
    from lmms_eval.api.registry import MODEL_REGISTRY

    import vlmkit

    monkeypatch.setattr(vlmkit, "load", lambda *a, **k: vlm)
    arg_string = ",".join(f"{k}={v}" for k, v in {"model": "tiny-random", **args}.items())
    lm = MODEL_REGISTRY["vlmkit"].create_from_arg_string(arg_string)
    lm.task_dict = {TASK: {"test": DOCS}}
    return lm


def requests(kind, arguments):
    from lmms_eval.api.instance import Instance

    return [Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})
            for i, args in enumerate(arguments)]  # fmt: skip


def test_the_plugin_registers_as_vlmkit(lmms_eval):
    from lmms_eval.api.registry import MODEL_REGISTRY

    assert MODEL_REGISTRY["vlmkit"] is lmms_eval.VlmkitLMM
    manifest = lmms_eval.manifest()
    assert (manifest.model_id, manifest.simple_class_path) == ("vlmkit", "vlmkit.interop.lmms_eval.VlmkitLMM")


def test_generate_until_answers_like_chat(lmms_eval, vlm, monkeypatch):
    lm = build(lmms_eval, vlm, monkeypatch, batch_size=2)
    gen = {"until": ["\n\n"], "max_new_tokens": 6, "temperature": 0, "top_p": 1.0, "num_beams": 1,
           "do_sample": False}  # fmt: skip
    answers = lm.generate_until(requests("generate_until", [
        (doc_to_text(doc), gen, doc_to_visual, i, TASK, "test") for i, doc in enumerate(DOCS)
    ]))  # fmt: skip
    expected = []
    for doc in DOCS:
        parts = [{"type": "image", "image": doc["image"]}] if doc["image"] is not None else []
        text = doc_to_text(doc).replace("<image>", "").strip()  # the plugin places the images itself
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
        expected.append(vlm.chat(messages, max_new_tokens=6, stop=["\n\n"]))
    assert answers == expected
    assert [call[2] for call in lm.cache_hook.calls] == answers


def test_loglikelihood_is_the_continuations_logprob(lmms_eval, vlm, monkeypatch):
    """The continuation's tokens after the prompt: the sum of the logprobs greedy generation reports for the
    same tokens, and ``is_greedy`` true for (a prefix of) the greedy continuation that tokenizes back to itself."""
    lm = build(lmms_eval, vlm, monkeypatch)
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
    (total, is_greedy), (other, other_greedy) = lm.loglikelihood(requests("loglikelihood", [
        ("hi", continuation, doc_to_visual, 2, TASK, "test"),
        ("hi", " purple", doc_to_visual, 2, TASK, "test"),
    ]))  # fmt: skip
    assert total == pytest.approx(sum(t.logprob for t in greedy.logprobs[:k]), abs=1e-4) and is_greedy
    assert other < 0 and not other_greedy
    with_image = lm.loglikelihood(requests("loglikelihood", [(doc_to_text(DOCS[0]), " yes", doc_to_visual, 0, TASK,
                                                               "test")]))  # fmt: skip
    assert with_image[0][0] < 0


def test_unsupported_generation_kwargs_are_refused(lmms_eval, vlm, monkeypatch):
    lm = build(lmms_eval, vlm, monkeypatch)
    for gen, match in [({"num_beams": 4}, "num_beams=4"), ({"image_aspect_ratio": "pad"}, "image_aspect_ratio")]:
        with pytest.raises(ConfigError, match=match):
            lm.generate_until(requests("generate_until", [(doc_to_text(DOCS[0]), gen, doc_to_visual, 0, TASK, "test")]))
    with pytest.raises(ConfigError, match="unknown vlmkit model_args colour"):
        build(lmms_eval, vlm, monkeypatch, colour="red")
    assert lmms_eval.generation_options({"do_sample": False, "temperature": 0.7}, 9)["temperature"] == 0.0


def test_without_lmms_eval_the_plugin_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # an import of it fails
    monkeypatch.delitem(sys.modules, "vlmkit.interop.lmms_eval", raising=False)
    plugin = importlib.import_module("vlmkit.interop.lmms_eval")
    try:
        with pytest.raises(ConfigError, match="pip install lmms-eval"):
            plugin.VlmkitLMM()
    finally:
        sys.modules.pop("vlmkit.interop.lmms_eval", None)
