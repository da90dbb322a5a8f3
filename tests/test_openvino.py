"""The OpenVINO export and backend: export, detection, parity with the PyTorch model, every command, release.

The backend contract itself runs on OpenVINO in test_backend_contract.py; this file checks what is OpenVINO's own.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
pytest.importorskip("nncf", reason="the [openvino] extra is not installed")

import vlmkit
from conftest import compose_tiny, image_turn, llama_config, make_tokenizer, qwen2_config, siglip_config
from test_engine import CONVERSATIONS
from vlmkit.api import VLM
from vlmkit.backends import detect_backend
from vlmkit.cli import main
from vlmkit.errors import ConfigError
from vlmkit.inference.options import GenerationOptions
from vlmkit.interop.openvino_export import export_openvino

MULTI_TURN = [
    image_turn("Describe the image.", 1, (0, 0, 255)),
    {"role": "assistant", "content": "A blue square."},
    {"role": "user", "content": "And the colour of the circle?"},
]


@pytest.fixture(scope="module")
def native() -> VLM:
    torch.manual_seed(0)
    return VLM(*compose_tiny(siglip_config(), qwen2_config(initializer_range=0.3)))


@pytest.fixture(scope="module")
def folder(native, tmp_path_factory):
    return export_openvino(native.model, native.processor, tmp_path_factory.mktemp("ov") / "fp32")


@pytest.fixture(scope="module")
def ov(folder) -> VLM:
    return vlmkit.load(str(folder))


def test_the_folder_is_three_models_and_loads_as_its_own_backend(folder, ov):
    for name in ("openvino_vision_embeddings_model", "openvino_text_embeddings_model", "openvino_language_model"):
        assert (folder / f"{name}.xml").is_file() and (folder / f"{name}.bin").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["vlmkit_runtime"] == "openvino" and config["weights"] == "fp32"
    assert detect_backend(folder) == "openvino"
    assert type(ov.engine).__name__ == "OpenVINOEngine" and ov.engine.capabilities == frozenset()
    # the KV cache is state of the compiled LM, not inputs and outputs
    assert [i.get_any_name() for i in ov.model.lm.inputs] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert [o.get_any_name() for o in ov.model.lm.outputs] == ["logits"]


def test_greedy_outputs_equal_the_pytorch_model(native, ov):
    options = GenerationOptions(max_new_tokens=24)
    conversations = [*CONVERSATIONS, MULTI_TURN]
    expected = native.engine.generate(conversations, options)
    got = ov.engine.generate(conversations, options)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [(r.text, r.finish_reason, r.prompt_tokens) for r in got] == [
        (r.text, r.finish_reason, r.prompt_tokens) for r in expected
    ]


def test_options_and_multi_turn_behave_as_on_the_native_backend(native, ov):
    sampled = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=3)
    assert ov.chat(MULTI_TURN, **sampled) == native.chat(MULTI_TURN, **sampled)
    base = native.chat(CONVERSATIONS[0], max_new_tokens=20)
    stop = base[len(base) // 2 :][:2]
    assert ov.chat(CONVERSATIONS[0], max_new_tokens=20, stop=[stop]) == native.chat(
        CONVERSATIONS[0], max_new_tokens=20, stop=[stop]
    )
    assert "".join(ov.stream(MULTI_TURN, max_new_tokens=15)) == native.chat(MULTI_TURN, max_new_tokens=15)
    n = ov.engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=6, temperature=1.0, seed=1, n=3))
    assert [r.choice for r in n] == [0, 1, 2]
    assert [r.token_ids for r in n] == [
        r.token_ids
        for r in native.engine.generate(CONVERSATIONS[:1], GenerationOptions(max_new_tokens=6, temperature=1.0,
                                                                               seed=1, n=3))
    ]  # fmt: skip


@pytest.mark.slow
def test_int8_and_int4_weights_from_the_command_line(native, folder, tmp_path):
    from vlmkit.models.compose import save_pretrained

    save_pretrained(native.model, native.processor, tmp_path / "src")
    sizes = {"fp32": sum(f.stat().st_size for f in folder.glob("*.bin"))}
    for weights in ("int8", "int4"):
        out = tmp_path / weights
        assert main(["export", "--model", str(tmp_path / "src"), "--to", "openvino", "--weights", weights,
                     str(out)]) == 0  # fmt: skip
        assert json.loads((out / "config.json").read_text())["weights"] == weights
        sizes[weights] = sum(f.stat().st_size for f in out.glob("*.bin"))
        vlm = vlmkit.load(str(out))
        result = vlm.engine.generate(CONVERSATIONS[:2], GenerationOptions(max_new_tokens=8))
        assert all(r.completion_tokens == 8 or r.finish_reason == "stop" for r in result)
        vlm.close()
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] * 0.6


def test_what_the_export_refuses(native, folder, tmp_path, capsys):
    from vlmkit.config import ViewsConfig

    torch.manual_seed(0)
    anyres = VLM(*compose_tiny(views=ViewsConfig("anyres")))
    with pytest.raises(ConfigError, match="supports the 'single' image views.*'anyres'"):
        export_openvino(anyres.model, anyres.processor, tmp_path / "anyres")
    assert not (tmp_path / "anyres").exists()
    with pytest.raises(ConfigError, match="weights must be one of fp32, int8, int4"):
        export_openvino(native.model, native.processor, tmp_path / "x", weights="int2")  # type: ignore[arg-type]
    assert main(["export", "--model", str(folder), "--to", "openvino", str(tmp_path / "again")]) != 0
    assert "OpenVINO export already" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-random", "--to", "hf-llava", "--weights", "int8", str(tmp_path / "y")]) != 0
    assert "--weights int8 is for --to openvino" in capsys.readouterr().err


def test_without_openvino_the_error_says_what_to_install(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino → ImportError
    with pytest.raises(ConfigError, match=r"pip install 'vlmkit\[openvino\]'"):
        vlmkit.load(str(folder))


def test_chat_describe_and_eval_commands_run_the_folder(folder, native, tmp_path, capsys):
    image = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (0, 0, 255)).save(image)
    assert main(["chat", "--model", str(folder), "--image", str(image), "--max-new-tokens", "10", "What colour?"]) == 0
    expected = native.chat("What colour?", images=[str(image)], max_new_tokens=10)
    assert capsys.readouterr().out.strip() == expected.strip()
    out = tmp_path / "descriptions.jsonl"
    assert main(["describe", str(image), "--model", str(folder), "--out", str(out), "--max-new-tokens", "8",
                 "--quiet"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["error"] is None
    assert rows[0]["text"] == native.chat("Describe the image.", images=[str(image)], max_new_tokens=8)
    report = tmp_path / "eval"
    assert main(["eval", "--model", str(folder), "--suite", "shapesworld", "--n", "3", "--max-new-tokens", "8",
                 "--quiet", "--out", str(report)]) == 0  # fmt: skip
    assert (report / "report.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_command_runs_the_folder(folder, native):
    import httpx

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "vlmkit", "serve", "--model", str(folder), "--port", str(port), "--no-ui"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        body = {"model": str(folder), "messages": [{"role": "user", "content": "How many stars are there?"}],
                "max_tokens": 10, "temperature": 0}  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        assert response.status_code == 200, response.text
        expected = native.chat("How many stars are there?", max_new_tokens=10)
        assert response.json()["choices"][0]["message"]["content"] == expected
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as streamed:  # fmt: skip
            text = ""
            for line in streamed.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0].get("delta", {})
                    text += delta.get("content") or ""
        assert text == expected
    finally:
        server.terminate()
        server.wait(30)


# -- release --------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A ~190 MB (fp32) model saved natively and exported to OpenVINO."""
    from transformers import LlamaConfig, SiglipVisionConfig

    from vlmkit.models.compose import compose, save_pretrained

    root = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                image_size=64, patch_size=16)  # fmt: skip
    lm = LlamaConfig(vocab_size=420, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)  # fmt: skip
    model, processor = compose(vision, lm, "mlp2x_gelu", tokenizer=make_tokenizer())
    megabytes = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    save_pretrained(model, processor, root / "native")
    export_openvino(model, processor, root / "openvino")
    del model, processor
    gc.collect()
    return root, megabytes


