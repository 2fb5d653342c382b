"""`stream-detector-train fit --format log`: raw log lines → template set + log model → bundle.

Two models (`log_model`): `counts` (the default; training/logcounts.py: cumulative template-count
vectors per entity, PCA reconstruction per row kind, idle checks; layout `template-counts/1`) and
`sequence` (below; layout `template-context/1`). The default was chosen by measurement on the
HDFS benchmark (docs/quality.md, Logs).

Steps: read the lines; drop the entities a label file marks anomalous (or keep only a list of
normal ones); mine templates with drain3 on the kept lines (`TemplateMiner`), freeze them; run the
kept lines through the very `LogStage` the service uses, which gives the model's input rows
(layout in stream_detector/logs/spec.py); hold out the entities whose first event is latest
(`val_fraction`) for early stopping and calibration; train `LogSequenceModel`; export to ONNX and
prove parity; calibrate on the held-out sessions; write the bundle with its `logs` section and
templates.json.

`LogSequenceModel` is a causal Transformer over the last K tokens of a session (template-id
embedding + a projection of log1p(gap) + a learned position embedding); it is trained to predict
each token from the ones before it (cross-entropy), and its exported graph outputs, at
[-1, K-1], the negative log-likelihood of the row's newest token: high for an unknown template, a
template in an unusual place, or a session that ends too early.

Calibration is per session, because an entity is flagged when any of its events alerts: the
suggested threshold is the `threshold_quantile` quantile of the held-out sessions' largest event
score (their end rows included) times `threshold_margin`, and at least `threshold_floor` nats (an
event the model gives 1 % or more never alerts, however regular the training data was).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_detector.core.bundle import Calibration, Normaliser, ScoringRule, load_bundle, write_bundle
from stream_detector.logs.features import LogFeatureConfigError, make_feature_config
from stream_detector.logs.parse import LineParser, LogConfigError, LogLineError, make_config
from stream_detector.logs.spec import COUNTS_LAYOUT, LAYOUT, WINDOW, LogModelSpec, feature_names
from stream_detector.logs.stage import START, LogStage
from stream_detector.logs.templates import TemplateConfigError, TemplateMiner, make_template_config

if TYPE_CHECKING:
    import torch  # imported where used: the count models train without it

log = logging.getLogger(__name__)

LOG_SCORING = ScoringRule(positions=(-1,), reduction="model_error")


class LogTrainingError(Exception):
    """Log training cannot run; one sentence."""


class LogFitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path
    out: Path
    labels: Path | None = None  # label file (entity,label; anomalous ones excluded) or a list of normal entities
    log_format: str = "hdfs"  # logs/parse.py preset
    entity_regex: str = r"blk_-?\d+"
    log_model: Literal["counts", "sequence"] = "counts"
    # None: 86,400 s for counts (the session is the entity's life; this only evicts), 3,600 s for sequence
    session_timeout_s: float | None = Field(None, gt=0)
    idle_check_s: float | None = Field(600.0, gt=0)  # counts: judge an entity at rest after this much inactivity
    count_variance: float = Field(0.99, gt=0, le=1)  # counts: variance kept by the principal subspace
    count_scale_floor: float = Field(0.2, gt=0)  # counts: floor of a feature's std of log1p(count)
    # counts: smallest calibration scale (residual sum of squares scoring 1.0)
    count_min_scale: float = Field(1.0, gt=0)
    # counts: a score below this never alerts (when the held-out entities all score ~0, as on very regular data)
    count_threshold_floor: float = Field(0.5, ge=0)
    context: int = Field(32, ge=2)
    d_model: int = Field(64, ge=4)
    n_heads: int = Field(4, ge=1)
    n_layers: int = Field(2, ge=1)
    ff_dim: int = Field(128, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(20, ge=1)
    patience: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    threshold_quantile: float = Field(1.0, gt=0, le=1)
    threshold_margin: float = Field(1.0, gt=0)
    # an event at least this likely (e^-floor; 4.6 nats = 1 %) never alerts, however regular the training data
    threshold_floor: float = Field(4.6, ge=0)
    unknown_template_nats: float = Field(30.0, gt=0)  # score of a line no learned template matches
    seed: int = 0
    threads: int = Field(0, ge=0)
    opset: int = Field(18, ge=17)
    parity_tolerance: float = Field(1e-3, gt=0)
    model_version: str | None = None


@dataclass(frozen=True)
class LogFitResult:
    bundle_dir: Path
    model_version: str
    templates: int
    train_rows: int
    val_rows: int
    best_val_loss: float
    threshold: float
    parity_max_abs_diff: float
    seconds: float


def read_lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except FileNotFoundError:
        raise LogTrainingError(f"log file {path} does not exist.") from None
    except OSError as e:
        raise LogTrainingError(f"cannot read log file {path} ({e.strerror}).") from None


def read_labels(path: Path) -> tuple[str, set[str]]:
    """('exclude', anomalous entities) for a CSV with a label column, ('keep', entities) for a plain
    list of normal entities, one per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LogTrainingError(f"label file {path} does not exist.") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and r[0].strip()]
    if not rows:
        raise LogTrainingError(f"label file {path} is empty.")
    if len(rows[0]) == 1:
        return "keep", {r[0].strip() for r in rows}
    header = [h.strip().lower() for h in rows[0]]
    if "label" not in header:
        raise LogTrainingError(f"label file {path} has several columns but none named 'Label'.")
    li = header.index("label")
    bad = {
        r[0].strip()
        for r in rows[1:]
        if len(r) > li and r[li].strip().lower() in ("anomaly", "anomalous", "abnormal", "1", "true")
    }
    return "exclude", bad


