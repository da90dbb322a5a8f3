"""Training data: stage mixes loaded and encoded once, a deterministic batch plan, collation with packing
(stages too big for that stream instead: :mod:`vlmkit.training.streaming`).

The plan is a pure function of ``(seed, stage index, step)``: the mix is an endless stream of epochs (each as
many samples as the sources hold, split by weight, every source drawn through fresh permutations), and global
batch ``step`` is read off that stream. Resuming at a step therefore needs nothing but the step number, and the
global batch does not depend on the number of processes: each rank takes its own micro-batches of it.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.data.formats import open_dataset, resolve_image
from vlmkit.data.formats.base import DecodeImages
from vlmkit.data.formats.schemas import DEFAULT_CAPTION_PROMPT
from vlmkit.errors import DataError, ProcessingError
from vlmkit.processing.processor import IGNORE_INDEX, EncodedSample, VLMProcessor
from vlmkit.training.config import DataSource, LossWeighting

log = logging.getLogger(__name__)

MEGA_BATCHES = 16
"""Global batches per length-grouping chunk: samples are sorted by length within ``MEGA_BATCHES`` batches."""
PADDING_PLAN_STEPS = 256
"""Steps of the plan over which the padding fraction is measured."""

Item = tuple[int, int]
"""(source index, sample index within the source)."""


@dataclass
class TrainSample:
    """One encoded conversation: token ids and labels (images expanded), with its images kept undecoded.

    :func:`encode_source` stores ids and labels as ``array("i")`` (4 bytes a token, not a Python int each)."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    image_token_counts: list[int]
    images: list[Any]
    """The images as given by the dataset: paths, encoded bytes or image handles (see :func:`read_samples`),
    read and decoded per batch."""
    id: str = ""
    """The record's id."""

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> int:
        """Tokens the loss is taken on (a label at position 0 has nothing before it to predict it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)

    def loss_weights(self, weighting: LossWeighting) -> list[float]:
        """The weight of each position's loss term (0 where nothing is predicted); see :func:`turn_weights`."""
        return turn_weights(self.labels, weighting)


def turn_weights(labels: Sequence[int], weighting: LossWeighting) -> list[float]:
    """Per-position loss weights for ``labels``: 1 per supervised token (``token``), ``1/n`` (``turn``) or
    ``1/sqrt(n)`` (``turn_sqrt``) for each token of a turn of ``n`` supervised tokens in a row. Position 0
    predicts nothing and weighs 0."""
    weights = [0.0] * len(labels)
    k = 1
    while k < len(labels):
        if labels[k] == IGNORE_INDEX:
            k += 1
            continue
        end = k
        while end < len(labels) and labels[end] != IGNORE_INDEX:
            end += 1
        n = end - k
        w = 1.0 if weighting == "token" else (1.0 / n if weighting == "turn" else n**-0.5)
        weights[k:end] = [w] * n
        k = end
    return weights


@dataclass
class SourceData:
    """The usable samples of one :class:`DataSource` and what was skipped, by reason."""

    source: DataSource
    samples: list[TrainSample]
    skipped: Counter[str] = field(default_factory=Counter)


def read_samples(source: DataSource, decode_images: DecodeImages = "lazy") -> Any:
    """Open a source's dataset (any format, any record schema); a missing path raises DataError. By default each
    image is checked and kept as its path, or as a handle to where it lies in a tar, parquet or ``datasets`` file
    (read and decoded again per batch), so a stage's data costs no pixel memory and no image-file memory."""
    prompt = source.caption_prompt or DEFAULT_CAPTION_PROMPT
    return open_dataset(
        source.path, source.format, image_root=source.image_root, skip_bad=source.skip_bad,
        decode_images=decode_images, columns=source.columns, split=source.split, llava_compat=source.llava_compat,
        allow_absolute_paths=source.allow_absolute_paths, caption_prompt=prompt,
    )  # fmt: skip


def check_source(source: DataSource, where: str) -> None:
    """Fail early, with the stage and index in the message, when a data path doesn't exist or can't be read."""
    if not any(ch in source.path for ch in "*{") and not Path(source.path).exists():
        raise DataError(f"{where}: data path {source.path} does not exist")
    try:
        read_samples(source)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


def encode_sample(sample: Any, processor: VLMProcessor, max_length: int | None) -> TrainSample | str:
    """One sample encoded for training, or why it is skipped (``too_long``, ``no_target``); a sample the
    processor rejects raises its ProcessingError."""
    encoded = processor.encode(sample.messages, sample.images, train=True, name=sample.id, pixels=False)
    images = list(sample.images)
    order = encoded.image_order if encoded.image_order is not None else range(len(images))
    item = TrainSample(array("i", encoded.input_ids), array("i", encoded.labels or []),
                       encoded.image_token_counts, [images[i] for i in order], sample.id)  # fmt: skip
    if max_length is not None and item.length > max_length:
        return "too_long"
    if item.targets == 0:
        return "no_target"
    return item


