"""Radially invariant groups: which weights only matter through their direction.

A *group* is a vector ``x`` whose scale does not change the loss (Roburin et al. sec. 2, app. B):
the weights of one output unit followed by BatchNorm, or a whole tensor followed by
LayerNorm. Every transformation of this library takes ``groups=``, which says for each
parameter leaf either ``None`` (not radially invariant) or which axes one group spans.

Accepted forms of ``groups``:

* a callable ``params -> spec tree`` (like an optax mask), for example :func:`per_unit`
  or :func:`per_tensor`;
* the result of :func:`optax_sphere.find_groups` (groups measured on the model itself, matched
  to the parameters by path, so the same object fits a Flax dict, an ``nnx.State`` with its
  ``Param`` nodes or the pure arrays ``nnx.Optimizer`` updates, and an Equinox tree) or of
  :func:`optax_sphere.rotational_groups` (Kosson et al.'s groups, from the model's
  structure);
* the strings ``"unit"`` / ``"unit_out_first"`` / ``"tensor"``, shorthands for
  :func:`per_unit`, :func:`per_unit_out_first` and :func:`per_tensor`
  (``optax.inject_hyperparams`` takes any callable argument for a schedule, so a callable spec
  given to an injected optimizer must be named in its ``static_args=("groups",)``: without it
  ``init`` raises, naming ``static_args``; a string, a spec tree or a found spec needs
  nothing);
* ``None``: no leaf is grouped (every transformation reduces to its base optimizer);
* ``"unset"``, every transformation's default: no leaf is grouped, and ``init`` warns that the
  groups were not given (which groups are radially invariant depends on the model, not on the
  shapes: a classifier head or an Equinox kernel would be grouped wrongly by any guess);
* a pytree with the structure of the params whose leaves are per-leaf specs.

A per-leaf spec is ``None``, ``"unit"`` (all axes but the last: a Flax ``Dense`` kernel
``(in, out)`` or ``Conv`` kernel ``(kh, kw, in, out)`` grouped per output unit),
``"unit_out_first"`` (all axes but the first: the ``(out, in, ...)`` layout of PyTorch and
Equinox), ``"tensor"`` (all axes) or an ``int`` / sequence of ``int`` axes (negative axes
count from the end).

Specs are resolved against the parameters at ``init`` into :class:`Group` leaves; a spec
that does not fit, or a parameter leaf that is not an array, raises a ``ValueError`` naming the
parameter path. A leaf with no elements resolves to ``None`` whatever its spec (it has no
direction), so every transformation treats it as an ungrouped, empty leaf. All per-group
arithmetic is a ``keepdims`` reduction over :attr:`Group.axes`, so per-group scalars
broadcast back onto their leaf and XLA inserts the cross-device reductions when a group
axis is sharded.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sphere._dtypes import accumulation_dtype
from optax_sphere._paths import check_trees_match, path_str, without_variable_value

PyTree = Any
LeafSpec = Union[None, str, int, Sequence[int]]
#: What ``groups=`` accepts: ``None``, ``"unit"`` / ``"tensor"``, a callable of the params, or a
#: pytree of per-leaf specs (see the module docstring).
GroupsLike = Union[None, str, Callable[[PyTree], PyTree], PyTree]

__all__ = [
    "Group",
    "GroupRule",
    "GroupsLike",
    "NAMED_SPECS",
    "UNSET",
    "key_names",
    "named_axes",
    "per_unit",
    "per_unit_out_first",
    "per_tensor",
    "resolve_groups",
    "group_sum",
    "group_dot",
    "group_sq_norm",
    "group_mean",
    "group_size",
]


@dataclasses.dataclass(frozen=True)
class Group:
    """The axes spanned by one radially invariant group of a leaf (a pytree leaf itself).

    ``units`` is how many units (output neurons, filters, embedding rows) one group holds,
    when it is known: 1 for the named per-unit specs, the count read from the model's
    structure for the groups of :func:`optax_sphere.find_groups` (a LayerNorm layer's kernel
    grouped per tensor holds all its units), or given (``Group((0, 1), units=256)``);
    ``None``: not known (a ``"tensor"`` spec or axes with no structure). The optimizers whose
    step in angle grows with the units of a group (SGD-G, PSI) divide their rate by it. It is
    metadata: two groups over the same axes are equal whatever their ``units``.
    """

    axes: tuple[int, ...]
    units: int | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.units is not None and (
            isinstance(self.units, bool) or not isinstance(self.units, (int, np.integer))
            or self.units < 1
        ):  # fmt: skip
            raise ValueError(f"Group: `units` must be an int >= 1 or None, got {self.units!r}.")

    def __repr__(self) -> str:
        units = "" if self.units is None else f", units={self.units}"
        return f"Group(axes={self.axes}{units})"

    def size(self, shape: Sequence[int]) -> int:
        """Dimension ``d`` of one group of a leaf of this ``shape``."""
        return math.prod(shape[a] for a in self.axes)

    def scalar_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of a per-group scalar (``keepdims`` over the group axes)."""
        return tuple(1 if i in self.axes else n for i, n in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class GroupRule:
    """A ``groups`` rule given as a function ``params -> specs``, wrapped so that it is not
    callable itself.

    ``optax.inject_hyperparams`` takes every callable argument for a schedule: it would call a
    bare function given as ``groups`` with the step count and pass its value (for most rules,
    ``None``: nothing grouped) to the optimizer. A ``GroupRule`` is passed on as it is, as a
    string spec or :func:`optax_sphere.find_groups`'s result are; elsewhere it is the same as
    the bare function.

    Args:
      fn: the rule, ``params -> tree of per-leaf specs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optax_sphere
      >>> rule = optax_sphere.GroupRule(
      ...     lambda params: jax.tree.map(lambda p: "unit" if p.ndim > 1 else None, params)
      ... )
      >>> tx = optax.inject_hyperparams(optax_sphere.adam_s)(learning_rate=1e-3, groups=rule)
      >>> state = tx.init({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)})

    References:
      ``optax.inject_hyperparams``'s ``static_args`` (optax's documentation), the other way.
    """

    fn: Callable[[PyTree], PyTree]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"GroupRule takes a function params -> specs, got {self.fn!r}.")

    def specs(self, params: PyTree) -> PyTree:
        """The rule's per-leaf specs for ``params``."""
        return self.fn(params)