def _keep_lines(
    lines: list[bytes], parser: LineParser, labels: tuple[str, set[str]] | None
) -> tuple[list[bytes], list[Any], int]:
    kept, parsed, unusable = [], [], 0
    for raw in lines:
        try:
            p = parser.parse(raw)
        except LogLineError:
            unusable += 1
            continue
        if labels is not None:
            mode, ids = labels
            ok = all((e in ids) == (mode == "keep") for e in p.entities)
            if not ok:
                continue
        kept.append(raw)
        parsed.append(p)
    return kept, parsed, unusable


def build_model(spec: LogModelSpec, s: LogFitSettings) -> torch.nn.Module:
    import torch
    from torch import nn

    class _CausalBlock(nn.Module):
        """Pre-norm Transformer block with causal self-attention, written out with plain matmuls:
        nn.TransformerEncoder's mask checks do not survive torch.export with a data-dependent input."""

        def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
            super().__init__()
            self.heads, self.dh = heads, d // heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
            self.drop = nn.Dropout(dropout)

        def forward(self, h: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
            b, k, d = h.shape
            q, kk, v = self.qkv(self.ln1(h)).reshape(b, k, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ kk.transpose(-1, -2) * (self.dh**-0.5) + causal, dim=-1)
            a = (self.drop(att) @ v).transpose(1, 2).reshape(b, k, d)
            h = h + self.drop(self.proj(a))
            return h + self.drop(self.ff(self.ln2(h)))

    class LogSequenceModel(nn.Module):
        causal: torch.Tensor  # buffers (register_buffer)
        eye: torch.Tensor
        slots: torch.Tensor
        slot: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            k, d = spec.context, s.d_model
            self.k, self.n_out, self.n_tokens = k, spec.vocab_size + 1, spec.n_tokens
            self.embedding = nn.Embedding(spec.n_tokens, d)
            self.gap_proj = nn.Linear(1, d)
            self.pos = nn.Embedding(k, d)  # position in the session (relative to its start row), not the slot
            self.blocks = nn.ModuleList(_CausalBlock(d, s.n_heads, s.ff_dim, s.dropout) for _ in range(s.n_layers))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, self.n_out)
            self.register_buffer("causal", torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1), persistent=False)
            self.register_buffer("eye", torch.eye(k, dtype=torch.bool), persistent=False)
            self.register_buffer("slots", torch.arange(k), persistent=False)
            slot = torch.zeros(1, WINDOW, 2 * k)
            slot[0, -1, k - 1] = 1.0
            self.register_buffer("slot", slot, persistent=False)

        def logits(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            tok = torch.clamp(torch.round(row[:, : self.k]), 0, self.n_tokens - 1).long()
            # Rows are left-padded by a varying amount: positions count from the first real token and
            # padding is masked out of attention (each position still sees itself, so no row is all
            # masked), which makes a token's prediction independent of how the row was aligned.
            is_pad = tok == self.n_tokens - 1
            n_pad = is_pad.long().sum(dim=1, keepdim=True)
            pos = torch.clamp(self.slots.unsqueeze(0) - n_pad, min=0)
            h = self.embedding(tok) + self.gap_proj(row[:, self.k :].unsqueeze(-1)) + self.pos(pos)
            blocked = self.causal.unsqueeze(0) | (is_pad.unsqueeze(1) & ~self.eye.unsqueeze(0))
            bias = (blocked.float() * -1e9).unsqueeze(1)  # [b, 1, k, k], broadcast over heads
            for block in self.blocks:
                h = block(h, bias)
            return self.head(self.norm(h)), tok

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits, tok = self.logits(x[:, -1, :])
            logp = torch.log_softmax(logits[:, -2, :], dim=-1)
            target = tok[:, -1:]
            valid = (target < self.n_out).float()  # start / padding tokens are not predicted: NLL 0
            nll = -torch.gather(logp, 1, torch.clamp(target, max=self.n_out - 1)) * valid
            # An unknown template never occurred in training: its surprise is not something the
            # softmax can estimate, so it is set to a fixed, large value (the issue's "explicit
            # unknown-template token"); learned templates keep their model NLL.
            nll = torch.where(target == 0, torch.full_like(nll, s.unknown_template_nats), nll)
            return nll.unsqueeze(-1) * self.slot

    return LogSequenceModel()


def _lm_loss(model: Any, rows: torch.Tensor, n_out: int, pad_id: int) -> torch.Tensor:
    import torch

    logits, tok = model.logits(rows)
    target = tok[:, 1:]
    ok = (target < n_out) & (tok[:, :-1] != pad_id)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, n_out), torch.clamp(target, max=n_out - 1).reshape(-1), reduction="none"
    )
    ok = ok.reshape(-1).float()
    return (ce * ok).sum() / ok.sum().clamp(min=1.0)


