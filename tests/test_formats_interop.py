"""Other tools' artefacts read as they are: LLaVA / qresearch ``mm_projector.bin`` projector checkpoints, and
every grounding box (with its ``<ref>`` label) of Qwen-VL-style answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose_tiny
from vlmkit.data.grounding import LabeledBox, format_boxes, parse_boxes
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.evaluation.metrics import parse_box
from vlmkit.interop.llava_projector import import_mm_projector, read_mm_projector
from vlmkit.training import load_config

# ----------------------------------------------------------------------------------------- mm_projector.bin


class ProjectionModule(nn.Module):
    """qresearch/llama-3-vision-alpha's projector (seed 001, its ``__main__.py``): Linear, GELU, Linear."""

    def __init__(self, mm_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(mm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _dims(model) -> tuple[int, int]:
    return model.vision_tower.hidden_size, model.language_model.config.hidden_size


def _llava_state(module: nn.Module, prefix: str = "model.mm_projector.") -> dict[str, torch.Tensor]:
    """``module``'s weights under LLaVA's ``mm_projector.bin`` keys (``model.mm_projector.0.weight``, ...), fp16
    as LLaVA saves them."""
    inner = module.model if isinstance(module, ProjectionModule) else module
    return {prefix + k: v.detach().half().clone() for k, v in inner.state_dict().items()}


def test_llava_mm_projector_bin_loads_as_the_projector(tmp_path):
    """LLaVA's pretraining output ``mm_projector.bin`` (haotian-liu/LLaVA ``train.py``, ``tune_mm_mlp_adapter``):
    a torch state dict keyed ``model.mm_projector.0.weight``, ``.0.bias``, ``.2.weight``, ``.2.bias`` (fp16), the
    layout of qresearch's llama-3-vision-alpha file (seed 001). ``load_projector`` takes the file or its folder;
    the model's projector then computes what the qresearch module computes."""
    model, _ = compose_tiny()
    reference = ProjectionModule(*_dims(model))
    (tmp_path / "alpha").mkdir()
    torch.save(_llava_state(reference), tmp_path / "alpha" / "mm_projector.bin")
    meta, state = read_mm_projector(tmp_path / "alpha" / "mm_projector.bin")
    assert meta["name"] == "mlp2x_gelu" and (meta["in_features"], meta["out_features"]) == _dims(model)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    model.load_projector(tmp_path / "alpha")
    features = torch.randn(2, 5, _dims(model)[0])
    expected = ProjectionModule(*_dims(model))
    expected.model.load_state_dict({k: v.float() for k, v in reference.model.state_dict().items()})
    for param in expected.parameters():
        param.data = param.data.half().float()  # the file holds fp16 weights
    assert torch.allclose(model.projector(features), expected(features), atol=1e-6)
    other, _ = compose_tiny()
    other.load_projector(tmp_path / "alpha" / "mm_projector.bin")
    assert torch.equal(other.projector[0].weight, model.projector[0].weight)


def test_mm_projector_key_layouts_and_import(tmp_path):
    """The other layouts LLaVA forks write: ``mm_projector.N`` without ``model.``, a LoRA run's
    ``non_lora_trainables.bin`` (``base_model.model.model.mm_projector.N``) and the ``linear`` projector
    (``model.mm_projector.weight``); :func:`import_mm_projector` writes a vlmkit projector folder."""
    model, _ = compose_tiny()
    three = nn.Sequential(*[nn.Linear(_dims(model)[0], 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)])
    torch.save(_llava_state(three, "base_model.model.model.mm_projector."), tmp_path / "non_lora_trainables.bin")
    meta, _ = read_mm_projector(tmp_path / "non_lora_trainables.bin")
    assert meta["name"] == "mlp3x_gelu" and meta["out_features"] == 8
    linear = nn.Linear(*_dims(model))
    torch.save(_llava_state(linear), tmp_path / "linear.bin")
    folder = import_mm_projector(tmp_path / "linear.bin", tmp_path / "imported")
    model.load_projector(folder)
    assert model.config.projector.name == "linear"
    assert torch.equal(model.projector.weight, linear.weight.detach().half().float())
    torch.save(_llava_state(three, "mm_projector."), tmp_path / "wide.bin")
    with pytest.raises(ConfigError, match=r"maps \d+ → 8, but this model needs"):
        model.load_projector(tmp_path / "wide.bin")
    torch.save({"model.mm_projector.1.weight": torch.zeros(2, 2)}, tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match="expected LLaVA's mlpNx_gelu"):
        read_mm_projector(tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match="or LLaVA's mm_projector.bin"):
        model.load_projector(tmp_path / "nothing-here")


def test_a_recipe_takes_an_mm_projector_bin(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {vision: a, lm: b, projector_checkpoint: alpha/mm_projector.bin}\n"
        "stages: [{data: [{path: d.parquet, split: train, columns: {q: question}, llava_compat: off}]}]\n"
        "output_dir: out\n"
    )
    config = load_config(recipe)
    assert config.model.projector_checkpoint == "alpha/mm_projector.bin"
    source = config.stages[0].data[0]
    assert (source.split, source.columns, source.llava_compat) == ("train", {"q": "question"}, False)  # YAML's off


# ------------------------------------------------------------------------------------------ grounding boxes


def test_qwen_vl_answers_give_every_box_with_its_ref():
    """Qwen-VL's grounding text (its README / tokenizer: ``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``, corners in
    [0, 1000)) and ms-swift's Qwen2-VL grounding examples (``Custom-dataset.md``, "Grounding"): two objects in
    one answer, and two boxes for one ``<ref>``."""
    two = ("<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)<|box_end|> and "
           "<|object_ref_start|>a woman<|object_ref_end|><|box_start|>(451,381),(733,793)<|box_end|> are playing "
           "on the beach")  # fmt: skip
    assert parse_boxes(two, 1000, 500) == [
        LabeledBox("a dog", (221.0, 211.5, 569.0, 443.0)),
        LabeledBox("a woman", (451.0, 190.5, 733.0, 396.5)),
    ]
    sheep = "<ref>sheep</ref><box>(101,201),(150,266)</box><box>(401,601),(550,666)</box>"
    boxes = parse_boxes(sheep, 1000, 1000)
    assert [b.label for b in boxes] == ["sheep", "sheep"] and boxes[1].box == (401.0, 601.0, 550.0, 666.0)
    assert format_boxes(boxes, 1000, 1000) == sheep
    assert parse_box(two, 1000, 500) == parse_boxes(two, 1000, 500)[0].box, "the first box is parse_box's"


def test_qwen25_json_and_plain_boxes():
    """Qwen2.5-VL's JSON grounding (its cookbook: ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``, absolute
    pixels of the model's input) and plain ``[x1, y1, x2, y2]`` lists (vlmkit's own answers)."""
    text = (
        '```json\n[\n\t{"bbox_2d": [10, 20, 30, 40], "label": "sheep"},\n'
        '\t{"bbox_2d": [50, 60, 70, 80], "label": "dog"}\n]\n```'
    )
    assert parse_boxes(text, 200, 200, input_size=(100, 100)) == [
        LabeledBox("sheep", (20.0, 40.0, 60.0, 80.0)),
        LabeledBox("dog", (100.0, 120.0, 140.0, 160.0)),
    ]
    plain = parse_boxes("the circle [3, 4, 10, 12] and the star [0.5, 0.5, 1.0, 1.0]", 64, 32)
    assert [b.box for b in plain] == [(3.0, 4.0, 10.0, 12.0), (32.0, 16.0, 64.0, 32.0)]
    assert parse_boxes("no box here", 10, 10) == []