#: Every transformation's default ``groups``: nothing grouped, with a warning at ``init``.
UNSET = "unset"

_UNSET_MESSAGE = (
    "no `groups` given: no parameter is grouped, so this optimizer is its base optimizer (a "
    "monitor records nothing). "
    "Which weights are radially invariant depends on the model, not on the shapes; find them "
    "with `optax_sphere.find_groups(model_fn, params, *example_inputs)` and pass the result as "
    "`groups=` (or give a spec: groups='unit' for Flax layouts (..., out), 'unit_out_first' "
    "for (out, ...) layouts, a per-parameter tree; groups=None silences this warning)."
)


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))  # non-arrays are reported by resolve_groups


#: The named per-leaf specs and the axes one group spans for a leaf of ``ndim`` axes.
NAMED_SPECS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "unit": lambda ndim: tuple(range(ndim - 1)),  # (..., out): Flax, Haiku
    "unit_out_first": lambda ndim: tuple(range(1, ndim)),  # (out, ...): PyTorch, Equinox
    "tensor": lambda ndim: tuple(range(ndim)),
}


def named_axes(spec: str, ndim: int) -> tuple[int, ...]:
    """The axes one group of a named spec (``"unit"``, ``"unit_out_first"``, ``"tensor"``)
    spans in a leaf of ``ndim`` axes.

    Args:
      spec: ``"unit"``, ``"unit_out_first"`` or ``"tensor"``.
      ndim: the number of axes of the leaf.

    Returns:
      The reduced axes, a tuple.

    Example:
      >>> from optax_sphere.groups import named_axes, UNSET
      >>> named_axes("unit", 4), named_axes("unit_out_first", 4), named_axes("tensor", 2)
      ((0, 1, 2), (1, 2, 3), (0, 1))

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2.
    """
    return NAMED_SPECS[spec](ndim)


