"""`stream-detector-train fit|report` from the command line: every bad input of issue 3 ends in one
sentence and exit code 2, with nothing written (or an existing bundle left untouched)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from training.cli import main  # noqa: E402

TINY = ["--window", "8", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--ff-dim", "32",
        "--epochs", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


def smd_file(path, rng, rows=200, cols=3):
    np.savetxt(path, rng.random((rows, cols)), delimiter=",", fmt="%.6f")
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_sentence_error(code, err, fragment):
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    assert line.startswith("error: ") and line.endswith("."), line
    assert fragment in line, line


def test_help_lists_defaults_and_config_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "default 64" in out and "config key 'window'" in out and "--config" in out


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (lambda d: ["--data", str(d / "missing.txt")], "does not exist"),
        (lambda d: ["--data", str(d / "ok.txt"), "--format", "xlsx"], "setting 'format'"),
        (lambda d: ["--data", str((d / "words.csv").write_text("host,name\na,b\n") and d / "words.csv")], "no numeric feature columns"),
        (lambda d: ["--data", str(d / "short.txt")], "fewer than one window of 8"),
        (lambda d: ["--data", str(d / "nan.txt"), "--nan-policy", "error"], "missing or non-finite values"),
        (lambda d: ["--data", str(d / "ok.txt"), "--config", str((d / "c.toml").write_text("windw = 3\n") and d / "c.toml")], "unknown key 'windw'"),
        (lambda d: ["--data", str(d / "ok.txt"), "--config", str((d / "v.toml").write_text("lr = 'fast'\n") and d / "v.toml")], "setting 'lr'"),
        (lambda d: ["--data", str(d / "ok.txt"), "--config", str(d / "nope.toml")], "does not exist"),
        (lambda d: ["--data", str(d / "ok.txt"), "--d-model", "10", "--n-heads", "4"], "multiple of n_heads"),
        (lambda d: ["--data", str(d / "ok.txt"), "--window", "4", "--mask-steps", "4"], "smaller than the window"),
    ],
)
def test_bad_input_exit_2_one_sentence_nothing_written(tmp_path, rng, capsys, make_args, fragment):
    smd_file(tmp_path / "ok.txt", rng)
    smd_file(tmp_path / "short.txt", rng, rows=5)
    (tmp_path / "nan.txt").write_text("1,2\nnan,3\n" * 20)
    out_dir = tmp_path / "bundle"
    args = make_args(tmp_path)
    code, _, err = run(capsys, "fit", *TINY, *args, "--out", str(out_dir))
    assert_one_sentence_error(code, err, fragment)
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "a temporary bundle was left behind"


def test_nan_fill_is_reported_in_the_bundle(tmp_path, rng, capsys):
    vals = rng.random((120, 2))
    vals[0, 0] = np.nan  # leading: dropped
    vals[50, 1] = np.inf  # filled from row 49
    np.savetxt(tmp_path / "gappy.txt", vals, delimiter=",", fmt="%.6f")
    code, out, err = run(capsys, "fit", *TINY, "--data", str(tmp_path / "gappy.txt"), "--out", str(tmp_path / "b"))
    assert code == 0, err
    import orjson

    meta = orjson.loads((tmp_path / "b" / "bundle.json").read_bytes())
    assert meta["training"]["missing_values"] == {"policy": "ffill", "missing_values": 2, "filled_values": 1, "dropped_rows": 1}
    assert meta["training"]["rows"] == 119
    assert "wrote" in out


def test_config_file_then_flags_override(tmp_path, rng, capsys):
    smd_file(tmp_path / "ok.txt", rng)
    (tmp_path / "c.toml").write_text("window = 12\nseed = 5\nvariant = 'plain'\n")
    code, _, err = run(capsys, "fit", *TINY, "--config", str(tmp_path / "c.toml"), "--data", str(tmp_path / "ok.txt"),
                       "--out", str(tmp_path / "b"))
    assert code == 0, err
    from stream_detector.core.bundle import load_bundle

    b = load_bundle(tmp_path / "b")
    assert b.window == 8  # the flag beat the file
    assert b.training["seed"] == 5 and b.model["variant"] == "plain"  # file values kept where no flag


def test_report_on_an_altered_bundle_is_refused(tmp_path, rng, capsys):
    smd_file(tmp_path / "ok.txt", rng)
    code, _, err = run(capsys, "fit", *TINY, "--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "b"))
    assert code == 0, err
    (tmp_path / "b" / "report.png").unlink()
    code, out, _ = run(capsys, "report", str(tmp_path / "b"))
    assert code == 0 and (tmp_path / "b" / "report.png").exists()
    assert "suggested threshold" in out and "ONNX parity" in out
    with open(tmp_path / "b" / "model.onnx", "ab") as f:
        f.write(b"\0")
    code, _, err = run(capsys, "report", str(tmp_path / "b"))
    assert_one_sentence_error(code, err, "does not match the sha256")


def test_a_failed_fit_leaves_an_existing_bundle_untouched(tmp_path, rng, capsys):
    smd_file(tmp_path / "ok.txt", rng)
    code, _, err = run(capsys, "fit", *TINY, "--data", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "b"))
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    smd_file(tmp_path / "short.txt", rng, rows=4)
    code, _, err = run(capsys, "fit", *TINY, "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "b"))
    assert code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before


def test_unwritable_output_is_one_sentence(tmp_path, rng, capsys):
    import os

    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "bundle"  # a path under a regular file cannot be created, even by root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "bundle"
    smd_file(tmp_path / "ok.txt", rng)
    code, _, err = run(capsys, "fit", *TINY, "--data", str(tmp_path / "ok.txt"), "--out", str(out))
    assert_one_sentence_error(code, err, "parent directory")
