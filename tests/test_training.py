"""Training end to end on tiny generated data: windows, model variants, loop, export, parity,
calibration, and that the written bundle scores exactly as PyTorch does."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stream_detector.core.bundle import INPUT_NAME, OUTPUT_NAME, load_bundle, open_cpu_session  # noqa: E402
from stream_detector.offline.datafiles import read_table  # noqa: E402
from training.calibrate import calibrate  # noqa: E402
from training.composite import ERROR_SCALE_FLOOR  # noqa: E402
from training.export import ExportNameMismatch, ExportShapeMismatch, ExportValueMismatch, check_parity, export_onnx  # noqa: E402
from training.fit import fit  # noqa: E402
from training.model import TransformerAutoencoder  # noqa: E402
from training.settings import make_settings  # noqa: E402
from training.windows import WindowingError, plan_windows  # noqa: E402

W = 8
TINY = dict(window=W, d_model=16, n_heads=2, n_layers=1, ff_dim=32, epochs=2, batch_size=64, threads=1, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_csv(path, rng, n_per_entity=300, gap_at=150):
    """Two entities, 1-minute steps, a 2-hour gap in entity 'b', a constant feature."""
    lines = ["timestamp,key,x,y,const"]
    t0 = 1_700_000_000
    for key, phase in (("a", 0.0), ("b", 1.0)):
        t = t0
        for i in range(n_per_entity):
            t += 7200 if (key == "b" and i == gap_at) else 60
            x = np.sin(i / 6 + phase) + 0.05 * rng.standard_normal()
            y = np.cos(i / 6 + phase) + 0.05 * rng.standard_normal()
            lines.append(f"{t},{key},{x:.5f},{y:.5f},3.0")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    torch.set_num_threads(1)
    data = make_csv(tmp / "normal.csv", np.random.default_rng(7))
    settings = make_settings({"data": data, "out": tmp / "bundle", "seed": 3, **TINY})
    return settings, fit(settings)


@pytest.fixture(scope="module")
def trained_relative(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit-relative")
    data = make_csv(tmp / "normal.csv", np.random.default_rng(7))
    settings = make_settings({"data": data, "out": tmp / "bundle", "seed": 3, "feature_errors": "relative", **TINY})
    return settings, fit(settings)


def test_windows_never_cross_entities_gaps_or_the_split(tmp_path, rng):
    table = read_table(make_csv(tmp_path / "d.csv", rng))
    plan = plan_windows(table, W, val_fraction=0.2, gap_factor=3.0)
    assert plan.n_segments == 3 and plan.n_gaps == 1
    # Segment boundaries in plan.data: entity a (300 rows), b before the gap (150), b after (150).
    seg_id = np.repeat([0, 1, 2], [300, 150, 150])
    for starts in (plan.train_starts, plan.val_starts):
        ids = seg_id[starts[:, None] + np.arange(W)]
        assert np.all(ids == ids[:, :1]), "a window spans two segments"
    assert np.all(plan.train_rows[plan.train_starts[:, None] + np.arange(W)]), "a training window touches validation rows"
    assert not np.any(plan.train_rows[plan.val_starts + W - 1]), "a validation window's newest row is a training row"
    # Validation is the last 20% of each entity by time: 60 rows each.
    assert int((~plan.train_rows[:300]).sum()) == 60 and int((~plan.train_rows[300:]).sum()) == 60
    # Each window's entity, for calibrating every entity in its own frame.
    assert plan.entities_of(plan.val_starts) == ["a" if s < 300 else "b" for s in plan.val_starts.tolist()]


def test_too_few_rows_for_a_window(tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("a,b\n" + "\n".join(f"{i},{i}" for i in range(5)) + "\n")
    with pytest.raises(WindowingError, match="fewer than one window of 8"):
        plan_windows(read_table(p), W, 0.2, 3.0)


def test_masked_variant_cannot_see_the_rows_it_scores():
    torch.manual_seed(0)
    m = TransformerAutoencoder(3, W, d_model=16, n_heads=2, n_layers=1, ff_dim=32, variant="masked", mask_steps=2).eval()
    x = torch.randn(4, W, 3)
    x2 = x.clone()
    x2[:, -2:] += 100.0  # a huge anomaly in the masked rows
    with torch.no_grad():
        assert torch.allclose(m(x), m(x2))
    assert m.scoring_positions == (-2, -1)
    plain = TransformerAutoencoder(3, W, d_model=16, n_heads=2, n_layers=1, ff_dim=32, variant="plain").eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), plain(x2))
    assert plain.scoring_positions == (-1,)


def validation_windows(settings, bundle):
    plan = plan_windows(read_table(settings.data), W, settings.val_fraction, settings.gap_factor)
    return plan, bundle.normaliser.apply(plan.data)[plan.val_starts[:, None] + np.arange(W)]


def test_fit_writes_a_bundle_that_reproduces_pytorch_scores(trained):
    settings, res = trained
    bundle = load_bundle(res.bundle_dir)
    assert bundle.features == ("x", "y", "const") and bundle.window == W
    assert bundle.scoring.positions == (-1,) and bundle.model["variant"] == "masked"
    assert "composite" not in bundle.model and bundle.scoring.reduction == "mean_squared_error"
    assert bundle.normaliser.scale[2] == pytest.approx(1e-3)  # constant feature: floored, not divided by zero
    assert (res.bundle_dir / "report.png").stat().st_size > 10_000
    assert res.parity_max_abs_diff <= 1e-4
    # Score validation windows through the bundle (ONNX Runtime) and through PyTorch.
    plan, x = validation_windows(settings, bundle)
    session = open_cpu_session(bundle.model_path)
    ort_scores, _ = bundle.scoring.scores(x, session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    with torch.no_grad():
        torch_scores, _ = bundle.scoring.scores(x, res.model(torch.from_numpy(x)).numpy())
    np.testing.assert_allclose(ort_scores, torch_scores, rtol=1e-4, atol=1e-6)
    # Calibration is exactly the quantiles of those validation scores.
    assert bundle.calibration.n_scores == len(plan.val_starts)
    assert bundle.calibration.threshold == pytest.approx(calibrate(ort_scores, settings.threshold_quantile).threshold, rel=1e-5)
    assert bundle.calibration.quantiles["1.0"] == pytest.approx(float(ort_scores.max()), rel=1e-5)


def test_relative_feature_errors_divide_by_each_features_validation_error(trained_relative):
    """--feature-errors relative: each feature's squared error at the newest row is divided by its
    validation mean (floored), they are averaged, and the graph divides that by its validation 99 %
    quantile; the bundle scores exactly that, as PyTorch computes it."""
    settings, res = trained_relative
    bundle = load_bundle(res.bundle_dir)
    plan, x = validation_windows(settings, bundle)
    session = open_cpu_session(bundle.model_path)
    ort_scores, ort_errors = bundle.scoring.scores(x, session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    with torch.no_grad():
        r = res.model(torch.from_numpy(x)).numpy()
    sq = (x[:, -1, :] - r[:, -1, :]) ** 2
    normal = np.maximum(sq.mean(axis=0), ERROR_SCALE_FLOOR)
    relative = (sq / normal).mean(axis=1)
    composite = bundle.model["composite"]
    assert composite["detectors"] == ["transformer"]
    assert composite["transformer_error_scale"]["floored_features"] == np.count_nonzero(sq.mean(axis=0) <= ERROR_SCALE_FLOOR)
    np.testing.assert_allclose(ort_scores, relative / composite["scales"]["transformer"], rtol=1e-3, atol=1e-6)
    # Per-feature errors (top_features) are the relative ones, as shares of the score.
    np.testing.assert_array_equal(ort_errors.argmax(axis=1), (sq / normal).argmax(axis=1))
    assert bundle.calibration.n_scores == len(plan.val_starts)


def test_a_fleet_is_calibrated_in_each_entitys_own_frame(tmp_path, caplog):
    """fit on two entities with 100+ validation windows each, the second's readings 3x the first's: the
    bundle keeps each entity's level (the second's errors are larger), its quantiles describe the
    scores in each entity's frame, and fit and the report say so."""
    from training.report import summary_text

    path = make_csv(tmp_path / "fleet.csv", np.random.default_rng(11), n_per_entity=700, gap_at=10**9)
    lines = path.read_text().splitlines()
    loud = [lines[0]] + [
        ",".join([*f[:2], f"{3 * float(f[2]):.5f}", f"{3 * float(f[3]):.5f}", f[4]]) if f[1] == "b" else line
        for line, f in ((line, line.split(",")) for line in lines[1:])
    ]
    path.write_text("\n".join(loud) + "\n")
    with caplog.at_level("INFO", logger="training.fit"):
        res = fit(make_settings({"data": path, "out": tmp_path / "bundle", "seed": 3, **TINY}))
    assert "calibrated in each entity's own frame: 2 entities" in caplog.text
    bundle = load_bundle(res.bundle_dir)
    levels = bundle.calibration.entity_levels
    assert levels is not None and set(levels) == {"a", "b"}
    assert 1.5 < math.exp(levels["b"] - levels["a"]) < 20.0  # b's errors are larger in absolute terms
    assert "in each entity's own frame" in summary_text(bundle)