_SCHEDULED_GROUPS = (
    "`optax.inject_hyperparams` treats every callable argument as a schedule and called the "
    "callable given as `groups` with its step count, so it would have grouped nothing. Name "
    "it static: `optax.inject_hyperparams(optimizer, static_args=('groups',))(...)`, or wrap "
    "it: `groups=optax_sphere.GroupRule(fn)`; a string ('unit', 'tensor'), a spec tree or "
    "`optax_sphere.find_groups`'s result needs nothing."
)


def _is_step_count(x: Any) -> bool:
    """A scalar integer array: what ``optax.inject_hyperparams`` calls a schedule with."""
    dtype = getattr(x, "dtype", None)
    return (
        getattr(x, "shape", None) == () and dtype is not None and jnp.issubdtype(dtype, jnp.integer)
    )


def _check_not_a_schedule(params: Any, rule: str) -> None:
    if _is_step_count(params):
        raise ValueError(
            f"groups={rule} was called with a step count, not parameters: " + _SCHEDULED_GROUPS
        )


def _per_unit_spec(params: PyTree, spec: str) -> PyTree:
    _check_not_a_schedule(
        params, {"unit": "per_unit", "unit_out_first": "per_unit_out_first"}[spec]
    )

    def leaf(p):
        shape = tuple(getattr(p, "shape", ()))
        if len(shape) < 2 or Group(named_axes(spec, len(shape))).size(shape) < 2:
            return None  # biases, norm scales, (1, ..., 1, C) norm parameters: no group
        return spec

    return jax.tree.map(leaf, params)


#: the leaf name of each framework's kernels, and the layout it implies
_LAYOUT_OF_NAME = {
    "weight": ("unit", "unit_out_first", "the (out, ...) layout of PyTorch and Equinox"),
    "kernel": ("unit_out_first", "unit", "the (..., out) layout of Flax and Haiku"),
}


def _warn_other_layout(spec: PyTree, rule: str) -> PyTree:
    """Warns when a rule groups leaves whose name says they are in the other layout (a Flax
    ``kernel`` grouped ``"unit_out_first"``, a PyTorch / Equinox ``weight`` grouped
    ``"unit"``): their groups would split one unit's inputs."""
    for name, (wrong, right, layout) in _LAYOUT_OF_NAME.items():
        if rule != wrong:
            continue
        named = [
            path_str(p)
            for p, s in jax.tree_util.tree_flatten_with_path(spec)[0]
            if s == rule and key_names(p)[-1:] == (name,)
        ]
        if named:
            axes = "all axes but the last" if rule == "unit" else "all axes but the first"
            warnings.warn(
                f"groups {rule!r} group {axes}, but {named} are named {name!r} as in "
                f"{layout}; use groups={right!r}, optax_sphere.find_groups or "
                "optax_sphere.check_groups.",
                stacklevel=4,
            )
    return spec


def per_unit(params: PyTree) -> PyTree:
    """One group per output unit for the Flax / Haiku layout ``(..., out)``.

    Leaves of ndim >= 2 are grouped over all axes but the last: the radial invariance created
    by BatchNorm (or any per-channel normalisation) after a Flax ``Dense`` / ``Conv`` layer.
    Leaves of ndim < 2 (biases, norm scales, scalars) and leaves whose groups would hold one
    element (Haiku's ``(1, ..., 1, C)`` norm parameters) are not grouped. Leaves named
    ``weight`` (the ``(out, ...)`` layout of PyTorch and Equinox) are grouped as asked, with a
    warning: use :func:`per_unit_out_first` or :func:`optax_sphere.find_groups` there.

    Which leaves a normalisation follows is not visible in the shapes (a classifier head is
    grouped too): prefer :func:`optax_sphere.find_groups`.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A tree like ``params`` of the spec ``"unit"`` (one group over all axes but the last) or
      ``None``, for :func:`resolve_groups` or a ``groups=`` argument.

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> optax_sphere.per_unit({"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros(8)})
      {'bias': None, 'kernel': 'unit'}

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (one
      radially invariant group per filter after BatchNorm).
    """
    return _warn_other_layout(_per_unit_spec(params, "unit"), "unit")


