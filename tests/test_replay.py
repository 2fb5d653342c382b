"""`stream-detector replay` end to end on small generated files: both output files, one scores
row per input row, the injected spike alerted, bad inputs end in one sentence with exit 2."""

from __future__ import annotations

import csv

import orjson
import pytest

from bundle_factory import make_bundle
from stream_detector.cli import main
from stream_detector.core.windows import hop_phase


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path, features=["a", "b", "c"], window=6, threshold=12.0)


def write_csv(path, rng, n_entities=3, steps=300, spike=(1, 250), with_time=True):
    rows = []
    for t in range(steps):
        for e in range(n_entities):
            v = rng.normal(size=3)
            if (e, t) == spike:
                v[2] += 25.0
            rows.append((f"m{e}", 1_700_000_000_000 + t * 60_000, *v))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["entity", "timestamp", "a", "b", "c"] if with_time else ["entity", "a", "b", "c"])
        for r in rows:
            w.writerow(r if with_time else (r[0], *r[2:]))
    return rows


def read_scores(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_replay_csv_writes_scores_and_alerts(tmp_path, rng, bundle, capsys):
    data = tmp_path / "fleet.csv"
    rows = write_csv(data, rng)
    out = tmp_path / "out"
    rc = main(["replay", "--model", str(bundle.path), "--input", str(data), "--out", str(out),
               "--model.provider", "cpu", "--runtime.max-batch", "100", "--detection.warmup", "50", "--detection.history", "200",
               "--detection.resolve-after", "30"])  # resolves within the 50 rows after the spike
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rows/s" in printed and "replayed 900 rows" in printed
    scores = read_scores(out / "scores.csv")
    assert list(scores[0]) == ["row", "key", "score", "threshold", "alert", "event"]
    assert [int(r["row"]) for r in scores] == list(range(len(rows)))
    assert [r["key"] for r in scores] == [r[0] for r in rows]
    assert sum(1 for r in scores if r["score"]) == 3 * (300 - 6 + 1)
    assert all(r["score"] == "" for r in scores[: 3 * 5])  # windows not full yet
    alerts = [orjson.loads(line) for line in (out / "alerts.jsonl").read_bytes().splitlines()]
    opens = [a for a in alerts if a["state"] == "open"]
    spike_row = 250 * 3 + 1
    assert [(a["key"], a["source"]["offset"]) for a in opens] == [("m1", spike_row)]
    assert opens[0]["source"]["topic"] == "fleet.csv" and opens[0]["event_time"] == "2023-11-15T02:23:20.000Z"
    assert scores[spike_row]["event"] == "open" and scores[spike_row]["alert"] == "1"
    # the alert column stays 1 on the entity's rows until the resolving row
    resolved = next(a for a in alerts if a["state"] == "resolved")
    m1_rows = [i for i, r in enumerate(scores) if r["key"] == "m1" and spike_row <= i <= resolved["source"]["offset"]]
    assert all(scores[i]["alert"] == "1" for i in m1_rows[:-1]) and scores[m1_rows[-1]]["alert"] == "0"


def test_replay_smd_with_hop(tmp_path, rng):
    b = make_bundle(tmp_path, features=["m00", "m01"], window=4, threshold=50.0, name="smd")
    data = tmp_path / "machine-9-9.txt"
    values = rng.normal(size=(103, 2))
    data.write_text("\n".join(",".join(f"{v:.5f}" for v in row) for row in values) + "\n")
    out = tmp_path / "o"
    assert main(["replay", "--model", str(b.path), "--input", str(data), "--format", "smd", "--out", str(out), "--detection.hop", "5", "--model.provider", "cpu"]) == 0
    scores = read_scores(out / "scores.csv")
    assert len(scores) == 103 and {r["key"] for r in scores} == {"machine-9-9"}
    phase = hop_phase("machine-9-9", 5)  # row r is event r + 1; scored from the 4th event on, at its phase
    assert [int(r["row"]) for r in scores if r["score"]] == [c - 1 for c in range(4, 104) if c % 5 == phase]
    assert (out / "alerts.jsonl").exists()


def test_replay_bad_inputs_exit_2_with_one_sentence(tmp_path, rng, bundle, capsys):
    data = tmp_path / "x.csv"
    write_csv(data, rng, steps=10)
    out = str(tmp_path / "o")
    cases = [
        (["--model", str(tmp_path / "nope"), "--input", str(data)], "is not a directory"),
        (["--model", str(bundle.path), "--input", str(tmp_path / "missing.csv")], "does not exist"),
        (["--model", str(bundle.path), "--input", str(data), "--detection.hop", "0"], "hop"),
    ]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("entity,a,b\nm0,1,2\n")
    cases.append((["--model", str(bundle.path), "--input", str(wrong)], "has no feature column 'c'"))
    cases.append((["--model", str(bundle.path), "--input", str(data)], "does not match the sha256"))
    for n, (args, needle) in enumerate(cases):
        if n == len(cases) - 1:  # last: a model file altered after the bundle was written
            (bundle.path / "model.onnx").write_bytes((bundle.path / "model.onnx").read_bytes() + b"x")
        rc = main(["replay", *args, "--out", out, "--model.provider", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2, args
        assert needle in err and "Traceback" not in err, err
        assert len([ln for ln in err.splitlines() if ln.startswith("stream-detector replay:")]) == 1
