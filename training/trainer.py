"""The training loop: AdamW, warm-up + cosine learning rate, gradient clipping, early stopping on
validation loss, best weights kept. Ctrl-C stops after the current batch and keeps the best
weights seen so far (a second Ctrl-C during export kills as usual).

What is minimised is an objective: how a batch is built from the training data and what its loss
is. The default, `Reconstruction`, is the autoencoder's (windows of normalised rows, mean squared
error at the model's loss positions); the sequence log model (training/logseq.py) brings its own
(rows of template ids, next-token cross-entropy)."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from training.model import TransformerAutoencoder

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Ctrl-C before any epoch finished: there are no weights worth exporting."""


@dataclass
class TrainResult:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based
    best_val_loss: float = math.inf
    interrupted: bool = False
    early_stopped: bool = False
    windows_per_s: float = 0.0  # training windows (forward + backward) per second
    seconds: float = 0.0
    device: str = "cpu"


class WindowBatches:
    """Gathers [B, W, F] windows from one normalised array kept on the training device."""

    def __init__(self, data: np.ndarray, window: int, device: torch.device) -> None:
        self.data = torch.as_tensor(np.ascontiguousarray(data, dtype=np.float32), device=device)
        self.offsets = torch.arange(window, device=device)
        self.device = device

    def gather(self, starts: torch.Tensor) -> torch.Tensor:
        return self.data[starts[:, None] + self.offsets]


class Objective(Protocol):
    """A batch builder and a loss: `batch` turns indices (into the training data) into the model's
    input, `loss` is the batch's mean loss (what is minimised), `loss_sum` its sum over the batch
    (validation loss = sum over the held-out indices / their number, taken `chunk` at a time)."""

    chunk: int

    def batch(self, idx: torch.Tensor) -> torch.Tensor: ...

    def loss(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def loss_sum(self, model: torch.nn.Module, x: torch.Tensor) -> float: ...


class Reconstruction:
    """The autoencoder's objective: [B, W, F] windows starting at the indices, mean squared
    reconstruction error at the model's loss positions."""

    chunk = 1024

    def __init__(self, model: TransformerAutoencoder, data: np.ndarray, device: torch.device) -> None:
        self.batches = WindowBatches(data, model.window, device)
        self.pos = model.loss_positions()

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.batches.gather(idx)

    def loss(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        recon = model(x)
        return torch.mean((recon[:, self.pos] - x[:, self.pos]) ** 2)

    def loss_sum(self, model: torch.nn.Module, x: torch.Tensor) -> float:
        recon = model(x)
        return float(torch.sum(torch.mean((recon[:, self.pos] - x[:, self.pos]) ** 2, dim=(1, 2))))


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        from training.settings import SettingsError

        raise SettingsError("device 'cuda' was requested but torch sees no CUDA device.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def train(
    model: torch.nn.Module,
    data: np.ndarray,
    train_starts: np.ndarray,
    val_starts: np.ndarray,
    *,
    epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    max_windows_per_epoch: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    objective: Callable[..., Objective] = Reconstruction,
    min_improvement: float = 1e-9,
) -> TrainResult:
    """Train in place; on return the model holds the best weights (lowest validation loss).
    `train_starts` / `val_starts` index `data` as `objective(model, data, device)` reads it; an
    epoch counts as an improvement when its validation loss is below the best by more than
    `min_improvement`."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model.to(device)
    obj = objective(model, data, device)
    val_t = torch.as_tensor(val_starts, device=device)
    per_epoch = min(len(train_starts), max_windows_per_epoch) if max_windows_per_epoch else len(train_starts)
    steps_per_epoch = math.ceil(per_epoch / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup = max(1, min(200, total_steps // 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    result = TrainResult(device=str(device))
    best_state = None
    since_best = 0
    trained_windows = 0
    train_seconds = 0.0
    t_start = time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            order = gen.permutation(len(train_starts))[:per_epoch]
            starts_t = torch.as_tensor(train_starts[order], device=device)
            bar = tqdm(
                range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False, unit="batch"
            )
            # The loss sum stays on the device: reading it every step would sync the GPU each batch.
            loss_sum = torch.zeros((), device=device)
            n_sum = 0
            t0 = time.perf_counter()
            for b in bar:
                idx = starts_t[b * batch_size : (b + 1) * batch_size]
                loss = obj.loss(model, obj.batch(idx))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(idx)
                n_sum += len(idx)
                if progress and b % 20 == 0:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{float(loss_sum) / n_sum:.4f}", win_s=f"{n_sum / max(elapsed, 1e-9):.0f}")
            bar.close()
            train_loss = float(loss_sum) / max(n_sum, 1)  # also waits for the device to finish the epoch
            train_seconds += time.perf_counter() - t0
            trained_windows += n_sum
            val_loss = evaluate_loss(model, obj, val_t)
            result.train_loss.append(train_loss)
            result.val_loss.append(val_loss)
            improved = val_loss < result.best_val_loss - min_improvement
            if improved:
                result.best_val_loss, result.best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
                since_best = 0
            else:
                since_best += 1
            msg = (
                f"epoch {epoch}/{epochs}: train loss {train_loss:.5f}, val loss {val_loss:.5f}"
                f"{' (best)' if improved else ''}, {n_sum / max(time.perf_counter() - t0, 1e-9):.0f} windows/s"
            )
            log.info(msg)
            if since_best >= patience:
                result.early_stopped = True
                log.info("early stopping: no validation improvement for %d epochs", patience)
                break
    except KeyboardInterrupt:
        result.interrupted = True
        log.warning("interrupted: keeping the best weights so far (epoch %d)", result.best_epoch)
    if best_state is None:
        raise TrainingInterrupted("training was interrupted before the first epoch finished; nothing was written.")
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - t_start
    result.windows_per_s = trained_windows / max(train_seconds, 1e-9)
    return result


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, objective: Objective, starts: torch.Tensor) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(starts), objective.chunk):
        x = objective.batch(starts[i : i + objective.chunk])
        total += objective.loss_sum(model, x)
        n += x.shape[0]
    return total / max(n, 1)