def per_unit_out_first(params: PyTree) -> PyTree:
    """One group per output unit for the PyTorch / Equinox layout ``(out, ...)``.

    Leaves of ndim >= 2 (an ``eqx.nn.Linear`` weight ``(out, in)``, an ``eqx.nn.Conv2d``
    weight ``(out, in, kh, kw)``) are grouped over all axes but the first; other leaves, and
    leaves whose groups would hold one element (an Equinox conv bias ``(out, 1, 1)``), are
    not grouped. Leaves named ``kernel`` (the ``(..., out)`` layout of Flax and Haiku) are
    grouped as asked, with a warning: use :func:`per_unit` or :func:`optax_sphere.find_groups`
    there.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A tree like ``params`` of the spec ``"unit_out_first"`` (one group over all axes but
      the first) or ``None``, for :func:`resolve_groups` or a ``groups=`` argument.

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> params = {"weight": jnp.ones((8, 4, 3, 3)), "bias": jnp.zeros(8)}
      >>> optax_sphere.per_unit_out_first(params)
      {'bias': None, 'weight': 'unit_out_first'}

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2.
    """
    return _warn_other_layout(_per_unit_spec(params, "unit_out_first"), "unit_out_first")


def per_tensor(params: PyTree) -> PyTree:
    """Whole-tensor grouping for leaves of ndim >= 2 (LayerNorm-style invariance).

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A tree like ``params`` of the spec ``"tensor"`` (one group over every axis of the leaf) or
      ``None``, for :func:`resolve_groups` or a ``groups=`` argument.

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> optax_sphere.per_tensor({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)})
      {'b': None, 'w': 'tensor'}

    References:
      Kosson et al., "Rotational Equilibrium", sec. 2 (whole-layer invariance under LayerNorm).
    """
    _check_not_a_schedule(params, "per_tensor")
    return jax.tree.map(lambda p: "tensor" if _ndim(p) >= 2 else None, params)


_SHORTHANDS: dict[str, Callable[[PyTree], PyTree]] = {
    "unit": per_unit,
    "unit_out_first": per_unit_out_first,
    "tensor": per_tensor,
}


def key_names(path: Sequence[Any]) -> tuple[Any, ...]:
    """The names of a ``jax.tree_util`` key path (dict keys, indices, attribute names).

    The trailing ``value`` attribute of a Flax ``nnx.Variable`` is dropped, so that a
    parameter has the same names in an ``nnx.State`` of ``Param`` nodes and in the pure arrays
    that ``nnx.Optimizer`` updates.

    Args:
      path: a ``jax.tree_util`` key path.

    Returns:
      The names, as a tuple.

    Example:
      >>> import jax
      >>> from optax_sphere.groups import key_names
      >>> [key_names(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": [0.0, 1.0]})]
      [('a', 0), ('a', 1)]

    References:
      ``jax.tree_util`` key paths; the rules of :func:`resolve_groups` match these names.
    """
    names = []
    for key in without_variable_value(path):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(getattr(key, attr))
                break
        else:
            names.append(str(key))
    return tuple(names)


#: (parameter path, shape) -> the axes indexing the layers of a stack, as the last structure
#: read for that parameter (``trace_structure``: ``find_groups``, ``rotational_groups``,
#: ``check_groups``) found them; bounded, for the warning of :func:`_warn_across_layers`
_STACK_AXES: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
_MOST_REMEMBERED = 65536


