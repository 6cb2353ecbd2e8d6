"""``nncurv report`` end to end on a tiny checkpoint made here, in a browser, and its errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from nncurv.__main__ import build_parser, main  # noqa: E402
from nncurv.landscape import LandscapeSlice  # noqa: E402
from nncurv.report import ReportInputError, build_report  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "report_fixture.py"
MODULE = f"{FIXTURE}:IrisClassifier"
DATA = f"{FIXTURE}:make_loader"
ROOT = HERE.parent

# small but complete: every stage runs
FAST = dict(
    num_eigenvalues=2,
    trace_matvecs=20,
    density_probes=1,
    density_steps=12,
    steps=9,
    grid=5,
    information_metrics=("condition",),
    progress=False,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    try:
        import report_fixture as rf
    finally:
        sys.path.remove(str(HERE))
    d = tmp_path_factory.mktemp("ckpt")
    return {
        "iris": rf.train_checkpoint(d / "iris.ckpt"),
        "bn": rf.train_checkpoint(d / "iris_bn.ckpt", batchnorm=True),
        "other": rf.train_checkpoint(d / "other.ckpt", cls=rf.OtherClassifier),
    }


@pytest.fixture(scope="module")
def report(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report")
    return build_report(MODULE, ckpts["iris"], DATA, out, **FAST)  # type: ignore[arg-type]


def _dense_hessian(ckpt: Path) -> tuple[torch.Tensor, float]:
    sys.path.insert(0, str(HERE))
    try:
        import report_fixture as rf
    finally:
        sys.path.remove(str(HERE))
    model = rf.IrisClassifier.load_from_checkpoint(str(ckpt)).double().eval()
    X, y = next(iter(rf.make_loader(batch_size=150)))
    X = X.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts, off = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[off : off + s.numel()].reshape(s)
            off += s.numel()
        out = torch.func.functional_call(model, parts, (X,))
        return torch.nn.functional.cross_entropy(out, y)

    return torch.func.hessian(loss)(flat0), float(loss(flat0))


# ------------------------------------------------------------------------------- end to end
def test_report_end_to_end_files_and_numbers(report, ckpts):
    out = report.out_dir
    for p in (report.html, report.summary_json, *report.figures.values(), *report.slices.values()):
        assert p.is_file() and p.stat().st_size > 0, p
    assert set(report.figures) >= {"spectrum", "eigvec1", "eigvec2", "gradient", "random1"}
    assert {"plane_random", "plane_eigen", "plane_random_surface"} <= set(report.figures)
    s = json.loads(report.summary_json.read_text())
    assert s == report.summary
    # the numbers agree with a dense float64 Hessian of the same checkpoint (float32 model)
    H, loss = _dense_hessian(ckpts["iris"])
    evals = torch.linalg.eigvalsh(H)
    top = sorted(evals.tolist(), reverse=True)[:2]
    np.testing.assert_allclose(s["curvature"]["top_eigenvalues"], top, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(s["curvature"]["min_eigenvalue"], float(evals[0]), rtol=2e-3)
    assert abs(s["curvature"]["trace"] - float(evals.sum())) < 4 * max(
        s["curvature"]["trace_standard_error"], 1e-3
    )
    assert s["model"]["num_params"] == H.shape[0] and s["model"]["num_samples"] == 150
    np.testing.assert_allclose(s["model"]["loss"], loss, rtol=1e-5)
    # observed information: cross-entropy is a categorical likelihood, I = N H for the mean loss
    info = s["information"]
    assert info["available"] and info["likelihood"]["name"] == "categorical"
    np.testing.assert_allclose(info["condition"]["lambda_max"], 150 * top[0], rtol=2e-3)
    # landscape: slices load back, the centre is the checkpoint's loss, Taylor data present
    for key, path in report.slices.items():
        sl = LandscapeSlice.load(path)
        np.testing.assert_allclose(sl.center_loss, loss, rtol=1e-5)
        assert s["landscape"][key]["ndim"] == sl.ndim
    g = s["landscape"]["gradient"]["taylor"]
    assert isinstance(g["epsilon_star"], float) and g["epsilon_star"] > 0
    assert "accuracy" in LandscapeSlice.load(report.slices["plane_random"]).metrics
    # one self-contained page: every figure embedded, nothing loaded from elsewhere
    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == len(report.figures)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert str(out) in str(report.tensorboard_dir)


def test_report_tensorboard_events(report):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(report.tensorboard_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {f"report/{k}" for k in report.figures} == set(tags["images"])
    assert "curvature/top_eigenvalue_1" in tags["scalars"] and "curvature/trace" in tags["scalars"]
    lam = acc.Scalars("curvature/top_eigenvalue_1")[0].value
    assert lam == pytest.approx(report.summary["curvature"]["top_eigenvalues"][0], rel=1e-6)
    img = acc.Images("report/spectrum")[0]
    assert img.width == 600 and img.height > 300


@pytest.mark.slow
def test_report_with_batchnorm_recalibration(ckpts, tmp_path):
    rep = build_report(
        MODULE,
        ckpts["bn"],
        DATA,
        tmp_path,
        recalibrate_bn=True,
        information=False,
        tensorboard=False,
        random_directions=1,
        **{k: v for k, v in FAST.items() if k != "information_metrics"},  # type: ignore[arg-type]
    )
    assert rep.tensorboard_dir is None and not (tmp_path / "tensorboard").exists()
    assert rep.summary["information"]["available"] is False
    sl = LandscapeSlice.load(rep.slices["eigvec1"])
    assert sl.recalibrated_bn and sl.finite
    assert "plane_random" not in rep.slices and "plane_eigen" in rep.slices


# ------------------------------------------------------------------------------- in a browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(exe: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    base = [
        exe,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--virtual-time-budget=5000",
    ]
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(
        base + args, capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.mark.slow
def test_report_page_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    from PIL import Image

    url = report.html.resolve().as_uri()
    dom = _run_chromium(exe, ["--window-size=1280,5000", "--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = re.search(
        r'id="image-status"[^>]*data-decoded="(\d+)"[^>]*data-total="(\d+)"', dom.stdout
    )
    assert status, dom.stdout[:2000]
    assert int(status.group(1)) == int(status.group(2)) == len(report.figures)
    imgs = re.findall(r"<img [^>]*>", dom.stdout)
    assert len(imgs) == len(report.figures)
    rects = []
    for tag in imgs:
        w = int(re.search(r'data-natural-width="(\d+)"', tag).group(1))  # type: ignore[union-attr]
        assert w >= 400, tag[:200]
        rect = re.search(r'data-rect="([-\d,]+)"', tag).group(1)  # type: ignore[union-attr]
        alt = re.search(r'alt="([^"]*)"', tag).group(1)  # type: ignore[union-attr]
        rects.append(([int(v) for v in rect.split(",")], alt))

    shot = tmp_path / "shot.png"
    res = _run_chromium(exe, ["--window-size=1280,5000", f"--screenshot={shot}", url], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert im.shape[:2] == (5000, 1280)
    # not blank: the header bar has its colour and much of the page is not white
    assert np.abs(im[10, 10] - np.array([0x0B, 0x3D, 0x91])).max() <= 3
    assert (im.sum(axis=2) < 3 * 250).mean() > 0.05
    # every figure that lies inside the window is drawn where the DOM says, on its white
    # background, with its curves in matplotlib's first colour (#1f77b4) for line plots and in
    # viridis' dark end (#440154) for contours and surfaces
    c0, viridis = np.array([0x1F, 0x77, 0xB4]), np.array([0x44, 0x01, 0x54])
    seen = 0
    for (x, y, w, h), alt in rects:
        assert w > 200 and h > 150
        if y + h > im.shape[0]:
            continue
        crop = im[y : y + h, x : x + w]
        colour = c0 if alt.startswith(("SLQ", "Loss along")) else viridis
        hits = (np.abs(crop - colour).max(axis=2) <= 16).sum()
        white = (crop.min(axis=2) >= 250).mean()
        assert hits > 50, (alt, x, y, w, h, hits)
        assert 0.2 < white < 0.995, (alt, white)
        seen += 1
    assert seen == len(report.figures)  # the whole page fits in 1280×5000


# ------------------------------------------------------------------------------- command line
def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["report"]  # type: ignore[union-attr]
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in text
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    assert "loss_fn" in text and "make_loader" in text


@pytest.mark.slow
def test_cli_end_to_end_subprocess(ckpts, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable, "-m", "nncurv", "report", "--module", MODULE, "--ckpt", str(ckpts["iris"]),
        "--data", DATA, "--data-kwargs", '{"batch_size": 75}', "--out", str(out),
        "--eigenvalues", "2", "--trace-matvecs", "10", "--density-probes", "1",
        "--density-steps", "8", "--steps", "5", "--grid", "3", "--no-information",
        "--loss", "torch.nn:CrossEntropyLoss", "--no-tensorboard",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report written to" in res.stdout
    assert "[1/7] loading" in res.stderr and "[7/7]" in res.stderr  # progress shown
    s = json.loads((out / "summary.json").read_text())
    assert s["model"]["num_batches"] == 2
    assert (out / "report.html").is_file() and not (out / "tensorboard").exists()


def _err(capsys, argv: list[str]) -> str:
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 2, cap
    lines = [x for x in cap.err.strip().splitlines() if not x.startswith("[")]  # progress
    assert len(lines) == 1 and lines[0].startswith("nncurv report: error: "), cap.err
    assert "Traceback" not in cap.err
    return lines[0]


def _argv(ckpt: Path | str, out: Path, *extra: str, module: str = MODULE, data: str = DATA):
    return ["report", "--module", module, "--ckpt", str(ckpt), "--data", data, "--out", str(out)]


def test_bad_inputs_one_clear_error_each(ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    assert "does not exist" in _err(capsys, _argv(tmp_path / "missing.ckpt", out))
    assert "importing 'nosuchpkg.mod' failed" in _err(
        capsys, _argv(ckpts["iris"], out, module="nosuchpkg.mod:Model")
    )
    assert "has no attribute 'Nope'" in _err(
        capsys, _argv(ckpts["iris"], out, module=f"{FIXTURE}:Nope")
    )
    assert "must look like" in _err(capsys, _argv(ckpts["iris"], out, module="just_a_name"))
    assert "LightningModule subclass" in _err(
        capsys, _argv(ckpts["iris"], out, module="torch.nn:Linear")
    )
    msg = _err(capsys, _argv(ckpts["other"], out))
    assert "does not match IrisClassifier" in msg
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a readable Lightning checkpoint" in _err(capsys, _argv(garbage, out))
    assert "no callable `loss_fn`" in _err(
        capsys, _argv(ckpts["iris"], out, module=f"{FIXTURE}:NoLoss")
    )
    assert "--loss: module 'torch.nn' has no attribute 'NoSuchLoss'" in _err(
        capsys, _argv(ckpts["iris"], out) + ["--loss", "torch.nn:NoSuchLoss"]
    )
    assert "calling 'make_loader' failed" in _err(
        capsys, _argv(ckpts["iris"], out) + ["--data-kwargs", '{"nope": 1}']
    )
    assert "not valid JSON" in _err(capsys, _argv(ckpts["iris"], out) + ["--data-kwargs", "{"])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is not a folder" in _err(capsys, _argv(ckpts["iris"], afile))
    assert "num_eigenvalues" in _err(capsys, _argv(ckpts["iris"], out) + ["--eigenvalues", "0"])
    assert "unknown information metrics" in _err(
        capsys, _argv(ckpts["iris"], out) + ["--information-metrics", "sharpness"]
    )
    # a mismatch found only when the loss runs (an IndexError) is one clear error too
    msg = _err(capsys, _argv(ckpts["iris"], out, data=f"{FIXTURE}:make_bad_targets"))
    assert "do not fit together: IndexError" in msg
    with pytest.raises(ReportInputError, match="does not exist"):
        build_report(MODULE, tmp_path / "nope.ckpt", DATA, out)
    assert not (out / "report.html").exists()


def test_bad_path_exit_code_of_the_console_script(tmp_path):
    cmd = [sys.executable, "-m", "nncurv", *_argv(tmp_path / "missing.ckpt", tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("nncurv report: error: --ckpt")
    assert "Traceback" not in res.stderr


def test_information_metrics_skip_undefined_spectral_sums():
    from nncurv.report import _information

    sys.path.insert(0, str(HERE))
    try:
        import report_fixture as rf
    finally:
        sys.path.remove(str(HERE))
    data = rf.make_loader()
    torch.manual_seed(0)
    # a linear softmax model: the observed information is PSD, everything is defined
    linear = torch.nn.Linear(4, 3)
    out, text = _information(
        linear, torch.nn.CrossEntropyLoss(), data, "mean", {}, ("logdet", "condition"), 0
    )
    assert out["available"] and not out["errors"], out["errors"]
    assert isinstance(out["logdet"]["value"], float) and "logdet" in text
    # an MLP far from a minimum: indefinite with lambda_min <= -1, logdet skipped with a reason
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(4.0)
    out, _ = _information(
        mlp, torch.nn.CrossEntropyLoss(), data, "mean", {}, ("logdet", "condition"), 0
    )
    assert out["condition"]["lambda_min"] < -1.0  # seeded: about -217
    assert "logdet" not in out and "indefinite" in out["errors"]["logdet"]
    # the default set keeps a number that is defined everywhere: the trace
    from nncurv.report import DEFAULT_INFORMATION_METRICS

    out, text = _information(
        mlp, torch.nn.CrossEntropyLoss(), data, "mean", {}, DEFAULT_INFORMATION_METRICS, 0
    )
    assert math.isfinite(out["trace"]["estimate"]) and "trace" in text, out
    # not a likelihood: reported, not raised
    out, _ = _information(linear, torch.nn.L1Loss(), data, "mean", {}, ("condition",), 0)
    assert out["available"] is False and "not a recognised negative log-likelihood" in out["reason"]


def test_max_batches_cuts_a_list_of_batches_but_not_one_batch():
    from nncurv._report_inputs import resolve_data

    x, y = torch.zeros(4, 2), torch.zeros(4)
    batches = [(x, y), (x, y), (x, y)]
    assert resolve_data(batches, None, 2) == batches[:2]
    assert resolve_data(tuple(batches), None, 1) == batches[:1]
    one = [x, y]  # a single batch, as a DataLoader yields it
    assert resolve_data(one, None, 1) is one
