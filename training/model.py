"""Transformer encoder autoencoders over windows x[batch, W, F] of normalised observations.

Variants:
- `plain`: input projection + learned positional embedding -> N encoder layers -> output
  projection; trained to reconstruct every position; the newest position scores the event.
  With full attention it can learn to copy its input, anomalies included.
- `masked`: the same network, but inside the model the newest `mask_steps` positions are replaced
  by a learned mask token before the encoder, so those steps must be predicted from the context
  before them. Training loss and score are on those positions. The masking is part of the forward
  pass, hence of the exported ONNX graph: the service just feeds raw windows.
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("plain", "masked")


class TransformerAutoencoder(nn.Module):
    keep: torch.Tensor  # a buffer (register_buffer), masked variant only

    def __init__(
        self,
        n_features: int,
        window: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        ff_dim: int = 128,
        dropout: float = 0.1,
        variant: str = "masked",
        mask_steps: int = 1,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown model variant {variant!r}; expected one of {', '.join(VARIANTS)}.")
        if variant == "masked" and not (1 <= mask_steps < window):
            raise ValueError(f"mask_steps must be between 1 and window-1 ({window - 1}), got {mask_steps}.")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads}).")
        self.n_features, self.window, self.variant, self.mask_steps = n_features, window, variant, mask_steps
        self.input_proj = nn.Linear(n_features, d_model)
        self.pos_embedding = nn.Parameter(torch.randn(1, window, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.output_proj = nn.Linear(d_model, n_features)
        if variant == "masked":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model))
            keep = torch.ones(1, window, 1)
            keep[:, window - mask_steps :, :] = 0.0
            self.register_buffer("keep", keep, persistent=False)

    @property
    def scoring_positions(self) -> tuple[int, ...]:
        """Window positions (negative, from the end) whose error scores the newest event."""
        if self.variant == "masked":
            return tuple(range(-self.mask_steps, 0))
        return (-1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        if self.variant == "masked":
            # Blend instead of index assignment: one graph for any batch size, exports cleanly.
            h = h * self.keep + self.mask_token * (1.0 - self.keep)
        h = self.encoder(h + self.pos_embedding)
        return self.output_proj(self.norm(h))

    def loss_positions(self) -> slice:
        """Positions the training loss covers: all for `plain`, the masked ones for `masked`."""
        return slice(self.window - self.mask_steps, None) if self.variant == "masked" else slice(None)

    def architecture(self) -> dict:
        return {
            "kind": "transformer_autoencoder",
            "variant": self.variant,
            "mask_steps": self.mask_steps if self.variant == "masked" else 0,
            "n_features": self.n_features,
            "window": self.window,
            "d_model": self.input_proj.out_features,
            "n_heads": self.encoder.layers[0].self_attn.num_heads,
            "n_layers": len(self.encoder.layers),
            "ff_dim": self.encoder.layers[0].linear1.out_features,
            "parameters": sum(p.numel() for p in self.parameters()),
        }