def remember_stack_axes(path: str, shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    """Records that the parameter ``path`` of ``shape`` holds a stack of layers on ``axes``
    (called by the structure trace), so that a group spec spanning them is said at ``init``."""
    if len(_STACK_AXES) >= _MOST_REMEMBERED:
        _STACK_AXES.clear()
    if axes:
        _STACK_AXES[(path, tuple(shape))] = tuple(axes)
    else:
        _STACK_AXES.pop((path, tuple(shape)), None)


def _warn_across_layers(specs: list, groups: list, leaves_with_path: list) -> None:
    """Warns when groups span the layers of a stack (a scanned block's stacked kernel or
    ``(L, d)`` norm scale grouped by a rule that knows only the leaf's shape)."""
    crossing = []
    for spec, group, (path, leaf) in zip(specs, groups, leaves_with_path):
        if group is None:
            continue
        stack = _STACK_AXES.get((path_str(path), tuple(leaf.shape)), ())
        crossed = sorted(set(group.axes) & set(stack))
        if crossed:
            crossing.append(
                f"'{path_str(path)}' {tuple(leaf.shape)} (spec {spec!r}, group axes "
                f"{group.axes}, layers on axis {', '.join(map(str, crossed))})"
            )
    if crossing:
        warnings.warn(
            f"{len(crossing)} groups span the layers of a stack (a scanned or vmapped block, "
            "as the model's structure read by find_groups / rotational_groups / check_groups "
            f"shows), so each group mixes the layers: {'; '.join(crossing)}. Group from the "
            "structure instead (groups=find_groups(model, ...) or rotational_groups(model, "
            "...)), or give per-leaf specs whose axes leave the stack axes out.",
            stacklevel=4,
        )


def _resolve_leaf(spec: Any, leaf: Any, path: str, units: int | None = None) -> Group | None:
    """The :class:`Group` of one leaf; ``units``: the units one group holds where the model's
    structure counted them (:meth:`~optax_sphere.FoundGroups.units_of`)."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"parameter '{path}' is a {type(leaf).__name__}, not an array: every parameter "
            "leaf must be an array (wrap Python numbers with jnp.asarray)."
        )
    if spec is None:
        return None
    axes: Any = spec.axes if isinstance(spec, Group) else spec
    if isinstance(spec, Group) and spec.units is not None:
        units = spec.units
    ndim = len(leaf.shape)
    if isinstance(axes, (bool, float)) or (
        isinstance(axes, (tuple, list)) and not all(_is_axis(a) for a in axes)
    ):
        raise ValueError(
            f"groups for parameter '{path}': {spec!r} is not a spec; {_LEAF_FORMS}"
            + (f" Did you mean {axes[0]!r}?" if _is_rule_in_sequence(axes) else "")
        )
    if isinstance(axes, str):
        if axes not in NAMED_SPECS:
            raise ValueError(
                f"groups for parameter '{path}': unknown spec {axes!r}; expected None, "
                "'unit', 'unit_out_first', 'tensor' or a sequence of axes."
            )
        if axes != "tensor" and ndim < 2:
            raise ValueError(
                f"groups for parameter '{path}': {axes!r} needs ndim >= 2 (one axis for the "
                f"units), got shape {tuple(leaf.shape)}; use 'tensor' or None."
            )
        axes = named_axes(axes, ndim)
    elif isinstance(axes, int):
        axes = (axes,)
    try:
        axes = tuple(int(a) for a in axes)
    except TypeError:
        raise ValueError(
            f"groups for parameter '{path}': expected None, 'unit', 'tensor', an int or a "
            f"sequence of ints, got {spec!r}."
        ) from None
    normalised = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"groups for parameter '{path}' (shape {tuple(leaf.shape)}): axis {a} is out "
                f"of range for ndim {ndim}."
            )
        normalised.append(a % ndim)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"groups for parameter '{path}': repeated axes in {axes}.")
    if not normalised:
        raise ValueError(
            f"groups for parameter '{path}': an empty axis list is not a group; use None."
        )
    if math.prod(leaf.shape) == 0:
        return None  # an empty leaf has no direction: nothing to group, nothing to compute
    axes = tuple(sorted(normalised))
    if units is None and (
        ndim == 1 or axes in (named_axes("unit", ndim), named_axes("unit_out_first", ndim))
    ):
        units = 1  # one unit in either layout, or a vector: one direction
    return Group(axes, units)


#: the forms a per-leaf spec takes, for the error messages
_LEAF_FORMS = (
    "a leaf's spec is None (ungrouped), 'unit', 'unit_out_first', 'tensor', an int axis or a "
    "tuple of int axes."
)
#: the forms ``groups`` takes, for the error messages
_GROUPS_FORMS = (
    "`groups` is None (nothing grouped), 'unit', 'unit_out_first' or 'tensor' (one rule for "
    "every leaf), the result of find_groups / rotational_groups, a callable params -> specs, "
    "or a tree like the parameters (a prefix of it) whose leaves are specs: " + _LEAF_FORMS
)


def _is_axis(a: Any) -> bool:
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _is_rule_in_sequence(spec: Any) -> bool:
    return isinstance(spec, (tuple, list)) and len(spec) == 1 and spec[0] in NAMED_SPECS


def _check_groups_form(groups: Any, params: PyTree) -> None:
    """Refuses a ``groups`` that is a lone value of no allowed form (``True``, ``3``,
    ``("unit",)``), naming the forms, before it is read as a tree that does not match."""
    if callable(groups) or isinstance(groups, str) or groups is None:
        return
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(params)):
        return  # one array: the spec is its own, checked as a leaf's
    lone = isinstance(groups, (bool, int, float, np.number)) or _is_rule_in_sequence(groups)
    if isinstance(groups, (tuple, list)) and all(_is_axis(a) for a in groups):
        # a tuple of axes for every leaf: fine only where the parameters are that tuple
        lone = not isinstance(params, (tuple, list)) or len(params) != len(groups)
    if lone:
        hint = ""
        if _is_rule_in_sequence(groups):
            hint = f" Did you mean groups={groups[0]!r}?"
        elif isinstance(groups, bool):
            hint = " Did you mean groups='unit' (or None)?"
        elif not isinstance(groups, float):
            hint = (
                " The same axes for every leaf: groups=lambda params: jax.tree.map(lambda _: "
                f"{tuple(groups) if isinstance(groups, (tuple, list)) else (groups,)!r}, params)."
            )
        raise ValueError(f"`groups`={groups!r} is not a groups spec: {_GROUPS_FORMS}{hint}")


def resolve_groups(groups: GroupsLike, params: PyTree) -> PyTree:
    """Resolves a ``groups`` specification against ``params``.

    Returns a pytree with the structure of ``params`` whose leaves are :class:`Group` or
    ``None``. Raises ``ValueError`` naming the parameter path when the spec does not fit.

    Args:
      groups: a spec: :func:`optax_sphere.find_groups`'s result, a rule name (``"unit"``,
        ``"unit_out_first"``, ``"tensor"``), a tuple of axes, ``None`` (no groups), a
        callable of the params, or a pytree of per-leaf specs (a prefix of ``params``).
      params: the parameter tree the groups must fit.

    Returns:
      A tree like ``params`` whose leaves are :class:`Group` or ``None``.

    Raises:
      ValueError: the spec does not fit a leaf (the message names its path), or a group
        would hold one element.

    Example:
      >>> import jax.numpy as jnp, optax_sphere
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> optax_sphere.resolve_groups({"w": "unit", "b": None}, params)
      {'b': None, 'w': Group(axes=(0,), units=1)}

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2.
    """
    if isinstance(groups, GroupRule):
        groups = groups.fn
    if isinstance(groups, str) and groups == UNSET:
        warnings.warn(_UNSET_MESSAGE, stacklevel=3)
        groups = None
    if groups is None:
        groups = lambda tree: jax.tree.map(lambda _: None, tree)
    units_of = None
    if hasattr(groups, "spec_for"):  # optax_sphere.find_groups: specs matched by path
        units_of = getattr(groups, "units_of", None)
        groups = groups.spec_for
    _check_groups_form(groups, params)
    if isinstance(groups, str):
        if groups not in _SHORTHANDS:
            raise ValueError(f"unknown groups shorthand {groups!r}: {_GROUPS_FORMS}")
        groups = _SHORTHANDS[groups]
    # a callable spec is a function; an Equinox module (a pytree, perhaps callable) is a tree
    is_function = callable(groups) and jax.tree_util.treedef_is_leaf(jax.tree.structure(groups))
    spec = groups(params) if is_function else groups
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves_with_path:
        # no parameter to group: an empty tree, or optax.tree.map_params's placeholder,
        # whose ``init`` reads which state fields mirror the parameters
        return jax.tree.unflatten(treedef, [])
    try:
        specs = treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as err:
        specs = _specs_of_masked_params(spec, params, leaves_with_path)
        if specs is None:
            _raise_tree_mismatch(spec, leaves_with_path, err)
    counted = [None if units_of is None else units_of(p) for p, _ in leaves_with_path]
    resolved = [
        _resolve_leaf(s, leaf, path_str(p), k)
        for (p, leaf), s, k in zip(leaves_with_path, specs, counted)
    ]
    if _STACK_AXES:
        _warn_across_layers(specs, resolved, leaves_with_path)
    return jax.tree.unflatten(treedef, resolved)


def map_groups(
    fn: Callable[..., Any], groups: PyTree, *trees: PyTree, trace_once: bool = False
) -> PyTree:
    """``fn(group, *leaves)`` over the leaves of ``trees`` (``groups`` resolved, same tree).

    ``trees`` are checked first (``check_trees_match``) (the first tree is the
    reference), so a parameter tree that changed since ``init`` gives a clear ``ValueError``.

    With ``trace_once``, inside a trace (``jit``, ``pmap``, ``grad``...) the grouped leaves
    that share a signature (their group's axes and units, and each argument's shapes and
    dtypes, or its value when it is not an array) go through one nested ``jax.jit`` of
    ``fn``: traced once per signature, lowered to one function that XLA inlines at every
    call. The computation is the same; a model of many layers of one shape is traced and
    lowered as one layer is. ``fn`` must then be pure (no per-leaf Python side effects).
    Outside a trace ``fn`` runs as it is.
    """
    check_trees_match(*trees)
    if not trace_once:
        return jax.tree.map(lambda *xs: fn(xs[-1], *xs[:-1]), *trees, groups)
    traced = _traced_per_signature(fn)

    def apply(*xs: Any) -> Any:
        *leaves, group = xs
        if group is None or not any(
            isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(leaves)
        ):
            return fn(group, *leaves)
        dynamic = [all(isinstance(v, jax.Array) for v in jax.tree.leaves(x)) for x in leaves]
        statics = tuple(_DYNAMIC if d else x for d, x in zip(dynamic, leaves))
        try:
            hash(statics)
        except TypeError:
            return fn(group, *leaves)
        arrays = [x for d, x in zip(dynamic, leaves) if d]
        return traced((group.axes, group.units), statics, *arrays)

    return jax.tree.map(apply, *trees, groups)


#: the place of an array argument among the static ones of :func:`_traced_per_signature`
_DYNAMIC = object()


def _traced_per_signature(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under ``jax.jit``, called as ``(group_key, statics, *arrays)``: the group's
    ``(axes, units)`` and the non-array arguments (``_DYNAMIC`` in the place of each array)
    are static, so that one trace serves every leaf of one signature."""

    def call(group_key: tuple, statics: tuple, *arrays: Any) -> Any:
        it = iter(arrays)
        leaves = [next(it) if s is _DYNAMIC else s for s in statics]
        return fn(Group(*group_key), *leaves)

    call.__name__ = getattr(fn, "__name__", "per_group")
    return jax.jit(call, static_argnums=(0, 1))