def _training_rows(keys: list[str], kind: np.ndarray, context: int) -> np.ndarray:
    """Rows that cover every session with few overlaps. The loss is taken at every position of a
    row, and the model is invariant to left padding, so a session's last row covers everything up
    to it while the session fits the context; once it is longer, every row is taken (a full row's
    positions count from its first slot, so each offset into a long session is its own case)."""
    n = len(keys)
    pick = np.zeros(n, dtype=bool)
    last_of: dict[str, int] = {}
    pos: dict[str, int] = {}
    for i, (k, kd) in enumerate(zip(keys, kind.tolist())):
        if kd == START:
            if k in last_of:
                pick[last_of.pop(k)] = True
            pos[k] = 0
            continue
        pos[k] = pos.get(k, 0) + 1
        last_of[k] = i
        if pos[k] >= context - 1:  # the row holds `context` tokens: no padding, no start token
            pick[i] = True
    for i in last_of.values():
        pick[i] = True
    return pick


def fit_log(s: LogFitSettings, command_line: str | None = None) -> LogFitResult:
    import torch

    from training.export import check_parity, export_onnx, ort_session

    t0 = time.perf_counter()
    counts = s.log_model == "counts"
    timeout = s.session_timeout_s or (86_400.0 if counts else 3_600.0)
    try:
        parser_cfg = make_config(format=s.log_format, entity_regex=s.entity_regex)
        feature_cfg = make_feature_config(session_timeout_s=timeout, idle_check_s=s.idle_check_s if counts else None)
        template_cfg = make_template_config()
    except (LogConfigError, LogFeatureConfigError, TemplateConfigError) as e:
        raise LogTrainingError(str(e)) from None
    if s.d_model % s.n_heads:
        raise LogTrainingError(f"d_model ({s.d_model}) must be a multiple of n_heads ({s.n_heads}).")
    labels = read_labels(s.labels) if s.labels is not None else None
    lines = read_lines(s.data)
    kept, parsed, unusable = _keep_lines(lines, LineParser(parser_cfg), labels)
    if not kept:
        raise LogTrainingError(
            f"no usable training lines in {s.data} ({unusable} of {len(lines)} lines do not parse as {s.log_format})."
        )
    miner = TemplateMiner(template_cfg)
    for p in parsed:
        miner.learn(p.message)
    templates = miner.freeze()
    spec = LogModelSpec(
        parser_cfg, feature_cfg, templates, 0 if counts else s.context, COUNTS_LAYOUT if counts else LAYOUT
    )
    log.info(
        "%s: %d lines, %d used for training (%d unparseable), %d templates",
        s.data,
        len(lines),
        len(kept),
        unusable,
        templates.vocab_size - 1,
    )

    stage = LogStage(spec)
    batch, _ = stage.feed(kept)
    stage.flush()
    use = _training_rows(batch.keys, batch.kind, spec.context)
    first_seen: dict[str, int] = {}
    for k, t in zip(batch.keys, batch.event_time_ms.tolist()):
        first_seen.setdefault(k, t)
    order = sorted(first_seen, key=lambda e: first_seen[e])
    n_val = max(1, int(round(len(order) * s.val_fraction)))
    if len(order) - n_val < 1:
        raise LogTrainingError(
            f"only {len(order)} entities in the training lines: too few to hold {s.val_fraction:.0%} out for "
            "calibration."
        )
    val_entities = set(order[-n_val:])
    is_val = np.fromiter((k in val_entities for k in batch.keys), dtype=bool, count=batch.n)
    rows = batch.rows
    train_idx = np.flatnonzero(use & ~is_val)
    val_idx = np.flatnonzero(use & is_val)
    val_all = np.flatnonzero(is_val & (batch.kind != START))  # every scored row of the held-out sessions
    if counts:
        return _fit_counts(s, spec, batch, is_val, val_all, lines, kept, unusable, len(order), n_val, command_line, t0)

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    torch.set_num_threads(s.threads or os.cpu_count() or 1)
    model = build_model(spec, s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    xt = torch.from_numpy(rows)
    n_out, pad = spec.vocab_size + 1, spec.pad_id
    best, best_state, bad_epochs, history = math.inf, None, 0, []
    for epoch in range(s.epochs):
        model.train()
        perm = rng.permutation(train_idx)
        total = 0.0
        for i in range(0, perm.size, s.batch_size):
            loss = _lm_loss(model, xt[perm[i : i + s.batch_size]], n_out, pad)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item() * min(s.batch_size, perm.size - i)
        model.eval()
        with torch.no_grad():
            val = sum(
                float(_lm_loss(model, xt[val_idx[i : i + 4096]], n_out, pad)) * min(4096, val_idx.size - i)
                for i in range(0, val_idx.size, 4096)
            ) / max(1, val_idx.size)
        history.append((total / max(1, train_idx.size), val))
        log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch + 1, history[-1][0], val)
        if val < best - 1e-4:
            best, bad_epochs = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= s.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    K2 = 2 * spec.context
    onnx_bytes = export_onnx(model, WINDOW, K2, s.opset)
    sample = rng.choice(val_idx, size=min(512, val_idx.size), replace=False)
    windows = np.stack([rows[sample], rows[sample]], axis=1)
    parity = check_parity(onnx_bytes, model, windows, s.parity_tolerance)

    # Calibration on held-out sessions, through ONNX Runtime as the service scores.
    sess = ort_session(onnx_bytes)
    scores = np.zeros(val_all.size, dtype=np.float32)
    for i in range(0, val_all.size, 2048):
        part = val_all[i : i + 2048]
        x = np.ascontiguousarray(np.stack([rows[part], rows[part]], axis=1))
        r = sess.run(None, {"x": x})[0]
        scores[i : i + part.size] = LOG_SCORING.scores(x, r)[0]
    per_entity: dict[str, float] = {}
    for k, sc in zip((batch.keys[i] for i in val_all.tolist()), scores.tolist()):
        per_entity[k] = max(per_entity.get(k, 0.0), sc)
    session_max = np.asarray(list(per_entity.values()), dtype=np.float64)
    threshold = float(np.quantile(session_max, s.threshold_quantile)) * s.threshold_margin
    qs = {str(q): float(np.quantile(scores, q)) for q in (0.9, 0.99, 0.999, 0.9999)}
    qs["1.0"] = float(scores.max())
    qs.update({f"session_{q}": float(np.quantile(session_max, q)) for q in (0.5, 0.9, 0.99, 1.0)})
    calibration = Calibration(qs, max(threshold, s.threshold_floor, 1e-6), int(scores.size))

    sha = hashlib.sha256(onnx_bytes).hexdigest()
    model_version = s.model_version or f"logseq-{sha[:12]}"
    extra, extra_files = spec.to_extra()
    K = spec.context
    arch = {
        "kind": "log_sequence_transformer",
        "context": K,
        "tokens": spec.n_tokens,
        "d_model": s.d_model,
        "n_heads": s.n_heads,
        "n_layers": s.n_layers,
        "ff_dim": s.ff_dim,
        "unknown_template_nats": s.unknown_template_nats,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    training_meta = {
        "data_source": str(s.data.resolve()),
        "data_format": "log",
        "lines": len(lines),
        "lines_used": len(kept),
        "lines_unparseable": unusable,
        "labels": None if s.labels is None else str(s.labels),
        "entities": len(order),
        "validation_entities": n_val,
        "train_rows": int(train_idx.size),
        "val_rows": int(val_idx.size),
        "seed": s.seed,
        "epochs": len(history),
        "best_val_loss": best,
        "history": history,
        "parity_max_abs_diff": parity,
        "settings": s.model_dump(mode="json"),
        "command_line": command_line or "python API: training.logs.fit_log()",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # ids must reach the graph as they are
    identity = Normaliser(np.zeros(K2, np.float32), np.ones(K2, np.float32), 1e-3)
    write_bundle(
        s.out,
        onnx_bytes,
        model_version=model_version,
        features=feature_names(K),
        window=WINDOW,
        normaliser=identity,
        scoring=LOG_SCORING,
        calibration=calibration,
        model=arch,
        training=training_meta,
        extra=extra,
        extra_files=extra_files,
    )
    from stream_detector.logs.spec import load_log_spec

    load_log_spec(load_bundle(s.out))  # the service's own checks, on what was written
    return LogFitResult(
        Path(s.out),
        model_version,
        templates.vocab_size - 1,
        int(train_idx.size),
        int(val_idx.size),
        best,
        calibration.threshold,
        parity,
        time.perf_counter() - t0,
    )


def _fit_counts(
    s: LogFitSettings,
    spec: LogModelSpec,
    batch: Any,
    is_val: np.ndarray,
    val_all: np.ndarray,
    lines: list,
    kept: list,
    unusable: int,
    n_entities: int,
    n_val: int,
    command_line: str | None,
    t0: float,
) -> LogFitResult:
    from training.export import ort_session
    from training.logcounts import count_model_onnx, entity_max, fit_count_branches, reference_errors

    rows = batch.rows
    try:
        line, idle, info = fit_count_branches(
            rows, batch.kind, batch.keys, is_val, s.count_variance, s.count_scale_floor, s.count_min_scale
        )
    except ValueError as e:
        raise LogTrainingError(str(e)) from None
    onnx_bytes = count_model_onnx(line, idle, spec.vocab_size)
    sess = ort_session(onnx_bytes)
    scores = np.zeros(val_all.size, dtype=np.float32)
    parity = 0.0
    for i in range(0, val_all.size, 4096):
        part = val_all[i : i + 4096]
        x = np.ascontiguousarray(np.stack([rows[part], rows[part]], axis=1))
        r = sess.run(None, {"x": x})[0]
        parity = max(parity, float(np.abs(r[:, -1, :] - reference_errors(rows[part], line, idle)).max(initial=0.0)))
        scores[i : i + part.size] = LOG_SCORING.scores(x, r)[0]
    if parity > s.parity_tolerance:
        raise LogTrainingError(
            f"the count model's ONNX graph differs from its numpy reference by {parity:.3g} (tolerance "
            f"{s.parity_tolerance})."
        )
    session_max = entity_max([batch.keys[i] for i in val_all.tolist()], scores) if val_all.size else np.zeros(1)
    threshold = float(np.quantile(session_max, s.threshold_quantile)) * s.threshold_margin
    qs = {str(q): float(np.quantile(scores, q)) for q in (0.9, 0.99, 0.999, 0.9999)} if scores.size else {}
    qs["1.0"] = float(scores.max(initial=0.0))
    qs.update({f"session_{q}": float(np.quantile(session_max, q)) for q in (0.5, 0.9, 0.99, 1.0)})
    calibration = Calibration(qs, max(threshold, s.count_threshold_floor, 1e-6), int(scores.size))

    sha = hashlib.sha256(onnx_bytes).hexdigest()
    model_version = s.model_version or f"logcounts-{sha[:12]}"
    extra, extra_files = spec.to_extra()
    arch = {
        "kind": "log_template_counts_pca",
        "templates": spec.vocab_size,
        "variance": s.count_variance,
        "scale_floor": s.count_scale_floor,
        "min_scale": s.count_min_scale,
        "branches": info,
    }
    n_train = int(((batch.kind != START) & ~is_val).sum())
    training_meta = {
        "data_source": str(s.data.resolve()),
        "data_format": "log",
        "model": "counts",
        "lines": len(lines),
        "lines_used": len(kept),
        "lines_unparseable": unusable,
        "labels": None if s.labels is None else str(s.labels),
        "entities": n_entities,
        "validation_entities": n_val,
        "train_rows": n_train,
        "val_rows": int(val_all.size),
        "seed": s.seed,
        "parity_max_abs_diff": parity,
        "settings": s.model_dump(mode="json"),
        "command_line": command_line or "python API: training.logs.fit_log()",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    f = spec.n_features
    identity = Normaliser(np.zeros(f, np.float32), np.ones(f, np.float32), 1e-3)  # counts reach the graph as they are
    write_bundle(
        s.out,
        onnx_bytes,
        model_version=model_version,
        features=spec.feature_names(),
        window=WINDOW,
        normaliser=identity,
        scoring=LOG_SCORING,
        calibration=calibration,
        model=arch,
        training=training_meta,
        extra=extra,
        extra_files=extra_files,
    )
    from stream_detector.logs.spec import load_log_spec

    load_log_spec(load_bundle(s.out))  # the service's own checks, on what was written
    return LogFitResult(
        Path(s.out),
        model_version,
        spec.vocab_size - 1,
        n_train,
        int(val_all.size),
        math.nan,
        calibration.threshold,
        parity,
        time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------- command line (fit --format log)
_FROM_FIT_FLAGS = (
    "data",
    "out",
    "d_model",
    "n_heads",
    "n_layers",
    "ff_dim",
    "dropout",
    "epochs",
    "patience",
    "batch_size",
    "lr",
    "weight_decay",
    "val_fraction",
    "threshold_quantile",
    "seed",
    "threads",
    "opset",
    "model_version",
)


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logs (--format log)")
    g.add_argument(
        "--labels",
        type=Path,
        default=None,
        help=(
            "with --format log: label file (entity,label; anomalous entities are left out) or a list of normal "
            "entities, one per line"
        ),
    )
    g.add_argument(
        "--log-format",
        default=None,
        help="with --format log: line format preset: hdfs, syslog-rfc3164, syslog-rfc5424, jsonl (default hdfs)",
    )
    g.add_argument(
        "--entity-regex",
        default=None,
        help=r"with --format log: regex naming the entity in a message (default blk_-?\d+)",
    )
    g.add_argument(
        "--log-model",
        choices=("counts", "sequence"),
        default=None,
        help=(
            "with --format log: counts (template-count vectors, PCA per row kind; default) or sequence (causal "
            "Transformer over template ids)"
        ),
    )
    g.add_argument(
        "--session-timeout",
        type=float,
        default=None,
        help=(
            "with --format log: seconds of inactivity that end an entity's session (default 86400 for counts, 3600 for "
            "sequence)"
        ),
    )
    g.add_argument(
        "--idle-check",
        type=float,
        default=None,
        help=(
            "with --log-model counts: seconds of inactivity after which an entity's counts at rest are judged (default "
            "600)"
        ),
    )
    g.add_argument(
        "--context", type=int, default=None, help="with --format log: tokens the sequence model sees (default 32)"
    )
    g.add_argument(
        "--threshold-margin",
        type=float,
        default=None,
        help="with --format log: factor on the calibrated session threshold (default 1.0)",
    )


def log_settings_from_args(args: argparse.Namespace) -> LogFitSettings:
    values: dict[str, Any] = {}
    for name in _FROM_FIT_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    for name, flag in (
        ("labels", "labels"),
        ("log_format", "log_format"),
        ("entity_regex", "entity_regex"),
        ("session_timeout_s", "session_timeout"),
        ("context", "context"),
        ("threshold_margin", "threshold_margin"),
        ("log_model", "log_model"),
        ("idle_check_s", "idle_check"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            values[name] = v
    for name in ("data", "out"):
        if values.get(name) in (None, ""):
            raise LogTrainingError(f"the option --{name} is required.")
    try:
        return LogFitSettings(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise LogTrainingError(
            f"setting {'.'.join(map(str, err['loc']))!r}: {err['msg']} (got {err.get('input')!r})."
        ) from None


def handle_log_fit(args: argparse.Namespace, command_line: str) -> int:
    import sys

    from stream_detector.core.bundle import BundleError
    from training.export import ExportError

    try:
        res = fit_log(log_settings_from_args(args), command_line)
    except (LogTrainingError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {res.bundle_dir} (model_version {res.model_version}): {res.templates} templates, "
        f"{res.train_rows} training / {res.val_rows} validation rows, "
        f"{'' if math.isnan(res.best_val_loss) else f'best validation loss {res.best_val_loss:.4g}, '}"
        f"ONNX parity {res.parity_max_abs_diff:.3g}, "
        f"session threshold {res.threshold:.4g}, {res.seconds:.1f} s"
    )
    return 0
