"""The backend registry: which backend runs a folder, what a folder no backend runs is said to be, a third
backend registered like the built-in ones, and the fixes that came with the seam (export, stop ids)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import vlmkit
from conftest import clip_config, compose_tiny, llama_config, make_tokenizer
from vlmkit import cli
from vlmkit.backends import BACKENDS, BackendLoader, LoadedModel, detect_backend
from vlmkit.errors import CheckpointError, RegistryError
from vlmkit.inference.options import GenerationOptions, GenerationResult
from vlmkit.inference.rows import StreamEvent
from vlmkit.models.compose import save_pretrained


def test_each_folder_goes_to_its_backend(tmp_path):
    from test_hf_backend import build_qwen2_vl

    build_qwen2_vl(tmp_path / "qwen")
    save_pretrained(*compose_tiny(), tmp_path / "native")
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert detect_backend(tmp_path / "qwen") == "transformers"
    assert detect_backend(tmp_path / "native") == "vlmkit"
    assert detect_backend(tmp_path / "llava") == "llava-hf"
    (tmp_path / "ov").mkdir()
    (tmp_path / "ov" / "config.json").write_text(json.dumps({"vlmkit_runtime": "openvino", "format_version": 1}))
    assert detect_backend(tmp_path / "ov") == "openvino"  # before "vlmkit", whatever else config.json says
    assert set(BACKENDS.names()) >= {"vlmkit", "llava-hf", "transformers", "openvino"}


def test_a_custom_code_model_is_named_as_such(tmp_path):
    folder = tmp_path / "phi35"
    folder.mkdir()
    config = {"model_type": "phi3_v", "auto_map": {"AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'phi3_v' is a custom-code model.*trust_remote_code"):
        vlmkit.load(str(folder))


def test_a_text_only_lm_is_named_as_such(tmp_path):
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="text-only language model; compose it"):
        vlmkit.load(str(tmp_path / "lm"))


def test_unknown_names_list_the_built_in_models():
    with pytest.raises(CheckpointError, match="default, tiny-random"):
        vlmkit.load("no-such-model")
    with pytest.raises(RegistryError, match="valid names: .*transformers"):
        BACKENDS.get("tensorrt")


class EchoEngine:
    """A third backend: it answers every prompt with the prompt's own last user text."""

    capabilities = frozenset()
    context_length = 1000

    def __init__(self, processor):
        self.processor = processor
        self.stop_ids = {0}

    def _text(self, conversation):
        content = conversation[-1]["content"]
        return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)

    def encode(self, conversation, name="request"):
        return conversation

    def generate(self, conversations, options):
        return [GenerationResult(self._text(c), "stop", 1, 1) for c in conversations]

    def stream_batch(self, conversations, options):
        for i, result in enumerate(self.generate(conversations, options)):
            yield StreamEvent(i, result.text, result)

    def new_batch(self):
        raise NotImplementedError


def test_a_third_backend_is_one_registration(tmp_path, monkeypatch):
    folder = tmp_path / "echo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"echo": True}))

    class Processor:
        tokenizer = make_tokenizer()
        image_access = None
        max_pixels = None

    def load(path, device, dtype):
        return LoadedModel(None, Processor(), EchoEngine(Processor()))

    loader = BackendLoader(lambda path, config: config.get("echo") is True, load, priority=5)
    with BACKENDS.temporary("echo", loader):
        vlm = vlmkit.load(str(folder), device="cpu")
        assert vlm.chat("hello there") == "hello there"
        assert "".join(vlm.stream("streamed")) == "streamed"


def test_exporting_a_transformers_model_says_why_not(tmp_path, capsys):
    from test_hf_backend import build_qwen2_vl

    build_qwen2_vl(tmp_path / "qwen")
    code = cli.main(["export", "--model", str(tmp_path / "qwen"), "--to", "hf-llava", str(tmp_path / "out")])
    assert code != 0
    err = capsys.readouterr().err
    assert "can't be exported" in err and "HFEngine" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_end_of_sequence_id_of_the_lm_stops(tmp_path):
    """Llama 3 lists three end-of-sequence ids in its generation config; each must end a row, also after saving."""
    lm = LlamaForCausalLM(llama_config())
    lm.generation_config.eos_token_id = [7, 8, 9]
    lm.save_pretrained(tmp_path / "llama3ish")
    torch.manual_seed(0)
    composed = vlmkit.compose(clip_config(), str(tmp_path / "llama3ish"), "mlp2x_gelu", tokenizer=make_tokenizer())
    save_pretrained(*composed, tmp_path / "vlm")
    for vlm in (vlmkit.api.VLM(*composed), vlmkit.load(str(tmp_path / "vlm"), device="cpu")):
        assert {7, 8, 9} <= vlm.engine.stop_ids
        conversation = [{"role": "user", "content": "hi"}]
        first = vlm.engine.generate([conversation], GenerationOptions(max_new_tokens=3))[0].token_ids[0]
        if first not in (7, 8, 9):  # make the model's first choice one of the three: it must stop there
            with torch.no_grad():
                head = vlm.model.language_model.get_output_embeddings().weight
                head[[8, first]] = head[[first, 8]]
        result = vlm.engine.generate([conversation], GenerationOptions(max_new_tokens=3))[0]
        assert result.finish_reason == "stop" and result.completion_tokens == 1


def test_training_resolves_model_names_as_every_command_does(tmp_path):
    from test_hf_backend import build_qwen2_vl
    from vlmkit.training.model import _load_checkpoint

    build_qwen2_vl(tmp_path / "qwen")
    with pytest.raises(CheckpointError, match="runs on a backend vlmkit can't train \\(HFEngine\\)"):
        _load_checkpoint(str(tmp_path / "qwen"))
    save_pretrained(*compose_tiny(), tmp_path / "native")
    model, processor = _load_checkpoint(str(tmp_path / "native"))
    assert type(model).__name__ == "VisionLanguageModel" and processor.tokens_per_image == 16
    with pytest.raises(CheckpointError, match="unknown model 'nope'"):
        _load_checkpoint("nope")