def is_masked_node(node: Any) -> bool:
    """True for ``optax.MaskedNode()``: the placeholder of a leaf in a view of the parameters
    (``optax.masked``, ``optax.multi_transform``, ``optax.partition``,
    :func:`~optax_sphere.on_groups`)."""
    return isinstance(node, optax.MaskedNode)


def flatten_view(tree: PyTree) -> tuple[list[Any], Any]:
    """``jax.tree_util.tree_flatten`` with ``optax.MaskedNode()`` taken as a leaf: the leaves
    of a view and the placeholders in their places, and a treedef that is the whole tree's."""
    return jax.tree_util.tree_flatten(tree, is_leaf=is_masked_node)


def _specs_of_masked_params(spec: PyTree, params: PyTree, leaves_with_path: list) -> list | None:
    """The spec of every leaf by its key path, when ``params`` is the view of
    ``optax.masked`` / ``optax.multi_transform`` (masked-out leaves replaced by
    ``MaskedNode``) and ``spec`` is written for the whole tree; ``None`` otherwise."""
    masked = jax.tree.leaves(params, is_leaf=is_masked_node)
    if not any(is_masked_node(x) for x in masked):
        return None
    specs = []
    for path, _ in leaves_with_path:
        node = spec
        try:
            for key in path:
                if hasattr(key, "key"):
                    node = node[key.key]
                elif hasattr(key, "idx"):
                    node = node[key.idx]
                elif hasattr(key, "name"):
                    node = getattr(node, key.name)
                else:
                    return None
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        specs.append(node)
    return specs


