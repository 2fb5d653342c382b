"""stream_detector.offline.datafiles: every format, key/timestamp handling, the missing-value policy, errors."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from stream_detector.offline.datafiles import DataFileError, read_table


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(str(c) for c in r) for r in rows) + "\n")
    return path


def test_smd_columns_named_and_single_entity(tmp_path, rng):
    vals = rng.random((5, 38))
    p = tmp_path / "machine-9-9.txt"
    p.write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in vals) + "\n")
    t = read_table(p, "auto")
    assert t.features[0] == "m00" and t.features[-1] == "m37" and len(t.features) == 38
    assert t.values.shape == (5, 38)
    np.testing.assert_allclose(t.values, vals, atol=1e-6)
    assert t.keys == ["machine-9-9"] * 5 and t.timestamps_ms is None
    assert [s.key for s in t.by_entity()] == ["machine-9-9"]


def test_csv_key_timestamp_and_per_entity_time_order(tmp_path):
    p = write_csv(
        tmp_path / "d.csv",
        ["timestamp", "key", "a", "b", "note"],
        [
            ["2024-01-01T00:02:00", "h1", 3, 30, "x"],
            ["2024-01-01T00:00:00", "h2", 9, 90, "y"],
            ["2024-01-01T00:00:00", "h1", 1, 10, "z"],
            ["2024-01-01T00:01:00", "h1", 2, 20, "w"],
        ],
    )
    t = read_table(p)
    assert t.features == ("a", "b")  # non-numeric 'note' ignored, key/timestamp not features
    ents = {e.key: e for e in t.by_entity()}
    assert list(ents) == ["h1", "h2"]
    np.testing.assert_array_equal(ents["h1"].values[:, 0], [1, 2, 3])
    assert np.all(np.diff(ents["h1"].timestamps_ms) == 60_000)
    np.testing.assert_array_equal(ents["h1"].row_index, [2, 3, 0])


def test_epoch_seconds_and_milliseconds(tmp_path):
    s = read_table(write_csv(tmp_path / "s.csv", ["ts", "v"], [[1_700_000_000, 1], [1_700_000_060, 2]]))
    ms = read_table(write_csv(tmp_path / "ms.csv", ["ts", "v"], [[1_700_000_000_000, 1], [1_700_000_060_000, 2]]))
    np.testing.assert_array_equal(s.timestamps_ms, ms.timestamps_ms)
    assert s.timestamps_ms[0] == 1_700_000_000_000


def test_feature_selection_order_and_missing_feature(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["a", "b", "c"], [[1, 2, 3], [4, 5, 6]])
    t = read_table(p, features=["c", "a"])
    assert t.features == ("c", "a")
    np.testing.assert_array_equal(t.values, [[3, 1], [6, 4]])
    with pytest.raises(DataFileError, match="no feature column 'zz'"):
        read_table(p, features=["a", "zz"])


def test_jsonl_event_shape(tmp_path):
    recs = [
        {"key": "s1", "ts": 1_700_000_000_000, "temp": 1.5, "load": 2},
        {"key": "s2", "ts": 1_700_000_000_500, "temp": 2.5, "load": 3},
        {"key": "s1", "ts": 1_700_000_001_000, "temp": 3.5, "load": 4},
    ]
    p = tmp_path / "dump.jsonl"
    p.write_bytes(b"\n".join(orjson.dumps(r) for r in recs) + b"\n")
    t = read_table(p, key_field="key", timestamp_field="ts")
    assert t.features == ("temp", "load") and t.keys == ["s1", "s2", "s1"]
    assert t.timestamps_ms.tolist() == [r["ts"] for r in recs]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"key": ["a", "a", "b"], "x": [1.0, 2.0, 3.0], "y": [1, 2, 3]}), p)
    t = read_table(p)
    assert t.features == ("x", "y") and t.keys == ["a", "a", "b"]
    np.testing.assert_array_equal(t.values[:, 1], [1, 2, 3])


def test_ffill_within_entity_and_drop_leading(tmp_path):
    p = write_csv(
        tmp_path / "d.csv",
        ["key", "a", "b"],
        [["e1", "", 1], ["e1", 2, ""], ["e2", 7, 7], ["e1", "inf", 3], ["e2", "nan", 8]],
    )
    t = read_table(p)
    # e1 row 0 has no earlier value for 'a' -> dropped; e1 'b' row1 filled with 1; e1 'a' row3 filled with 2;
    # e2 'a' row4 filled with 7 (from e2, never from e1).
    assert t.cleaning.missing_values == 4 and t.cleaning.dropped_rows == 1 and t.cleaning.filled_values == 3
    np.testing.assert_array_equal(t.row_index, [1, 2, 3, 4])
    np.testing.assert_array_equal(t.values, [[2, 1], [7, 7], [2, 3], [7, 8]])


def test_drop_and_error_policies(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["a", "b"], [[1, 2], ["nan", 3], [4, 5]])
    t = read_table(p, nan_policy="drop")
    np.testing.assert_array_equal(t.row_index, [0, 2])
    with pytest.raises(DataFileError, match="policy is 'error'"):
        read_table(p, nan_policy="error")


@pytest.mark.parametrize(
    "setup, fmt, message",
    [
        (lambda d: d / "nope.csv", "csv", "does not exist"),
        (lambda d: write_csv(d / "d.csv", ["a"], [[1]]), "xlsx", "unknown data format"),
        (lambda d: (d / "d.bin").write_text("1,2\n") and d / "d.bin", "auto", "cannot tell the format"),
        (lambda d: write_csv(d / "d.csv", ["name", "host"], [["a", "b"]]), "csv", "no numeric feature columns"),
        (lambda d: (d / "d.csv").write_text("a,b\n") and d / "d.csv", "csv", "no data rows"),
        (lambda d: (d / "d.csv").write_text("a,b\n1,2\n3\n") and d / "d.csv", "csv", "line 3 has 1 cells"),
        (lambda d: (d / "d.jsonl").write_text('{"a": 1}\n{oops\n') and d / "d.jsonl", "jsonl", "line 2 is not valid JSON"),
        (lambda d: (d / "d.txt").write_text("1,2\n3,x\n") and d / "d.txt", "smd", "not an SMD file"),
        (lambda d: write_csv(d / "d.csv", ["a"], [["nan"], [""]]), "csv", "no row left"),
    ],
)
def test_bad_input_one_sentence(tmp_path, setup, fmt, message):
    path = setup(tmp_path)
    with pytest.raises(DataFileError, match=message) as e:
        read_table(path, fmt)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)
