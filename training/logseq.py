"""The sequence log model (`fit --format log --log-model sequence`, layout `template-context/1`).

`LogSequenceModel` is a causal Transformer over the last K tokens of a session (template-id
embedding + a projection of log1p(gap) + a learned position embedding); it is trained to predict
each token from the ones before it (cross-entropy, the `NextToken` objective of the shared loop in
training/trainer.py: AdamW, warm-up + cosine learning rate, early stopping, Ctrl-C keeps the best),
and its exported graph outputs, at [-1, K-1], the negative log-likelihood of the row's newest
token: high for an unknown template, a template in an unusual place, or a session that ends too
early. Calibration and the bundle are the log path's (training/logs.py).
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.logs.spec import WINDOW, LogModelSpec, feature_names
from stream_detector.logs.stage import START
from training.logs import (
    LogFitResult,
    LogFitSettings,
    LogTrainingData,
    LogTrainingError,
    score_rows,
    session_calibration,
    write_log_bundle,
)


def build_model(spec: LogModelSpec, s: LogFitSettings) -> Any:
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


def _lm_loss(model: Any, rows: Any, n_out: int, pad_id: int) -> Any:
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


class NextToken:
    """The trainer's objective (training/trainer.py) for the sequence model: a batch is the rows
    at the indices, its loss the mean next-token cross-entropy over their real tokens."""

    chunk = 4096

    def __init__(self, model: Any, data: np.ndarray, device: Any, n_out: int, pad_id: int) -> None:
        import torch

        self.rows = torch.as_tensor(np.ascontiguousarray(data, dtype=np.float32), device=device)
        self.n_out, self.pad_id = n_out, pad_id

    def batch(self, idx: Any) -> Any:
        return self.rows[idx]

    def loss(self, model: Any, x: Any) -> Any:
        return _lm_loss(model, x, self.n_out, self.pad_id)

    def loss_sum(self, model: Any, x: Any) -> float:
        return float(self.loss(model, x)) * x.shape[0]


def fit_sequence(s: LogFitSettings, d: LogTrainingData, command_line: str | None) -> LogFitResult:
    import torch

    from training.export import check_parity, export_onnx, ort_session
    from training.trainer import TrainingInterrupted, train

    spec, batch, rows = d.spec, d.batch, d.batch.rows
    use = _training_rows(batch.keys, batch.kind, spec.context)
    train_idx = np.flatnonzero(use & ~d.is_val)
    val_idx = np.flatnonzero(use & d.is_val)
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads or os.cpu_count() or 1)
    model = build_model(spec, s)
    try:
        result = train(
            model,
            rows,
            train_idx,
            val_idx,
            epochs=s.epochs,
            patience=s.patience,
            batch_size=s.batch_size,
            lr=s.lr,
            weight_decay=s.weight_decay,
            grad_clip=1.0,
            max_windows_per_epoch=0,
            seed=s.seed,
            device=torch.device("cpu"),
            progress=False,
            objective=partial(NextToken, n_out=spec.vocab_size + 1, pad_id=spec.pad_id),
            min_improvement=1e-4,
        )
    except TrainingInterrupted as e:
        raise LogTrainingError(str(e)) from None
    model.eval()

    K2 = 2 * spec.context
    onnx_bytes = export_onnx(model, WINDOW, K2, s.opset)
    sample = np.random.default_rng(s.seed).choice(val_idx, size=min(512, val_idx.size), replace=False)
    parity = check_parity(onnx_bytes, model, np.stack([rows[sample], rows[sample]], axis=1), s.parity_tolerance)

    # Calibration on held-out sessions, through ONNX Runtime as the service scores.
    scores, _ = score_rows(ort_session(onnx_bytes), rows, d.val_all, 2048)
    calibration = session_calibration([batch.keys[i] for i in d.val_all.tolist()], scores, s, s.threshold_floor)
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
    model_version = write_log_bundle(
        s,
        d,
        onnx_bytes,
        "logseq",
        feature_names(K),
        calibration,
        arch,
        command_line,
        train_rows=int(train_idx.size),
        val_rows=int(val_idx.size),
        epochs=len(result.train_loss),
        best_epoch=result.best_epoch,
        best_val_loss=result.best_val_loss,
        interrupted=result.interrupted,
        early_stopped=result.early_stopped,
        history={"train_loss": result.train_loss, "val_loss": result.val_loss},
        train_seconds=round(result.seconds, 2),
        parity_max_abs_diff=parity,
    )
    return LogFitResult(
        Path(s.out),
        model_version,
        spec.vocab_size - 1,
        int(train_idx.size),
        int(val_idx.size),
        result.best_val_loss,
        calibration.threshold,
        parity,
        time.perf_counter() - d.started,
    )
