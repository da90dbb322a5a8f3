"""Streaming stages (``streaming: true``): records are read, encoded and batched as the run goes, each process
reads its own share, bad records fail alone, and an interrupted + resumed run sees exactly the batches (and
losses) of the uninterrupted one."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import torch
import yaml

from test_training_support import make_assets, run_config, step_records
from vlmkit.data.formats import open_dataset, open_writer
from vlmkit.errors import CheckpointError, ConfigError, DataError
from vlmkit.models.compose import load_pretrained
from vlmkit.training import streaming, train
from vlmkit.training.config import DataSource, load_config
from vlmkit.training.data import MEGA_BATCHES
from vlmkit.training.metrics import read_metrics
from vlmkit.training.streaming import MIX_BLOCK, SourceStream, StreamPlan, wants_streaming


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def shards(assets, tmp_path_factory):
    """The 24 caption samples as webdataset shards of 5 samples (5 shards)."""
    folder = tmp_path_factory.mktemp("wds")
    with open_writer(folder, "wds", "train", shard_size=5) as writer:
        for sample in open_dataset(assets.captions):
            writer.write_sample(sample)
    return writer.path


@pytest.fixture(scope="module")
def processor(assets):
    return load_pretrained(assets.base)[1]


def _stream(path, processor, *, rank=0, world=1, window=4, index=0, **source):
    dataset = open_dataset(path, decode_images="lazy", skip_bad=source.get("skip_bad", False))
    return SourceStream(DataSource(str(path), **source), dataset, processor, None, f"data[{index}]",
                        key=(0, 0, index), rank=rank, world_size=world, window=window,
                        skipped=Counter())  # fmt: skip


def _plan(streams, weights, **options):
    options = {"seed": 0, "stage_index": 0, "rank": 0, "group_by_length": True, "packing": False, **options}
    return StreamPlan(streams, weights, 2, 1, skipped=Counter(), **options)


def _ids(batches):
    return [[s.id for s in batch] for batch in batches]


def test_restored_plan_serves_the_same_chunks(shards, assets, processor):
    """A plan restored from a snapshot taken between chunks serves exactly what the first plan served next."""
    streams = [_stream(shards, processor), _stream(assets.mixed, processor, index=1)]
    plan = _plan(streams, [2.0, 1.0])
    chunk0 = _ids(plan.chunk(0))
    state = json.loads(json.dumps(plan.snapshot()))  # plain values
    following = [_ids(plan.chunk(c)) for c in (1, 2)]
    fresh = _plan([_stream(shards, processor), _stream(assets.mixed, processor, index=1)], [2.0, 1.0])
    assert _ids(fresh.chunk(0)) == chunk0, "a pure function of the seed"
    again = _plan([_stream(shards, processor), _stream(assets.mixed, processor, index=1)], [2.0, 1.0])
    again.restore(state)
    assert [_ids(again.chunk(c)) for c in (1, 2)] == following
    assert all(len(b) == 2 for b in chunk0) and len(chunk0) == MEGA_BATCHES
    served = [i for batch in chunk0 + following[0] for i in batch]
    assert len(set(served)) > 20, "shuffled over the sources, not one sample over and over"


def test_sources_are_mixed_by_weight(shards, assets, processor):
    plan = _plan([_stream(shards, processor), _stream(assets.mixed, processor, index=1)], [3.0, 1.0])
    assert Counter(plan.sources_of(0, MIX_BLOCK)) == {0: 768, 1: 256}
    assert Counter(plan.sources_of(MIX_BLOCK, 3 * MIX_BLOCK)) == {0: 1536, 1: 512}, "every block exactly"
    assert plan.sources_of(0, 40) != plan.sources_of(MIX_BLOCK, MIX_BLOCK + 40), "each block in its own order"


def test_memory_is_one_window_per_source_not_the_dataset(assets, processor, tmp_path):
    """Reading the first chunk of a 200-record parquet file reads one chunk plus one shuffle window."""
    records = list(open_dataset(assets.captions)) * 9  # 216 rows, row groups of 100
    with open_writer(tmp_path, "parquet", "big") as writer:
        for sample in records:
            writer.write_sample(sample)
    stream = _stream(writer.path, processor, window=8)
    read = []
    original = stream.dataset.read_unit

    def counting(unit, start=0, keep=None):
        for index, item in original(unit, start, keep):
            read.append(index)
            yield index, item

    stream.dataset.read_unit = counting
    plan = _plan([stream], [1.0])
    plan.chunk(0)
    assert len(read) <= 2 * MEGA_BATCHES + 8, f"read {len(read)} of 216 records for a chunk of 32"


def test_each_process_reads_its_own_share(shards, processor, tmp_path):
    """With 5 shards and 2 processes, each reads its own shards; with one shard, its own records of it."""
    one_cycle = {}
    for rank in (0, 1):
        stream = _stream(shards, processor, rank=rank, world=2)
        units = [stream.units[u] for u in stream.order(0)]
        one_cycle[rank] = {s.id for u in units for _, s in stream.dataset.read_unit(u)}
    assert one_cycle[0] and one_cycle[1] and not one_cycle[0] & one_cycle[1]
    assert len(one_cycle[0] | one_cycle[1]) == 24
    assert _stream(shards, processor, rank=1, world=2).order(1) != _stream(shards, processor, rank=1, world=2).order(0)

    single = tmp_path / "one.tar"
    with tarfile.open(single, "w") as out, tarfile.open(sorted(shards.parent.glob("*.tar"))[0]) as first:
        for member in first:
            out.addfile(member, first.extractfile(member))
    seen = {}
    for rank in (0, 1):
        stream = _stream(single, processor, rank=rank, world=2, window=1)
        assert not stream.shared_units
        it = stream.samples({"cycle": 0, "unit": 0, "entry": 0, "taken": 0})
        seen[rank] = [next(it).id for _ in range(4)]
    assert set(seen[0]).isdisjoint(seen[1]) and len(set(seen[0] + seen[1])) == 5


def test_interrupted_and_resumed_run_sees_the_same_batches(shards, assets, tmp_path):
    """Stopped inside a chunk (step 3 of 16) and at a chunk's end (step 16), the resumed runs' losses and
    per-step token counts equal the uninterrupted run's, with several sources, accumulation and workers."""
    # the LM trains too: a micro-batch of text-only samples leaves the projector without a gradient
    stage = {"data": [{"path": str(shards)}, {"path": str(assets.mixed), "weight": 0.5}], "steps": 18,
             "streaming": True, "shuffle_buffer": 5, "batch_size": 2, "grad_accum": 2,
             "policy": {"projector": "full", "language_model": "full"}}  # fmt: skip
    full = train(run_config(assets, tmp_path / "full", stage))
    assert full.stages[0].samples == 24 + len(open_dataset(assets.mixed))
    assert 0 <= full.stages[0].padding_after < full.stages[0].padding_before < 1
    for stop in (3, 16):
        config = run_config(assets, tmp_path / f"parts-{stop}", stage, save_every=100, num_workers=int(stop == 3))
        first = train(config, callbacks=[lambda r, stop=stop: r.get("event") == "step" and r["step"] == stop])
        assert first.interrupted and first.global_step == stop
        resumed = train(config, resume=True)
        assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
        tokens = [r["tokens"] for r in step_records(read_metrics(tmp_path / f"parts-{stop}"))]
        assert tokens == [r["tokens"] for r in step_records(read_metrics(tmp_path / "full"))]
    start = next(r for r in read_metrics(tmp_path / "full") if r.get("event") == "stage_start")
    assert start["streaming"] is True and start["padding_after"] is None


