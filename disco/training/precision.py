"""Mixed precision for training (`disco train --precision`): the forward pass and the loss under autocast, and,
for fp16, a gradient scaler (fp16's narrow range underflows small gradients; bf16 has fp32's range and needs
none). Weights, optimiser state, masks and evaluation stay fp32, so a run exports and deploys as any other."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    def __init__(self, precision: str, device: torch.device):
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        """The context of a forward pass and its loss."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    @property
    def gradient_scale(self) -> float:
        """What the gradients of the current step are multiplied by (1 without a scaler)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimiser's step; False when fp16 gradients overflowed and the scaler skipped it (the scale is
        lowered for the next step)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scaler lowers its scale exactly when it skipped

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
