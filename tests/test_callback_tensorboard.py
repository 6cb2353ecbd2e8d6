"""A real TensorBoard server finds the CurvatureMonitor's scalars, histograms and figures."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from nncurv.callbacks import CurvatureMonitor

from tests.test_callback_common import (  # noqa: F401 - one_thread is a fixture
    QUIET,
    Regression,
    loader,
    make_trainer,
    one_thread,
    read_events,
    regression_data,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    *[pytest.mark.filterwarnings(q) for q in QUIET],
]

TENSORBOARD = Path(sys.executable).parent / "tensorboard"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, route: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=5) as resp:
        return json.loads(resp.read())


def _tags(payload: dict[str, dict[str, Any]]) -> set[str]:
    return {tag for run in payload.values() for tag in run}


def _start_tensorboard(logdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A TensorBoard server on a free port, once it answers.

    The port is free when picked but another process can take it before TensorBoard binds it;
    then TensorBoard exits and a new port is tried (three times at most).
    """
    for _ in range(3):
        port = _free_port()
        proc = subprocess.Popen(
            [
                str(TENSORBOARD),
                "--logdir",
                str(logdir),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--load_fast",
                "false",
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                _get(port, "/data/plugin/scalars/tags")
                return proc, port
            except OSError:  # not listening yet
                time.sleep(0.5)
        _stop(proc)
    raise AssertionError("tensorboard did not start on any of three ports")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not TENSORBOARD.exists(), reason="no tensorboard executable")
def test_tensorboard_server_shows_scalars_histograms_and_images(tmp_path):
    pytest.importorskip("matplotlib")
    X, y = regression_data(32, 4)
    cb = CurvatureMonitor(
        metrics=["top_eig", "trace", "density", "diagonal"], top_k=2, every_n_steps=2
    )
    trainer = make_trainer(tmp_path / "logs", [cb], max_steps=4, precision="64-true")
    trainer.fit(Regression(4, lr=0.01), loader(X, y, 8))
    # the event files hold everything (custom-scalars layout included) before the server reads
    _, kinds = read_events(trainer.logger.log_dir)
    assert "custom_scalars__config__" in kinds["tensors"]

    proc, port = _start_tensorboard(tmp_path / "logs")
    want_scalars = {"curvature/hessian/top_eig_0", "curvature/hessian/top_eig_1"}
    want_scalars |= {"curvature/hessian/trace", "curvature/hessian/trace_stderr"}
    want_hist = {"curvature/hessian/spectral_density", "curvature/hessian/diagonal/lin"}
    want_img = {"curvature/hessian/spectral_density_plot"}
    found: dict[str, set[str]] = {}
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, "tensorboard exited"
            try:
                found = {
                    "scalars": _tags(_get(port, "/data/plugin/scalars/tags")),
                    "histograms": _tags(_get(port, "/data/plugin/histograms/tags")),
                    "images": _tags(_get(port, "/data/plugin/images/tags")),
                }
            except OSError:  # a transient error while it loads the logs
                time.sleep(0.5)
                continue
            if (
                want_scalars <= found["scalars"]
                and want_hist <= found["histograms"]
                and want_img <= found["images"]
            ):
                break
            time.sleep(0.5)
        assert want_scalars <= found.get("scalars", set()), found
        assert want_hist <= found.get("histograms", set()), found
        assert want_img <= found.get("images", set()), found
        run = next(iter(_get(port, "/data/plugin/scalars/tags")))
        series = _get(
            port, f"/data/plugin/scalars/scalars?run={run}&tag=curvature/hessian/top_eig_0"
        )
        assert [point[1] for point in series] == [2, 4]  # (wall time, step, value) rows
        layout = json.dumps(_get(port, "/data/plugin/custom_scalars/layout"))
        for chart in ["Hessian top eigenvalues", "curvature/hessian/trace_lower", "margin"]:
            assert chart in layout, layout
    finally:
        _stop(proc)


def test_merged_scalar_events_read_back_like_log_metrics(tmp_path):
    """One merged event per call for a stock TensorBoardLogger (prefix honoured) reads back
    exactly like Lightning's one-event-per-scalar ``log_metrics``; other loggers and loggers
    that override ``log_metrics`` are called as usual."""
    from nncurv.callbacks._tb import log_scalars
    from pytorch_lightning.loggers import TensorBoardLogger

    from tests.test_callback_common import read_events

    tags = {"curvature/a": 1.5, "curvature/b/c": -2.25, "curvature/n": 7.0}
    ours = TensorBoardLogger(str(tmp_path), name="ours", prefix="run")
    theirs = TensorBoardLogger(str(tmp_path), name="theirs", prefix="run")
    for step in (3, 8):
        log_scalars(ours, {k: v * step for k, v in tags.items()}, step)
        theirs.log_metrics({k: v * step for k, v in tags.items()}, step=step)
    ours.experiment.flush()
    theirs.experiment.flush()
    got, _ = read_events(ours.log_dir)
    want, _ = read_events(theirs.log_dir)
    assert set(got) == {f"run-{k}" for k in tags}
    assert got == want

    class Custom(TensorBoardLogger):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

    custom = Custom(str(tmp_path), name="custom")
    log_scalars(custom, tags, 5)
    assert custom.calls == [(5, tags)]


def test_merged_events_only_for_torch_summary_writers(tmp_path):
    """A stock logger whose experiment is another writer (tensorboardX, which Lightning falls
    back to) gets ``log_metrics``."""
    from nncurv.callbacks._tb import log_scalars
    from pytorch_lightning.loggers import TensorBoardLogger

    class OtherWriter:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def _get_file_writer(self):  # noqa: ANN202 - present on tensorboardX writers too
            raise AssertionError("the merged path must not be taken")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, value, step))

    writer = OtherWriter()

    class Logger(TensorBoardLogger):
        @property
        def experiment(self):  # noqa: ANN202
            return writer

    log_scalars(Logger(str(tmp_path)), {"a": 1.0, "b": 2.0}, 4)
    assert writer.scalars == [("a", 1.0, 4), ("b", 2.0, 4)]


