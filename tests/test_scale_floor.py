"""The normaliser's scale floors: absolute (constant features) and relative to the training range
(a feature nearly constant in training, with a rare spike, must not get a tiny scale), and that
`fit` / the baselines write the floored scale into a bundle the loader accepts."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.core.bundle import Normaliser, load_bundle


def spiky_rows(rng, n=5000):
    """Columns: noisy (std ~1), constant, flat with one spike of height 2 (std ~0.028, range 2)."""
    rows = np.zeros((n, 3))
    rows[:, 0] = rng.standard_normal(n)
    rows[:, 1] = 5.0
    rows[n // 3, 2] = 2.0
    return rows


def test_range_floor_lifts_only_features_flat_in_training(rng):
    rows = spiky_rows(rng)
    plain = Normaliser.fit(rows, scale_floor=1e-3)
    floored = Normaliser.fit(rows, scale_floor=1e-3, range_fraction=0.03)
    std = rows.std(axis=0)
    assert plain.scale[2] == pytest.approx(std[2], rel=1e-5) and std[2] < 0.03
    assert floored.scale[2] == pytest.approx(0.03 * 2.0, rel=1e-6)  # 0.03 x range, above its std
    assert floored.scale[0] == pytest.approx(std[0], rel=1e-5)  # 0.03 x range (~0.2) < std ~1: untouched
    assert floored.scale[1] == plain.scale[1] == pytest.approx(1e-3)  # constant: range 0, absolute floor
    np.testing.assert_array_equal(floored.center, plain.center)
    # a later change of 0.5 on the flat feature: z = 0.5 / scale
    z_plain = plain.apply(np.array([[0.0, 5.0, 0.5]]))[0, 2]
    z_floored = floored.apply(np.array([[0.0, 5.0, 0.5]]))[0, 2]
    assert z_plain > 15 and z_floored == pytest.approx((0.5 - floored.center[2]) / 0.06, rel=1e-5)


def test_fit_and_baseline_write_the_range_floor(tmp_path, rng):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from training.baselines import BaselineSettings, fit_baseline
    from training.fit import fit
    from training.settings import make_settings

    rows = spiky_rows(rng)
    data = tmp_path / "normal.csv"
    data.write_text("a,b,c\n" + "\n".join(f"{a:.6f},{b},{c}" for a, b, c in rows) + "\n")
    train_rows = rows[: int(len(rows) * 0.8)]  # val_fraction 0.2: the normaliser sees the first 80 %
    expected = max(train_rows[:, 2].std(), 0.03 * np.ptp(train_rows[:, 2]))
    assert expected == pytest.approx(0.06)

    tiny = dict(window=8, d_model=8, n_heads=2, n_layers=1, ff_dim=16, epochs=1, max_windows_per_epoch=256, threads=1, progress=False)
    assert make_settings({"data": data, "out": tmp_path / "x"}).scale_floor_range == 0.03  # the default
    fit(make_settings({"data": data, "out": tmp_path / "t", **tiny}))
    fit(make_settings({"data": data, "out": tmp_path / "t0", **tiny, "scale_floor_range": 0.0}))
    fit_baseline(BaselineSettings(kind="pca", data=data, out=tmp_path / "p"))
    for name in ("t", "p"):
        assert load_bundle(tmp_path / name).normaliser.scale[2] == pytest.approx(expected, rel=1e-5)
    assert load_bundle(tmp_path / "t0").normaliser.scale[2] == pytest.approx(train_rows[:, 2].std(), rel=1e-5)
