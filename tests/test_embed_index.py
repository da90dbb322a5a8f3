"""``vlmkit embed`` into an index: rows and vectors, reruns that embed only new or changed files, exact resume
after a failure or a kill, pruning, and the index folder's own errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from embed_fixtures import colour_encoder, colour_image
from vlmkit.embeddings import index as index_module
from vlmkit.embeddings.embed import embed
from vlmkit.embeddings.index import EmbeddingIndex
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.images import load_image

NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def encoder():
    return colour_encoder()


def make_images(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.png"
        colour_image(NAMES[i % 3], size=(20 + i % 5, 16), shade=(i * 7) % 40).save(path)
        paths.append(path)
    return paths


def rows(folder):
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]


def state(folder):
    """Everything an index holds: its rows without the run-dependent mtimes, and all its vectors."""
    index = EmbeddingIndex.open(folder)
    kept = [{k: v for k, v in row.items() if k != "mtime_ns"} for row in index.rows]
    return kept, index.vectors.reconstruct_n(0, index.ntotal)


def test_embed_writes_a_row_and_a_vector_per_image_and_records_bad_files(encoder, tmp_path):
    images = make_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "index"
    summary = embed([tmp_path / "imgs"], out, model=encoder, batch_size=2, progress=False)
    assert (summary.total, summary.embedded, summary.errors, summary.skipped) == (6, 5, 1, 0)
    written = rows(out)
    assert [r["image"] for r in written] == sorted(str(p) for p in [*images, tmp_path / "imgs" / "broken.png"])
    broken = next(r for r in written if r["image"].endswith("broken.png"))
    assert broken["id"] is None and "broken.png" in broken["error"] and "not an image" in broken["error"]
    good = [r for r in written if r["id"] is not None]
    assert [r["id"] for r in good] == [0, 1, 2, 3, 4]
    for row in good:
        data = Path(row["image"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["size"] == len(data)
        assert row["path"] == os.path.realpath(row["image"]) and row["mtime_ns"] == os.stat(row["image"]).st_mtime_ns
    index = EmbeddingIndex.open(out)
    expected = encoder.embed_images([load_image(p) for p in images])
    np.testing.assert_array_equal(index.vectors.reconstruct_n(0, 5), expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"format_version": 1, "model": "colour-test", "dim": 3, "faiss": "IndexFlatIP",
                    "metric": "cosine (inner product of L2-normalised vectors)"}  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [".lock", "meta.json", "rows.jsonl", "vectors.faiss"]


def test_a_rerun_embeds_only_new_and_changed_files(encoder, tmp_path):
    images = make_images(tmp_path / "imgs", 4)
    out = tmp_path / "index"
    embed([tmp_path / "imgs"], out, model=encoder, progress=False)
    before = rows(out)
    again = embed([tmp_path / "imgs"], out, model=encoder, progress=False)
    assert (again.embedded, again.skipped) == (0, 4) and rows(out) == before
    colour_image("blue", size=(30, 30)).save(images[0])  # changed (was red)
    os.utime(images[1], ns=(1, 1))  # touched: same content, other mtime
    new = make_images(tmp_path / "imgs", 1, start=10)[0]
    summary = embed([tmp_path / "imgs"], out, model=encoder, progress=False)
    assert (summary.embedded, summary.skipped, summary.errors) == (2, 3, 0)
    written = rows(out)
    assert len(written) == 6 and [r["image"] for r in written[4:]] == [str(images[0]), str(new)]
    index = EmbeddingIndex.open(out)
    assert len(index) == 5 and index.ntotal == 6 and index.latest[str(images[0].resolve())]["id"] == 4
    hits = index.search(encoder.embed_texts(["blue"]), k=5)[0]
    assert str(images[0]) in [h.image for h in hits] and 0 not in [h.id for h in hits]  # the old vector is gone


def _fail_on_batch(monkeypatch, encoder, number, error=RuntimeError):
    real = encoder.embed_pixels
    calls = []

    def embed_pixels(inputs):
        calls.append(1)
        if len(calls) == number:
            raise error("killed")
        return real(inputs)

    monkeypatch.setattr(encoder, "embed_pixels", embed_pixels)


def test_resume_after_a_failure_midway_gives_the_same_rows_and_vectors(encoder, tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 11)
    embed([tmp_path / "imgs"], tmp_path / "whole", model=encoder, batch_size=3, progress=False)
    _fail_on_batch(monkeypatch, encoder, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        embed([tmp_path / "imgs"], tmp_path / "resumed", model=encoder, batch_size=3, progress=False)
    monkeypatch.undo()
    assert len(rows(tmp_path / "resumed")) == 6  # two batches were kept
    summary = embed([tmp_path / "imgs"], tmp_path / "resumed", model=encoder, batch_size=3, progress=False)
    assert (summary.embedded, summary.skipped) == (5, 6)
    whole, resumed = state(tmp_path / "whole"), state(tmp_path / "resumed")
    assert resumed[0] == whole[0]
    np.testing.assert_array_equal(resumed[1], whole[1])


def test_resume_after_a_hard_kill_gives_the_same_rows_and_vectors(encoder, tmp_path, monkeypatch):
    """A kill: no commit, the last batch's vectors written but its rows torn, a pending file left behind."""
    make_images(tmp_path / "imgs", 11)
    embed([tmp_path / "imgs"], tmp_path / "whole", model=encoder, batch_size=3, progress=False)
    out = tmp_path / "killed"
    monkeypatch.setattr(EmbeddingIndex, "_commit", lambda self, pending: None)
    _fail_on_batch(monkeypatch, encoder, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        embed([tmp_path / "imgs"], out, model=encoder, batch_size=3, progress=False)
    monkeypatch.undo()
    pending = out / "pending-0.f32"
    assert pending.stat().st_size == 6 * 3 * 4 and not (out / "vectors.faiss").exists()
    with pending.open("ab") as handle:  # the next batch's vectors reached the disk, its rows did not
        handle.write(np.ones((3, 3), np.float32).tobytes())
    with (out / "rows.jsonl").open("ab") as handle:
        handle.write(b'{"id": 6, "path": "/x", "ima')
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    reader = EmbeddingIndex.open(out)  # reading a killed index sees its complete batches and changes nothing
    assert len(reader) == 6 and {p.name: p.read_bytes() for p in out.iterdir()} == files
    summary = embed([tmp_path / "imgs"], out, model=encoder, batch_size=3, progress=False)
    assert (summary.embedded, summary.skipped) == (5, 6)
    whole, resumed = state(tmp_path / "whole"), state(out)
    assert resumed[0] == whole[0]
    np.testing.assert_array_equal(resumed[1], whole[1])
    assert sorted(p.name for p in out.iterdir()) == [".lock", "meta.json", "rows.jsonl", "vectors.faiss"]


def test_prune_drops_files_that_no_longer_exist(encoder, tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "index"
    embed([tmp_path / "imgs"], out, model=encoder, progress=False)
    images[0].unlink()
    summary = embed([tmp_path / "imgs"], out, model=encoder, prune=True, progress=False)
    assert (summary.removed, summary.skipped, summary.embedded) == (1, 2, 0)
    assert rows(out)[-1] == {"path": str(images[0].resolve()), "image": str(images[0]), "removed": True, "id": None}
    index = EmbeddingIndex.open(out)
    assert len(index) == 2 and str(images[0]) not in [h.image for h in index.search(np.ones(3) / 3**0.5, k=3)[0]]


def test_index_folder_errors(encoder, tmp_path):
    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "index"
    embed([tmp_path / "imgs"], out, model=encoder, progress=False)
    with pytest.raises(ConfigError, match="holds embeddings of model 'colour-test'.*not of 'other'"):
        EmbeddingIndex.create_or_append(out, "other", 3)
    with index_module.writing(out, "colour-test", 3), pytest.raises(ConfigError, match="another vlmkit embed"):
        EmbeddingIndex.create_or_append(out, "colour-test", 3)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an embedding index"):
        EmbeddingIndex.open(tmp_path / "notes")
    with pytest.raises(ConfigError, match="not an embedding index"):
        EmbeddingIndex.create_or_append(tmp_path / "notes", "colour-test", 3)
    (out / "vectors.faiss").unlink()  # rows whose vectors are gone
    with pytest.raises(DataError, match="rows 0..1 have no vectors"):
        EmbeddingIndex.open(out)
    with pytest.raises(ConfigError, match="no such file or folder"):
        embed([tmp_path / "missing"], tmp_path / "other", model=encoder, progress=False)


def test_an_image_whose_embedding_fails_fails_alone(encoder, tmp_path, monkeypatch):
    images = make_images(tmp_path / "imgs", 4)
    poison = encoder.image_inputs([load_image(images[2])])["pixel_values"]
    real = encoder.embed_pixels

    def embed_pixels(inputs):
        pixels = inputs["pixel_values"]
        if any(torch.equal(row, poison[0]) for row in pixels):
            raise RuntimeError("a failure for this image only")
        return real(inputs)

    monkeypatch.setattr(encoder, "embed_pixels", embed_pixels)
    summary = embed([tmp_path / "imgs"], tmp_path / "index", model=encoder, progress=False)
    assert (summary.embedded, summary.errors) == (3, 1)
    failed = [r for r in rows(tmp_path / "index") if r["id"] is None]
    assert [r["image"] for r in failed] == [str(images[2])] and "a failure for this image only" in failed[0]["error"]