def _raise_tree_mismatch(spec: PyTree, leaves_with_path: list, err: Exception) -> None:
    spec_paths = [
        path_str(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            spec, is_leaf=lambda x: x is None or isinstance(x, (str, int, tuple, list))
        )[0]
    ]
    param_paths = [path_str(p) for p, _ in leaves_with_path]
    missing = sorted(set(param_paths) - set(spec_paths))
    extra = sorted(set(spec_paths) - set(param_paths))
    raise ValueError(
        "the `groups` tree does not match the parameter tree: "
        f"parameters without a spec: {missing or 'none'}; specs without a parameter: "
        f"{extra or 'none'} ({err})."
    ) from None


def group_sum(x: jax.Array, group: Group) -> jax.Array:
    """Per-group sum, ``keepdims`` so it broadcasts back onto the leaf.

    Args:
      x: the leaf.
      group: the group.

    Returns:
      The sums, ``keepdims``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.groups import Group, group_sum
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> group_sum(x, Group((0,))).tolist()
      [[4.0, 6.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (per-group
      quantities of a radially invariant group).
    """
    return jnp.sum(x, axis=group.axes, keepdims=True, dtype=accumulation_dtype(x.dtype))


def group_dot(a: jax.Array, b: jax.Array, group: Group) -> jax.Array:
    """Per-group inner product ``<a, b>`` (``keepdims``), accumulated in at least float32.

    Args:
      a, b: arrays shaped like the leaf.
      group: the group.

    Returns:
      The inner products, ``keepdims``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.groups import Group, group_dot
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> group_dot(x, x, Group((0,))).tolist()
      [[10.0, 20.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (per-group
      quantities of a radially invariant group).
    """
    dtype = accumulation_dtype(jnp.result_type(a, b))
    return jnp.sum(a.astype(dtype) * b.astype(dtype), axis=group.axes, keepdims=True)


