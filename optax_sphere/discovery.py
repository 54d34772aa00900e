"""Finding the radially invariant groups of a model from the model itself.

A group of weights ``x_G`` is radially invariant when ``f(.., c x_G, ..) = f(.., x_G, ..)`` for
every ``c > 0`` (Roburin et al. sec. 2, app. B): the weights of one unit followed by BatchNorm,
a whole tensor followed by LayerNorm. Differentiating in ``c`` at ``c = 1`` (Euler's theorem
for a function homogeneous of degree 0), the outputs do not move along the radial direction:
``J_G x_G = 0``, where ``J_G`` is the Jacobian of the outputs in ``x_G``.

:func:`find_groups` measures this for every candidate grouping of every parameter at once.
With ``K`` random output directions ``r_k`` it takes the gradients ``g_k = J^T r_k`` (one
forward and one batched backward pass per probe point) and, per group, compares the radial
derivative ``<g_k, x_G>`` with the derivative along a random tangent direction ``t_G`` of the
same norm (``<t_G, x_G> = 0``, ``||t_G|| = ||x_G||``):

    sensitivity(G) = sqrt(sum_k <g_k, x_G>^2 / sum_k <g_k, t_G>^2).

It is 0 for an invariant group (up to rounding and the ``eps`` of the normalisation layers)
and of order 1 for a group whose scale the outputs see, whatever the size of the group and
of the gradients. A grouping is accepted when the largest sensitivity over its groups is below
``tolerance`` (default ``1e-2``; invariant groups measure about ``1e-6`` to ``1e-3`` in float32
with ``eps = 1e-5`` to ``1e-6``, non-invariant ones ``0.1`` to ``10``).

Invariance that holds only at initialisation (zero biases and offsets make a ``Dense`` kernel
before ``LayerNorm`` with a bias, or a BatchNorm scale before another normalised layer, look
invariant) is ruled out by probing at perturbed parameters: every leaf is moved by
``perturbation`` times its root mean square (or by ``perturbation`` for an all-zero leaf) in a
random direction, at two independent points. The grouping found is then checked by a finite
test: every group scaled by a random factor in ``[1/2, 2]`` at once must leave the outputs
unchanged to ``check_rtol``; a leaf that fails it is left ungrouped with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_sphere._paths import path_str
from optax_sphere.groups import Group, key_names, named_axes

__all__ = ["FoundGroups", "GroupReport", "find_groups"]

PyTree = Any

#: Candidate groupings, in order of preference: the finest invariant one is chosen.
_UNIT_LAST = "unit"
_UNIT_FIRST = "unit_out_first"
_TENSOR = "tensor"
_LABELS = {
    _UNIT_LAST: "per unit (out last)",
    _UNIT_FIRST: "per unit (out first)",
    _TENSOR: "per tensor",
    None: "not grouped",
}


def _candidates(shape: tuple[int, ...], layout: str) -> list[str]:
    """The groupings tried for a leaf: per unit in the model's layout first, then the other
    layout, then per tensor; never one whose groups hold fewer than 2 elements."""
    units = [_UNIT_LAST, _UNIT_FIRST] if layout == "out_last" else [_UNIT_FIRST, _UNIT_LAST]
    kinds = (units if len(shape) >= 2 else []) + [_TENSOR]
    return [k for k in kinds if Group(named_axes(k, len(shape))).size(shape) >= 2]


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """What :func:`find_groups` found for one parameter: its ``path`` (``a/b/kernel``) and
    ``shape``; the ``grouping`` (``"unit"``, ``"unit_out_first"``, ``"tensor"`` or ``None``:
    not grouped), the ``group_size`` (elements per group, ``None`` when not grouped) and
    ``num_groups`` (0 when not grouped); the ``sensitivity`` of each candidate grouping tried
    (module docstring), ``{grouping: value}``, empty when the outputs do not depend on the
    leaf; and a ``note`` that says, in words, why it is not grouped.
    """

    path: str
    shape: tuple[int, ...]
    grouping: str | None
    group_size: int | None
    num_groups: int
    sensitivity: dict[str, float]
    note: str


@dataclasses.dataclass(frozen=True)
class FoundGroups:
    """The radially invariant groups of a model, as found by :func:`find_groups`.

    Pass it as ``groups=`` to any transformation of this library. Parameters are matched by
    path (:func:`~optax_sphere.groups.key_names`), so it fits every form of the same
    parameters: a Flax ``params`` dict, an ``nnx.State`` of ``nnx.Param`` nodes and the pure
    arrays of ``nnx.Optimizer``, an Equinox tree with ``None`` leaves, and the views of
    ``optax.masked`` / ``optax.multi_transform``. A parameter it has not seen raises at
    ``init``. ``str(found)`` (or :meth:`table`) is the report, one row per parameter.
    """

    reports: tuple[GroupReport, ...]
    tolerance: float
    seconds: float

    @property
    def specs(self) -> dict[tuple[Any, ...], str | None]:
        return {_path_key(r.path): r.grouping for r in self.reports}

    def spec_for(self, params: PyTree) -> PyTree:
        """The per-leaf spec tree for ``params`` (any of the forms above)."""
        specs = {tuple(str(n) for n in k): v for k, v in self.specs.items()}

        def leaf(path, _):
            key = tuple(str(n) for n in key_names(path))
            if key not in specs:
                raise ValueError(
                    f"parameter '{path_str(path)}' was not among the parameters given to "
                    f"find_groups ({sorted('/'.join(k) for k in specs)[:8]}...): run "
                    "find_groups on the parameters this optimizer is built for."
                )
            return specs[key]

        return jax.tree_util.tree_map_with_path(leaf, params)

    @property
    def grouped(self) -> list[str]:
        """Paths of the grouped parameters."""
        return [r.path for r in self.reports if r.grouping is not None]

    def table(self) -> str:
        """The report as a plain-text table."""
        header = ("parameter", "shape", "grouping", "size", "groups", "radial sensitivity")
        rows = []
        for r in self.reports:
            sens = " ".join(f"{_short(k)}={v:.1e}" for k, v in r.sensitivity.items()) or r.note
            rows.append(
                (
                    r.path,
                    "x".join(map(str, r.shape)) or "scalar",
                    _LABELS[r.grouping],
                    "-" if r.group_size is None else str(r.group_size),
                    "-" if not r.num_groups else str(r.num_groups),
                    sens,
                )
            )
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(header), line("-" * w for w in widths)] + [line(r) for r in rows]
        out.append(
            f"{len(self.grouped)} of {len(self.reports)} parameters grouped; tolerance "
            f"{self.tolerance:g} on the radial sensitivity; found in {self.seconds:.1f} s."
        )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _short(kind: str) -> str:
    return {_UNIT_LAST: "unit", _UNIT_FIRST: "unit_out_first", _TENSOR: "tensor"}[kind]


def _path_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def _as_function(model: Any, args: tuple, kwargs: dict) -> tuple[Callable, PyTree, tuple, str]:
    """``(f, params, inputs, layout)`` with ``f(params, *inputs)`` the model's outputs."""
    nnx = getattr(sys.modules.get("flax"), "nnx", None)  # imported only if the user did
    linen = getattr(sys.modules.get("flax"), "linen", None)
    eqx = sys.modules.get("equinox")
    if nnx is not None and isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f_nnx(p, *inputs):
            # fresh Variables inside the trace: the model's own are not mutated
            state = jax.tree.map(lambda v: v, rest)
            return nnx.merge(graphdef, p, state)(*inputs, **kwargs)

        return f_nnx, params, args, "out_last"
    if linen is not None and isinstance(model, linen.Module):
        if not args or not isinstance(args[0], Mapping) or "params" not in args[0]:
            raise ValueError(
                "find_groups(linen_module, variables, *inputs): the second argument must "
                "be the module's variables ({'params': ..., 'batch_stats': ...})."
            )
        variables, inputs = args[0], args[1:]
        mutable = [c for c in variables if c != "params"] or False

        def f_linen(p, *inputs):
            out = model.apply({**variables, "params": p}, *inputs, mutable=mutable, **kwargs)
            return out[0] if mutable else out

        return f_linen, variables["params"], inputs, "out_last"
    if eqx is not None and isinstance(model, eqx.Module):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def f_eqx(p, *inputs):
            return eqx.combine(p, static)(*inputs, **kwargs)

        return f_eqx, params, args, "out_first"
    if not callable(model):
        raise TypeError(f"find_groups: expected a model or a function, got {type(model).__name__}.")
    if not args:
        raise ValueError("find_groups(fn, params, *inputs): the parameters are missing.")

    def f(p, *inputs):
        return model(p, *inputs, **kwargs)

    params = args[0]
    is_module = lambda x: eqx is not None and isinstance(x, eqx.Module)
    nodes = jax.tree.leaves(params, is_leaf=is_module)
    return (
        f,
        params,
        args[1:],
        "out_first" if is_module(params) or any(map(is_module, nodes)) else "out_last",
    )


