"""Streaming stages: records are read, encoded and batched as the run goes, in bounded memory, and resume exactly.

Each process reads its own share of each source. A source's units (tar shards, parquet row groups, blocks of
``datasets`` rows; a JSON or JSONL file is one) come in a fresh seeded order every cycle (pass); a process takes
every ``world_size``-th unit of that order, or, when the source has fewer units than there are processes, every
``world_size``-th record of each unit. Its usable samples are shuffled in windows of ``shuffle_buffer``. The mix
takes the sources by weight (each block of :data:`MIX_BLOCK` positions split by weight, in a seeded order), and
chunks of :data:`~vlmkit.training.data.MEGA_BATCHES` local batches are grouped by length as the in-memory plan
does. Every order is a pure function of the seed, the stage and a position, so a checkpoint needs only, per
process, where each source's current window began (cycle, unit, entry), how much of it was taken, and the
skip counts, as they stood at the start of the current chunk; a resumed run rebuilds that chunk and serves the
batches the uninterrupted run would have.

Not webdataset's pipeline or ``datasets.IterableDataset``: neither restores a shuffle buffer (webdataset keeps no
position at all; ``IterableDataset.load_state_dict`` starts with an empty buffer), so neither resumes exactly;
and the records go through vlmkit's own readers (every format and schema, bad records counted) anyway.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from vlmkit.data.formats.base import SampleDataset
from vlmkit.data.formats.records import RecordError
from vlmkit.errors import DataError, ProcessingError
from vlmkit.processing.processor import VLMProcessor
from vlmkit.training.config import DataSource, StageConfig
from vlmkit.training.data import MEGA_BATCHES, TrainSample, _split_counts, batch_padding, encode_sample

log = logging.getLogger(__name__)

STREAM_FORMATS = ("wds", "parquet", "hf")
"""Formats whose sources make ``streaming: auto`` stream."""
STREAM_AUTO_RECORDS = 100_000
"""``streaming: auto`` streams a stage whose sources hold at least this many records."""
MIX_BLOCK = 1024
"""Mix positions per block: each block holds every source's exact share of it, in a seeded order."""
BARREN_CYCLES = 8
"""Cycles of a process's share of a source without a usable sample before the source is an error."""

Position = dict[str, int]
"""Where a source's current shuffle window began (``cycle``, ``unit``, ``entry``) and how many of its samples
were taken (``taken``)."""


def wants_streaming(stage: StageConfig, datasets: list[SampleDataset]) -> bool:
    """Whether a stage streams: its ``streaming`` option, or for ``auto`` a webdataset, parquet or ``datasets``
    source in the mix, no ``limit``, and at least :data:`STREAM_AUTO_RECORDS` records in the sources."""
    if stage.streaming != "auto":
        return bool(stage.streaming)
    if any(source.limit is not None for source in stage.data):
        return False
    if not any(dataset.format in STREAM_FORMATS for dataset in datasets):
        return False
    return sum(len(dataset) for dataset in datasets) >= STREAM_AUTO_RECORDS


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class SourceStream:
    """One source's endless stream of usable samples for one process, from any :data:`Position`."""

    def __init__(
        self,
        source: DataSource,
        dataset: SampleDataset,
        processor: VLMProcessor,
        max_length: int | None,
        where: str,
        *,
        key: tuple[int, int, int],
        rank: int,
        world_size: int,
        window: int,
        skipped: Counter[str],
    ) -> None:
        self.source, self.dataset, self.processor, self.max_length, self.where = (
            source, dataset, processor, max_length, where,
        )  # fmt: skip
        self.key = key  # (seed, stage index, source index)
        self.rank, self.world_size, self.window = rank, world_size, window
        self.skipped = skipped
        self.units = dataset.units()
        self.shared_units = len(self.units) >= world_size
        """Each process reads its own units (else: its own records of every unit)."""
        self.position: Position = {"cycle": 0, "unit": 0, "entry": 0, "taken": 0}

    def order(self, cycle: int) -> list[int]:
        """This process's units of ``cycle``, in reading order."""
        perm = _rng(*self.key, 10, cycle).permutation(len(self.units)).tolist()
        return perm[self.rank :: self.world_size] if self.shared_units else perm

    def _usable(self, item: Any, cycle: int) -> TrainSample | None:
        """The encoded sample, or None (another process's record, or skipped and counted: once per cycle it is
        read in, logged in the first)."""
        if item is None:
            return None
        if isinstance(item, RecordError):
            if not self.source.skip_bad:
                raise DataError(f"{self.where}: {item}") from item
            self.skipped[item.reason] += 1
            log.log(logging.WARNING if cycle == 0 else logging.DEBUG, "skipped: %s", item)
            return None
        try:
            encoded = encode_sample(item, self.processor, self.max_length)
        except ProcessingError as exc:
            if not self.source.skip_bad:
                raise DataError(f"{self.where}: sample {item.id!r}: {exc}") from exc
            self.skipped["unencodable"] += 1
            return None
        if isinstance(encoded, str):
            self.skipped[encoded] += 1
            return None
        return encoded

    def _read(self, cycle: int, unit: int, entry: int) -> Iterator[tuple[tuple[int, int, int], TrainSample]]:
        """Usable samples from reader position ``(cycle, unit, entry)`` on, each with the position after it."""
        keep = None
        if not self.shared_units and self.world_size > 1:
            rank, world = self.rank, self.world_size

            def keep(index: int) -> bool:
                return index % world == rank

        barren = 0
        limit = BARREN_CYCLES if self.shared_units and self.world_size > 1 else 2
        while True:
            order = self.order(cycle)
            found = False
            while unit < len(order):
                for index, item in self.dataset.read_unit(self.units[order[unit]], entry, keep):
                    entry = index + 1
                    sample = self._usable(item, cycle)
                    if sample is not None:
                        found = True
                        yield (cycle, unit, entry), sample
                unit, entry = unit + 1, 0
            barren = 0 if found else barren + 1
            if barren >= limit:
                detail = f" (skipped: {dict(self.skipped)})" if self.skipped else ""
                raise DataError(f"{self.where}: no usable sample in {self.source.path}{detail}")
            cycle, unit = cycle + 1, 0

    def samples(self, position: Position) -> Iterator[TrainSample]:
        """The stream from ``position`` on; :attr:`position` follows it (the position after each sample)."""
        self.position = dict(position)
        return self._samples(dict(position))

    def _samples(self, position: Position) -> Iterator[TrainSample]:
        start = (position["cycle"], position["unit"], position["entry"])
        taken = position["taken"]
        reader = self._read(*start)
        while True:
            window: list[TrainSample] = []
            after = start
            for cursor, sample in reader:
                window.append(sample)
                after = cursor
                if len(window) == self.window:
                    break
            perm = _rng(*self.key, 11, self.rank, *start).permutation(len(window))
            for k in range(taken, len(window)):
                self.position = {"cycle": start[0], "unit": start[1], "entry": start[2], "taken": k + 1}
                yield window[perm[k]]
            start, taken = after, 0


