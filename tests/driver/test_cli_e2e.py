"""End to end on the real offline MiniLM + SST-2: train, plots, resume, kill-and-resume, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora_jax.cli import main
from fedlora_jax.driver.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "experiments" / "configs" / "quickstart.py")
# Fields that legitimately differ between an interrupted+resumed run and a straight one.
VOLATILE = {"wall_s"}


def _rows(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    rc = main(["train", "--config", QUICK, "--variant", "smoke", "--out", str(out), "-o", "rounds=3", "--quiet"])
    assert rc == 0
    return out


@pytest.mark.slow
@pytest.mark.smoke
def test_train_writes_metrics_checkpoint_plots(straight_run):
    rows = _rows(straight_run)
    assert [r["round"] for r in rows] == [-1, 0, 1, 2]
    for r in rows[1:]:
        assert r["bytes_up"] > 0 and r["sim_round_time_s"] > 0 and "test_accuracy" in r
    assert (straight_run / "checkpoints" / "latest.json").is_file()
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_vs_simtime.png", "rank_map.png"):
        assert (straight_run / "plots" / name).stat().st_size > 1000
    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["compilations_this_call"] == 1
    assert summary["rounds_completed"] == 3


@pytest.mark.slow
@pytest.mark.smoke
def test_resume_equals_uninterrupted(straight_run, tmp_path):
    out = tmp_path / "resumed"
    args = ["train", "--config", QUICK, "--variant", "smoke", "--out", str(out), "-o", "rounds=3", "--quiet",
            "--no-plots"]
    assert main(args + ["--stop-after", "1"]) == 0
    assert len(_rows(out)) == 2
    # Without --resume an existing run is refused.
    assert main(args) == 2
    assert main(args + ["--resume"]) == 0
    assert _stable(_rows(out)) == _stable(_rows(straight_run))


@pytest.mark.slow
@pytest.mark.smoke
def test_sigkill_then_resume_reproduces_metrics(straight_run, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedlora_jax", "train", "--config", QUICK, "--variant", "smoke", "--out", str(out),
           "-o", "rounds=3", "--quiet", "--no-plots"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.2)
    time.sleep(0.3)  # land somewhere inside the next round
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    assert main(cmd[3:] + ["--resume"]) == 0
    assert _stable(_rows(out)) == _stable(_rows(straight_run))


@pytest.mark.slow
@pytest.mark.smoke
def test_resume_with_different_config_refused(straight_run, tmp_path):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(straight_run, out)
    with pytest.raises(CheckpointError, match="different config"):
        from fedlora_jax.driver.config import load_config
        from fedlora_jax.driver.run import run_experiment

        cfg = load_config(QUICK, variant="smoke", overrides=["rounds=4", "lr=0.01"])
        run_experiment(cfg, out, resume=True, quiet=True)


@pytest.mark.slow
@pytest.mark.smoke
def test_corrupt_checkpoint_refused(straight_run, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(straight_run, out)
    ck = out / "checkpoints"
    latest = json.loads((ck / "latest.json").read_text())["name"]
    for f in (ck / latest).rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    from fedlora_jax.driver.config import load_config
    from fedlora_jax.driver.run import run_experiment

    cfg = load_config(QUICK, variant="smoke", overrides=["rounds=4"])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_experiment(cfg, out, resume=True, quiet=True)


@pytest.mark.slow
@pytest.mark.smoke
def test_eval_and_export_peft(straight_run, tmp_path):
    from fedlora_jax.driver.evaluate import evaluate_run
    from fedlora_jax.models.peft_io import import_peft

    res = evaluate_run(straight_run)
    last = _rows(straight_run)[-1]
    assert res["round"] == 2
    assert abs(res["test_accuracy"] - last["test_accuracy"]) < 1e-6
    out = tmp_path / "peft"
    assert main(["export-peft", str(straight_run), "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "head.safetensors").is_file()
    lora, masks, scale = import_peft(out)
    assert len(lora) == 12


def test_devices_command(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "raspberry_pi_5_8gb" in out and "jetson_orin_nano_8gb" in out


def test_unknown_override_key_is_a_clear_cli_error(capsys):
    assert main(["train", "--config", QUICK, "--variant", "smoke", "-o", "roundz=3"]) == 2
    assert "did you mean 'rounds'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, kind):
    out = tmp_path / kind
    if kind == "empty":
        out.mkdir()
    rc = main(["train", "--config", QUICK, "--variant", "smoke", "--out", str(out), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"error: nothing to resume at {out}: it holds no checkpoint (start a new run without --resume)\n"
    assert (kind == "empty") == out.exists()   # nothing was created or written
    if kind == "empty":
        assert not any(out.iterdir())