def _check_leaves(params: PyTree) -> list[tuple[Any, jax.Array]]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("find_groups: the parameter tree has no array leaf.")
    bad = [
        f"'{path_str(p)}' ({type(v).__name__})"
        for p, v in leaves
        if not (hasattr(v, "shape") and hasattr(v, "dtype"))
        or not jnp.issubdtype(v.dtype, jnp.inexact)
    ]
    if bad:
        raise ValueError(
            f"find_groups: parameters must be floating-point arrays; got {', '.join(bad)}. "
            "Partition the model first (eqx.partition(model, eqx.is_inexact_array), "
            "nnx.state(model, nnx.Param))."
        )
    return leaves


def _float_outputs(out: PyTree) -> list[jax.Array]:
    return [
        jnp.asarray(o)
        for o in jax.tree.leaves(out)
        if hasattr(o, "dtype") and jnp.issubdtype(jnp.asarray(o).dtype, jnp.inexact)
    ]


def _perturb(leaves: list[np.ndarray], rng: np.random.Generator, scale: float) -> list:
    """Every leaf moved by ``scale`` times its root mean square (``scale`` for a zero leaf) in
    a random direction: a generic point, where no bias or offset is zero. In at least float32
    (bfloat16 / float16 parameters are probed in float32, whose rounding the tolerance is
    chosen for)."""
    out = []
    for p in leaves:
        p64 = p.astype(np.float64)
        rms = math.sqrt(float(np.mean(p64 * p64))) if p.size else 0.0
        step = scale * (rms if rms > 0 else 1.0)
        dtype = np.dtype(jnp.promote_types(p.dtype, jnp.float32))
        out.append((p64 + step * rng.standard_normal(p.shape)).astype(dtype))
    return out


