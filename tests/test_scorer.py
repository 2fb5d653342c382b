"""Scorer on factory bundles: CPU provider really active, scores by the bundle's rule, chunking,
CUDA required but absent refused with one sentence, wrong model IO refused."""

from __future__ import annotations

import numpy as np
import pytest

from bundle_factory import make_bundle
from stream_detector.core.scorer import Scorer, ScorerError


def test_cpu_scores_follow_the_scoring_rule(tmp_path, rng):
    b = make_bundle(tmp_path, window=6, kind="mean")
    s = Scorer(b, provider="cpu", max_batch=7, intra_op_threads=1)
    assert s.provider == "CPUExecutionProvider" and not s.on_cuda
    x = rng.normal(size=(20, 6, 4)).astype(np.float32)  # 20 windows in chunks of 7
    scores, errors = s.score(x)
    expected_err = (x[:, -1, :] - x.mean(axis=1)) ** 2
    np.testing.assert_allclose(errors, expected_err, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, expected_err.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert scores.dtype == np.float32 and errors.shape == (20, 4)
    empty_s, empty_e = s.score(np.zeros((0, 6, 4), np.float32))
    assert empty_s.shape == (0,) and empty_e.shape == (0, 4)


def test_warm_up_passes_a_sound_model_and_refuses_one_that_returns_nan(tmp_path):
    s = Scorer(make_bundle(tmp_path, window=6), provider="cpu", max_batch=5, intra_op_threads=1)
    s.warm_up()
    broken = Scorer(make_bundle(tmp_path, window=6, kind="nan", name="nan"), provider="cpu", max_batch=5, intra_op_threads=1)
    with pytest.raises(ScorerError, match="produced NaN or infinite scores"):
        broken.warm_up()


def test_the_service_scorer_takes_provider_and_batch_size_from_the_settings(tmp_path):
    from stream_detector.config import Settings

    b = make_bundle(tmp_path, window=6)
    s = Scorer.from_settings(b, Settings(model={"provider": "cpu"}, runtime={"max_batch": 7}))
    assert (s.requested, s.max_batch, s.provider) == ("cpu", 7, "CPUExecutionProvider")
    if not _gpu_present():  # require_cuda reaches the scorer: refused on a CPU-only machine
        with pytest.raises(ScorerError, match="CUDA execution provider was required"):
            Scorer.from_settings(b, Settings(model={"require_cuda": True}))


def test_spike_scores_high(tmp_path, rng):
    b = make_bundle(tmp_path, window=8)
    s = Scorer(b, provider="cpu")
    x = rng.normal(size=(2, 8, 4)).astype(np.float32)
    x[1, -1, 2] += 15.0
    scores, errors = s.score(x)
    assert scores[1] > 10 * scores[0]
    assert int(np.argmax(errors[1])) == 2


def test_identity_model_scores_zero(tmp_path, rng):
    b = make_bundle(tmp_path, kind="identity")
    scores, _ = Scorer(b, provider="cpu").score(rng.normal(size=(5, 8, 4)).astype(np.float32))
    assert np.all(scores == 0)


def test_auto_decides_from_the_session_not_the_available_list(tmp_path):
    # onnxruntime-gpu lists CUDA as available even without a GPU; the scorer must report what runs
    b = make_bundle(tmp_path)
    s = Scorer(b, provider="auto")
    assert s.provider == s.session.get_providers()[0]
    if not _gpu_present():
        assert s.provider == "CPUExecutionProvider" and not s.on_cuda


def test_cuda_requested_without_a_gpu_reports_the_cpu_it_really_runs_on(tmp_path, caplog):
    # asked for CUDA explicitly, the session falls back to the CPU; the scorer says so (warning)
    if _gpu_present():
        pytest.skip("this machine has a GPU")
    b = make_bundle(tmp_path)
    with caplog.at_level("WARNING", logger="stream_detector.core.scorer"):
        s = Scorer(b, provider="cuda")
    assert s.provider == s.session.get_providers()[0] == "CPUExecutionProvider" and not s.on_cuda
    assert any("CUDA was requested (provider=cuda) but is not active" in r.getMessage() for r in caplog.records)


def test_require_cuda_refused_without_a_gpu(tmp_path):
    if _gpu_present():
        pytest.skip("this machine has a GPU; the refusal is for CPU-only machines")
    b = make_bundle(tmp_path)
    with pytest.raises(ScorerError, match=r"CUDA execution provider was required but .* runs this model on CPUExecutionProvider"):
        Scorer(b, provider="auto", require_cuda=True)


def test_bad_provider_and_wrong_shapes(tmp_path):
    b = make_bundle(tmp_path)
    with pytest.raises(ScorerError, match="unknown provider"):
        Scorer(b, provider="tpu")
    s = Scorer(b, provider="cpu")
    with pytest.raises(ValueError, match="windows must have shape"):
        s.score(np.zeros((2, 7, 4), np.float32))


def test_model_io_mismatch_is_one_sentence(tmp_path):
    b = make_bundle(tmp_path, window=8)
    other = make_bundle(tmp_path, window=9, name="other")
    # a bundle whose model file was swapped for another window length (sha kept consistent)
    import dataclasses

    wrong = dataclasses.replace(b, path=other.path)
    with pytest.raises(ScorerError, match="does not match the bundle's window 8"):
        Scorer(wrong, provider="cpu")


def _gpu_present() -> bool:
    from pathlib import Path

    return Path("/dev/nvidia0").exists()


@pytest.mark.gpu
def test_cuda_is_really_active_and_matches_cpu(tmp_path, rng):
    b = make_bundle(tmp_path, features=[f"f{i}" for i in range(38)], window=64)
    gpu = Scorer(b, provider="auto", require_cuda=True, max_batch=256)
    assert gpu.provider == "CUDAExecutionProvider" and gpu.on_cuda
    x = rng.normal(size=(600, 64, 38)).astype(np.float32)
    s_gpu, e_gpu = gpu.score(x)
    s_cpu, e_cpu = Scorer(b, provider="cpu").score(x)
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e_gpu, e_cpu, rtol=1e-4, atol=1e-5)