def encode_source(source: DataSource, processor: VLMProcessor, max_length: int | None, where: str) -> SourceData:
    """Read and encode every sample of a source; over-long or target-less samples are skipped and counted."""
    try:
        dataset = read_samples(source)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    out = SourceData(source, [])
    for sample in dataset:
        if source.limit is not None and len(out.samples) >= source.limit:
            break
        try:
            item = encode_sample(sample, processor, max_length)
        except ProcessingError as exc:
            if not source.skip_bad:
                raise DataError(f"{where}: sample {sample.id!r}: {exc}") from exc
            out.skipped["unencodable"] += 1
            continue
        if isinstance(item, str):
            out.skipped[item] += 1
        else:
            out.samples.append(item)
    out.skipped.update(getattr(dataset, "problems", {}))
    if out.skipped:
        log.warning("%s: skipped %s", where, dict(out.skipped))
    if not out.samples:
        detail = f" (skipped: {dict(out.skipped)})" if out.skipped else ""
        raise DataError(f"{where}: no usable sample in {source.path}{detail}")
    return out


# ---------------------------------------------------------------------------------------------------- the plan


def _split_counts(total: int, weights: list[float]) -> list[int]:
    """``total`` split by ``weights`` with largest-remainder rounding (sums exactly to ``total``)."""
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(int)
    order = np.argsort(-(shares - counts), kind="stable")
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class BatchPlan:
    """Which samples form global batch ``step`` of a stage; deterministic and independent of world size.

    ``lengths[i][k]`` is the token length of sample ``k`` of source ``i``. With ``group_by_length`` the stream
    is cut into chunks of :data:`MEGA_BATCHES` global batches, sorted by length within each chunk, and the
    chunk's batches are served in a seeded random order.
    """

    def __init__(
        self,
        lengths: list[list[int]],
        weights: list[float],
        global_batch: int,
        *,
        seed: int,
        stage_index: int,
        group_by_length: bool = True,
    ) -> None:
        if any(not lens for lens in lengths):
            raise DataError("every source of a stage needs at least one sample")
        self.lengths = lengths
        self.sizes = [len(lens) for lens in lengths]
        self.epoch_size = sum(self.sizes)
        self.counts = _split_counts(self.epoch_size, weights)
        self.global_batch = global_batch
        self.seed = seed
        self.stage_index = stage_index
        self.group_by_length = group_by_length
        self._epochs: OrderedDict[int, list[Item]] = OrderedDict()
        self._chunks: OrderedDict[int, list[list[Item]]] = OrderedDict()

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stage_index, *key])

    def _source_items(self, source: int, start: int, count: int) -> list[int]:
        """Items ``start .. start+count-1`` of a source's endless stream of permutations."""
        n = self.sizes[source]
        out: list[int] = []
        pos = start
        while len(out) < count:
            cycle, offset = divmod(pos, n)
            perm = self._rng(0, source, cycle).permutation(n)
            take = min(n - offset, count - len(out))
            out += perm[offset : offset + take].tolist()
            pos += take
        return out

    def epoch(self, e: int) -> list[Item]:
        """The shuffled samples of epoch ``e`` of the mix."""
        if e not in self._epochs:
            items = [(i, k) for i, count in enumerate(self.counts) for k in self._source_items(i, e * count, count)]
            order = self._rng(1, e).permutation(len(items))
            self._epochs[e] = [items[j] for j in order]
            while len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def stream(self, start: int, stop: int) -> list[Item]:
        """Positions ``start .. stop-1`` of the endless stream of epochs."""
        out: list[Item] = []
        pos = start
        while pos < stop:
            e, offset = divmod(pos, self.epoch_size)
            take = min(self.epoch_size - offset, stop - pos)
            out += self.epoch(e)[offset : offset + take]
            pos += take
        return out

    def length(self, item: Item) -> int:
        return self.lengths[item[0]][item[1]]

    def _chunk(self, c: int) -> list[list[Item]]:
        if c not in self._chunks:
            size = self.global_batch * MEGA_BATCHES
            items = self.stream(c * size, (c + 1) * size)
            items.sort(key=self.length, reverse=True)  # stable: ties keep stream order
            batches = [items[b * self.global_batch : (b + 1) * self.global_batch] for b in range(MEGA_BATCHES)]
            order = self._rng(2, c).permutation(MEGA_BATCHES)
            self._chunks[c] = [batches[j] for j in order]
            while len(self._chunks) > 2:
                self._chunks.popitem(last=False)
        return self._chunks[c]

    def batch(self, step: int) -> list[Item]:
        """The global batch of ``step`` (0-based within the stage)."""
        if self.group_by_length:
            return self._chunk(step // MEGA_BATCHES)[step % MEGA_BATCHES]
        return self.stream(step * self.global_batch, (step + 1) * self.global_batch)

    def micro_batches(self, step: int, rank: int, world_size: int, accum: int) -> list[list[Item]]:
        """This rank's ``accum`` micro-batches of global batch ``step``; micro-batch ``a * world + rank``."""
        items = self.batch(step)
        if self.group_by_length:
            items = sorted(items, key=self.length, reverse=True)
        per = len(items) // (world_size * accum)
        return [items[(a * world_size + rank) * per : (a * world_size + rank + 1) * per] for a in range(accum)]

    def all_micro_batches(self, step: int, world_size: int, accum: int) -> list[list[Item]]:
        """Every micro-batch of global batch ``step`` (all ranks)."""
        return [mb for r in range(world_size) for mb in self.micro_batches(step, r, world_size, accum)]


# ---------------------------------------------------------------------------------------------------- packing


def pack_rows(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """First-fit-decreasing packing of sequence indices into rows of at most ``capacity`` tokens.

    ``capacity`` defaults to the longest length, so packing never widens a batch.
    """
    capacity = capacity or max(lengths)
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return rows


def batch_padding(lengths: list[int], packing: bool) -> tuple[int, int]:
    """``(padded cells, real tokens)`` of one micro-batch of sequences of these lengths."""
    width = max(lengths)
    rows = len(pack_rows(lengths)) if packing else len(lengths)
    return rows * width, sum(lengths)


def padding_fraction(plan: BatchPlan, steps: int, world_size: int, accum: int, packing: bool) -> float:
    """Fraction of batch cells that are padding over the first ``steps`` steps of ``plan``."""
    cells = real = 0
    for step in range(steps):
        for mb in plan.all_micro_batches(step, world_size, accum):
            c, r = batch_padding([plan.length(item) for item in mb], packing)
            cells, real = cells + c, real + r
    return 1.0 - real / cells if cells else 0.0


# ---------------------------------------------------------------------------------------------------- collation


class Collator:
    """Turns a micro-batch of :class:`TrainSample` into model inputs: right-padded, or packed into rows."""

    def __init__(self, processor: VLMProcessor, packing: bool = False, loss_weighting: LossWeighting = "token") -> None:
        self.processor = processor
        self.packing = packing
        self.loss_weighting = loss_weighting

    def _views(self, sample: TrainSample) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        if not sample.images:
            return None, []
        return self.processor.load_views([resolve_image(image) for image in sample.images])

    def __call__(self, samples: list[TrainSample]) -> dict[str, Any]:
        if self.packing:
            batch = self._packed(samples)
        else:
            encoded = []
            for s in samples:
                pixels, sizes = self._views(s)
                encoded.append(
                    EncodedSample(list(s.input_ids), list(s.labels), pixels, s.image_token_counts, image_sizes=sizes)
                )
            batch = self.processor.collate(encoded, padding_side="right")
            batch.pop("image_counts", None)
        if self.loss_weighting != "token":
            batch["loss_weights"] = self._weights(samples, batch["labels"].shape)
        batch["num_samples"] = len(samples)
        batch["num_tokens"] = sum(s.length for s in samples)
        batch["num_targets"] = sum(s.targets for s in samples)
        return batch

    def _weights(self, samples: list[TrainSample], shape: torch.Size) -> torch.Tensor:
        """Loss weights laid out like the labels (packed rows: samples side by side, in packing order)."""
        out = torch.zeros(shape)
        rows = pack_rows([s.length for s in samples]) if self.packing else [[i] for i in range(len(samples))]
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                weights = samples[i].loss_weights(self.loss_weighting)
                out[r, col : col + len(weights)] = torch.tensor(weights)
                col += len(weights)
        return out

    def _packed(self, samples: list[TrainSample]) -> dict[str, Any]:
        """Rows of several samples; position ids restart per sample, which transformers' masks read as packed
        sequences (attention stays within a sample). The first label of each sample is masked so no sample is
        trained to predict the next one's first token."""
        rows = pack_rows([s.length for s in samples])
        width = max(s.length for s in samples)
        input_ids = torch.full((len(rows), width), self.processor.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        pixels: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                s = samples[i]
                n = s.length
                input_ids[r, col : col + n] = torch.tensor(s.input_ids)
                labels[r, col + 1 : col + n] = torch.tensor(s.labels[1:])
                positions[r, col : col + n] = torch.arange(n)
                p, image_sizes = self._views(s)
                if p is not None:
                    pixels.append(p)
                    sizes += image_sizes
                col += n
            positions[r, col:] = torch.arange(width - col)  # padding: a segment of its own
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return batch


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset over this rank's micro-batches from ``start_step``: item ``k`` is micro-batch
    ``k % accum`` of step ``start_step + k // accum`` (so a DataLoader with workers can collate ahead)."""

    def __init__(
        self,
        plan: BatchPlan,
        sources: list[SourceData],
        collator: Collator,
        *,
        start_step: int,
        stop_step: int,
        rank: int,
        world_size: int,
        accum: int,
    ) -> None:
        self.plan, self.sources, self.collator = plan, sources, collator
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size, self.accum = rank, world_size, accum

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step) * self.accum

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, a = divmod(k, self.accum)
        items = self.plan.micro_batches(self.start_step + step, self.rank, self.world_size, self.accum)[a]
        return self.collator([self.sources[i].samples[j] for i, j in items])
