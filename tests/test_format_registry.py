"""The dataset-format seam: a format registered from outside the package is read, written, detected and
converted like the built-in ones; unknown and duplicate names are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vlmkit.data.formats import (
    FORMATS,
    DatasetWriter,
    FormatSpec,
    Record,
    SampleDataset,
    open_dataset,
    open_writer,
    register_format,
)
from vlmkit.errors import DataError, RegistryError

BUILT_IN = "hf, jsonl, llava, parquet, wds"


class TsvDataset(SampleDataset):
    """``id<TAB>messages as JSON`` per line (text only)."""

    def _lines(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines()

    def __len__(self) -> int:
        return len(self._lines())

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for lineno, line in enumerate(self._lines(), 1):
            record_id, messages = line.split("\t", 1)
            yield f"{self.path}: line {lineno}", {"id": record_id, "messages": json.loads(messages)}


class TsvWriter(DatasetWriter):
    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        super().__init__(out_dir, name, overwrite=overwrite)
        self._lines: list[str] = []

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.name}.tsv"

    def write(self, record: Record) -> None:
        if record.images:
            raise DataError(f"record {record.id!r}: the tsv format holds text only")
        self._lines.append(f"{record.id}\t{json.dumps(record.messages)}\n")
        self.count += 1

    def close(self) -> Path:
        self.path.write_text("".join(self._lines), encoding="utf-8")
        return self.path


@pytest.fixture
def tsv() -> Iterator[FormatSpec]:
    spec = FormatSpec(
        "tsv",
        TsvDataset,
        TsvWriter,
        layout="a .tsv file",
        matches=lambda path: path.suffix == ".tsv" and path.is_file(),
        find=lambda folder: sorted(folder.glob("*.tsv")),
    )
    TsvDataset.format = TsvWriter.format = "tsv"  # what register_format sets
    with FORMATS.temporary("tsv", spec):  # other tests see the built-in formats only
        yield spec


def _records() -> list[Record]:
    return [
        Record("a", [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
        Record("b/2", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}]),
    ]  # fmt: skip


def test_a_registered_format_is_written_read_and_detected(tmp_path, tsv):
    assert "tsv" in FORMATS and "tsv" in FORMATS.names()
    with open_writer(tmp_path, "tsv", "notes") as writer:
        for record in _records():
            writer.write(record)
    assert writer.path == tmp_path / "notes.tsv" and writer.format == "tsv"
    for path in (writer.path, tmp_path):  # the file itself, and the folder holding it
        dataset = open_dataset(path)
        assert dataset.format == "tsv" and len(dataset) == 2
        assert [(s.id, s.messages) for s in dataset] == [(r.id, r.messages) for r in _records()]
    with pytest.raises(DataError, match="already exists"):
        open_writer(tmp_path, "tsv", "notes")


def test_data_convert_and_check_go_through_a_registered_format(run, tmp_path, tsv):
    with open_writer(tmp_path / "src", "jsonl", "notes") as writer:
        for record in _records():
            writer.write(record)
    code, out, err = run("data", "convert", writer.path, "--out", tmp_path / "tsv", "--to", "tsv")
    assert code == 0, err
    assert "wrote 2 samples (tsv)" in out and (tmp_path / "tsv" / "notes.tsv").is_file()
    code, out, _ = run("data", "check", tmp_path / "tsv")
    assert code == 0 and "(tsv): 2 records, 2 valid" in out
    code, _, err = run(
        "data",
        "convert",
        tmp_path / "tsv" / "notes.tsv",
        "--format",
        "tsv",
        "--out",
        tmp_path / "back",
        "--to",
        "llava",
    )
    assert code == 0, err
    assert [s.messages for s in open_dataset(tmp_path / "back")] == [r.messages for r in _records()]


def test_unknown_format_names_are_refused_listing_the_valid_ones(tmp_path, run, capsys):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(DataError, match=f"unknown dataset format 'csv'; expected one of {BUILT_IN}$"):
        open_dataset(tmp_path / "a.json", "csv")
    with pytest.raises(DataError, match=f"unknown dataset format 'csv'; expected one of {BUILT_IN}$"):
        open_writer(tmp_path, "csv")
    with pytest.raises(RegistryError, match=f"unknown dataset format 'csv'; valid names: {BUILT_IN}$"):
        FORMATS.get("csv")
    with pytest.raises(SystemExit):
        run("data", "convert", tmp_path / "a.json", "--out", tmp_path / "o", "--to", "csv")
    err = capsys.readouterr().err
    assert "argument --to: invalid choice: 'csv'" in err and all(name in err for name in BUILT_IN.split(", "))


def test_a_format_name_is_registered_once(tsv):
    with pytest.raises(RegistryError, match="dataset format 'jsonl' is already registered"):
        register_format(FormatSpec("jsonl", TsvDataset, TsvWriter, layout="a .tsv file"))
    assert TsvDataset.format == "tsv", "a refused registration changes nothing"


def test_an_option_a_format_has_no_use_for_is_refused(tmp_path):
    from vlmkit.data.formats import open_writer

    with pytest.raises(DataError, match="shard_size applies to sharded formats \\(wds\\), not to 'jsonl'"):
        open_writer(tmp_path, "jsonl", shard_size=5)
    assert not list(tmp_path.iterdir())
    with open_writer(tmp_path, "wds", "x", shard_size=1) as writer:
        for record in _records():
            writer.write(record)
    assert len(list(tmp_path.glob("x-*.tar"))) == 2  # one record per shard
