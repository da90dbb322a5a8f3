"""Run a predictor over an evaluation set: batching, resumable ``predictions.jsonl``, ``report.json``, a table.

The runner needs only a *predictor*: a callable that takes a batch of chat conversations in content-parts form
(``[{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", "text": ...}]}]``) and
returns one answer string per conversation. Any model fits behind one, e.g.
``lambda convs: [r.text for r in vlm.generate_batch(convs, max_new_tokens=64, temperature=0)]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from vlmkit import jsonl
from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.evaluation.sources import describe_source, iter_rows, source_digest
from vlmkit.evaluation.tasks import EvalSample, Task, get_task

logger = logging.getLogger(__name__)

Predictor = Callable[[list[list[dict[str, Any]]]], list[str]]
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.json"
RUN_FILE = "run.json"
_RUN_KEYS = ("task", "data_sha256", "blank_images")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_samples(
    task: Task,
    data_path: str | Path,
    image_root: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
) -> list[EvalSample]:
    """Read and validate the first ``limit`` rows of a source as ``task`` samples (a task may make several
    samples of one row: MMBench's CircularEval).

    Sources (:func:`~vlmkit.evaluation.sources.iter_rows`): a JSONL file, a parquet file or folder, a datasets
    folder (``split`` for a DatasetDict or the hub's parquet splits). Each row gets ``_index``, its position,
    for data without ids. Relative image paths resolve against ``image_root`` (default: the data file's folder,
    or the data folder). Errors name the file and line (or row); duplicate ids are refused.
    """
    path = Path(data_path)
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    rows: list[tuple[str, dict[str, Any]]] = []
    for where, row in iter_rows(path, split):
        if limit is not None and len(rows) >= limit:
            break
        rows.append((where, {**row, "_index": len(rows)}))
    samples: list[EvalSample] = []
    seen: dict[str, str] = {}
    for sample in task.read_rows(rows, root):
        if sample.id in seen:
            raise DataError(f"{sample.where}: duplicate id {sample.id!r} (first at {seen[sample.id]})")
        seen[sample.id] = sample.where
        samples.append(sample)
    return samples


def _check_prediction(row: dict[str, Any]) -> None:
    if "id" not in row or "prediction" not in row:
        raise ValueError("not a prediction row: it needs 'id' and 'prediction'")


def read_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """The rows of a ``predictions.jsonl`` by id, repairing a torn last line (cut off by a crash) in place.

    A malformed line before the last one is a DataError; a repeated id keeps its first row.
    """
    rows: dict[str, dict[str, Any]] = {}
    for row in jsonl.read_rows(path, _check_prediction, "a prediction row", "{path}:{line}"):
        key = str(row.data["id"])
        if key in rows:
            logger.warning("%s:%d: id %r already predicted; keeping the first row", path, row.line, key)
            continue
        rows[key] = row.data
    return rows


def blank_like(image: Image.Image, background: tuple[int, ...] | None = None) -> Image.Image:
    """A blank RGB image of ``image``'s size in ``background`` (default: its top-left pixel's colour)."""
    rgb = image.convert("RGB")
    colour = background if background is not None else rgb.getpixel((0, 0))
    return Image.new("RGB", rgb.size, colour)


def _blank_sample(sample: EvalSample) -> EvalSample:
    from vlmkit.processing.images import load_image

    image = sample.image
    if image is None:
        return sample
    blank = blank_like(image if isinstance(image, Image.Image) else load_image(image))
    return dataclasses.replace(sample, image=blank)


def _check_run(out: Path, run: dict[str, Any]) -> None:
    """Refuse to resume predictions made for another task, data set, image condition or model."""
    path = out / RUN_FILE
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable ({exc}); remove it or choose another output folder") from exc
        keys = [*_RUN_KEYS, *(["model"] if previous.get("model") and run.get("model") else [])]
        changed = [k for k in keys if previous.get(k) != run.get(k)]
        if changed:
            raise ConfigError(
                f"{out} holds predictions of another run ({', '.join(changed)} differ); "
                "choose another output folder or remove it"
            )
    elif (out / PREDICTIONS_FILE).exists():
        logger.warning("%s has no %s; resuming its predictions as they are", out, RUN_FILE)
    path.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")


def _call(predictor: Predictor, batch: Sequence[EvalSample]) -> list[str]:
    answers = predictor([s.conversation() for s in batch])
    if isinstance(answers, str | bytes) or len(answers) != len(batch):
        count = "a string" if isinstance(answers, str | bytes) else f"{len(answers)} answers"
        raise VlmkitError(f"the predictor returned {count} for {len(batch)} conversations; it must return a list")
    if not all(isinstance(a, str) for a in answers):
        raise VlmkitError("the predictor must return strings (the generated text of each conversation)")
    return list(answers)


def _image_key(sample: EvalSample) -> Any:
    image = sample.image
    return image if isinstance(image, str | bytes) or image is None else id(image)


def by_image(samples: Sequence[EvalSample]) -> list[EvalSample]:
    """``samples`` with the questions about one image together (images in order of first appearance, questions
    in their order), so that the engine's caches reuse the image's features and prompt prefix."""
    groups: dict[Any, list[EvalSample]] = {}
    for sample in samples:
        groups.setdefault(_image_key(sample), []).append(sample)
    return [sample for group in groups.values() for sample in group]


def run_samples(
    predictor: Predictor,
    task: Task,
    samples: Sequence[EvalSample],
    *,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    run_info: dict[str, Any] | None = None,
    blank_images: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every sample not yet in ``out_dir/predictions.jsonl`` and aggregate: the report's core fields.

    Each batch's rows (id, prompt, prediction, per-sample score) are appended and flushed before the next
    batch starts, so an interrupted run resumes where it stopped. Questions about one image are predicted
    together (:func:`by_image`); the report keeps the samples' order.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    out = Path(out_dir) if out_dir is not None else None
    done: dict[str, dict[str, Any]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_run(out, {**(run_info or {}), "task": task.name, "blank_images": blank_images})
        done = read_predictions(out / PREDICTIONS_FILE)
    ids = {s.id for s in samples}
    resumed = sum(1 for k in done if k in ids)
    if resumed:
        logger.info("resuming: %d of %d samples already predicted in %s", resumed, len(samples), out)
    pending = by_image([s for s in samples if s.id not in done])
    predictions = {k: str(v["prediction"]) for k, v in done.items()}
    start = time.perf_counter()
    writer = (out / PREDICTIONS_FILE).open("ab") if out is not None else None
    try:
        with tqdm(total=len(samples), initial=resumed, desc=task.name, unit="sample", disable=not progress) as bar:
            for lo in range(0, len(pending), batch_size):
                batch = pending[lo : lo + batch_size]
                inputs = [_blank_sample(s) for s in batch] if blank_images else batch
                answers = _call(predictor, inputs)
                rows = []
                for sample, answer in zip(batch, answers, strict=True):
                    predictions[sample.id] = answer
                    rows.append({"id": sample.id, "prompt": sample.prompt, "prediction": answer,
                                 **task.score(sample, answer)})  # fmt: skip
                if writer is not None:
                    jsonl.append_rows(writer, rows)
                bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
    duration = time.perf_counter() - start
    ordered = [predictions[s.id] for s in samples]
    metrics = task.aggregate(samples, ordered)
    new = len(pending)
    return {
        "metrics": metrics,
        "summary": task.summary(metrics),
        "counts": {"samples": len(samples), "resumed": resumed, "new": new},
        "duration_s": round(duration, 3),
        "samples_per_s": round(new / duration, 3) if new and duration > 0 else None,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _finish(report: dict[str, Any], out_dir: str | Path | None) -> dict[str, Any]:
    from vlmkit import __version__

    report = _json_safe(
        {
            **report,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "vlmkit_version": __version__,
        }
    )
    if out_dir is not None:
        path = Path(out_dir) / REPORT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        logger.info("wrote %s", path)
    return report


def evaluate(
    predictor: Predictor,
    task: str | Task,
    data_path: str | Path,
    image_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    model_name: str = "",
    *,
    blank_images: bool = False,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``predictor`` on a data source (JSONL, parquet, a datasets folder: :func:`load_samples`);
    returns the report (also written to ``out_dir``).

    ``task`` is a registered name (see :func:`~vlmkit.evaluation.tasks.get_task`, built with ``task_options``)
    or a Task. With ``out_dir``, predictions go to ``predictions.jsonl`` batch by batch and a rerun resumes
    from them; ``report.json`` holds metrics, counts, model, the data file's sha256, duration and samples/s.
    ``blank_images`` replaces each image by a blank one of its size and top-left colour.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be non-negative, got {limit}")
    task_obj = task if isinstance(task, Task) else get_task(task, **(task_options or {}))
    samples = load_samples(task_obj, data_path, image_root, limit, split)
    digest = source_digest(data_path, split)
    run_info = {"model": model_name, "data": describe_source(data_path, split), "data_sha256": digest}
    core = run_samples(
        predictor,
        task_obj,
        samples,
        batch_size=batch_size,
        out_dir=out_dir,
        run_info=run_info,
        blank_images=blank_images,
        progress=progress,
    )
    report = {
        "task": task_obj.name,
        **run_info,
        "limit": limit,
        "blank_images": blank_images,
        "batch_size": batch_size,
        **core,
    }
    return _finish(report, out_dir)


def evaluate_suite(
    predictor: Predictor,
    n: int = 100,
    seed: int = 0,
    blank_images: bool = False,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    model_name: str = "",
    *,
    later_turns: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``predictor`` on every ShapesWorld task type over the first ``n`` test images of ``seed``.

    With ``blank_images`` the same questions are also asked about blank images (same size and background) and
    the report gains ``ablation.blank_images``; those predictions go to ``out_dir/blank/``. With ``later_turns``
    they are also asked as the 2nd to 5th turn of a conversation about the image (see
    :mod:`vlmkit.evaluation.shapesworld`): the report gains ``later_turns``, predictions in ``out_dir/turns/``.
    """
    from vlmkit.evaluation.shapesworld import ShapesWorldSuite, iter_suite_samples, samples_digest

    if n < 1:
        raise ConfigError(f"the ShapesWorld suite needs at least one test image, got n={n}")
    task = ShapesWorldSuite()
    samples = list(iter_suite_samples(n, seed))
    run_info = {
        "model": model_name,
        "data": f"shapesworld:test:n={n}:seed={seed}",
        "data_sha256": samples_digest(samples),
    }
    core = run_samples(
        predictor, task, samples, batch_size=batch_size, out_dir=out_dir, run_info=run_info, progress=progress
    )
    report: dict[str, Any] = {
        "task": task.name,
        **run_info,
        "n_images": n,
        "seed": seed,
        "batch_size": batch_size,
        **core,
    }
    if blank_images:
        blank = list(iter_suite_samples(n, seed, blank_images=True))
        blank_out = Path(out_dir) / "blank" if out_dir is not None else None
        report["ablation"] = {
            "blank_images": run_samples(
                predictor,
                task,
                blank,
                batch_size=batch_size,
                out_dir=blank_out,
                run_info=run_info,
                blank_images=True,
                progress=progress,
            )
        }
    if later_turns:
        turns = list(iter_suite_samples(n, seed, later_turns=True))
        report["later_turns"] = run_samples(
            predictor,
            task,
            turns,
            batch_size=batch_size,
            out_dir=Path(out_dir) / "turns" if out_dir is not None else None,
            run_info={**run_info, "data": run_info["data"] + ":later_turns", "data_sha256": samples_digest(turns)},
            progress=progress,
        )
    return _finish(report, out_dir)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_table(report: dict[str, Any], full: bool = False) -> str:
    """The report as a plain-text table: a header, then the summary metrics (all metrics with ``full``).

    A blank-image ablation and later-turn questions add a value column each.
    """
    pick = (lambda r: _flatten(r["metrics"])) if full else (lambda r: r["summary"])
    columns = [("value", pick(report))]
    ablation = report.get("ablation", {}).get("blank_images")
    if ablation is not None:
        columns = [("images", columns[0][1]), ("blank images", pick(ablation))]
    if report.get("later_turns") is not None:
        columns[0] = ("first turn", columns[0][1])
        columns.append(("later turns", pick(report["later_turns"])))
    names = list(dict.fromkeys(name for _, values in columns for name in values))
    width = max([len("metric"), *(len(n) for n in names)])
    counts = report.get("counts", {})
    speed = report.get("samples_per_s")
    lines = [
        f"task: {report.get('task')}   model: {report.get('model') or '-'}   data: {report.get('data')} "
        f"(sha256 {str(report.get('data_sha256', ''))[:12]})",
        f"samples: {counts.get('samples')} ({counts.get('resumed', 0)} resumed)   "
        f"time: {report.get('duration_s') or 0:.1f} s   samples/s: {'-' if speed is None else f'{speed:.1f}'}",
        "",
        "  ".join([f"{'metric':<{width}}", *(f"{title:>12}" for title, _ in columns)]),
        "  ".join(["-" * width, *("-" * 12 for _ in columns)]),
    ]
    for name in names:
        lines.append("  ".join([f"{name:<{width}}", *(f"{_fmt(values.get(name)):>12}" for _, values in columns)]))
    return "\n".join(lines)
