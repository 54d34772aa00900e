"""The dtype policy: per-group sums, moments and optimizer states accumulate in at least
float32, so that bfloat16 and float16 parameters are updated from float32 statistics."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def accumulation_dtype(dtype: Any) -> Any:
    """Dtype for reductions and moments: at least float32 (bf16/fp16 params accumulate in f32)."""
    return jnp.promote_types(dtype, jnp.float32)