def test_log_scalars_without_tensorboard_calls_log_metrics(monkeypatch):
    """Without tensorboard (the lightning extra not installed) every logger still gets its
    scalars through ``log_metrics``."""
    import nncurv.callbacks._tb as tb

    monkeypatch.setattr(tb, "_summary_types", lambda: None)

    class Plain:
        _prefix = ""

        def __init__(self) -> None:
            self.calls: list[tuple[int | None, dict[str, float]]] = []

        def log_metrics(self, metrics, step=None):  # noqa: ANN001
            self.calls.append((step, dict(metrics)))

    lg = Plain()
    tb.log_scalars(lg, {"a": 1.0}, 3)
    assert lg.calls == [(3, {"a": 1.0})]


def _layout(log_dir: str) -> dict[str, list[str]]:
    """The custom-scalars layout in the event files: chart title -> tag regexes."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts: dict[str, list[str]] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        acc = EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        if "custom_scalars__config__" not in acc.Tags()["tensors"]:
            continue
        events = acc.Tensors("custom_scalars__config__")
        assert len(events) == 1, "one layout per run"
        layout = layout_pb2.Layout()
        layout.ParseFromString(events[0].tensor_proto.string_val[0])
        for category in layout.category:
            for chart in category.chart:
                if chart.HasField("multiline"):
                    charts[chart.title] = list(chart.multiline.tag)
                else:
                    charts[chart.title] = [s.value for s in chart.margin.series]
    return charts


def test_layout_comes_from_a_training_call_even_after_a_validation_call(tmp_path):
    X, y = regression_data(32, 4)
    # 4 steps an epoch: validation at step 4 comes before the training call at step 6
    cb = CurvatureMonitor(metrics=["top_eig"], every_n_steps=6, validation=True)
    trainer = make_trainer(tmp_path / "logs", [cb], max_epochs=2, precision="64-true")
    data = loader(X, y, 8)
    trainer.fit(Regression(4, lr=0.0), data, data)  # lr = 0: no 2/lr scalar at all
    scalars, _ = read_events(trainer.logger.log_dir)
    assert scalars["curvature/val/hessian/top_eig_0"][0][0] == 4
    assert [st for st, _ in scalars["curvature/hessian/top_eig_0"]] == [6]
    charts = _layout(trainer.logger.log_dir)
    assert charts["Hessian top eigenvalues"] == [r"curvature/hessian/top_eig_\d+$"], charts
    assert r"curvature/hessian/top_eig_0$" in charts["Sharpness vs 2/lr"], charts
