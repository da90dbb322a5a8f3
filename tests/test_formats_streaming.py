"""Big datasets stream: parquet is read row group by row group, embedded images come back as handles
(``decode_images="lazy"``), and training on tar shards, parquet and ``datasets`` folders keeps only handles and
token arrays in memory, with the same losses (and the same exact resume) as on JSONL."""

from __future__ import annotations

import pickle
from array import array

import pyarrow.parquet as pq
import pytest
from PIL import Image

from test_training_support import make_assets, run_config
from vlmkit.data.formats import ImageHandle, open_dataset, open_writer, resolve_image
from vlmkit.data.synth import SynthConfig, generate
from vlmkit.models.compose import load_pretrained
from vlmkit.processing.images import load_image
from vlmkit.training import train
from vlmkit.training.config import DataSource
from vlmkit.training.data import encode_source


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _write(folder, fmt, records, **options):
    with open_writer(folder, fmt, "d", **options) as writer:
        for record in records:
            writer.write(record)
    return writer.path


@pytest.mark.parametrize("fmt", ["wds", "parquet", "hf"])
def test_lazy_reading_gives_picklable_handles_to_the_same_bytes(tmp_path, fmt):
    records = list(generate(SynthConfig("val", seed=3, image_size=64), 5))
    path = _write(tmp_path, fmt, records, **({"shard_size": 2} if fmt == "wds" else {}))
    lazy = list(open_dataset(path, decode_images="lazy"))
    for sample, record in zip(lazy, records, strict=True):
        (handle,) = sample.images
        assert isinstance(handle, ImageHandle) and not isinstance(handle, bytes | Image.Image)
        assert pickle.loads(pickle.dumps(handle)).read() == record.images[0] == resolve_image(handle)
    checked = next(iter(open_dataset(path, decode_images="check")))
    assert isinstance(checked.images[0], bytes), "check keeps bytes"


def test_parquet_streams_row_groups_without_loading_the_file(tmp_path, monkeypatch):
    records = list(generate(SynthConfig("val", seed=4, image_size=64), 230))
    path = _write(tmp_path, "parquet", records)
    assert pq.ParquetFile(path).num_row_groups == 3  # 100 + 100 + 30 rows
    for name in ("read", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, lambda *a, **k: pytest.fail("the whole file was read"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole file was read"))
    dataset = open_dataset(path, decode_images=False)
    assert len(dataset) == 230
    assert [s.id for s in dataset] == [r.id for r in records]
    samples = list(open_dataset(path, decode_images="lazy"))
    assert samples[150].images[0].read() == records[150].images[0], "a handle reads its own row group only"


def test_training_on_shards_parquet_and_datasets_matches_jsonl(assets, tmp_path):
    """The same caption samples as JSONL, wds, parquet and an HF folder train to the same losses; the samples
    encoded for a stage hold image handles and ``array`` token ids, not image bytes or lists of ints."""
    samples = list(open_dataset(assets.captions))
    paths = {"jsonl": assets.captions}
    for fmt in ("wds", "parquet", "hf"):
        with open_writer(tmp_path / fmt, fmt, "train") as writer:
            for sample in samples:
                writer.write_sample(sample)
        paths[fmt] = writer.path
    losses = {}
    for fmt, path in paths.items():
        stage = {"data": [{"path": str(path), "format": fmt}], "steps": 2}
        losses[fmt] = train(run_config(assets, tmp_path / f"run-{fmt}", stage)).losses
    assert losses["wds"] == pytest.approx(losses["jsonl"], abs=1e-6)
    assert losses["parquet"] == pytest.approx(losses["jsonl"], abs=1e-6)
    assert losses["hf"] == pytest.approx(losses["jsonl"], abs=1e-6)
    _, processor = load_pretrained(assets.base)
    encoded = encode_source(DataSource(str(paths["parquet"])), processor, None, "test")
    item = encoded.samples[0]
    assert isinstance(item.input_ids, array) and isinstance(item.images[0], ImageHandle)
    assert load_image(resolve_image(item.images[0])).size == samples[0].images[0].size


def test_resume_on_parquet_repeats_the_uninterrupted_losses(assets, tmp_path):
    samples = list(open_dataset(assets.captions))
    with open_writer(tmp_path / "pq", "parquet", "train") as writer:
        for sample in samples:
            writer.write_sample(sample)
    stage = {"data": [{"path": str(writer.path)}], "steps": 4}
    full = train(run_config(assets, tmp_path / "full", stage))
    config = run_config(assets, tmp_path / "parts", stage, save_every=100)
    first = train(config, callbacks=[lambda r: r.get("event") == "step" and r["step"] == 2])
    assert first.interrupted and first.global_step == 2
    resumed = train(config, resume=True)
    assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
