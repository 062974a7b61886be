"""Helpers shared by the PyTorch functions: the caller's stream, the status word per device,
and the dtype and layout conversions of their inputs."""

from __future__ import annotations

from typing import Optional

import torch

from . import _native

_STATUS: dict = {}


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _status(t: torch.Tensor) -> Optional[torch.Tensor]:
    if not t.is_cuda:
        return None
    word = _STATUS.get(t.device)
    if word is None:
        word = _STATUS[t.device] = torch.full((1,), -1, dtype=torch.int64, device=t.device)
    return word


def check_status(device=None) -> None:
    """Raises ``ValueError`` for the first row a GPU kernel could not process since the last
    check (waits for the device), and clears the record."""
    for dev, word in list(_STATUS.items()):
        if device is not None and torch.device(device) != dev:
            continue
        value = int(word.item())
        if value != -1:
            word.fill_(-1)
            _native.check_status(value)


def _mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"mask: dtype {mask.dtype}, expected torch.bool or torch.uint8")
    return mask.detach().contiguous()


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """The logits as the kernels read them: in place, unless rows share memory (an expanded
    tensor), whose gradients must add up: then a contiguous copy, through autograd."""
    if any(size > 1 and stride == 0 for size, stride in zip(logits.shape, logits.stride())):
        return logits.contiguous()
    if torch._debug_has_internal_overlap(logits) != 0:
        return logits.contiguous()
    return logits


def _f32(t: Optional[torch.Tensor], what: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.dtype != torch.float32:
        raise TypeError(f"{what}: dtype {t.dtype}, expected torch.float32")
    return t.detach().contiguous()


def _counts_options(aggregation: str, max_len: int, global_counts) -> dict:
    return dict(
        aggregation=aggregation, max_len=int(max_len),
        global_counts=None if global_counts is None else tuple(float(c) for c in global_counts),
    )


def _f32_keep_grad(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise TypeError(f"{what}: dtype {t.dtype}, expected torch.float32")
    return t
