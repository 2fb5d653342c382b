"""stream_detector.core.bundle: round trip, and the loader's refusals (sha256, schema, W/F vs ONNX
shapes, names), each one sentence. Torch-free: models come from tests/bundle_factory.py."""

from __future__ import annotations

import os

import numpy as np
import orjson
import pytest

from bundle_factory import make_bundle, model_bytes
from stream_detector.core.bundle import (
    BundleError,
    Calibration,
    Normaliser,
    ScoringRule,
    load_bundle,
    write_bundle,
)


def write(tmp_path, onnx_bytes, *, window=8, features=("a", "b", "c"), name="b", **kw):
    args = dict(
        model_version="v1",
        features=list(features),
        window=window,
        normaliser=Normaliser(np.array([1, 2, 3], np.float32)[: len(features)], np.array([1, 0.5, 1e-3], np.float32)[: len(features)], 1e-3),
        scoring=ScoringRule((-2, -1)),
        calibration=Calibration({"0.99": 1.0, "1.0": 2.0}, 1.5, 100),
        model={"variant": "test"},
        training={"seed": 3, "history": {"val_loss": [0.5, 0.25]}},
    )
    args.update(kw)
    return write_bundle(tmp_path / name, onnx_bytes, **args)


def test_round_trip_keeps_every_field(tmp_path):
    out = write(tmp_path, model_bytes(8, 3, "mean"), extra={"logs": {"preset": "hdfs"}}, extra_files={"templates.json": b"{}"})
    b = load_bundle(out)
    assert b.features == ("a", "b", "c") and b.window == 8 and b.model_version == "v1"
    np.testing.assert_array_equal(b.normaliser.center, [1, 2, 3])
    np.testing.assert_array_equal(b.normaliser.scale, np.array([1, 0.5, 1e-3], np.float32))
    assert b.scoring.positions == (-2, -1)
    assert b.calibration.threshold == 1.5 and b.calibration.quantiles == {"0.99": 1.0, "1.0": 2.0}
    assert b.calibration.entity_levels is None  # a bundle of one entity, or written before them
    assert b.training["history"]["val_loss"] == [0.5, 0.25] and b.extra == {"logs": {"preset": "hdfs"}}
    assert (out / "templates.json").read_bytes() == b"{}"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp alone would leave it 0700


def test_entity_levels_round_trip(tmp_path):
    cal = Calibration({"0.99": 1.0, "1.0": 2.0}, 1.5, 100, entity_levels={"pump-1": 0.25, "pump-2": -0.5})
    assert load_bundle(write(tmp_path, model_bytes(8, 3, "mean"), calibration=cal)).calibration == cal


def test_scores_are_mse_at_the_scoring_positions():
    rule = ScoringRule((-2, -1))
    x = np.zeros((1, 4, 2), np.float32)
    r = np.zeros_like(x)
    x[0, -1] = [2.0, 0.0]  # error 4 on feature 0 at the newest step
    x[0, 0] = [9.0, 9.0]  # outside the scoring positions: ignored
    score, fe = rule.scores(x, r)
    np.testing.assert_allclose(fe, [[2.0, 0.0]])  # mean over the 2 positions
    np.testing.assert_allclose(score, [1.0])


def test_rewriting_replaces_atomically(tmp_path):
    write(tmp_path, model_bytes(8, 3, "mean"))
    write(tmp_path, model_bytes(8, 3, "zeros"), model_version="v2")
    assert load_bundle(tmp_path / "b").model_version == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_write_leaves_the_old_bundle(tmp_path):
    write(tmp_path, model_bytes(8, 3, "mean"))
    with pytest.raises(TypeError):
        write(tmp_path, model_bytes(8, 3, "zeros"), training={"bad": object()})  # not JSON-serialisable
    assert load_bundle(tmp_path / "b").model_version == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def one_sentence(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_altered_model_is_refused(tmp_path):
    b = make_bundle(tmp_path)
    with open(b.model_path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match the sha256") as e:
        load_bundle(b.path)
    one_sentence(e)


def test_replaced_model_is_refused(tmp_path):
    b = make_bundle(tmp_path, kind="mean")
    b.model_path.write_bytes(model_bytes(b.window, b.n_features, "zeros"))
    with pytest.raises(BundleError, match="altered or replaced"):
        load_bundle(b.path)


@pytest.mark.parametrize(
    "onnx_window, onnx_features, kwargs, message",
    [
        (16, 3, {}, "does not match the bundle's window 8 and 3 features"),
        (8, 4, {}, "does not match the bundle's window 8 and 3 features"),
        (8, 3, {"input_name": "input"}, "one input named 'x'"),
        (8, 3, {"output_name": "out"}, "first output must be named 'reconstruction'"),
        (8, 3, {"fixed_batch": 4}, "fixed batch size"),
    ],
)
def test_onnx_io_must_match_w_and_f(tmp_path, onnx_window, onnx_features, kwargs, message):
    out = write(tmp_path, model_bytes(onnx_window, onnx_features, "identity", **kwargs))
    with pytest.raises(BundleError, match=message) as e:
        load_bundle(out)
    one_sentence(e)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(schema_version=99), "schema version 99"),
        (lambda m: m.pop("normaliser"), "lacks the required key 'normaliser'"),
        (lambda m: m.update(features=["a", "a", "c"]), "each name once"),
        (lambda m: m["scoring"].update(positions=[0]), "negative indices"),
        (lambda m: m["calibration"].update(threshold=-1), "not a positive number"),
        (lambda m: m["normaliser"].update(scale=[1.0, 1.0]), "2 scales"),
        (lambda m: m["calibration"].update(entity_levels=[1.0]), "entity levels must map entity keys to numbers"),
        (lambda m: m["calibration"].update(entity_levels={"a": "x"}), "entity levels must map entity keys to numbers"),
        (lambda m: m["calibration"].update(entity_levels={"a": "nan"}), "entity levels must be finite"),
    ],
)
def test_bad_bundle_json_is_refused(tmp_path, edit, message):
    out = write(tmp_path, model_bytes(8, 3, "mean"))
    meta = orjson.loads((out / "bundle.json").read_bytes())
    edit(meta)
    (out / "bundle.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match=message) as e:
        load_bundle(out)
    one_sentence(e)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no bundle.json"):
        load_bundle(tmp_path / "empty")