#: a leaf whose first-order effect on the outputs is below this fraction of the largest one is
#: taken as having none (float32 rounding of an exact zero)
_NO_EFFECT = 1e-6
#: a group whose tangential effect is below this fraction of the largest of its leaf is not seen
#: by the outputs at the probe point (a unit a ReLU switched off): it says nothing
_UNSEEN_GROUP = 1e-4


class _Sums:
    """Per leaf and candidate grouping, the per-group sums over probes of ``<g, x_G>^2`` and
    ``<g, t_G>^2`` (``t_G`` a random tangent of the norm of ``x_G``), accumulated in float64 on
    the host, one gradient at a time."""

    def __init__(self, leaves: list, kinds: list[list[str]], rng: np.random.Generator):
        self.leaves = [p.astype(np.float64) for p in leaves]
        self.kinds = kinds
        self.tangents: list[dict[str, np.ndarray]] = []
        self.radial: list[dict[str, Any]] = []
        self.tangent: list[dict[str, Any]] = []
        self.effect = [0.0] * len(leaves)
        for p, leaf_kinds in zip(self.leaves, kinds):
            noise = rng.standard_normal(p.shape)
            tangents = {}
            for kind in leaf_kinds:
                axes = named_axes(kind, p.ndim)
                pp = np.sum(p * p, axis=axes, keepdims=True)
                safe_pp = np.where(pp > 0, pp, 1)
                t = noise - np.sum(noise * p, axis=axes, keepdims=True) / safe_pp * p
                tt = np.sum(t * t, axis=axes, keepdims=True)
                tangents[kind] = t * np.sqrt(pp / np.where(tt > 0, tt, 1))
            self.tangents.append(tangents)
            self.radial.append(dict.fromkeys(leaf_kinds, 0.0))
            self.tangent.append(dict.fromkeys(leaf_kinds, 0.0))

    def add(self, grads: list) -> None:
        for i, (p, g) in enumerate(zip(self.leaves, grads)):
            g = np.asarray(g, np.float64)
            effect = math.sqrt(float(np.sum(g * g)) * float(np.sum(p * p)))
            self.effect[i] = max(self.effect[i], effect)
            for kind in self.kinds[i]:
                axes = named_axes(kind, p.ndim)
                self.radial[i][kind] = self.radial[i][kind] + np.sum(g * p, axis=axes) ** 2
                t = self.tangents[i][kind]
                self.tangent[i][kind] = self.tangent[i][kind] + np.sum(g * t, axis=axes) ** 2

    def sensitivity(self, i: int) -> dict[str, float]:
        """The largest radial sensitivity over the groups of each candidate of leaf ``i``;
        groups the outputs do not see (zero gradient, zero weights, dead units) say nothing."""
        out = {}
        for kind in self.kinds[i]:
            radial, tangent = self.radial[i][kind], self.tangent[i][kind]
            # a group whose outputs are at rounding level (a dead unit) is not seen
            seen = tangent > (_UNSEEN_GROUP**2) * np.max(tangent)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(seen, radial / tangent, 0.0)
            out[kind] = float(np.sqrt(np.max(ratio)))
        return out


