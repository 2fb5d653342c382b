"""Log model bundles: `fit --format log` writes the logs section and templates.json; the loader
refuses a mismatched parser / template set / layout with one sentence; CLI input errors exit 2."""

from __future__ import annotations

import shutil

import orjson
import pytest

from logsynth import make_log, train_tiny_bundle
from stream_detector.core.bundle import BundleError, load_bundle
from stream_detector.logs.spec import LOGS_SECTION, TEMPLATES_FILE, feature_names, load_log_spec
from stream_detector.logs.parse import LOG_PARSER_VERSION


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return train_tiny_bundle(tmp_path_factory.mktemp("logbundle"))


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _edit(bundle_dir, fn):
    meta = orjson.loads((bundle_dir / "bundle.json").read_bytes())
    fn(meta)
    (bundle_dir / "bundle.json").write_bytes(orjson.dumps(meta))


def test_fit_writes_parser_and_template_set(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    spec = load_log_spec(bundle)
    sec = bundle.extra[LOGS_SECTION]
    assert (tiny_bundle / TEMPLATES_FILE).is_file()
    assert sec["parser"]["version"] == LOG_PARSER_VERSION and sec["parser"]["format"] == "hdfs"
    assert bundle.window == 2 and list(bundle.features) == feature_names(spec.context)
    assert bundle.scoring.reduction == "model_error"
    # allocateBlock, Receiving, PacketResponder, Received, addStoredBlock: five kinds of line
    texts = spec.templates.templates()
    assert len(texts) - 1 == 5, texts
    assert any("Receiving block" in t for t in texts)
    assert spec.templates.match("writeBlock blk_1 received exception java.io.IOException: x") == 0


COMMON_TRAINING_FIELDS = {
    "data_source",
    "data_format",
    "rows",
    "entities",
    "seed",
    "settings",
    "versions",
    "command_line",
    "created_at",
    "seconds",
}


def test_sequence_bundle_records_the_shared_training_metadata_and_a_quantile_calibration(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    tr = bundle.training
    assert COMMON_TRAINING_FIELDS <= set(tr) and tr["model"] == "sequence" and tr["data_format"] == "log"
    assert {"python", "numpy", "onnx", "onnxruntime", "torch"} <= set(tr["versions"])
    # trained by the shared loop: its history, best epoch and stop reason are recorded as fit's are
    assert len(tr["history"]["val_loss"]) == tr["epochs"] and 1 <= tr["best_epoch"] <= tr["epochs"]
    assert tr["best_val_loss"] == min(tr["history"]["val_loss"]) and tr["interrupted"] is False
    # per-session quantile threshold: no fitted tail, no run section
    assert bundle.calibration.tail is None and bundle.calibration.run is None
    assert "session_1.0" in bundle.calibration.quantiles


def test_ctrl_c_during_sequence_training_keeps_the_best_weights(monkeypatch, tmp_path):
    import training.trainer as trainer

    calls = {"n": 0}
    real = trainer.evaluate_loss

    def interrupt_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "evaluate_loss", interrupt_on_second_epoch)
    tr = load_bundle(train_tiny_bundle(tmp_path, epochs=5)).training
    assert tr["interrupted"] is True and tr["best_epoch"] == 1 and tr["epochs"] == 1


def test_ctrl_c_before_the_first_sequence_epoch_writes_nothing(monkeypatch, tmp_path):
    import training.trainer as trainer
    from training.logsettings import LogTrainingError

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate_loss", boom)
    with pytest.raises(LogTrainingError, match="nothing was written"):
        train_tiny_bundle(tmp_path)
    assert not (tmp_path / "bundle").exists()


def test_loader_refuses_a_template_set_that_is_not_the_trained_one(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    d = orjson.loads((b / TEMPLATES_FILE).read_bytes())
    d["templates"][0]["template"] = "something else <NUM>"
    (b / TEMPLATES_FILE).write_bytes(orjson.dumps(d))
    with pytest.raises(BundleError, match="not the template set the model was trained with") as e:
        load_log_spec(load_bundle(b))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m[LOGS_SECTION]["parser"].__setitem__("version", LOG_PARSER_VERSION + 1),
            "log parser configuration has version",
        ),
        (lambda m: m[LOGS_SECTION].__setitem__("template_set_version", 99), "template set version 99"),
        (lambda m: m[LOGS_SECTION].__setitem__("layout", "counts/7"), "log input layout 'counts/7'"),
        (lambda m: m[LOGS_SECTION].__setitem__("vocab_size", 3), "trained for 3 template ids"),
        (lambda m: m[LOGS_SECTION]["parser"].__setitem__("format", "klingon"), "invalid log parser setting format"),
        (lambda m: m.pop(LOGS_SECTION), "is not a log model"),
    ],
)
def test_loader_refuses_mismatched_versions_in_one_sentence(tiny_bundle, tmp_path, edit, message):
    b = _copy(tiny_bundle, tmp_path)
    _edit(b, edit)
    with pytest.raises(BundleError) as e:
        load_log_spec(load_bundle(b))
    assert message in str(e.value)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_loader_refuses_a_missing_template_file(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    (b / TEMPLATES_FILE).unlink()
    with pytest.raises(BundleError, match="has no template set file templates.json"):
        load_log_spec(load_bundle(b))


def test_fit_cli_labels_exclude_anomalous_blocks(tmp_path, capsys):
    """--labels leaves anomalous blocks out of template mining and training: their template stays unknown."""
    import torch

    from training.cli import main

    torch.set_num_threads(1)
    lines, kinds = make_log(3, 60, {"unknown": 5})
    data = tmp_path / "train.log"
    data.write_text("\n".join(lines) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "BlockId,Label\n" + "".join(f"{b},{'Anomaly' if k != 'normal' else 'Normal'}\n" for b, k in kinds.items())
    )
    out = tmp_path / "bundle"
    rc = main(
        [
            "fit",
            "--format",
            "log",
            "--data",
            str(data),
            "--out",
            str(out),
            "--labels",
            str(labels),
            "--context",
            "8",
            "--d-model",
            "8",
            "--n-heads",
            "2",
            "--n-layers",
            "1",
            "--ff-dim",
            "16",
            "--epochs",
            "1",
            "--threads",
            "1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    spec = load_log_spec(load_bundle(out))
    assert (
        spec.templates.match("writeBlock blk_1 received exception java.io.IOException: Could not read from stream") == 0
    )
    anomalous_lines = sum(any(b in line for b, k in kinds.items() if k != "normal") for line in lines)
    assert anomalous_lines > 0
    assert load_bundle(out).training["lines_used"] == len(lines) - anomalous_lines


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nope.log"], "log file {tmp}/nope.log does not exist."),
        (["--data", "{tmp}/garbage.log"], "none of the first 2 lines of {tmp}/garbage.log parses with these settings"),
        (
            ["--data", "{tmp}/garbage.log", "--labels", "{tmp}/bad_labels.csv"],
            "has several columns but none named 'Label'",
        ),
        (["--data", "{tmp}/garbage.log", "--context", "1"], "setting 'context'"),
    ],
)
def test_fit_cli_bad_input_ends_in_one_sentence(tmp_path, capsys, args, message):
    from training.cli import main

    (tmp_path / "garbage.log").write_text("this is not an hdfs line\nnor this\n")
    (tmp_path / "bad_labels.csv").write_text("a,b\nblk_1,x\n")
    argv = ["fit", "--format", "log", "--out", str(tmp_path / "b")] + [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert err.count("\n") == 1 and "Traceback" not in err
