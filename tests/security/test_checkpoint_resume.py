"""Resume after a damaged checkpoint (issue 14): a truncated ``trainer_state.pt`` falls back to the previous one."""

from __future__ import annotations

import logging

import pytest

from test_training_support import make_assets, run_config
from vlmkit.errors import CheckpointError
from vlmkit.training import checkpoint as ckpt
from vlmkit.training import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n=8)


def truncate(file, fraction=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="module")
def stopped(assets, tmp_path_factory):
    """A run of 6 steps stopped after step 4 with checkpoints at steps 2 and 4: (config, first result, run dir)."""
    out = tmp_path_factory.mktemp("stopped")
    config = run_config(assets, out, {"steps": 6}, save_every=2)
    first = train(config, callbacks=[lambda r: r.get("event") == "step" and r["step"] == 4])
    assert first.interrupted and first.global_step == 4
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["step-00000002", "step-00000004"]
    return config, first, out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_latest_state_resumes_from_the_previous_checkpoint(stopped, tmp_path, caplog):
    config, first, src = stopped
    out = copy_run(src, tmp_path / "run")
    bad = out / "checkpoints" / "step-00000004" / ckpt.TRAINER_STATE
    truncate(bad)
    caplog.set_level(logging.WARNING, logger="vlmkit.training")
    resumed = train({**config, "output_dir": str(out)}, resume=True)
    assert not resumed.interrupted and resumed.global_step == 6
    # steps 3 and 4 are done again from the step-2 checkpoint, exactly as the first time
    assert resumed.losses[:2] == pytest.approx(first.losses[2:4], abs=1e-6, rel=0) and len(resumed.losses) == 4
    [warning] = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert str(bad) in warning and str(out / "checkpoints" / "step-00000002") in warning and "instead" in warning
    assert ckpt.read_trainer_state(out / "checkpoints" / "step-00000004")["position"]["global_step"] == 4, (
        "the damaged checkpoint was written again when the run passed its step"
    )


def test_without_a_readable_checkpoint_the_error_names_the_files(stopped, tmp_path):
    config, _, src = stopped
    out = copy_run(src, tmp_path / "run")
    bad = [out / "checkpoints" / name / ckpt.TRAINER_STATE for name in ("step-00000002", "step-00000004")]
    truncate(bad[1])
    bad[0].write_bytes(b"")  # an empty file, as a crash before the data reached the disk leaves
    with pytest.raises(CheckpointError) as info:
        train({**config, "output_dir": str(out)}, resume=True)
    message = str(info.value)
    assert message.startswith(f"nothing to resume: no readable checkpoint in {out / 'checkpoints'}")
    assert str(bad[0]) in message and str(bad[1]) in message and "cannot be read" in message
    with pytest.raises(CheckpointError, match="nothing to resume: no readable checkpoint"):
        ckpt.load_resume(out, tmp_path)  # the same through a run folder


def test_an_explicit_checkpoint_folder_is_not_replaced_by_another(stopped, tmp_path, caplog):
    config, _, src = stopped
    out = copy_run(src, tmp_path / "run")
    folder = out / "checkpoints" / "step-00000004"
    truncate(folder / ckpt.TRAINER_STATE, 0.9)
    with pytest.raises(CheckpointError, match=rf"^{folder / ckpt.TRAINER_STATE}: cannot be read") as info:
        train({**config, "output_dir": str(out)}, resume=str(folder))
    assert "step-00000002" in str(info.value), "the message says what else could be resumed"
    path, state = ckpt.load_resume(out / "checkpoints" / "step-00000002", out)
    assert path.name == "step-00000002" and state["position"]["global_step"] == 2


def test_a_damaged_checkpoint_json_falls_back_too(stopped, tmp_path, caplog):
    _, _, src = stopped
    out = copy_run(src, tmp_path / "run")
    meta = out / "checkpoints" / "step-00000004" / ckpt.META_FILE
    truncate(meta)
    with pytest.raises(CheckpointError, match=rf"{meta}: cannot be read"):
        ckpt.read_meta(meta.parent)
    caplog.set_level(logging.WARNING, logger="vlmkit.training")
    path, state = ckpt.load_resume(True, out)
    assert path.name == "step-00000002" and state["position"]["global_step"] == 2
    assert str(meta) in caplog.text and "step-00000002 instead" in caplog.text