def group_sq_norm(a: jax.Array, group: Group) -> jax.Array:
    """Per-group squared norm ``||a||^2`` (``keepdims``).

    Args:
      a: the leaf.
      group: the group.

    Returns:
      ``||a||^2`` per group, ``keepdims``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.groups import Group, group_sq_norm
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> group_sq_norm(x, Group((1,))).tolist()
      [[5.0], [25.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (per-group
      quantities of a radially invariant group).
    """
    return group_dot(a, a, group)


def group_mean(a: jax.Array, group: Group) -> jax.Array:
    """Per-group mean (``keepdims``).

    Args:
      a: the leaf.
      group: the group.

    Returns:
      The means, ``keepdims``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.groups import Group, group_mean
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> group_mean(x, Group((0,))).tolist()
      [[2.0, 3.0]]

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (per-group
      quantities of a radially invariant group).
    """
    return group_sum(a, group) / group.size(a.shape)


def group_size(leaf: jax.Array, group: Group) -> int:
    """Dimension ``d`` of one group of ``leaf``.

    Args:
      leaf: the leaf (or anything with a ``shape``).
      group: the group.

    Returns:
      The number of elements ``d`` of one group.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_sphere.groups import Group, group_size
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> group_size(x, Group((0,)))
      2

    References:
      Roburin et al., "Spherical Perspective on Learning with Batch Norm", sec. 2 (per-group
      quantities of a radially invariant group).
    """
    return group.size(leaf.shape)
