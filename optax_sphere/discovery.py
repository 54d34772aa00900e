"""Finding the radially invariant groups of a model from the model itself.

A group of weights ``x_G`` is radially invariant when ``f(.., c x_G, ..) = f(.., x_G, ..)`` for
every ``c > 0`` (Roburin et al. sec. 2, app. B): the weights of one unit followed by BatchNorm,
a whole tensor followed by LayerNorm. Differentiating in ``c`` at ``c = 1`` (Euler's theorem
for a function homogeneous of degree 0), the outputs do not move along the radial direction:
``J_G x_G = 0``, where ``J_G`` is the Jacobian of the outputs in ``x_G``.

:func:`find_groups` measures this for every candidate grouping of every parameter at once.
The candidates are read from the model's structure (:mod:`optax_sphere.structure`): the
inputs of one unit, per unit, per head and per layer of a stack.
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
import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_sphere._models import as_function, has_batch_statistics
from optax_sphere._paths import path_str
from optax_sphere.groups import Group, key_names, named_axes, resolve_groups
from optax_sphere.structure import LeafStructure, ModelStructure, _matrix_axes, trace_structure

__all__ = [
    "FoundGroups",
    "GroupReport",
    "check_groups",
    "find_groups",
    "matrix_groups",
    "rotational_groups",
]

PyTree = Any

#: The named groupings of a leaf whose structure is not known, and their names in words.
_UNIT_LAST = "unit"
_UNIT_FIRST = "unit_out_first"
_TENSOR = "tensor"
_LABELS = {
    _UNIT_LAST: "per unit (out last)",
    _UNIT_FIRST: "per unit (out first)",
    _TENSOR: "per tensor",
}
#: at most this many candidate groupings per leaf (a leaf with many unit and stack axes)
_MAX_CANDIDATES = 32


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """One grouping tried for a leaf: ``spec`` is what ``groups=`` takes for it (a named spec
    when one fits, else the tuple of reduced axes), ``axes`` the axes one group spans."""

    spec: str | tuple[int, ...]
    axes: tuple[int, ...]
    words: str

    @property
    def key(self) -> str:
        return self.spec if isinstance(self.spec, str) else f"axes{self.spec}".replace(" ", "")


def _named_spec(axes: tuple[int, ...], ndim: int) -> str | tuple[int, ...]:
    """The named spec that spans ``axes`` of a leaf of ``ndim`` axes, or the axes."""
    for name in (_TENSOR, _UNIT_LAST, _UNIT_FIRST):
        if (name == _TENSOR or ndim >= 2) and named_axes(name, ndim) == axes:
            return name
    return axes


def _subsets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _words(axes: tuple[int, ...], shape: tuple[int, ...], leaf: LeafStructure | None) -> str:
    """The grouping in words: "per unit", "per head (axis 1)", "per layer of a stack of 4,
    per unit", "per tensor"..."""
    ndim, reduced = len(shape), set(axes)
    if leaf is None or not leaf.known:
        stack = [a for a in (leaf.stack_axes if leaf else ()) if a not in reduced]
        spec = _named_spec(axes, ndim)
        base = (
            _LABELS.get(spec, f"over axes {axes}")
            if isinstance(spec, str)
            else (f"over axes {axes}")
        )
        if stack:
            layers = math.prod(shape[a] for a in stack)
            return f"per layer of a stack of {layers}" + (
                "" if reduced | set(stack) == set(range(ndim)) else f", {base}"
            )
        return base
    units, stack = set(leaf.unit_axes), set(leaf.stack_axes)
    parts = []
    kept_stack = sorted(stack - reduced)
    if kept_stack:
        layers = math.prod(shape[a] for a in kept_stack)
        parts.append(f"per layer of a stack of {layers}")
    heads = sorted(units - reduced)
    if not heads:
        if not kept_stack:
            parts.append("per tensor")
    elif set(heads) == units:
        spec = _named_spec(axes, ndim)
        if leaf.lookup:
            parts.append("per row")
        else:
            parts.append(_LABELS[spec] if spec in (_UNIT_LAST, _UNIT_FIRST) else "per unit")
    else:
        where = ", ".join(map(str, heads))
        parts.append(f"per head (axis {where})" if len(heads) == 1 else f"per head (axes {where})")
    if stack and stack <= reduced and units - reduced:
        parts.append(f"across the stack of {math.prod(shape[a] for a in stack)}")
    return ", ".join(parts)


