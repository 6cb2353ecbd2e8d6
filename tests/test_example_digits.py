"""The main example runs end to end (quick configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_curvature_example_runs():
    pytest_sklearn = __import__("pytest").importorskip("sklearn")
    assert pytest_sklearn is not None
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_curvature.py"), "--quick"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "Hessian top-5 eigenvalues" in out.stdout
    assert "model state and global RNG unchanged by the analysis: True" in out.stdout


def test_training_example_with_the_callback_runs(tmp_path):
    __import__("pytest").importorskip("sklearn")
    script = ROOT / "examples" / "train_with_curvature_monitor.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--arch", "mlp", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "lambda_max" in out.stdout and "x 2/lr at step" in out.stdout
    assert (tmp_path / "digits_mlp.ckpt").is_file()
    assert f"tensorboard --logdir {tmp_path}" in out.stdout
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file"