def test_training_metadata(trained):
    settings, res = trained
    tr = load_bundle(res.bundle_dir).training
    assert tr["rows"] == 600 and tr["entities"] == 2 and tr["gaps"] == 1 and tr["seed"] == 3
    assert len(tr["history"]["train_loss"]) == tr["epochs"] == 2
    assert tr["best_val_loss"] == min(tr["history"]["val_loss"])
    assert {"torch", "onnx", "onnxruntime", "numpy", "python"} <= set(tr["versions"])
    assert tr["command_line"] and tr["settings"]["window"] == W


def test_same_seed_same_model(trained, tmp_path):
    settings, res = trained
    again = fit(settings.model_copy(update={"out": tmp_path / "again"}))
    assert again.best_val_loss == pytest.approx(res.best_val_loss, rel=1e-6)


@pytest.mark.parametrize("variant", ["plain", "masked"])
def test_export_parity_both_variants(variant, rng):
    torch.manual_seed(1)
    m = TransformerAutoencoder(3, W, d_model=16, n_heads=2, n_layers=1, ff_dim=32, variant=variant, mask_steps=2).eval()
    onnx_bytes = export_onnx(m, W, 3)
    windows = rng.standard_normal((5, W, 3)).astype(np.float32)
    assert check_parity(onnx_bytes, m, windows, 1e-4) <= 1e-4