def _candidates(
    shape: tuple[int, ...], layout: str, leaf: LeafStructure | None
) -> list[_Candidate]:
    """The groupings tried for a leaf, in order of preference (the first invariant one wins).

    Where the model's structure is known: every superset of one unit's inputs within one
    layer of a stack (per unit, per head, per layer), finest first, then the same across the
    stack. Where it is not: per unit in the model's layout, in the other layout, per tensor
    (each within one layer of a known stack). Never a grouping of one-element groups."""
    ndim = len(shape)
    if leaf is not None and leaf.known:
        inputs = set(leaf.input_axes)
        sets = [
            (len(b), tuple(sorted(inputs | set(a) | set(b))))
            for b in _subsets(leaf.stack_axes)
            for a in _subsets(leaf.unit_axes)
        ]
        sets.sort(key=lambda t: (t[0], math.prod(shape[x] for x in t[1]), len(t[1])))
        axes_sets = [s for _, s in sets]
    else:
        stack = set(leaf.stack_axes) if leaf is not None else set()
        layer = [a for a in range(ndim) if a not in stack]
        units = [_UNIT_LAST, _UNIT_FIRST] if layout == "out_last" else [_UNIT_FIRST, _UNIT_LAST]
        if stack:
            sub = len(layer)
            axes_sets = [tuple(layer[i] for i in named_axes(k, sub)) for k in units if sub >= 2] + [
                tuple(layer),
                tuple(range(ndim)),
            ]
        else:
            axes_sets = [named_axes(k, ndim) for k in (units if ndim >= 2 else []) + [_TENSOR]]
    out, seen = [], set()
    for axes in axes_sets:
        if not axes or axes in seen or Group(axes).size(shape) < 2:
            continue
        seen.add(axes)
        out.append(_Candidate(_named_spec(axes, ndim), axes, _words(axes, shape, leaf)))
    return out[:_MAX_CANDIDATES]


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """What :func:`find_groups` found for one parameter.

    Its ``path`` (``a/b/kernel``) and ``shape``; the ``grouping``, the spec ``groups=`` takes
    for it (``"unit"``, ``"unit_out_first"``, ``"tensor"``, a tuple of the axes one group
    spans: ``(1,)`` for one layer of a stack, ``(0, 2)`` per head; or ``None``: not grouped);
    the ``group_size`` (elements per group, ``None`` when not grouped) and ``num_groups`` (0
    when not grouped); the ``sensitivity``, the radial sensitivity of each candidate grouping
    tried (module docstring), keyed by its spec (``"axes(0,2)"`` for a tuple), empty when the
    outputs do not depend on the leaf; a ``note`` that says why it is not grouped; the
    grouping in words, ``description`` (``"per layer of a stack of 4, per unit"``, ``"per head
    (axis 1)"``); and ``structure``, how the model uses the leaf in words
    (:mod:`optax_sphere.structure`), or why it could not be read, in which case the named
    groupings were tried; ``units_per_group``, the units (output neurons, filters, rows) one
    group holds, counted from the structure (1 per unit, all of them for a LayerNorm layer's
    kernel per tensor, a head's width per head; ``None`` when not grouped or not read), which
    the resolved :class:`~optax_sphere.Group` carries.
    """

    path: str
    shape: tuple[int, ...]
    grouping: str | tuple[int, ...] | None
    group_size: int | None
    num_groups: int
    sensitivity: dict[str, float]
    note: str
    description: str = "not grouped"
    structure: str = ""
    units_per_group: int | None = None


