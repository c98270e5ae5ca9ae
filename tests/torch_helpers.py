"""Helpers for tests that compare torch tensors with mxref bit for bit (tests of dmx)."""
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import settings

INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.bfloat16: torch.int16, torch.float16: torch.int16}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# Half the active Hypothesis profile's examples per property (keeps the default run fast,
# scales up under HYPOTHESIS_PROFILE=thorough).
EXAMPLES = max(30, settings.default.max_examples // 2)


def to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(INT_VIEW[t.dtype])
