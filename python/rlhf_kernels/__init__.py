"""rlhf-kernels: fused kernels for RLHF / PPO / GRPO on any DLPack tensor.

``rlhf_kernels.torch`` has the PyTorch functions (with autograd). ``rlhf_kernels._native`` is
the framework-agnostic layer underneath: it reads DLPack tensors (PyTorch, JAX, CuPy) where
they lie and writes into output tensors the caller allocated, on the caller's CUDA stream.
"""

from . import _native
from ._native import POLICY_STATS_WORDS, cuda_available

__all__ = ["POLICY_STATS_WORDS", "cuda_available", "_native"]