@dataclasses.dataclass(frozen=True)
class FoundGroups:
    """The radially invariant groups of a model, as found by :func:`find_groups` (or chosen
    from its structure by :func:`rotational_groups`).

    Pass it as ``groups=`` to any transformation of this library. Parameters are matched by
    path (:func:`~optax_sphere.groups.key_names`), so it fits every form of the same
    parameters: a Flax ``params`` dict, an ``nnx.State`` of ``nnx.Param`` nodes and the pure
    arrays of ``nnx.Optimizer``, an Equinox tree with ``None`` leaves, and the views of
    ``optax.masked`` / ``optax.multi_transform``. A parameter it has not seen raises at
    ``init``. ``str(found)`` (or :meth:`table`) is the report, one row per parameter;
    :meth:`check` checks another spec against the model's structure.
    """

    reports: tuple[GroupReport, ...]
    tolerance: float
    seconds: float
    structure: ModelStructure | None = None
    method: str = "radial probe"

    @property
    def specs(self) -> dict[tuple[Any, ...], str | tuple[int, ...] | None]:
        return {_path_key(r.path): r.grouping for r in self.reports}

    @functools.cached_property
    def _by_key(self) -> dict[tuple[str, ...], GroupReport]:
        """The reports by the key names of their paths, as strings (one lookup per leaf)."""
        return {tuple(str(n) for n in _path_key(r.path)): r for r in self.reports}

    def _report_at(self, path: Sequence[Any]) -> GroupReport | None:
        return self._by_key.get(tuple(str(n) for n in key_names(path)))

    def spec_for(self, params: PyTree) -> PyTree:
        """The per-leaf spec tree for ``params`` (any of the forms above)."""

        def leaf(path, _):
            report = self._report_at(path)
            if report is None:
                raise ValueError(
                    f"parameter '{path_str(path)}' was not among the parameters given to "
                    f"find_groups ({sorted('/'.join(k) for k in self._by_key)[:8]}...): run "
                    "find_groups on the parameters this optimizer is built for."
                )
            return report.grouping

        return jax.tree_util.tree_map_with_path(leaf, params)

    def units_of(self, path: Sequence[Any]) -> int | None:
        """How many units one group of the parameter at the key ``path`` holds, as the
        model's structure counts them (``None``: not grouped, or the structure not read)."""
        report = self._report_at(path)
        return None if report is None else report.units_per_group

    @property
    def grouped(self) -> list[str]:
        """Paths of the grouped parameters."""
        return [r.path for r in self.reports if r.grouping is not None]

    def check(self, groups: Any, params: PyTree) -> None:
        """Checks a ``groups`` spec for ``params`` against the model's structure
        (:func:`check_groups`)."""
        if self.structure is None:
            raise ValueError("check: the model's structure could not be read.")
        _raise_problems(_spec_problems(self.structure, groups, params))

    def table(self) -> str:
        """The report as a plain-text table."""
        header = ("parameter", "shape", "grouping", "size", "groups", "radial sensitivity")
        if self.method != "radial probe":
            header = header[:-1] + ("why",)
        rows = []
        for r in self.reports:
            sens = " ".join(f"{k}={v:.1e}" for k, v in r.sensitivity.items()) or r.note
            rows.append(
                (
                    r.path,
                    "x".join(map(str, r.shape)) or "scalar",
                    r.description,
                    "-" if r.group_size is None else str(r.group_size),
                    "-" if not r.num_groups else str(r.num_groups),
                    sens,
                )
            )
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(header), line("-" * w for w in widths)] + [line(r) for r in rows]
        unknown = [r.path for r in self.reports if r.structure.startswith("structure unknown")]
        footer = f"{len(self.grouped)} of {len(self.reports)} parameters grouped"
        if self.method == "radial probe":
            footer += f"; tolerance {self.tolerance:g} on the radial sensitivity"
        else:
            footer += f", {self.method}"
        out.append(f"{footer}; found in {self.seconds:.1f} s.")
        if self.structure is None:
            out.append("The model's structure could not be read: the named groupings were tried.")
        elif unknown and self.method == "radial probe":
            out.append(
                f"No layer structure for {_listed(unknown)}: used elementwise with the data "
                "(biases, gains, norm scales: expected, they have no units) or not followed "
                "by the trace; the named groupings were tried there."
            )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _listed(names: Sequence[str], most: int = 6) -> str:
    """``names`` joined, the first ``most`` of them and how many more."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _path_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


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

    def __init__(self, leaves: list, kinds: list[list[_Candidate]], rng: np.random.Generator):
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
                axes = kind.axes
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
                axes = kind.axes
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
            out[kind.key] = float(np.sqrt(np.max(ratio)))
        return out


def find_groups(
    model: Any,
    *args: Any,
    tolerance: float = 1e-2,
    probes: int = 4,
    perturbation: float = 0.5,
    check_rtol: float = 1e-3,
    seed: int = 0,
    batch_axis_name: str | None = None,
    **kwargs: Any,
) -> FoundGroups:
    """Finds the radially invariant groups of a model by measuring them.

    Every parameter gets the finest grouping under which scaling any one group by ``c > 0``
    leaves the model's outputs unchanged. The candidates come from the model's structure,
    read from one trace of its computation (:func:`~optax_sphere.structure.trace_structure`):
    one unit's inputs (the axes a ``dot_general`` or a convolution contracts) plus any set of
    the unit axes, within one layer of a stack: per unit, per head (``(0, 2)`` for a
    ``(in, heads, head_dim)`` kernel), per layer; a stack axis is reduced only when nothing
    finer is invariant (per tensor). Where the structure cannot be read (a parameter used
    only elementwise), the candidates are per unit in the model's layout (``"unit"`` for
    Flax / Haiku ``(..., out)``, ``"unit_out_first"`` for PyTorch / Equinox ``(out, ...)``),
    in the other layout and per tensor, each within one layer of a stack read from a
    ``scan``. Groups of one element are never made, and a parameter the outputs do not depend
    on is not grouped. The method, the tolerance and why it is not fooled by the zero biases
    of an initialisation are in the module docstring; it costs one trace, two forward and two
    batched backward passes, plus one forward pass for the final check.

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
      batch_axis_name: for a model of one example that normalises over a named batch axis
        (Equinox's ``BatchNorm(axis_name="batch")``, whose state comes among the inputs): it
        is mapped over the first input's leading axis with ``jax.vmap(...,
        axis_name=batch_axis_name)``, the other inputs shared, its returned state dropped:
        ``find_groups(model, x, state, batch_axis_name="batch")``.
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
    f, params, inputs, layout = as_function(model, args, kwargs, batch_axis_name)
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
            + (
                " A model of one example (Equinox's, with BatchNorm(axis_name=...)) takes a "
                "batch with batch_axis_name=: find_groups(model, x, state, "
                'batch_axis_name="batch").'
                if batch_axis_name is None and layout == "out_first"
                else ""
            )
        ) from err
    if not reference:
        raise ValueError("find_groups: the model returned no floating-point output.")

    structure = _read_structure(f, params, inputs)
    leaves = list(structure) if structure is not None else [None] * len(values)
    kinds = [_candidates(tuple(v.shape), layout, s) for v, s in zip(values, leaves)]
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
        measured = {k.key: max(m[k.key] for m in per_point) for k in kinds[i]}
        choice, note = None, ""
        if not kinds[i]:
            note = "scalar or one element: no direction"
        elif effect == 0 or not np.isfinite(effect):
            measured, note = {}, "outputs do not depend on it"
        else:
            ok = [k for k in kinds[i] if measured[k.key] < tolerance]
            choice = ok[0] if ok else None
            note = "" if ok else "outputs change with its scale"
        specs.append(choice)
        reports.append((path, tuple(v.shape), measured, note))

    kept = _check_by_scaling(
        outputs, points[0][0], [c and c.axes for c in specs], paths, check_rtol, seed
    )
    rows = []
    for (path, shape, measured, note), choice, axes, leaf in zip(reports, specs, kept, leaves):
        choice = choice if axes is not None else None
        if choice is None and not note:
            note = "failed the scaling check"
        rows.append(_report(path, shape, choice, measured, note, leaf))
    found = FoundGroups(tuple(rows), tolerance, time.perf_counter() - start, structure)
    if not found.grouped:
        batch_statistics = has_batch_statistics(model, args)
        warnings.warn(
            _no_groups_message(f, treedef, values, inputs, batch_statistics), stacklevel=2
        )
    return found