MEASURE = """
import gc, json, sys
import vlmkit
import vlmkit.api, vlmkit.backends, vlmkit.backends.openvino  # libraries in memory before "before"
import openvino, torch, transformers  # noqa
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
gc.collect()
before = rss()
with vlmkit.load(sys.argv[1], device="cpu") as vlm:
    vlm.chat("hi", max_new_tokens=4)
    loaded = rss()
gc.collect()
after = rss()
try:
    vlm.chat("hi")
    closed = False
except vlmkit.ConfigError as exc:
    closed = "was closed" in str(exc)
vlm.close()  # a second close does nothing
print(json.dumps({"before": before, "loaded": loaded, "after": after, "closed": closed}))
"""


@pytest.mark.parametrize("kind", ["native", "openvino"])
def test_close_returns_the_memory(big, kind):
    """Measured in a fresh process: in the test process, memory freed by earlier tests would be reused."""
    import json
    import subprocess
    import sys

    root, megabytes = big
    assert megabytes > 150
    out = subprocess.run([sys.executable, "-c", MEASURE, str(root / kind)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout  # fmt: skip
    m = json.loads(out.strip().splitlines()[-1])
    before, loaded, after = m["before"], m["loaded"], m["after"]
    assert loaded - before > 0.8 * megabytes, m  # the weights are really in memory
    assert after - before < 0.25 * (loaded - before), m  # and they went back
    assert m["closed"]


def test_close_releases_the_compiled_models(folder):
    vlm = vlmkit.load(str(folder))
    model = vlm.model
    vlm.close()
    assert model.closed and not hasattr(model, "lm") and not hasattr(model, "core")


def test_an_lm_with_untied_head_and_llama_layers_matches_too(tmp_path):
    torch.manual_seed(1)
    native = VLM(*compose_tiny(lm=llama_config(initializer_range=0.3)))
    ov = vlmkit.load(str(export_openvino(native.model, native.processor, tmp_path / "llama")))
    options = GenerationOptions(max_new_tokens=16)
    assert [r.token_ids for r in ov.engine.generate(CONVERSATIONS, options)] == [
        r.token_ids for r in native.engine.generate(CONVERSATIONS, options)
    ]


def test_the_seed_004_pipeline_over_the_export(folder, native):
    from transformers import TextStreamer

    pipe = vlmkit.pipeline("image-text-to-text", model=str(folder))
    pipe.generation_config.max_new_tokens = None
    messages = [image_turn("Describe the image.", 1, (0, 0, 255))]
    printed = []

    class Keep(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    out = pipe(text=messages, generate_kwargs={"max_length": 80, "streamer": Keep(tokenizer=pipe.tokenizer,
               skip_prompt=False), "repetition_penalty": 1.1})  # fmt: skip
    expected = native.chat(messages, max_length=80, repetition_penalty=1.1)
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": expected}
    assert "".join(printed).startswith(pipe.tokenizer.decode(native.engine.encode(messages).input_ids))
    runtime = pipe.model.model
    pipe.model.dispose()
    assert runtime.closed