class StreamPlan:
    """A process's batches of a streaming stage: sources mixed by weight, chunks grouped by length."""

    def __init__(
        self,
        streams: list[SourceStream],
        weights: list[float],
        batch_size: int,
        accum: int,
        *,
        seed: int,
        stage_index: int,
        rank: int,
        group_by_length: bool,
        packing: bool,
        skipped: Counter[str],
    ) -> None:
        self.streams, self.weights = streams, weights
        self.batch_size, self.accum = batch_size, accum
        self.local_batch = batch_size * accum
        self.seed, self.stage_index, self.rank = seed, stage_index, rank
        self.group_by_length, self.packing = group_by_length, packing
        self.skipped = skipped
        self.counts = _split_counts(MIX_BLOCK, weights)
        self._iters: list[Iterator[TrainSample]] = []
        self.cells = {"before": 0, "after": 0, "real": 0}
        self.restore(None)

    def snapshot(self) -> dict[str, Any]:
        """Where every source stands now, and the skip counts (plain values: ``weights_only`` loadable)."""
        return {"sources": [dict(s.position) for s in self.streams], "skipped": dict(self.skipped)}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from a :meth:`snapshot` (None: from the start)."""
        start: Position = {"cycle": 0, "unit": 0, "entry": 0, "taken": 0}
        positions = state["sources"] if state else [start] * len(self.streams)
        if len(positions) != len(self.streams):
            raise DataError(f"the checkpoint's stream has {len(positions)} source(s), the stage {len(self.streams)}")
        self.skipped.clear()
        self.skipped.update(state["skipped"] if state else {})
        self._iters = [s.samples(p) for s, p in zip(self.streams, positions, strict=True)]

    def sources_of(self, start: int, stop: int) -> list[int]:
        """The source of each mix position ``start .. stop-1``."""
        out: list[int] = []
        pos = start
        while pos < stop:
            block, offset = divmod(pos, MIX_BLOCK)
            labels = np.repeat(np.arange(len(self.counts)), self.counts)
            labels = labels[_rng(self.seed, self.stage_index, 12, block).permutation(MIX_BLOCK)]
            take = min(MIX_BLOCK - offset, stop - pos)
            out += labels[offset : offset + take].tolist()
            pos += take
        return out

    def chunk(self, c: int) -> list[list[TrainSample]]:
        """The :data:`MEGA_BATCHES` local batches of chunk ``c``, read from where the sources stand."""
        size = self.local_batch * MEGA_BATCHES
        items = [next(self._iters[i]) for i in self.sources_of(c * size, (c + 1) * size)]
        plain = [items[b * self.local_batch : (b + 1) * self.local_batch] for b in range(MEGA_BATCHES)]
        if not self.group_by_length:
            batches = plain
        else:
            ranked = sorted(items, key=lambda s: s.length, reverse=True)  # stable: ties keep stream order
            grouped = [ranked[b * self.local_batch : (b + 1) * self.local_batch] for b in range(MEGA_BATCHES)]
            order = _rng(self.seed, self.stage_index, 13, self.rank, c).permutation(MEGA_BATCHES)
            batches = [grouped[j] for j in order]
        for batch, key, packing in ((plain, "before", False), (batches, "after", self.packing)):
            for b in batch:
                for micro in self.micro_batches(b, sort=key == "after"):
                    cells, real = batch_padding([s.length for s in micro], packing)
                    self.cells[key] += cells
                    if key == "after":
                        self.cells["real"] += real
        return batches

    def micro_batches(self, batch: list[TrainSample], sort: bool = True) -> list[list[TrainSample]]:
        """The ``accum`` micro-batches of a local batch (longest first when grouping by length)."""
        items = sorted(batch, key=lambda s: s.length, reverse=True) if sort and self.group_by_length else batch
        n = self.batch_size
        return [items[a * n : (a + 1) * n] for a in range(self.accum)]

    @property
    def padding(self) -> tuple[float, float]:
        """Padding fraction of the batches served so far: in stream order, and as served."""
        real = self.cells["real"]
        return tuple(1.0 - real / self.cells[k] if self.cells[k] else 0.0 for k in ("before", "after"))  # type: ignore[return-value]