def find_groups(
    model: Any,
    *args: Any,
    tolerance: float = 1e-2,
    probes: int = 4,
    perturbation: float = 0.5,
    check_rtol: float = 1e-3,
    seed: int = 0,
    **kwargs: Any,
) -> FoundGroups:
    """Finds the radially invariant groups of a model by measuring them.

    Every parameter gets the finest grouping under which scaling any one group by ``c > 0``
    leaves the model's outputs unchanged: one group per output unit (for the Flax / Haiku
    layout ``(..., out)``, ``"unit"``, or the PyTorch / Equinox layout ``(out, ...)``,
    ``"unit_out_first"``), one group per tensor (``"tensor"``), or none. Groups of one element
    are never made, and a parameter the outputs do not depend on is not grouped. The method,
    the tolerance and why it is not fooled by the zero biases of an initialisation are in the
    module docstring; it costs two forward and two batched backward passes, plus one forward
    pass for the final check.

    The model comes in one of four forms (BatchNorm in training mode, dropout off):

    * a function: ``find_groups(fn, params, *inputs, **kw)`` with ``fn(params, *inputs, **kw)``
      returning the outputs (any pytree; its floating leaves are used);
    * a Flax linen module: ``find_groups(module, variables, *inputs, train=True)``; the
      collections other than ``params`` are passed as mutable;
    * a ``flax.nnx`` module: ``find_groups(model, *inputs)``, for the parameters
      ``nnx.state(model, nnx.Param)`` (and ``nnx.Optimizer(model, tx, wrt=nnx.Param)``);
    * an Equinox module: ``find_groups(model, *inputs)``, for the parameters
      ``eqx.filter(model, eqx.is_inexact_array)``.

    Args:
      model: the function or module.
      *args: the parameters (function), the variables (linen) and the example inputs: a
        batch of a few examples is enough, with at least two per batch for BatchNorm.
      tolerance: largest radial sensitivity of an invariant group.
      probes: random output directions per probe point.
      perturbation: size of the move away from the given parameters, relative to each
        leaf's root mean square.
      check_rtol: relative change of the outputs allowed when every group found is scaled.
      seed: seed of the random perturbations and directions.
      **kwargs: passed to the model (``train=True``, ``deterministic=True``...).

    Returns:
      A :class:`FoundGroups`: pass it as ``groups=``; print it for the report.

    Raises:
      ValueError: a parameter that is not a floating array, or a model that fails on the
        inputs (the model's own error is chained).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_sphere
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=True):
      ...         x = nn.Dense(8, use_bias=False)(x)
      ...         x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      ...         return nn.Dense(3)(x)
      >>> x = jax.random.normal(jax.random.key(0), (16, 5))
      >>> variables = Net().init(jax.random.key(1), x)
      >>> found = optax_sphere.find_groups(Net(), variables, x, train=True)
      >>> found.grouped
      ['Dense_0/kernel']
      >>> tx = optax_sphere.adam_srt(1e-3, groups=found)

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (the
      radially invariant groups the method measures).
    """
    start = time.perf_counter()
    f, params, inputs, layout = _as_function(model, args, kwargs)
    flat = _check_leaves(params)
    paths = [path_str(p) for p, _ in flat]
    treedef = jax.tree.structure(params)
    values = [v for _, v in flat]

    def outputs(leaves):
        return _float_outputs(f(jax.tree.unflatten(treedef, leaves), *inputs))

    try:
        reference = jax.eval_shape(outputs, values)
    except Exception as err:
        raise ValueError(
            f"find_groups: the model failed on the example inputs ({type(err).__name__}: "
            f"{err}). Check the inputs' shapes and the keyword arguments (train=True...)."
        ) from err
    if not reference:
        raise ValueError("find_groups: the model returned no floating-point output.")

    kinds = [_candidates(tuple(v.shape), layout) for v in values]
    rng = np.random.default_rng(seed)
    host = [np.asarray(jax.device_get(v)) for v in values]

    @jax.jit
    def gradient(leaves, cotangent):
        return jax.vjp(outputs, leaves)[1](cotangent)[0]

    points = []
    for _ in range(2):
        moved = _perturb(host, rng, perturbation)
        sums = _Sums(moved, kinds, rng)
        device_moved = [jnp.asarray(m) for m in moved]
        for _ in range(probes):
            cot = [rng.standard_normal(y.shape).astype(y.dtype) for y in reference]
            sums.add(jax.device_get(gradient(device_moved, cot)))
        points.append((device_moved, sums))

    # first-order effect of each leaf on the outputs, ||g|| ||x||: below rounding (a bias before
    # a normalisation), the outputs do not depend on the leaf
    effects = [max(s.effect[i] for _, s in points) for i in range(len(values))]
    largest = max(effects)
    specs, reports = [], []
    for i, (path, v) in enumerate(zip(paths, values)):
        effect = effects[i] if effects[i] > _NO_EFFECT * largest else 0.0
        per_point = [s.sensitivity(i) for _, s in points]
        measured = {kind: max(m[kind] for m in per_point) for kind in kinds[i]}
        choice, note = None, ""
        if not kinds[i]:
            note = "scalar or one element: no direction"
        elif effect == 0 or not np.isfinite(effect):
            measured, note = {}, "outputs do not depend on it"
        else:
            ok = [kind for kind in kinds[i] if measured[kind] < tolerance]
            choice = ok[0] if ok else None
            note = "" if ok else "outputs change with its scale"
        specs.append(choice)
        reports.append((path, tuple(v.shape), choice, measured, note))

    specs = _check_by_scaling(outputs, points[0][0], specs, paths, check_rtol, seed)

    rows = []
    for (path, shape, _, measured, note), choice in zip(reports, specs):
        size = None if choice is None else Group(named_axes(choice, len(shape))).size(shape)
        count = 0 if choice is None else math.prod(shape) // size
        if choice is None and not note:
            note = "failed the scaling check"
        rows.append(GroupReport(path, shape, choice, size, count, measured, note))
    found = FoundGroups(tuple(rows), tolerance, time.perf_counter() - start)
    if not found.grouped:
        causes = _causes_of_no_groups(
            f, treedef, values, inputs, _has_batch_statistics(model, args)
        )
        warnings.warn(
            "find_groups: no radially invariant group in this model: every parameter is left "
            "ungrouped, and the optimizers of this library reduce to their base optimizers. "
            + (
                "Checked causes: " + " ".join(causes)
                if causes
                else "None of the checked causes applies (running averages in use, a batch "
                "too small for the normalisation, dropout on): the model normalises no "
                "parameter's output."
            ),
            stacklevel=2,
        )
    return found


