"""The 77-token budget (issue 17): CLIP's tokenizer shipped offline, counted as Stable Diffusion's text encoder
counts; generation stopped at the budget and trimmed back to the last complete clause; clear errors offline."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from PIL import Image

from clip_reference import SimpleTokenizer
from vlmkit.api import VLM
from vlmkit.cli import main
from vlmkit.errors import ConfigError
from vlmkit.inference.budget import BudgetCounter, clause_ends, resolve_budget_tokenizer, trim_to_clause
from vlmkit.inference.describe import describe
from vlmkit.inference.options import GenerationResult
from vlmkit.inference.rows import StreamEvent
from vlmkit.processing.clip_tokenizer import CLIP_CONTEXT, clip_tokenizer, read_merges

LONG = ("A sleek crimson coupe with chrome rims, parked by the sea at dusk; its headlights glowing softly and the sky "
        "turning violet. ") * 3  # fmt: skip
# (text, count) as open_clip_torch 3.3.0's own SimpleTokenizer counts them, start and end tokens included
FIXED = [
    ("a red sports car", 6),
    ("A photo of a dog.", 8),
    ("Ünïcödé façade — naïve café 東京 👍 emoji test", 23),
    ("Hello, world! It's 3.14... (ok) [x] {y} #tag @me 50% off: $9.99", 36),
    ("don't you're I'll we've THEY'D", 12),
    ("  many   spaces\n\tand a newline ", 8),
    (LONG, 77),
]


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, verbose=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ the tokenizer


def test_the_shipped_vocabulary_is_clips(clip):
    assert len(clip) == 49408 and clip.bos_token_id == 49406 and clip.eos_token_id == 49407
    assert ids(clip, "a red sports car") == [49406, 320, 736, 2054, 1615, 49407]  # open_clip's ids
    assert len(read_merges()) == 48894 and CLIP_CONTEXT == 77


@pytest.mark.parametrize("text, count", FIXED)
def test_counts_equal_the_reference_tokenizer_on_fixed_strings(clip, reference, text, count):
    assert len(ids(clip, text)) == count
    assert ids(clip, text) == [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]


def test_counts_equal_the_reference_on_random_texts(clip, reference):
    rng = random.Random(17)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:!?'-()/%$#@éüñçøåß東京한국😀 \n\t"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 160)))
        assert ids(clip, text) == [reference.sot_token_id, *reference.encode(text), reference.eot_token_id], text


def test_counts_equal_transformers_clip_tokenizer_loaded_from_a_hub_layout_folder(clip, tmp_path):
    """openai/clip-vit-large-patch14's tokenizer folder (vocab.json + merges.txt), loaded as diffusers loads it."""
    from transformers import AutoTokenizer

    merges = read_merges()
    (tmp_path / "vocab.json").write_text(json.dumps(clip.get_vocab()), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                                "model_max_length": 77}))  # fmt: skip
    hub = AutoTokenizer.from_pretrained(tmp_path)
    for text, _ in [*FIXED, ("“curly quotes” and &amp; entities", 0)]:
        assert ids(hub, text) == ids(clip, text)


def test_where_the_two_references_differ_vlmkit_counts_as_transformers_does(clip, reference):
    """open_clip runs ftfy and HTML unescaping first (curly quotes → straight, &amp; → &); transformers'
    CLIPTokenizer (Stable Diffusion's, through diffusers) does not. vlmkit counts what transformers counts."""
    text = "“curly quotes” and &amp; entities"
    assert len(ids(clip, text)) == 13 and reference.count(text) == 9


# ------------------------------------------------------------------------------------------------ clauses


def test_clause_boundaries():
    text = 'A red car, parked by the sea; its lights on. The word "cat", and a dog at 3.5 m for $1,000 and white'
    ends = clause_ends(text)
    assert [text[:e] for e in ends] == ["A red car,", "A red car, parked by the sea;",
                                        "A red car, parked by the sea; its lights on.",
                                        'A red car, parked by the sea; its lights on. The word "cat",']  # fmt: skip
    assert all(not text[:e].endswith(("3", "3.", "$1,")) for e in ends)  # 3.5 and 1,000 are not boundaries
    assert clause_ends("a red and white car and the sky") == [len("a red and white car")]  # "and the": a new phrase
    assert clause_ends("Done!) Next") == [len("Done!)")]


def test_trim_to_clause_keeps_the_longest_complete_clause_that_fits(clip):
    text = "A red sports car, parked on a wet street at night, neon lights on the hood and a city skyline behind it."
    counter = BudgetCounter(clip, 77)
    assert trim_to_clause(text, counter) == (text, None)
    for budget, expected in [(20, "A red sports car, parked on a wet street at night, neon lights on the hood"),
                             (14, "A red sports car, parked on a wet street at night"),
                             (8, "A red sports car")]:  # fmt: skip
        cut, how = trim_to_clause(text, BudgetCounter(clip, budget))
        assert (cut, how) == (expected, "clause") and len(ids(clip, cut)) <= budget
        longer = [text[:e].rstrip(",;: ") for e in clause_ends(text) if len(text[:e].rstrip(",;: ")) > len(cut)]
        assert len(ids(clip, longer[0])) > budget  # the next clause would not fit
    assert trim_to_clause(text, BudgetCounter(clip, 5)) == ("A red sports", "word")  # no clause fits
    # an incomplete text (stopped at the budget) is trimmed even when it fits; a finished clause at its end counts
    assert trim_to_clause("A red car, parked by", counter, complete=False) == ("A red car", "clause")
    assert trim_to_clause("A red car. A blue", counter, complete=False) == ("A red car.", "clause")
    with pytest.raises(ConfigError, match="more than 2 tokens"):
        BudgetCounter(clip, 2)