def test_export_value_mismatch_is_detected(rng):
    torch.manual_seed(1)
    m = TransformerAutoencoder(3, W, d_model=16, n_heads=2, n_layers=1, ff_dim=32, variant="plain").eval()
    onnx_bytes = export_onnx(m, W, 3)
    with torch.no_grad():
        m.output_proj.bias += 0.5  # PyTorch now differs from what was exported
    with pytest.raises(ExportValueMismatch, match="differ by up to"):
        check_parity(onnx_bytes, m, rng.standard_normal((4, W, 3)).astype(np.float32), 1e-4)


def test_export_name_and_shape_mismatches_are_distinct(rng):
    from bundle_factory import model_bytes

    m = TransformerAutoencoder(3, W, d_model=16, n_heads=2, n_layers=1, ff_dim=32, variant="plain").eval()
    windows = rng.standard_normal((2, W, 3)).astype(np.float32)
    with pytest.raises(ExportNameMismatch):
        check_parity(model_bytes(W, 3, "identity", input_name="inp"), m, windows, 1e-4)
    with pytest.raises(ExportShapeMismatch, match="dynamic batch"):
        check_parity(model_bytes(W, 3, "identity", fixed_batch=2), m, windows, 1e-4)
    with pytest.raises(ExportShapeMismatch, match=r"\[batch, 8, 3\]"):
        check_parity(model_bytes(W + 1, 3, "identity"), m, windows, 1e-4)


def test_ctrl_c_keeps_the_best_weights(monkeypatch, tmp_path, rng):
    import training.trainer as trainer

    calls = {"n": 0}
    real = trainer.evaluate_loss

    def interrupt_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "evaluate_loss", interrupt_on_second_epoch)
    data = make_csv(tmp_path / "d.csv", rng)
    res = fit(make_settings({"data": data, "out": tmp_path / "b", **{**TINY, "epochs": 5}}))
    tr = load_bundle(res.bundle_dir).training
    assert tr["interrupted"] is True and tr["best_epoch"] == 1 and tr["epochs"] == 1


def test_ctrl_c_before_first_epoch_writes_nothing(monkeypatch, tmp_path, rng):
    import training.trainer as trainer

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate_loss", boom)
    data = make_csv(tmp_path / "d.csv", rng)
    with pytest.raises(trainer.TrainingInterrupted, match="nothing was written"):
        fit(make_settings({"data": data, "out": tmp_path / "b", **TINY}))
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
def test_fit_on_cuda_exports_a_bundle_with_cpu_parity(tmp_path, rng):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    data = make_csv(tmp_path / "d.csv", rng)
    res = fit(make_settings({"data": data, "out": tmp_path / "b", **TINY, "device": "cuda"}))
    bundle = load_bundle(res.bundle_dir)
    assert bundle.training["device"].startswith("cuda")
    assert res.parity_max_abs_diff <= 1e-4  # trained on the GPU, exported and checked on the CPU
