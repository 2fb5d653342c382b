"""Baselines as bundles: the ONNX graphs compute what numpy says, the CLI writes loadable bundles
that the service's scoring core runs (same windows, thresholds and alerts), bad input is one
sentence with exit code 2."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME, ScoringRule, load_bundle, open_cpu_session
from training import baselines
from training.cli import main as train_main


def _run(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})[0]


def _low_rank_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Six features driven by two latent factors plus a little noise."""
    latent = rng.normal(size=(n, 2))
    mixing = np.array([[1.0, 0.5, -1.0, 0.2, 0.0, 0.7], [0.0, 1.0, 0.5, -0.6, 1.0, 0.3]])
    return latent @ mixing + 0.01 * rng.normal(size=(n, 6))


def test_pca_keeps_the_components_that_explain_the_variance(rng):
    rows = _low_rank_rows(rng, 2000)
    mean, comps, ratio = baselines.fit_pca(rows, 0.9)
    assert comps.shape == (6, 2) and ratio.sum() > 0.99
    assert baselines.fit_pca(rows, 1.0)[1].shape[1] == 6


def test_pca_graph_matches_numpy_and_separates_off_subspace_rows(rng):
    rows = _low_rank_rows(rng, 2000)
    mean, comps, _ = baselines.fit_pca(rows, 0.9)
    window = 3
    x = np.stack([rows[:window], rows[window : 2 * window]])
    x[1, -1] += np.array([0, 0, 0, 0, 0, 3.0])  # leaves the 2-D subspace
    recon = _run(baselines.pca_onnx(mean, comps, window), x)
    expected = mean + (x - mean) @ comps @ comps.T
    np.testing.assert_allclose(recon, expected, atol=1e-5)
    scores, _ = ScoringRule((-1,)).scores(x.astype(np.float32), recon)
    assert scores[0] < 1e-3 < 0.5 < scores[1]


def test_zscore_graph_gives_max_squared_z_by_hand():
    # one window, W = 4, F = 2: earlier rows of feature 0 are 1, 2, 3 (mean 2, std sqrt(2/3)), newest 4;
    # feature 1 is constant 5 then 5.05: std 0 -> floor 0.1 -> z = 0.5
    x = np.array([[[1, 5], [2, 5], [3, 5], [4, 5.05]]], dtype=np.float32)
    recon = _run(baselines.zscore_onnx(4, 2, 0.1), x)
    np.testing.assert_allclose(recon[0, :3], x[0, :3])  # earlier rows pass through
    z0 = (4 - 2) / np.sqrt(2 / 3)
    rule = ScoringRule((-1,), "max_squared_error")
    score, fe = rule.scores(x, recon)
    np.testing.assert_allclose(fe[0], [z0**2, 0.5**2], rtol=1e-4)
    assert score[0] == pytest.approx(z0**2, rel=1e-4)
    # the mean reduction would average them instead
    assert ScoringRule((-1,)).scores(x, recon)[0][0] == pytest.approx((z0**2 + 0.25) / 2, rel=1e-4)


def _write_csv(path, rows: np.ndarray) -> None:
    names = [f"f{i}" for i in range(rows.shape[1])]
    lines = [",".join(names)] + [",".join(f"{v:.6f}" for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind, reduction, window", [("pca", "mean_squared_error", 2), ("zscore", "max_squared_error", 16)])
def test_cli_writes_a_bundle_the_scoring_core_runs(tmp_path, rng, kind, reduction, window, capsys):
    from stream_detector.core.events import EventBatch
    from stream_detector.core.pipeline import DetectionSettings, DetectorCore
    from stream_detector.core.scorer import Scorer
    from stream_detector.core.thresholds import ThresholdParams

    train = _low_rank_rows(rng, 1500)
    _write_csv(tmp_path / "train.csv", train)
    out = tmp_path / kind
    extra = ["--window", "16"] if kind == "zscore" else []  # pca: the default W = 2
    rc = train_main(["baseline", "--kind", kind, "--data", str(tmp_path / "train.csv"), "--out", str(out), *extra])
    assert rc == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    assert bundle.window == window and bundle.scoring.reduction == reduction
    assert bundle.features == tuple(f"f{i}" for i in range(6))
    assert bundle.calibration.threshold > 0 and bundle.calibration.n_scores > 0
    assert bundle.model["kind"] == f"{kind}-baseline"

    # a test stream with a large off-pattern spike at row 400: the core alerts there and nowhere near the start
    test = _low_rank_rows(rng, 600)
    test[400] += np.array([0, 0, 6.0, 0, 0, -6.0])
    core = DetectorCore(
        bundle, Scorer(bundle, provider="cpu"), DetectionSettings(threshold=ThresholdParams(warmup=50, history=200))
    )
    result = core.process(EventBatch.build(["m"] * len(test), test.astype(np.float32)))
    opened = [int(result.index[j]) for j, e in enumerate(result.alert_event) if e == "open"]
    assert 400 in opened
    spike = result.score[result.index == 400][0]
    assert spike > 10 * np.median(result.score)


def test_cli_bad_input_is_one_sentence(tmp_path, capsys):
    rc = train_main(["baseline", "--kind", "pca", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    rc = train_main(["baseline", "--kind", "lstm", "--data", "x.csv", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "'kind'" in err
    _write_csv(tmp_path / "short.csv", np.zeros((10, 3)))
    rc = train_main(["baseline", "--kind", "zscore", "--data", str(tmp_path / "short.csv"), "--out", str(tmp_path / "b")])
    assert rc == 2 and "fewer than one window" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_graphs_use_an_ir_version_onnx_runtime_accepts(tmp_path, rng):
    import onnx

    for data in (baselines.zscore_onnx(8, 3, 0.1), baselines.pca_onnx(np.zeros(3), np.eye(3)[:, :1], 2)):
        model = onnx.load_from_string(data)
        assert model.ir_version <= 10 and model.opset_import[0].version >= 17
        path = tmp_path / "m.onnx"
        path.write_bytes(data)
        open_cpu_session(path)  # raises BundleError if ONNX Runtime refuses it