def test_exhausted_counts_complete_words_only(clip):
    counter = BudgetCounter(clip, 6)  # 4 words + start and end
    assert not counter.exhausted("a red sports car")  # the last word may still grow: not judged
    assert not counter.exhausted("a red sports car par")
    assert counter.exhausted("a red sports car parked ")


# ------------------------------------------------------------------------------------------------ resolution


def test_budget_tokenizer_names_resolve_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_budget_tokenizer("clip") is clip_tokenizer()
    with pytest.raises(ConfigError, match=r"'openai/clip-vit-large-patch14' \(hub id\) could not be loaded: .*"
                                          r"--budget-tokenizer clip"):  # fmt: skip
        resolve_budget_tokenizer("openai/clip-vit-large-patch14")
    with pytest.raises(ConfigError, match="built-in names that work offline: clip"):
        resolve_budget_tokenizer("someone/some-tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"\(folder\) could not be loaded"):
        resolve_budget_tokenizer(str(tmp_path / "empty"))


def test_cli_describe_with_an_unloadable_budget_tokenizer_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    code = main(["describe", str(tmp_path / "a.png"), "--model", "tiny-random", "--out", str(tmp_path / "d.jsonl"),
                 "--token-budget", "77", "--budget-tokenizer", "openai/clip-vit-large-patch14"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: budget tokenizer 'openai/clip-vit-large-patch14'")
    assert not (tmp_path / "d.jsonl").exists()  # refused before any work


# ------------------------------------------------------------------------------------------------ describe


class ScriptedBatch:
    """A running batch whose every row streams ``text`` one word per step (the engine contract's add/step/cancel)."""

    def __init__(self, engine):
        self.engine = engine
        self.rows: dict[int, list[str]] = {}

    def __len__(self):
        return len(self.rows)

    def add(self, items):
        for key, _, _ in items:
            self.rows[key] = self.engine.text.split(" ")
        return []

    def step(self):
        self.engine.steps += 1
        events = []
        for key, words in list(self.rows.items()):
            word = words.pop(0)
            piece = word if not words else word + " "
            if words:
                events.append(StreamEvent(key, piece))
            else:
                del self.rows[key]
                events.append(StreamEvent(key, piece, GenerationResult(self.engine.text, "stop", 1, 1)))
        return events

    def cancel(self, keys):
        for key in keys:
            self.rows.pop(key, None)


class ScriptedEngine:
    def __init__(self, text):
        self.text, self.steps = text, 0
        self.processor = SimpleNamespace(max_pixels=None, tokenizer=clip_tokenizer())

    def encode(self, conversation, name="request"):
        return conversation

    def new_batch(self):
        return ScriptedBatch(self)


def test_describe_stops_generating_at_the_budget_and_keeps_whole_clauses(tmp_path):
    text = ("A red sports car, parked on a wet street at night, neon lights on the hood and a city skyline "
            "behind it, rain on the glass, a dog watching from a doorway.")  # fmt: skip
    engine = ScriptedEngine(text)
    vlm = VLM(None, engine.processor, name="scripted", engine=engine)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "d.jsonl"
    describe(vlm, [tmp_path], out, token_budget=14, budget_tokenizer=clip_tokenizer(), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A red sports car, parked on a wet street at night"] * 3
    assert all(r["cut"] == "clause" and r["tokens"] == 14 for r in rows)
    assert engine.steps < len(text.split()) // 2  # generation stopped long before the text's end
    # a text that fits is kept whole, and generation runs to its end
    engine2 = ScriptedEngine("A red sports car.")
    vlm2 = VLM(None, engine2.processor, name="scripted", engine=engine2)
    describe(vlm2, [tmp_path / "img0.png"], tmp_path / "e.jsonl", token_budget=77, progress=False)
    row = json.loads((tmp_path / "e.jsonl").read_text())
    assert (row["text"], row["cut"], row["tokens"]) == ("A red sports car.", None, 7)


def test_describe_budget_with_a_real_model_never_passes_it(tmp_path):
    from conftest import compose_tiny

    vlm = VLM(*compose_tiny())
    for i in range(3):
        Image.new("RGB", (20 + i, 16), (i * 60, 90, 200)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "d.jsonl"
    describe(vlm, [tmp_path], out, max_new_tokens=40, token_budget=10, budget_tokenizer=clip_tokenizer(),
             progress=False)  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["error"] is None and r["tokens"] <= 10 for r in rows)
    assert all(r["tokens"] == len(ids(clip_tokenizer(), r["text"])) for r in rows)