def _read_structure(f: Callable, params: PyTree, inputs: tuple) -> ModelStructure | None:
    """The model's structure (:func:`~optax_sphere.structure.trace_structure`); ``None``, with
    a warning, when it cannot be traced (the probe then tries the named groupings)."""
    try:
        return trace_structure(f, params, *inputs)
    except Exception as err:  # the probe does not need the structure; it says so
        warnings.warn(
            f"find_groups: the model's structure could not be read ({type(err).__name__}: "
            f"{err}); the named groupings are tried for every parameter.",
            stacklevel=3,
        )
        return None


def _report(
    path: str,
    shape: tuple[int, ...],
    choice: _Candidate | None,
    measured: dict[str, float],
    note: str,
    leaf: LeafStructure | None,
) -> GroupReport:
    size = None if choice is None else Group(choice.axes).size(shape)
    units = None
    if size is not None and leaf is not None and leaf.known and leaf.input_axes:
        # a group spans its units' inputs: the units it holds are its size over one's inputs
        fan_in = math.prod(shape[a] for a in leaf.input_axes if a in choice.axes)
        units = size // fan_in if size % fan_in == 0 else None
    return GroupReport(
        path,
        shape,
        None if choice is None else choice.spec,
        size,
        0 if size is None else math.prod(shape) // size,
        measured,
        note,
        "not grouped" if choice is None else choice.words,
        "" if leaf is None else leaf.describe(),
        units,
    )


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