def test_a_bad_record_fails_only_itself(shards, assets, tmp_path):
    """A shard with a malformed JSON member and a truncated shard: skipped and counted with skip_bad."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for shard in sorted(shards.parent.glob("*.tar")):
        (folder / shard.name).write_bytes(shard.read_bytes())
    first = sorted(folder.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(first, "w") as tar:
        broken = False
        for member, data in members:
            if member.name.endswith(".json") and not broken:
                data, broken = b"{not json", True
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    last = sorted(folder.glob("*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:700])
    stage = {"data": [{"path": str(folder / "train-*.tar"), "skip_bad": True}], "steps": 3, "streaming": True}
    result = train(run_config(assets, tmp_path / "run", stage))
    skipped = result.stages[0].skipped
    assert skipped["bad_json"] >= 1 and skipped["bad_shard"] >= 1
    assert len(result.losses) == 3

    strict = {**stage, "data": [{"path": str(folder / "train-*.tar")}], "steps": 12}
    with pytest.raises(DataError, match=r"data\[0\] .*(malformed|truncated or corrupt tar shard)"):
        train(run_config(assets, tmp_path / "strict", strict))


def test_auto_streams_big_shard_parquet_and_datasets_sources_only(shards, assets, monkeypatch):
    stage = load_config(run_config(assets, "unused", {"data": [{"path": str(shards)}]})).stages[0]
    datasets = [open_dataset(shards)]
    assert not wants_streaming(stage, datasets), "24 records: below the threshold"
    monkeypatch.setattr(streaming, "STREAM_AUTO_RECORDS", 20)
    assert wants_streaming(stage, datasets)
    stage.data[0].limit = 5
    assert not wants_streaming(stage, datasets), "a limit reads the whole source first"
    stage.data[0].limit = None
    assert not wants_streaming(stage, [open_dataset(assets.captions)]), "JSONL is not streamed by auto"
    stage.streaming = True
    assert wants_streaming(stage, [open_dataset(assets.captions)])
    stage.streaming = False
    assert not wants_streaming(stage, datasets)


def test_epochs_count_the_records_in_the_files(shards, assets, tmp_path):
    stage = {"data": [{"path": str(shards)}], "epochs": 1.0, "steps": None, "streaming": True, "batch_size": 4}
    result = train(run_config(assets, tmp_path / "run", stage))
    assert result.stages[0].steps == 6  # 24 records / 4


def test_streaming_options_are_checked(assets):
    def config(**stage):
        return run_config(assets, "unused", {"data": [{"path": str(assets.captions), **stage.pop("src", {})}], **stage})

    with pytest.raises(ConfigError, match="limit"):
        load_config(config(streaming=True, src={"limit": 3}))
    with pytest.raises(ConfigError, match="shuffle_buffer must be at least 1"):
        load_config(config(shuffle_buffer=0))
    with pytest.raises(ConfigError, match="streaming must be true, false or 'auto'"):
        load_config(config(streaming="sometimes"))
    grid = {"objective": "grid_labels", "policy": {"vision": "full", "projector": "frozen",
                                                   "language_model": "frozen"}}  # fmt: skip
    with pytest.raises(ConfigError, match="grid_labels reads its images first"):
        load_config(config(streaming=True, **grid))
    assert load_config(config(streaming="auto")).stages[0].streaming == "auto"


def test_resume_refuses_a_checkpoint_without_a_stream_position(shards, assets, tmp_path):
    stage = {"data": [{"path": str(shards)}], "steps": 4, "streaming": False}
    config = run_config(assets, tmp_path / "run", stage, save_every=100)
    train(config, callbacks=[lambda r: r.get("event") == "step" and r["step"] == 2])
    config["stages"][0]["streaming"] = True
    with pytest.raises(CheckpointError, match="no stream position"):
        train(config, resume=True)


@pytest.mark.slow
def test_two_processes_stream_their_shares_and_resume_exactly(shards, assets, tmp_path):
    """Under torchrun (2 gloo processes), a streaming stage resumed from its step-2 checkpoint repeats the
    uninterrupted run's losses for steps 3 and 4 (each process restores its own stream position)."""
    stage = {"data": [{"path": str(shards)}], "steps": 4, "streaming": True, "shuffle_buffer": 3, "batch_size": 2}
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(run_config(assets, tmp_path / "run", stage, save_every=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlmkit",
                "train", str(config)]  # fmt: skip
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    full = step_records(read_metrics(tmp_path / "run"))
    assert [r["samples"] for r in full] == [4] * 4
    state = torch.load(tmp_path / "run/checkpoints/step-00000002/trainer_state.pt", weights_only=True)
    assert len(state["objective"]["stream"]["ranks"]) == 2
    resume = [*torchrun, "--resume", str(tmp_path / "run/checkpoints/step-00000002")]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = step_records(read_metrics(tmp_path / "run"))
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in full], abs=1e-6, rel=0)
    assert [r["tokens"] for r in again] == [r["tokens"] for r in full]
