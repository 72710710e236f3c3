"""A small transformer autoencoder over normalised OHLCV windows (the tick challenger), in torch.

Input: (batch, 60, 4) windows of ``BAR_SEQ`` channels, each channel robust-scaled within its
window (``auris.collector.feed_features.BarWindows``). The encoder (1 layer, width 16, 2 heads)
reads the window, its mean over time is squeezed to an 8-value code, and a decoder (learned
positions + the code, 1 layer) rebuilds the window: the code is the bottleneck that keeps the
model from copying its input. Score: the mean squared error over the four channels at the LAST
position (the bar being judged; causal); ``channel_errors`` holds those four errors to explain it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["ERRORS_OUTPUT", "INPUT_NAME", "SCORE_OUTPUT", "WindowAutoencoder", "export_onnx", "fit", "score"]

INPUT_NAME = "sequences"
SCORE_OUTPUT = "score"
ERRORS_OUTPUT = "channel_errors"


class WindowAutoencoder(nn.Module):
    def __init__(self, length: int = 60, channels: int = 4, d_model: int = 16, code: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(channels, d_model)
        self.pos = nn.Parameter(torch.randn(1, length, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.to_code = nn.Linear(d_model, code)
        self.from_code = nn.Linear(code, d_model)
        self.dec_pos = nn.Parameter(torch.randn(1, length, d_model) * 0.02)
        dec_layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.decoder = nn.TransformerEncoder(dec_layer, num_layers=1, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, channels)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.inp(x) + self.pos)
        code = self.to_code(h.mean(dim=1))
        d = self.from_code(code).unsqueeze(1) + self.dec_pos
        out: torch.Tensor = self.out(self.decoder(d))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        errors = (self.reconstruct(x)[:, -1, :] - x[:, -1, :]) ** 2
        return errors.mean(dim=1), errors


def fit(
    windows: npt.NDArray[np.float32],
    *,
    epochs: int = 6,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int = 2,
) -> WindowAutoencoder:
    """Train on clean windows (mean squared error over every position and channel)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = WindowAutoencoder(length=windows.shape[1], channels=windows.shape[2])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.from_numpy(np.ascontiguousarray(windows))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch):
            xb = data[order[start : start + batch]]
            loss = ((model.reconstruct(xb) - xb) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    model.eval()
    return model


def score(
    model: WindowAutoencoder, windows: npt.NDArray[np.float32], batch: int = 4096
) -> npt.NDArray[np.float32]:
    """Scores in torch: the yardstick for the ONNX graph's parity."""
    out = []
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            s, _ = model(torch.from_numpy(np.ascontiguousarray(windows[start : start + batch])))
            out.append(s.numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def export_onnx(model: WindowAutoencoder, length: int, channels: int) -> bytes:
    """ONNX (torch's dynamo exporter, weights inside the file), dynamic batch."""
    example = torch.zeros(2, length, channels)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[SCORE_OUTPUT, ERRORS_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        dynamo=True,
    )
    assert program is not None
    data: bytes = program.model_proto.SerializeToString()
    return data
