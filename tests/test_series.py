"""The generality suite's synthetic series (stream_detector/offline/series.py): the `outages` dataset
is univariate's series with stretches of readings missing, and its files say so with their times."""

from __future__ import annotations

import csv

import numpy as np

from stream_detector.offline.series import STEP_MS, SUITE, generate, write_dataset


def test_outages_are_univariates_series_with_readings_missing_away_from_incidents(tmp_path):
    plain, gappy = generate(SUITE["univariate"], 3), generate(SUITE["outages"], 3)
    for p, g in zip(plain, gappy):
        np.testing.assert_array_equal(p.test, g.test)  # the series goes on underneath an outage
        assert p.incidents == g.incidents and p.reported is None
        assert g.reported is not None
        missing = np.flatnonzero(~g.reported)
        stretches = np.split(missing, np.flatnonzero(np.diff(missing) > 1) + 1)
        assert len(stretches) == SUITE["outages"].outages
        assert all(30 <= len(s) <= 240 for s in stretches)
        for inc in g.incidents:
            assert g.reported[max(0, inc.start - 100) : inc.end + 100].all()
    paths = write_dataset(gappy, tmp_path)
    g = gappy[0]
    with open(paths[f"test-{g.key}"]) as fh:
        ts = np.array([int(r["ts"]) for r in csv.DictReader(fh)])
    labels = np.loadtxt(paths[f"labels-{g.key}"], dtype=int)
    assert ts.size == labels.size == int(g.reported.sum())
    steps = np.diff(ts) // STEP_MS
    assert (steps > 1).sum() == SUITE["outages"].outages and steps.max() >= 31  # the time jumps over each outage
    np.testing.assert_array_equal(labels, g.labels()[g.reported])
