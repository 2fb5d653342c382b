"""Short and narrow histories train (issue 17, item 3): `fit` with defaults sizes the window, the model
and the optimiser to a 1-feature, 300-row history (training/sizing.py) and the bundle then catches a
level shift in the rest of the series; a window the data cannot support, given explicitly, is refused
naming the largest one it can; a history too short for anything is one sentence. Generated data only."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pytest

pytest.importorskip("torch")

from stream_detector.core.bundle import load_bundle  # noqa: E402
from stream_detector.offline.datafiles import read_table  # noqa: E402
from stream_detector.offline.scoresfile import read_scores  # noqa: E402
from training.cli import main as train_main  # noqa: E402
from training.settings import make_settings  # noqa: E402
from training.sizing import size_to_data  # noqa: E402
from training.windows import WindowingError, plan_windows  # noqa: E402

SHIFT_AT, SHIFT_ROWS = 1000, 50  # in the continuation: a level shift of 10 sigma over rows 1000..1049


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


def sine(rng, n):
    """A noisy sine, period 40 rows, noise 0.1."""
    return np.sin(2 * np.pi * np.arange(n) / 40) + 0.1 * rng.standard_normal(n)


def write_csv(path, values, timestamps=None):
    if timestamps is None:
        path.write_text("x\n" + "".join(f"{v:.5f}\n" for v in values))
    else:
        path.write_text("timestamp,x\n" + "".join(f"{t},{v:.5f}\n" for t, v in zip(timestamps, values)))
    return path


def one_sentence_error(code, err, fragment):
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in line, err
    assert line.startswith("error: ") and line.endswith("."), line
    assert fragment in line, line
    return line


def test_defaults_train_300_rows_and_replay_of_the_rest_alerts_on_a_level_shift(tmp_path, rng, capsys, caplog):
    from stream_detector.cli import main as sd_main

    series = sine(rng, 1800)
    rest = series[300:].copy()
    rest[SHIFT_AT : SHIFT_AT + SHIFT_ROWS] += 10 * series[:300].std()
    train_csv = write_csv(tmp_path / "train.csv", series[:300])
    rest_csv = write_csv(tmp_path / "rest.csv", rest)
    caplog.set_level(logging.INFO)
    code = train_main(
        ["fit", "--data", str(train_csv), "--out", str(tmp_path / "b"), "--threads", "1", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    # The rule: 240 training rows give 241 - W training windows and 60 validation windows; 64 gives
    # 177 < 4 x 64, 32 gives 209 >= 4 x 32. 300 rows: d_model 16 (16^2 <= 300 < 32^2), ff_dim 32;
    # 209 training windows: batch 16 (<= 209 / 8), 14 steps a pass, the default 8 epochs and patience 3.
    b = load_bundle(tmp_path / "b")
    assert b.window == 32 and b.model["d_model"] == 16 and b.model["ff_dim"] == 32
    assert b.training["sized_to_data"] == {
        "window": 32,
        "d_model": 16,
        "ff_dim": 32,
        "batch_size": 16,
    }
    assert "composite" not in b.model  # one feature, but 60 validation windows (< 100): the Transformer alone
    assert (
        b.training["settings"]["window"] == 32
        and b.training["train_windows"] == 209
        and b.training["val_windows"] == 60
    )
    chosen = [r.getMessage() for r in caplog.records if r.name == "training.sizing" and "chosen" in r.getMessage()]
    assert (
        len(chosen) == 1
        and chosen[0].startswith("window 32 rows, chosen")
        and "64 gives 177 training windows, fewer than 256" in chosen[0]
    )

    out = tmp_path / "replay"
    code = sd_main(
        [
            "replay",
            "--model",
            str(tmp_path / "b"),
            "--input",
            str(rest_csv),
            "--out",
            str(out),
            "--model.provider",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    alerts = [orjson.loads(line) for line in (out / "alerts.jsonl").read_bytes().splitlines()]
    opened = [a["source"]["offset"] for a in alerts if a["state"] == "open"]
    # the shift is inside an open alert (one opened by it, or still open from a moment before it)
    rows = read_scores(out / "scores.csv")
    in_alert = rows.alert[(rows.row >= SHIFT_AT) & (rows.row < SHIFT_AT + SHIFT_ROWS)]
    assert in_alert.mean() > 0.5, opened
    assert len(opened) <= 6, opened  # and the 1,000 normal rows before it are not paged over and over


def test_an_explicit_window_the_data_cannot_support_names_the_largest_that_it_can(tmp_path, rng, capsys):
    data = write_csv(tmp_path / "train.csv", sine(rng, 300))
    out = tmp_path / "b"
    code = train_main(
        ["fit", "--data", str(data), "--out", str(out), "--window", "64", "--threads", "1", "--no-progress"]
    )
    # 241 - W >= 4 W up to W = 48
    line = one_sentence_error(code, capsys.readouterr().err, "cannot support a window of 64 rows")
    assert "the largest window it supports is 48 rows (--window 48" in line
    assert not out.exists()
    table = read_table(data)
    assert size_to_data(make_settings({"data": data, "out": out, "window": 48}), table).plan.window == 48  # and it is


@pytest.mark.parametrize(
    "rows, fragment",
    [
        (20, "too few to train on: even a window of 8 gives 9 training and 4 validation"),
        (5, "fewer than one window of 8, too few to train on"),
    ],
)
def test_a_history_too_short_for_any_window_is_one_sentence(tmp_path, rng, capsys, rows, fragment):
    data = write_csv(tmp_path / "tiny.csv", sine(rng, rows))
    code = train_main(["fit", "--data", str(data), "--out", str(tmp_path / "b"), "--threads", "1", "--no-progress"])
    line = one_sentence_error(code, capsys.readouterr().err, fragment)
    assert "about 100 rows" in line and not (tmp_path / "b").exists()


def test_a_history_with_nothing_moving_is_one_sentence_and_one_moving_feature_trains(tmp_path, rng, capsys):
    """A history whose every feature is constant within every entity has no normal variation to learn
    (every later change would score far beyond it): two entities constant at different levels are
    refused like one constant series. A series that moves on one row in seven trains."""
    flat = tmp_path / "flat.csv"
    flat.write_text("key,a,b\n" + "".join(f"{'s1' if i % 2 else 's2'},{1 + i % 2},7\n" for i in range(600)))
    code = train_main(["fit", "--data", str(flat), "--out", str(tmp_path / "b"), "--threads", "1", "--no-progress"])
    line = one_sentence_error(code, capsys.readouterr().err, "every one of its 2 features is constant over all 600")
    assert "no normal variation to learn" in line and not (tmp_path / "b").exists()
    one = write_csv(tmp_path / "one.csv", np.full(600, 3.0))
    code = train_main(["fit", "--data", str(one), "--out", str(tmp_path / "b"), "--threads", "1", "--no-progress"])
    one_sentence_error(code, capsys.readouterr().err, "x is constant over all 600 usable rows")
    values = np.full(600, 3.0)
    values[::7] += rng.normal(size=values[::7].size)
    table = read_table(write_csv(tmp_path / "moving.csv", values))
    assert size_to_data(make_settings({"data": tmp_path / "moving.csv", "out": tmp_path / "b"}), table).plan.window == 64


def test_a_long_history_keeps_every_default(tmp_path, rng):
    data = tmp_path / "long.csv"
    data.write_text("a,b,c\n" + "".join(f"{a:.4f},{b:.4f},{c:.4f}\n" for a, b, c in rng.standard_normal((5000, 3))))
    table = read_table(data)
    s = make_settings({"data": data, "out": tmp_path / "b"})
    sized = size_to_data(s, table)
    assert sized.chosen == {}
    assert (
        sized.settings.model_dump() == s.model_dump()
    )  # window 64, d_model 64, ff_dim 128, batch 256, 8 epochs, patience 3
    want = plan_windows(table, 64, s.val_fraction, s.gap_factor, s.stride)
    np.testing.assert_array_equal(sized.plan.train_starts, want.train_starts)
    np.testing.assert_array_equal(sized.plan.val_starts, want.val_starts)


def test_a_gap_before_the_validation_rows_picks_a_window_that_fits_the_last_segment(tmp_path, rng):
    # 300 rows, a 2-hour gap at row 240: the 60 validation rows are a segment of their own, shorter
    # than 64 (the default window alone: "no validation window of 64 rows").
    ts = 1_700_000_000 + 60 * np.arange(300) + 7200 * (np.arange(300) >= 240)
    data = write_csv(tmp_path / "gappy.csv", sine(rng, 300), ts)
    table = read_table(data)
    with pytest.raises(WindowingError, match="no validation window of 64 rows"):
        plan_windows(table, 64, 0.2, 3.0)
    sized = size_to_data(make_settings({"data": data, "out": tmp_path / "b"}), table)
    assert sized.plan.window == 32 and sized.plan.val_starts.size == 29 and sized.plan.n_gaps == 1


def test_given_settings_are_kept_and_the_window_stays_above_mask_steps(tmp_path, rng, caplog):
    data = write_csv(tmp_path / "train.csv", sine(rng, 300))
    table = read_table(data)
    given = {"d_model": 32, "batch_size": 64, "epochs": 3}
    s = size_to_data(make_settings({"data": data, "out": tmp_path / "b", **given}), table).settings
    assert (s.window, s.d_model, s.ff_dim, s.batch_size, s.epochs, s.patience) == (
        32,
        32,
        128,
        64,
        3,
        3,
    )  # ff_dim follows only a chosen d_model
    longer = size_to_data(make_settings({"data": data, "out": tmp_path / "b", "epochs": 30}), table).settings
    assert (longer.epochs, longer.patience) == (30, 6), "a short history's patience is a fifth of the epochs"
    # masked with 40 steps: of the ladder only 64 is above it, and 300 rows cannot support 64; 48 is the largest that fits
    caplog.set_level(logging.INFO)
    assert size_to_data(make_settings({"data": data, "out": tmp_path / "b", "mask_steps": 40}), table).plan.window == 48
    assert "window 48 rows, chosen: the largest above mask_steps (40)" in caplog.text
    with pytest.raises(WindowingError, match="too few to train on: even a window of 51 gives 190 training"):
        size_to_data(make_settings({"data": data, "out": tmp_path / "b", "mask_steps": 50}), table)


@pytest.mark.parametrize("rows, width", [(100, 8), (300, 16), (1023, 16), (1024, 32), (4095, 32), (4096, 64)])
def test_model_width_grows_with_the_rows(rows, width):
    from training.sizing import _choose_width

    assert _choose_width(rows, 4) == width


def test_a_single_series_gets_the_zscore_detector_with_100_validation_windows_unless_detectors_are_given(
    tmp_path, rng
):
    one = tmp_path / "one.csv"
    one.write_text("a\n" + "".join(f"{a:.4f}\n" for a in rng.standard_normal(5000)))
    short = tmp_path / "short.csv"  # 500 rows: 100 validation windows, the z-score joins
    short.write_text("a\n" + "".join(f"{a:.4f}\n" for a in rng.standard_normal(500)))
    shorter = tmp_path / "shorter.csv"  # 495 rows: 99 validation windows, the Transformer alone
    shorter.write_text("a\n" + "".join(f"{a:.4f}\n" for a in rng.standard_normal(495)))
    two = tmp_path / "two.csv"
    two.write_text("a,b\n" + "".join(f"{a:.4f},{b:.4f}\n" for a, b in rng.standard_normal((5000, 2))))
    assert size_to_data(make_settings({"data": one, "out": tmp_path / "b"}), read_table(one)).settings.detectors == (
        "transformer",
        "zscore",
    )
    assert size_to_data(make_settings({"data": two, "out": tmp_path / "b"}), read_table(two)).settings.detectors == (
        "transformer",
    )
    sized = size_to_data(make_settings({"data": short, "out": tmp_path / "b"}), read_table(short))
    assert sized.plan.val_starts.size == 100 and sized.settings.detectors == ("transformer", "zscore")
    sized = size_to_data(make_settings({"data": shorter, "out": tmp_path / "b"}), read_table(shorter))
    assert sized.plan.val_starts.size == 99 and sized.settings.detectors == ("transformer",)
    given = make_settings({"data": one, "out": tmp_path / "b", "detectors": "transformer"})
    assert size_to_data(given, read_table(one)).settings.detectors == ("transformer",)
