"""kvtier: a tiered KV-cache runtime for LLM serving.

The device holds the hot tokens of every (sequence, layer, KV head) exactly and
a sketch of the rest; their exact K/V live in a host tier and, below it, an
NVMe tier. See README.md and ``help(kvtier.Runtime)``.

Tensors cross without copies: C-contiguous CPU arrays (numpy, any DLPack
producer, or an object with ``__array_interface__``) in the exact dtype of the
model shape: ``"f16"`` -> ``numpy.float16``, ``"f32"`` -> ``numpy.float32``,
``"bf16"`` -> a DLPack bfloat16 tensor or a ``numpy.uint16`` array holding the
bf16 bits (see :func:`f32_to_bf16` and :func:`bf16_to_f32`). Anything else
raises :class:`InvalidArgumentError` naming the expected and the given shape
and dtype.

Errors: a failed call raises :class:`Error` (a ``RuntimeError``) whose ``code``
is the status code name; :class:`InvalidArgumentError` is also a
``ValueError``, :class:`NotFoundError` a ``KeyError`` and
:class:`ResourceExhaustedError` a ``MemoryError``.
"""

import numpy as _np

from ._kvtier import (
    Error,
    InvalidArgumentError,
    ModelShape,
    NotFoundError,
    Options,
    ResourceExhaustedError,
    Runtime,
    __version__,
)

__all__ = [
    "Error",
    "InvalidArgumentError",
    "ModelShape",
    "NotFoundError",
    "Options",
    "ResourceExhaustedError",
    "Runtime",
    "bf16_to_f32",
    "f32_to_bf16",
    "__version__",
]


def f32_to_bf16(x):
    """Rounds float32 values to bfloat16 (to nearest, ties to even) and
    returns their bits as a numpy.uint16 array of the same shape: the form in
    which kvtier takes bf16 tensors from numpy. NaN stays NaN."""
    bits = _np.ascontiguousarray(x, dtype=_np.float32).view(_np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = _np.isnan(_np.asarray(x, dtype=_np.float32))
    return _np.where(nan, (bits >> 16) | 0x40, rounded).astype(_np.uint16)


def bf16_to_f32(bits):
    """The float32 values of bfloat16 bits held in a numpy.uint16 array."""
    b = _np.ascontiguousarray(bits)
    if b.dtype != _np.uint16:
        raise ValueError(f"bf16_to_f32 takes a uint16 array of bf16 bits; got {b.dtype}")
    return (b.astype(_np.uint32) << 16).view(_np.float32)