def _primitive_names(jaxpr: Any) -> set[str]:
    """Every primitive of a closed jaxpr, nested jaxprs (``jit``, ``scan``, ``cond``...)
    included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitive_names(inner)
    return names


def _has_batch_statistics(model: Any, args: tuple) -> bool | None:
    """Whether the model keeps running statistics (linen collections besides ``params``, nnx
    ``BatchStat`` variables, an Equinox ``State`` among the inputs); ``None`` for a plain
    function, which cannot say."""
    nnx = getattr(sys.modules.get("flax"), "nnx", None)
    linen = getattr(sys.modules.get("flax"), "linen", None)
    eqx = sys.modules.get("equinox")
    if nnx is not None and isinstance(model, nnx.Module):
        return bool(jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    if linen is not None and isinstance(model, linen.Module):
        return any(jax.tree.leaves(v) for k, v in args[0].items() if k != "params")
    if eqx is not None and isinstance(model, eqx.Module):
        state = getattr(getattr(eqx, "nn", None), "State", None)
        return state is not None and any(isinstance(a, state) for a in args)
    return None


def _causes_of_no_groups(
    f: Callable, treedef: Any, values: list, inputs: tuple, batch_statistics: bool | None
) -> list[str]:
    """The checkable reasons why a model with normalisation layers shows no invariant group:
    a batch of one, outputs that ignore the rest of the batch (running averages), randomness
    (dropout)."""
    params = jax.tree.unflatten(treedef, values)
    causes = []
    arrays = [x for x in jax.tree.leaves(inputs) if hasattr(x, "shape") and len(x.shape) >= 1]
    batch = {int(x.shape[0]) for x in arrays}
    if batch == {1}:
        causes.append(
            "the example batch holds one example: a normalisation over the batch "
            "(BatchNorm in training mode) of one example has a constant output, so no weight "
            "before it is seen; pass a batch of several examples."
        )
    elif len(batch) == 1 and min(batch) >= 2:
        (size,) = batch

        def other_rows(x):  # every example but the first replaced by another one
            x = jnp.asarray(x)
            if x.shape[0] != size:
                return x
            moved = jnp.roll(x[1:], 1, axis=0) if size > 2 else x[1:]
            if jnp.issubdtype(x.dtype, jnp.inexact):
                moved = 2 * moved + 1
            return jnp.concatenate([x[:1], moved], axis=0)

        try:
            a = _float_outputs(f(params, *inputs))
            b = _float_outputs(f(params, *jax.tree.map(other_rows, inputs)))
            rows = [(x[0], y[0]) for x, y in zip(a, b) if x.ndim >= 1 and x.shape[0] == size]
        except Exception:  # a model that cannot take the changed batch says nothing here
            rows = []
        independent = rows and all(
            np.allclose(np.asarray(x), np.asarray(y), rtol=1e-6) for x, y in rows
        )
        if independent and batch_statistics is not False:
            causes.append(
                "the outputs of one example do not depend on the other examples of the "
                + (
                    "batch, and the model keeps running statistics: its BatchNorm runs on "
                    "its running averages (eval mode); "
                    if batch_statistics
                    else "batch: if the model has a BatchNorm, it runs on its running "
                    "averages (eval mode); "
                )
                + "call it in training mode (train=True, use_running_average=False, "
                "inference=False)."
            )
    try:
        randomness = _primitive_names(jax.make_jaxpr(lambda p: f(p, *inputs))(params).jaxpr) & {
            "random_bits",
            "threefry2x32",
            "random_wrap",
        }
    except Exception:
        randomness = set()
    if randomness:
        causes.append(
            "the model draws random numbers (dropout on?): turn dropout off for the probe "
            "(deterministic=True, train=False for dropout, inference=True)."
        )
    return causes


def _scalar_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return Group(named_axes(kind, len(shape))).scalar_shape(shape)


def _check_by_scaling(
    outputs: Callable, leaves: list, specs: list, paths: Sequence[str], rtol: float, seed: int
) -> list:
    """Scales every group found by a random factor in [1/2, 2] and compares the outputs; the
    leaves that break the invariance (found one at a time) are left ungrouped."""
    if not any(specs):
        return specs
    rng = np.random.default_rng(seed + 1)
    factors = [
        None
        if s is None
        else np.exp(rng.uniform(-math.log(2), math.log(2), _scalar_shape(s, v.shape)))
        for s, v in zip(specs, leaves)
    ]
    jitted = jax.jit(outputs)

    def scaled(which):
        out = []
        for i, (v, c) in enumerate(zip(leaves, factors)):
            out.append(v if c is None or i not in which else (v * c).astype(v.dtype))
        return out

    base = [np.asarray(y, np.float64) for y in jitted(leaves)]

    def error(which):
        ys = [np.asarray(y, np.float64) for y in jitted(scaled(which))]
        num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(ys, base))
        den = sum(float(np.sum(b**2)) for b in base)
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    grouped = [i for i, s in enumerate(specs) if s is not None]
    if error(set(grouped)) <= rtol:
        return specs
    failed = [i for i in grouped if error({i}) > rtol]
    if failed:
        warnings.warn(
            "find_groups: scaling the groups of "
            f"{[paths[i] for i in failed]} changed the outputs by more than {rtol:g} although "
            "their radial derivative vanished; they are left ungrouped.",
            stacklevel=3,
        )
    return [None if i in failed else s for i, s in enumerate(specs)]
