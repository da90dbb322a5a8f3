"""Training: config, data plan, padding, packing, schedule, policy and bad input (no long runs here)."""

from __future__ import annotations

import math

import pytest
import torch

from test_training_support import make_assets, run_config
from vlmkit.errors import ConfigError, DataError
from vlmkit.models.compose import load_pretrained
from vlmkit.processing.processor import IGNORE_INDEX
from vlmkit.training import load_config, train
from vlmkit.training.config import COMPONENTS, LoraSpec, PolicySpec, StageConfig
from vlmkit.training.data import BatchPlan, Collator, encode_source, pack_rows, padding_fraction, turn_weights
from vlmkit.training.model import apply_policy, param_groups, trainable_counts
from vlmkit.training.optim import build_optimizer, lr_factor


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


# ---------------------------------------------------------------------------------------------------- config


def test_config_typo_lists_valid_keys(assets, tmp_path):
    config = run_config(assets, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) save_evry; valid keys: .*save_every"):
        load_config({**config, "save_evry": 3})
    config["stages"][0]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"stages\.0\.lrr.*valid keys: .*stages\.0\.lr,"):
        load_config(config)
    config = run_config(assets, tmp_path)
    config["stages"][0]["data"][0]["wieght"] = 2
    with pytest.raises(ConfigError, match=r"stages\.0\.data\.0\.wieght.*stages\.0\.data\.0\.weight"):
        load_config(config)
    config = run_config(assets, tmp_path)
    config["stages"][0]["policy"]["language_model"] = "partial"
    with pytest.raises(ConfigError, match="'partial' is not one of 'frozen', 'full', 'lora'"):
        load_config(config)
    config["stages"][0]["policy"] = {"vision": "frozen", "projector": "frozen", "language_model": "frozen"}
    with pytest.raises(ConfigError, match="nothing would train"):
        load_config(config)