_RANDOMNESS = frozenset({"random_bits", "threefry2x32", "random_wrap"})
#: the primitives of a normalisation (the inverse of a norm or of a standard deviation)
_NORMALISATION = frozenset({"rsqrt"})


def _model_primitives(f: Callable, treedef: Any, values: list, inputs: tuple) -> set[str]:
    params = jax.tree.unflatten(treedef, values)
    try:
        return _primitive_names(jax.make_jaxpr(lambda p: f(p, *inputs))(params).jaxpr)
    except Exception:  # a model that cannot be traced again says nothing here
        return set()


def _no_groups_message(
    f: Callable, treedef: Any, values: list, inputs: tuple, batch_statistics: bool | None
) -> str:
    """Why a model shows no radially invariant group: the checked causes (a batch of one,
    running averages, dropout), else what is expected (normalisations on a residual stream,
    as in a pre-LN transformer; or no normalisation at all)."""
    primitives = _model_primitives(f, treedef, values, inputs)
    causes = _causes_of_no_groups(f, treedef, values, inputs, batch_statistics, primitives)
    head = (
        "find_groups: no radially invariant group in this model: every parameter is left "
        "ungrouped, and the optimizers of this library reduce to their base optimizers. "
    )
    if causes:
        return head + "Checked causes: " + " ".join(causes)
    if primitives & _NORMALISATION:
        return head + (
            "This is expected where the normalisations sit on a residual stream (a pre-LN "
            "transformer: the residual additions keep every weight's scale in the outputs), "
            "and where each weight's output reaches the outputs other than through a "
            "normalisation. The rotational optimizers (rv_adamw, rv_sgdm, rv_lion) need no "
            "invariance: give them rotational_groups(model, ...), the units of every "
            "linear, convolution and embedding."
        )
    return head + (
        "The model normalises nothing (no normalisation layer was seen), so no weight is "
        "scale invariant; the rotational optimizers (rv_*) take rotational_groups(model, ...)."
    )


