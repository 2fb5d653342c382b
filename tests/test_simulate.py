"""The simulator: deterministic under a seed, anomalies change the data exactly where the ground
truth says, sensors are correlated and seasonal, and the CLI's file mode writes trainable data."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np

from stream_detector.offline.simulate import KINDS, SimConfig, Simulator, read_truth, write_truth


def test_deterministic_and_anomalies_only_inside_truth(rng):
    seed = int(rng.integers(1_000_000))
    cfg = SimConfig(entities=20, features=10, anomaly_rate=4.0, warmup=50, min_gap=30, seed=seed)
    a = Simulator(cfg, 600)
    rows = a.frame()[2]
    np.testing.assert_array_equal(rows, Simulator(cfg, 600).frame()[2])  # same seed, same data
    clean = Simulator(SimConfig(entities=20, features=10, anomaly_rate=0.0, seed=seed), 600).frame()[2]
    assert {x.kind for x in a.truth} == set(KINDS), f"seed {seed}: every kind should occur"
    diff = (np.abs(rows - clean) > 1e-12).reshape(600, 20, 10)
    mask = np.zeros_like(diff)
    for x in a.truth:
        assert 50 <= x.start < x.end <= 600 and x.features
        mask[x.start : x.end, x.entity_index, list(x.feature_index)] = True
        assert diff[x.start : x.end, x.entity_index].any(), f"{x.kind} at {x.start} changed nothing"
    assert not (diff & ~mask).any(), "data differs from the clean run outside the ground truth"
    # anomalies of one entity never overlap
    for e in range(20):
        spans = sorted((x.start, x.end) for x in a.truth if x.entity_index == e)
        assert all(s2 >= e1 for (_, e1), (s2, _) in zip(spans, spans[1:]))


def test_kinds_look_like_their_names():
    cfg = SimConfig(entities=30, features=12, anomaly_rate=5.0, warmup=50, min_gap=20, seed=3)
    sim = Simulator(cfg, 800)
    rows = sim.frame()[2].reshape(800, 30, 12)
    clean = Simulator(SimConfig(entities=30, features=12, seed=3), 800).frame()[2].reshape(800, 30, 12)
    for x in sim.truth:
        seg = rows[x.start : x.end, x.entity_index, list(x.feature_index)]
        ref = clean[x.start : x.end, x.entity_index, list(x.feature_index)]
        if x.kind == "stuck":
            assert np.ptp(seg, axis=0).max() == 0.0
        elif x.kind in ("spike", "level_shift"):
            shift = (seg - ref) / sim._scale[x.entity_index, list(x.feature_index)]
            np.testing.assert_allclose(shift, x.sign * x.size)
        elif x.kind == "drift":
            shift = np.abs(seg - ref).mean(axis=1)
            assert shift[-1] > shift[0]


def test_correlated_and_seasonal():
    sim = Simulator(SimConfig(entities=2, features=8, period=100, seed=1), 2000)
    x = sim.frame()[2].reshape(2000, 2, 8)[:, 0, :]
    corr = np.corrcoef(x.T)[~np.eye(8, dtype=bool)]
    assert np.abs(corr).mean() > 0.2, "sensors share latent drivers"
    lagged = [np.corrcoef(x[:-lag, 0], x[lag:, 0])[0, 1] for lag in (50, 100)]
    assert lagged[1] > lagged[0], "a full period later looks more alike than half a period"


def test_truth_round_trip(tmp_path):
    sim = Simulator(SimConfig(entities=5, features=4, anomaly_rate=5.0, warmup=10, min_gap=10, seed=2), 300)
    write_truth(tmp_path / "t.jsonl", sim.truth)
    back = read_truth(tmp_path / "t.jsonl")
    assert [(d["entity"], d["kind"], d["start"], d["end"]) for d in back] == [(x.entity, x.kind, x.start, x.end) for x in sim.truth]


def test_cli_file_mode_writes_normal_csv(tmp_path):
    out = tmp_path / "normal.csv"
    r = subprocess.run(
        [sys.executable, "-m", "stream_detector.cli", "simulate", "--out", str(out), "--entities", "3", "--features", "5", "--ticks", "40", "--truth", str(tmp_path / "t.jsonl")],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["entity", "ts", "sensor_00", "sensor_01", "sensor_02", "sensor_03", "sensor_04"]
    assert len(rows) == 1 + 3 * 40
    assert (tmp_path / "t.jsonl").read_text() == ""  # file mode defaults to normal data
    bad = subprocess.run([sys.executable, "-m", "stream_detector.cli", "simulate", "--kinds", "meteor", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "meteor" in bad.stderr and "Traceback" not in bad.stderr


def test_fleet_fault_hits_every_entity_at_once_and_nothing_else_overlaps_it():
    cfg = SimConfig(entities=12, features=6, anomaly_rate=4.0, seed=3, fleet_fault_tick=400, fleet_fault_ticks=50)
    sim = Simulator(cfg, 900)
    fault = [a for a in sim.truth if a.kind == "fleet_fault"]
    assert sorted(a.entity for a in fault) == sim.keys and {(a.start, a.end) for a in fault} == {(400, 450)}
    assert len({a.features for a in fault}) == 1, "the same sensors on every entity"
    own = [a for a in sim.truth if a.kind != "fleet_fault"]
    assert own and all(a.end + cfg.min_gap <= 400 or a.start >= 450 + cfg.min_gap for a in own)
    _, _, rows = sim.frame()
    _, _, clean = Simulator(SimConfig(entities=12, features=6, seed=3), 900).frame()
    moved = np.abs(rows - clean).reshape(900, 12, 6).max(axis=(1, 2)) > 1e-9
    assert moved[400:450].all(), "every tick of the fault differs from the clean run"
