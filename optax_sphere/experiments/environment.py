"""What a measurement ran on: the machine, the library versions, and what moves timings."""

from __future__ import annotations

import os
import platform

import jax
import optax

__all__ = ["environment"]


def environment() -> dict:
    """The machine (processor, cores, JAX backend and devices), the versions of Python, JAX,
    optax and optax_sphere, and what moves step times besides the code: the malloc settings
    (``MALLOC_*``, ``GLIBC_TUNABLES``), ``XLA_FLAGS`` and the load average now (1, 5, 15 min).

    Returns:
      A dict of plain Python values, for a results file.

    Example:
      >>> from optax_sphere.experiments.environment import environment
      >>> sorted(environment())[:3]
      ['backend', 'cpu_count', 'devices']

    References:
      What the benchmarks record beside their timings (``benchmarks/README.md``).
    """
    import optax_sphere

    malloc = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "devices": len(jax.devices()),
        "jax": jax.__version__,
        "load_average_1_5_15_min": list(load) if load else None,
        "machine": platform.machine(),
        "malloc_settings": malloc or "glibc defaults",
        "optax": optax.__version__,
        "optax_sphere": optax_sphere.__version__,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