def _causes_of_no_groups(
    f: Callable,
    treedef: Any,
    values: list,
    inputs: tuple,
    batch_statistics: bool | None,
    primitives: set[str],
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
        if independent and batch_statistics:
            causes.append(
                "the outputs of one example do not depend on the other examples of the "
                "batch, and the model keeps running statistics: its BatchNorm runs on its "
                "running averages (eval mode); call it in training mode (train=True, "
                "use_running_average=False, inference=False)."
            )
    if primitives & _RANDOMNESS:
        causes.append(
            "the model draws random numbers (dropout on?): turn dropout off for the probe "
            "(deterministic=True, train=False for dropout, inference=True)."
        )
    return causes


def _check_by_scaling(
    outputs: Callable, leaves: list, specs: list, paths: Sequence[str], rtol: float, seed: int
) -> list:
    """Scales every group found (``specs``: the axes one group spans, or ``None``) by a random
    factor in [1/2, 2] and compares the outputs; the leaves that break the invariance (found
    one at a time) are left ungrouped."""
    if not any(specs):
        return specs
    rng = np.random.default_rng(seed + 1)
    factors = [
        None
        if s is None
        else np.exp(rng.uniform(-math.log(2), math.log(2), Group(s).scalar_shape(v.shape)))
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


# ---------------------------------------------------------------------------------------------
# Specs checked against the structure, and the rotational variants' groups


def _spec_problems(structure: ModelStructure, groups: Any, params: PyTree) -> list[str]:
    """Every grouped leaf whose groups cross a stack axis or split one unit's inputs."""
    by_path = {leaf.path: leaf for leaf in structure}
    resolved = resolve_groups(groups, params)
    problems = []
    for path, group in jax.tree_util.tree_flatten_with_path(
        resolved, is_leaf=lambda x: x is None or isinstance(x, Group)
    )[0]:
        leaf = by_path.get(path_str(path))
        if group is None or leaf is None:
            continue
        axes = set(group.axes)
        crossed = [a for a in leaf.stack_axes if a in axes and leaf.shape[a] > 1]
        if crossed:
            layers = math.prod(leaf.shape[a] for a in crossed)
            problems.append(
                f"'{leaf.path}' (shape {leaf.shape}): its groups span axes {group.axes}, which "
                f"cross the stack on axis {', '.join(map(str, crossed))}: one group holds "
                f"weights of {layers} layers; one layer's groups leave out "
                f"{tuple(crossed)}."
            )
        split = [a for a in leaf.input_axes if a not in axes and leaf.shape[a] > 1]
        if split:
            problems.append(
                f"'{leaf.path}' (shape {leaf.shape}): its groups span axes {group.axes}, but "
                f"one unit's inputs are on axes {leaf.input_axes} ({leaf.describe()}): axes "
                f"{tuple(split)} of one unit's inputs are split across groups."
            )
    return problems


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError(
            "groups that do not fit the model's structure:\n  - "
            + "\n  - ".join(problems)
            + "\nUse optax_sphere.find_groups (measured) or optax_sphere.rotational_groups "
            "(from the structure), or give axes that hold one unit's inputs within one layer."
        )


def check_groups(
    groups: Any, model: Any, *args: Any, batch_axis_name: str | None = None, **kwargs: Any
) -> None:
    """Checks a ``groups`` spec against the structure of a model.

    The model is traced once (no FLOPs) and every grouped parameter is compared with how the
    model uses it (:mod:`optax_sphere.structure`): a group that crosses a stack axis (it holds
    the weights of several layers of an ``nn.scan`` / ``nnx.scan`` / stacked Equinox layer) or
    that splits the inputs of one unit (``"unit"`` given for an ``(out, in)`` kernel) is
    reported with the parameter's path and axes. Leaves whose structure cannot be read pass.

    Args:
      groups: the spec to check (anything ``groups=`` takes).
      model: the model, in any form :func:`find_groups` takes, followed by its parameters
        or variables and example inputs in ``*args``.
      *args: as for :func:`find_groups`.
      batch_axis_name: as for :func:`find_groups`.
      **kwargs: passed to the model.

    Raises:
      ValueError: listing every parameter whose groups do not fit, with its axes.

    Example:
      >>> import jax, jax.numpy as jnp, optax_sphere
      >>> def model(p, x):  # an (out, in) kernel, as in PyTorch and Equinox
      ...     return jnp.tanh(x @ p["w"].T)
      >>> p, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 3))
      >>> optax_sphere.check_groups("unit_out_first", model, p, x)
      >>> optax_sphere.check_groups("unit", model, p, x)
      Traceback (most recent call last):
      ...
      ValueError: groups that do not fit the model's structure: ...

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (a group
      is the inputs of one unit).
    """
    f, params, inputs, _ = as_function(model, args, kwargs, batch_axis_name)
    _raise_problems(_spec_problems(trace_structure(f, params, *inputs), groups, params))


def rotational_groups(
    model: Any,
    *args: Any,
    head: bool = True,
    embedding: bool = True,
    batch_axis_name: str | None = None,
    **kwargs: Any,
) -> FoundGroups:
    """Kosson et al.'s rotational groups, read from the model's structure: every linear and
    convolutional kernel per output unit.

    The rotational variants (:func:`~optax_sphere.rv_adamw`, :func:`~optax_sphere.rv_sgdm`,
    :func:`~optax_sphere.rv_lion`) "apply rotational updates to all convolutional and linear
    layers" (Kosson et al. sec. 4), one group per output unit, whether or not a
    normalisation makes the layer scale-invariant (a transformer's are not: add a learnable
    gain, :mod:`optax_sphere.gains`, where the norm matters). This reads each kernel's units
    from the computation (:func:`~optax_sphere.structure.trace_structure`), so the groups
    are right in any layout (``(in, out)``, ``(out, in)``, attention kernels
    ``(in, heads, head_dim)``) and one layer at a time in a stack (``nn.scan``, ``nnx.scan``,
    stacked Equinox layers). Every other leaf (biases, gains, norm scales, positions added
    elementwise) is left ungrouped: its base optimizer with its own weight decay, as REQ treats
    its non-rotational weights. Nothing is measured: use :func:`find_groups` for the groups
    that are radially invariant.

    Args:
      model: the model, in any form :func:`find_groups` takes, followed by its parameters
        or variables and example inputs in ``*args``.
      *args: as for :func:`find_groups`.
      head: group the output layer too (a kernel whose outputs reach the model's outputs
        with no other parameterised layer after it), as REQ does (every matrix with weight
        decay); ``False`` gives it its base optimizer.
      embedding: group the rows of an embedding (a kernel indexed by the data), as REQ does;
        ``False`` gives it its base optimizer. A tied embedding and head is grouped only if
        both are.
      batch_axis_name: as for :func:`find_groups`.
      **kwargs: passed to the model.

    Returns:
      A :class:`FoundGroups`: pass it as ``groups=``; print it for the report.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_sphere
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.gelu(nn.Dense(8)(nn.LayerNorm()(x)))
      ...         return nn.Dense(3)(x)
      >>> x = jnp.ones((4, 5))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> groups = optax_sphere.rotational_groups(Net(), variables, x, head=False)
      >>> groups.grouped
      ['Dense_0/kernel']
      >>> tx = optax_sphere.rv_adamw(1e-3, weight_decay=0.1, groups=groups)

    References:
      Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across Neural
      Networks", sec. 4 and app. M, O.
    """

    def choose(leaf: LeafStructure) -> tuple[_Candidate | None, str]:
        layered = {"dot_general", "conv_general_dilated"} & set(leaf.consumers)
        if not layered and not leaf.lookup:
            return None, "not a linear, convolutional or embedding layer"
        if leaf.head and not head:
            return None, "the output layer (head=False)"
        if leaf.lookup and not embedding:
            return None, "an embedding (embedding=False)"
        axes = leaf.input_axes
        if Group(axes).size(leaf.shape) < 2 if axes else True:
            return None, "one input per unit: no direction"
        return _Candidate(
            _named_spec(axes, len(leaf.shape)), axes, _words(axes, leaf.shape, leaf)
        ), ""

    return _groups_from_structure(
        model,
        args,
        kwargs,
        batch_axis_name,
        choose,
        "from the structure (Kosson et al.: every linear and convolutional layer)",
    )


def _groups_from_structure(
    model: Any,
    args: tuple,
    kwargs: dict,
    batch_axis_name: str | None,
    choose: Callable[[LeafStructure], tuple[_Candidate | None, str]],
    method: str,
) -> FoundGroups:
    """The groups ``choose(leaf) -> (candidate or None, why not)`` takes for every leaf of
    the model's structure (a leaf whose structure is not known: ungrouped, with its note)."""
    start = time.perf_counter()
    f, params, inputs, _ = as_function(model, args, kwargs, batch_axis_name)
    _check_leaves(params)
    structure = trace_structure(f, params, *inputs)
    rows = []
    for leaf in structure:
        choice, reason = choose(leaf) if leaf.known else (None, leaf.note)
        rows.append(_report(leaf.path, leaf.shape, choice, {}, reason, leaf))
    return FoundGroups(tuple(rows), math.nan, time.perf_counter() - start, structure, method=method)


def matrix_groups(
    model: Any,
    *args: Any,
    head: bool = False,
    per_head: bool = False,
    batch_axis_name: str | None = None,
    **kwargs: Any,
) -> FoundGroups:
    """One group per matrix of every layer, read from the model's structure: Wen et al.'s
    hyperball groups (:func:`~optax_sphere.adamh`, :func:`~optax_sphere.muonh`), for any
    optimizer of the library.

    A kernel's group spans its contracted and unit axes, the axes
    :func:`~optax_sphere.structure.muon_dimension_numbers` orthogonalises together: each
    layer of a scanned stack, each expert of a batched kernel, and with ``per_head=True``
    each attention head is its own group. The embeddings, the head (unless ``head=True``) and
    what the model uses elementwise (biases, norm scales, gains) are left ungrouped, as Wen et
    al. give them Adam. Nothing is measured: use :func:`find_groups` for the groups that are
    radially invariant.

    Args:
      model: the model, in any form :func:`find_groups` takes, followed by its parameters
        or variables and example inputs in ``*args``.
      *args: as for :func:`find_groups`.
      head: group the output layer too.
      per_head: one group per attention head (the outer of two unit axes, or of two input
        axes of an output projection).
      batch_axis_name: as for :func:`find_groups`.
      **kwargs: passed to the model.

    Returns:
      A :class:`FoundGroups`: pass it as ``groups=``; print it for the report.

    Example:
      >>> import jax, jax.numpy as jnp, optax_sphere
      >>> def model(p, x):  # a stack of 2 layers, scanned, then a head
      ...     h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["blocks"])[0]
      ...     return h @ p["head"]
      >>> p = {"blocks": jnp.ones((2, 3, 3)), "head": jnp.ones((3, 5))}
      >>> groups = optax_sphere.matrix_groups(model, p, jnp.ones((4, 3)))
      >>> groups.spec_for(p)
      {'blocks': (1, 2), 'head': None}
      >>> tx = optax_sphere.adamh(0.02, ungrouped_learning_rate=1e-3, groups=groups)

    References:
      Wen, Dang, Lyu, Ma and Liang, "Fantastic Pretraining Optimizers and Where to Find Them
      2.1: Hyperball Optimization" (2025): one sphere per matrix.
    """

    def choose(leaf: LeafStructure) -> tuple[_Candidate | None, str]:
        axes = _matrix_axes(leaf, head, per_head)
        if axes is None:
            if leaf.head and not head:
                return None, "the output layer (head=False)"
            if leaf.lookup:
                return None, "an embedding"
            return None, "not a matrix of a linear or convolutional layer"
        spanned = tuple(sorted(axes[0] + axes[1]))
        # the axes themselves, but for a whole leaf ("unit_out_first" would read as units)
        spec = _TENSOR if len(spanned) == len(leaf.shape) else spanned
        return _Candidate(spec, spanned, _words(spanned, leaf.shape, leaf)), ""

    return _groups_from_structure(
        model,
        args,
        kwargs,
        batch_axis_name,
        choose,
        "from the structure (Wen et al.: one sphere per matrix of each layer)",
    )