def test_config_files_and_overrides(assets, tmp_path):
    import yaml

    config = run_config(assets, tmp_path, {"name": "align"}, {"name": "instruct", "lr": 1e-4})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, ["stages.1.lr=2e-5", "seed=7", "stages.0.policy.language_model=lora"])
    assert loaded.stages[1].lr == 2e-5 and loaded.seed == 7
    assert loaded.stages[0].policy.language_model == "lora"
    assert loaded.stages[0].data[0].path == str(assets.captions)
    with pytest.raises(ConfigError, match="has no item '5'"):
        load_config(path, ["stages.5.lr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["seed"])
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'output_dir = "{tmp_path}"\n[model]\ncheckpoint = "{assets.base}"\n'
        f'[[stages]]\nname = "align"\nsteps = 2\n[[stages.data]]\npath = "{assets.captions}"\nweight = 2.0\n'
    )
    loaded = load_config(toml)
    assert loaded.stages[0].data[0].weight == 2.0 and loaded.stages[0].steps == 2


def test_missing_data_path_and_empty_dataset(assets, tmp_path):
    config = run_config(assets, tmp_path / "run", {"data": [{"path": str(tmp_path / "nope.jsonl")}]})
    with pytest.raises(DataError, match=r"stage 'align' \(stages\.0\) data\[0\].*nope\.jsonl does not exist"):
        train(config)
    assert not (tmp_path / "run").exists()  # failed before writing anything
    config = run_config(assets, tmp_path / "run", {"data": [{"path": str(assets.empty)}]})
    with pytest.raises(DataError, match="no usable sample"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_projector_of_another_lm_is_refused(assets, tmp_path):
    from conftest import compose_tiny, llama_config

    other, _ = compose_tiny(lm=llama_config(hidden_size=64))
    other.save_projector(tmp_path / "projector")
    config = run_config(assets, tmp_path / "run")
    config["model"]["projector_checkpoint"] = str(tmp_path / "projector")
    with pytest.raises(ConfigError, match=r"maps 32 → 64, but this model needs 32 → 48"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------- data plan


def _plan(group: bool = True, world_batch: int = 8, weights=(1.0, 3.0)) -> BatchPlan:
    lengths = [[10 + (7 * k) % 50 for k in range(30)], [5 + (11 * k) % 90 for k in range(50)]]
    return BatchPlan(lengths, list(weights), world_batch, seed=3, stage_index=1, group_by_length=group)


@pytest.mark.parametrize("group", [False, True])
def test_plan_is_pure_and_independent_of_world_size(group):
    a, b = _plan(group), _plan(group)
    for step in (0, 5, 17, 40):  # several epochs; a fresh plan gives the same batches (resume needs only the step)
        batch = a.batch(step)
        assert batch == b.batch(step) and len(batch) == 8
        one = a.all_micro_batches(step, world_size=1, accum=1)
        four = a.all_micro_batches(step, world_size=2, accum=2)
        assert sorted(x for mb in one for x in mb) == sorted(batch) == sorted(x for mb in four for x in mb)
        assert all(len(mb) == 2 for mb in four)
    assert _plan(group).batch(3) != BatchPlan(a.lengths, [1.0, 3.0], 8, seed=4, stage_index=1).batch(3)


def test_plan_mixes_by_weight():
    plan = _plan(weights=(1.0, 3.0))
    assert plan.counts == [20, 60] and plan.epoch_size == 80
    drawn = [source for source, _ in plan.stream(0, 800)]
    assert drawn.count(0) == 200 and drawn.count(1) == 600
    # a source drawn more often than it has samples cycles through fresh permutations: every sample is used
    first = [k for s, k in plan.stream(0, 80) if s == 1]
    assert len(first) == 60 and set(first) == set(range(50))


def test_grouping_and_packing_cut_padding():
    plain = padding_fraction(_plan(group=False), 20, world_size=1, accum=1, packing=False)
    grouped = padding_fraction(_plan(group=True), 20, world_size=1, accum=1, packing=False)
    packed = padding_fraction(_plan(group=False), 20, world_size=1, accum=1, packing=True)
    assert grouped < plain / 2 and packed < plain
    assert pack_rows([5, 3, 2, 4, 1]) == [[0], [3, 4], [1, 2]]


def test_packed_batch_gives_the_same_loss(assets):
    from vlmkit.training.config import DataSource

    model, processor = load_pretrained(assets.base)
    source = encode_source(DataSource(str(assets.mixed)), processor, None, "test")
    samples = source.samples[:3] + source.samples[-4:]  # QA, text-only and two-image samples
    padded = Collator(processor, packing=False)(samples)
    packed = Collator(processor, packing=True)(samples)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["num_targets"] == padded["num_targets"] == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        losses = []
        for batch in (padded, packed):
            keys = ("input_ids", "attention_mask", "position_ids", "pixel_values")
            inputs = {k: batch[k] for k in keys if k in batch}
            losses.append(float(model(**inputs, labels=batch["labels"], supervised_loss=True)["loss_sum"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_turn_weights():
    x = IGNORE_INDEX
    labels = [7, x, 1, 2, 3, 4, x, x, 5, x, 6, 6]
    assert turn_weights(labels, "token") == [0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1]
    assert turn_weights(labels, "turn") == [0, 0, 0.25, 0.25, 0.25, 0.25, 0, 0, 1, 0, 0.5, 0.5]
    sqrt = turn_weights(labels, "turn_sqrt")
    assert sqrt[2:6] == [0.5] * 4 and sqrt[8] == 1.0 and sqrt[10] == pytest.approx(2**-0.5)


def test_weighted_loss_matches_per_turn_means_padded_and_packed(assets):
    from vlmkit.training.config import DataSource

    model, processor = load_pretrained(assets.base)
    source = encode_source(DataSource(str(assets.mixed)), processor, None, "test")
    samples = source.samples[:3] + source.samples[-4:]
    batch = Collator(processor, loss_weighting="turn")(samples)
    assert batch["loss_weights"].shape == batch["labels"].shape
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        weighted = float(model(**{k: batch[k] for k in keys if k in batch}, labels=batch["labels"],
                               supervised_loss=True, loss_weights=batch["loss_weights"])["loss_sum"])  # fmt: skip
        # the same by hand: every assistant turn's mean token loss, summed
        logits = model(**{k: batch[k] for k in keys if k in batch}).logits.float()
    terms = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )
    expected = 0.0
    for row, sample in enumerate(samples):
        weights = torch.tensor(sample.loss_weights("turn"))[1:]
        expected += float((terms[row, : len(weights)] * weights).sum())
    assert weighted == pytest.approx(expected, rel=1e-4)
    turns = sum(round(sum(s.loss_weights("turn"))) for s in samples)
    assert float(batch["loss_weights"].sum()) == pytest.approx(turns)
    packed = Collator(processor, packing=True, loss_weighting="turn")(samples)
    with torch.no_grad():
        packed_loss = float(model(**{k: packed[k] for k in ("input_ids", "position_ids", "pixel_values")},
                                  labels=packed["labels"], supervised_loss=True,
                                  loss_weights=packed["loss_weights"])["loss_sum"])  # fmt: skip
    assert packed_loss == pytest.approx(weighted, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- optimisation


def test_warmup_cosine_values():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert lr_factor(2, 10, 2) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(10, 10, 2) == pytest.approx(0.0)
    assert lr_factor(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(4, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_policy_param_groups_and_module_lr(assets):
    model, _ = load_pretrained(assets.base)
    stage = StageConfig(
        policy=PolicySpec("frozen", "full", "lora"),
        lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]),
        lr=1e-4,
        module_lr={"projector": 1e-3},
        weight_decay=0.1,
    )
    apply_policy(model, stage)
    counts = trainable_counts(model)
    assert counts["vision"]["trainable"] == 0
    assert counts["projector"]["trainable"] == counts["projector"]["total"] > 0
    lora = 2 * 2 * 4 * (48 + 48) - 2 * 4 * (48 - 24)  # q (48→48) and v (48→24) in 2 layers, r=4
    assert counts["language_model"]["trainable"] == lora
    groups = param_groups(model, stage)
    by_name = {g["name"]: g for g in groups}
    assert by_name["projector"]["lr"] == 1e-3 and by_name["language_model"]["lr"] == 1e-4
    assert by_name["projector"]["weight_decay"] == 0.1 and by_name["projector.no_decay"]["weight_decay"] == 0.0
    assert not any(g["name"].startswith("vision") for g in groups)
    optimizer, _ = build_optimizer(groups, stage, total_steps=10)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["projector"] == pytest.approx(1e-3 * lr_factor(0, 10, 0))
    assert set(COMPONENTS) == {"vision", "projector", "language_model"}
