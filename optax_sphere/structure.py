"""The structure of every weight, read from the model's computation.

A weight's radially invariant groups are made of the inputs of one output unit: the axes a
``dot_general`` or a convolution contracts, within one layer of a stack. This module traces the
model once (``jax.make_jaxpr``: no FLOPs) and follows every parameter leaf to the operations
that consume it with the data:

* ``dot_general``: the contracted axes are one unit's inputs, the batch axes index a stack
  (``vmap`` over stacked weights), the free axes index the units (and the heads);
* ``conv_general_dilated``: the input-feature and spatial axes of the kernel are one unit's
  inputs, the output-feature axis indexes the units;
* ``gather`` (an embedding lookup): the indexed axis indexes the rows (the units), the sliced
  axes are one row's entries;
* the stacked axis of a ``scan`` over the weights, and an axis a weight is indexed along
  (``w[i]`` in a loop), index one layer of a stack.

Axes are followed through dtype casts, transposes, broadcasts, reshapes that split or merge
axes, slices, elementwise arithmetic with other weights (a gain, a weight normalisation) and
the nested ``jit``, ``scan``, ``while``, ``cond``, ``remat``, ``custom_jvp`` / ``custom_vjp``
and ``shard_map`` of the trace. Where the structure cannot be read (a weight used only
elementwise, as a bias or a gain; a weight multiplied by another weight; an operation this
module does not know), the result says so, in words.

One implementation serves every framework: the model comes as a function of its parameters
(:func:`optax_sphere.find_groups` adapts Flax linen, flax.nnx, Equinox and Haiku models to
one), and nothing here depends on how the parameters are named.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

from optax_sphere._paths import path_str
from optax_sphere.groups import remember_stack_axes

__all__ = [
    "LeafStructure",
    "ModelStructure",
    "muon_dimension_numbers",
    "trace_structure",
    "weight_decay_mask",
]

PyTree = Any

INPUT, UNIT, STACK = "input", "unit", "stack"

#: operations that keep every axis of their operand, in place
_IDENTITY = frozenset(
    {
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
        "mesh_cast",
        "pvary",
        "pbroadcast",
        "device_put",
        "optimization_barrier",
        "stop_gradient",
        "real",
    }
)
#: operations that keep the rank and every axis of their first operand (a slice of it)
_SAME_AXES = frozenset({"slice", "rev", "pad", "cumsum", "cumprod", "cummax", "cummin"})
#: reductions over ``axes``
_REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and"}
)
_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass(frozen=True)
class LeafStructure:
    """How the model uses one parameter leaf.

    ``input_axes`` are the axes of one unit's inputs (contracted by the layer), ``unit_axes``
    index the units (several of them: units and heads), ``stack_axes`` index the layers of a
    stack; an axis of size 1 counts as an input axis. ``consumers`` names the operations that
    consume the leaf with the data (empty: the structure is unknown, and ``note`` says why);
    ``lookup`` is true for a leaf indexed by the data (an embedding), ``head`` for a leaf whose
    layer's outputs reach the model's outputs with no other parameterised layer after it.
    """

    path: str
    shape: tuple[int, ...]
    input_axes: tuple[int, ...]
    unit_axes: tuple[int, ...]
    stack_axes: tuple[int, ...]
    consumers: tuple[str, ...]
    lookup: bool
    head: bool
    note: str

    @property
    def known(self) -> bool:
        """True when the structure was read (some operation consumes the leaf with the data)."""
        return bool(self.consumers)

    def describe(self) -> str:
        """The structure in words."""
        if not self.known:
            return f"structure unknown: {self.note}"
        axes = lambda a: ("axis " if len(a) == 1 else "axes ") + ", ".join(map(str, a))
        parts = [f"inputs of a unit on {axes(self.input_axes)}" if self.input_axes else ""]
        if self.unit_axes:
            parts.append(f"{'rows' if self.lookup else 'units'} on {axes(self.unit_axes)}")
        if self.stack_axes:
            layers = math.prod(self.shape[a] for a in self.stack_axes)
            parts.append(f"a stack of {layers} on {axes(self.stack_axes)}")
        kind = "+".join(self.consumers)
        return f"{kind}: " + "; ".join(p for p in parts if p) + ("; the head" if self.head else "")


@dataclasses.dataclass(frozen=True)
class ModelStructure:
    """The :class:`LeafStructure` of every parameter leaf, in the order of the tree's leaves."""

    leaves: tuple[LeafStructure, ...]

    def __getitem__(self, path: str) -> LeafStructure:
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise KeyError(f"no parameter '{path}' (parameters: {[x.path for x in self.leaves]})")

    def __iter__(self):
        return iter(self.leaves)

    def __len__(self) -> int:
        return len(self.leaves)

    def table(self) -> str:
        """One line per parameter: its path, shape and structure in words."""
        width = max((len(x.path) for x in self.leaves), default=0)
        return "\n".join(
            f"{x.path.ljust(width)}  {'x'.join(map(str, x.shape)) or 'scalar'}  {x.describe()}"
            for x in self.leaves
        )

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------
# The trace


Origins = tuple  # per axis of a value, the frozenset of (leaf, leaf axis) it carries


@dataclasses.dataclass(frozen=True)
class _Value:
    """What is known of one value of the trace: the parameter axes each of its axes carries
    (``None``: no parameter), whether it depends on the data, and, for data, the leaves of the
    last layers it came through."""

    origins: Origins | None = None
    data: bool = False
    after: frozenset = frozenset()
    leaves: frozenset = frozenset()  # the parameters it carries, even with no axis left


_CONSTANT = _Value()


class _Recorder:
    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = shapes
        self.uses: list[dict[tuple[str, tuple], None]] = [{} for _ in shapes]
        self.stack: list[set[int]] = [set() for _ in shapes]
        self.notes: list[dict[str, None]] = [{} for _ in shapes]

    def use(self, kind: str, value: _Value, roles: Sequence[str]) -> None:
        per_leaf: dict[int, dict[int, str]] = {leaf: {} for leaf in _leaves_of(value)}
        for origin, role in zip(value.origins, roles):
            for leaf, axis in origin:
                previous = per_leaf.setdefault(leaf, {}).get(axis)
                # an axis split into a unit axis and an input axis is an input axis
                per_leaf[leaf][axis] = INPUT if INPUT in (previous, role) else role
        for leaf, axes in per_leaf.items():
            self.uses[leaf][(kind, tuple(sorted(axes.items())))] = None

    def indexed(self, origin: frozenset) -> None:
        for leaf, axis in origin:
            if self.shapes[leaf][axis] > 1:
                self.stack[leaf].add(axis)

    def note(self, value: _Value, text: str) -> None:
        for leaf in _leaves_of(value):
            self.notes[leaf][text] = None


def _leaves_of(value: _Value) -> set[int]:
    if value.origins is None:
        return set()
    return set(value.leaves) | {leaf for origin in value.origins for leaf, _ in origin}


def _carrying(value: _Value, ins: Sequence[_Value]) -> _Value:
    """``value`` (a parameter transformed without the data) with the parameters of ``ins``."""
    if value.origins is None:
        return value
    leaves = frozenset().union(*(_leaves_of(v) for v in ins))
    return dataclasses.replace(value, leaves=leaves)


def _union(origins: Iterable[Origins]) -> Origins:
    origins = list(origins)
    return tuple(frozenset().union(*dims) for dims in zip(*origins))


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _reshape(origins: Origins, old: tuple[int, ...], new: tuple[int, ...], rec: _Recorder):
    """The axes of a reshape: runs of axes with equal products map onto each other (a split
    gives its parts the axis split, a merge gives the merged axis all of its parts)."""
    out: list[frozenset] = [frozenset()] * len(new)
    if 0 in old or 0 in new:  # an empty array: no axis carries anything
        return tuple(out)
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            if j >= len(new) or new[j] != 1:
                rec.indexed(origins[i])  # a dropped unit axis: indexed if its leaf axis was not
                i += 1
                continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            j += 1
            continue
        if i < len(old) and j < len(new) and old[i] == 1 and new[j] == 1:
            out[j] = origins[i]
            i, j = i + 1, j + 1
            continue
        i0, j0, a, b = i, j, old[i], new[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= old[i]
                i += 1
            else:
                b *= new[j]
                j += 1
        merged = frozenset().union(*origins[i0:i])
        for k in range(j0, j):
            out[k] = merged
    return tuple(out)


class _Tracer:
    def __init__(self, rec: _Recorder):
        self.rec = rec

    # -- values
    def run(self, jaxpr: Any, inputs: Sequence[_Value], consts: Sequence[_Value] = ()):
        """Walks a (closed or open) jaxpr with the given values of its inputs; returns the
        values of its outputs."""
        inner = getattr(jaxpr, "jaxpr", jaxpr)
        env: dict[Any, _Value] = {}
        for var, value in zip(inner.constvars, list(consts) + [_CONSTANT] * len(inner.constvars)):
            env[var] = value
        for var, value in zip(inner.invars, inputs):
            env[var] = value

        def read(v):
            return _CONSTANT if isinstance(v, jex_core.Literal) else env.get(v, _CONSTANT)

        for eqn in inner.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in inner.outvars]

    def equation(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        data = any(v.data for v in ins)
        after = frozenset().union(*(v.after for v in ins if v.data))
        carried = [v for v in ins if v.origins is not None and not v.data]
        if not carried and name not in ("scan", "while", "cond") and not _sub_jaxpr(eqn):
            return [_Value(None, data, after)] * n_out
        if name == "dot_general":
            return [self.dot_general(eqn, ins)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins)]
        if name == "gather":
            return [self.gather(eqn, ins)]
        if name == "dynamic_slice" and ins[0].origins is not None:
            return [self.dynamic_slice(eqn, ins)]
        if name == "scan":
            return self.scan(eqn, ins)
        if name == "while":
            return self.while_loop(eqn, ins)
        if name == "cond":
            return self.cond(eqn, ins)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub, ins)
        if data:  # a parameter used elementwise with the data (a bias, a gain, a position)
            for v in carried:
                self.rec.use("elementwise", v, ())
            return [_Value(None, True, after)] * n_out
        return [_carrying(self.structural(eqn, ins), ins)] * n_out

    def structural(self, eqn: Any, ins: list[_Value]) -> _Value:
        """A parameter transformed without the data: the axes it keeps."""
        name, params = eqn.primitive.name, eqn.params
        out_shape = _shape(eqn.outvars[0])
        first = ins[0]
        if name in _IDENTITY:
            return _Value(first.origins)
        if first.origins is not None and name in _SAME_AXES:
            return _Value(first.origins)
        if name == "transpose":
            return _Value(tuple(first.origins[p] for p in params["permutation"]))
        if name == "broadcast_in_dim":
            out = [frozenset()] * len(out_shape)
            in_shape = _shape(eqn.invars[0])
            for i, d in enumerate(params["broadcast_dimensions"]):
                if in_shape[i] == out_shape[d]:
                    out[d] = first.origins[i]
            return _Value(tuple(out))
        if name == "reshape":
            return _Value(_reshape(first.origins, _shape(eqn.invars[0]), out_shape, self.rec))
        if name == "squeeze":
            dims = {d % len(first.origins) for d in params["dimensions"]}
            for d in dims:
                self.rec.indexed(first.origins[d])
            return _Value(tuple(o for d, o in enumerate(first.origins) if d not in dims))
        if name in _REDUCTIONS:
            axes = set(params["axes"])
            return _Value(tuple(o for d, o in enumerate(first.origins) if d not in axes))
        if name == "concatenate":
            return _Value(_union(v.origins for v in ins if v.origins is not None))
        if name == "dot_general":
            for v in ins:
                if v.origins is not None:
                    self.rec.note(
                        v, "contracted with a constant or another parameter before the data"
                    )
            return _CONSTANT
        shapes = [_shape(var) for var in eqn.invars]
        broadcast = all(
            s == () or (len(s) == len(out_shape) and all(a in (1, b) for a, b in zip(s, out_shape)))
            for s in shapes
        )
        if broadcast:
            # elementwise (size-1 axes broadcast): a gain, a normalised direction; an axis of
            # size 1 carries nothing
            same = [
                tuple(o if a == b else frozenset() for o, a, b in zip(v.origins, s, out_shape))
                for v, s in zip(ins, shapes)
                if v.origins is not None and len(s) == len(out_shape)
            ]
            return _Value(_union(same) if same else tuple(frozenset() for _ in out_shape))
        for v in ins:
            if v.origins is not None:
                self.rec.note(v, f"passed through `{name}`, whose axes are not followed")
        return _CONSTANT

    # -- consumers
    def _one_parameter(self, ins: list[_Value], kind: str) -> int | None:
        """The operand that is a parameter when the other is data, else ``None``."""
        parameter = [i for i, v in enumerate(ins[:2]) if v.origins is not None and not v.data]
        other = [i for i, v in enumerate(ins[:2]) if v.data]
        if len(parameter) == 1 and len(other) == 1:
            return parameter[0]
        if len(parameter) == 2:
            for v in ins[:2]:
                self.rec.note(v, f"multiplied by another parameter ({kind}) before the data")
        return None

    def dot_general(self, eqn: Any, ins: list[_Value]) -> _Value:
        which = self._one_parameter(ins, "dot_general")
        if which is None:
            return self.structural(eqn, ins) if not any(v.data for v in ins) else self._data(ins)
        (contract, batch) = eqn.params["dimension_numbers"]
        contract, batch = set(contract[which]), set(batch[which])
        value = ins[which]
        roles = [
            INPUT if d in contract else STACK if d in batch else UNIT
            for d in range(len(value.origins))
        ]
        self.rec.use("dot_general", value, roles)
        return _Value(None, True, frozenset(_leaves_of(value)))

    def conv(self, eqn: Any, ins: list[_Value]) -> _Value:
        value = ins[1]
        if value.origins is None or value.data or not ins[0].data:
            for v in ins:
                if v.origins is not None and not v.data:
                    self.rec.use("elementwise", v, ())
            return self._data(ins)
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        roles = [UNIT if d == out_feature else INPUT for d in range(len(value.origins))]
        self.rec.use("conv_general_dilated", value, roles)
        return _Value(None, True, frozenset(_leaves_of(value)))

    def gather(self, eqn: Any, ins: list[_Value]) -> _Value:
        value, indices = ins[0], ins[1]
        if value.origins is None or value.data or not indices.data:
            if not any(v.data for v in ins):
                return self.structural(eqn, ins)
            return self._data(ins)
        numbers = eqn.params["dimension_numbers"]
        shape, sizes = _shape(eqn.invars[0]), eqn.params["slice_sizes"]
        # an axis indexed by the data and sliced to less than its size: the rows
        indexed = {d for d in numbers.start_index_map if sizes[d] < shape[d]}
        batched = set(getattr(numbers, "operand_batching_dims", ()))
        roles = [
            STACK if d in batched else UNIT if d in indexed else INPUT
            for d in range(len(value.origins))
        ]
        self.rec.use("gather", value, roles)
        return _Value(None, True, frozenset(_leaves_of(value)))

    def dynamic_slice(self, eqn: Any, ins: list[_Value]) -> _Value:
        value, starts = ins[0], ins[1:]
        if value.data:
            return self._data(ins)
        if any(s.data for s in starts):  # indexed by the data: a lookup
            shape = _shape(eqn.invars[0])
            sizes = eqn.params["slice_sizes"]
            roles = [UNIT if sizes[d] < shape[d] else INPUT for d in range(len(shape))]
            self.rec.use("gather", value, roles)
            return _Value(None, True, frozenset(_leaves_of(value)))
        return _carrying(_Value(value.origins), [value])

    def _data(self, ins: list[_Value]) -> _Value:
        for v in ins:
            if v.origins is not None and not v.data:
                self.rec.use("elementwise", v, ())
        return _Value(None, True, frozenset().union(*(v.after for v in ins if v.data)))

    # -- control flow
    def _loop(self, body: Any, consts: list[_Value], carry: list[_Value], xs: list[_Value]):
        """Runs a loop body until the data-dependence of its carry is stable; only the last
        pass records uses."""
        real = self.rec
        for _ in range(3):
            self.rec = _Recorder(real.shapes)  # a scratch pass
            outs = self.run(body, consts + carry + xs)
            new = [
                _Value(
                    c.origins if not o.data else None,
                    c.data or o.data,
                    c.after | o.after,
                    c.leaves if not o.data else frozenset(),
                )
                for c, o in zip(carry, outs[: len(carry)])
            ]
            if [(v.data, v.after) for v in new] == [(v.data, v.after) for v in carry]:
                break
            carry = new
        self.rec = real
        return self.run(body, consts + carry + xs), carry

    def scan(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        consts, carry, xs = (
            ins[:n_consts],
            ins[n_consts : n_consts + n_carry],
            ins[n_consts + n_carry :],
        )
        sliced = []
        for v in xs:
            if v.origins is not None and not v.data:
                for leaf, axis in v.origins[0]:
                    self.rec.stack[leaf].add(axis)
                sliced.append(_Value(v.origins[1:], leaves=frozenset(_leaves_of(v))))
            else:
                sliced.append(v)
        outs, carry = self._loop(eqn.params["jaxpr"], consts, carry, sliced)
        ys = [
            _Value((frozenset(),) + o.origins, o.data, o.after, frozenset(_leaves_of(o)))
            if o.origins is not None
            else o
            for o in outs[n_carry:]
        ]
        return list(outs[:n_carry]) + ys

    def while_loop(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        cond_consts, body_consts, carry = ins[:nc], ins[nc : nc + nb], ins[nc + nb :]
        outs, carry = self._loop(eqn.params["body_jaxpr"], body_consts, carry, [])
        self.run(eqn.params["cond_jaxpr"], cond_consts + carry)
        return outs

    def cond(self, eqn: Any, ins: list[_Value]) -> list[_Value]:
        branches = [self.run(b, ins[1:]) for b in eqn.params["branches"]]
        outs = []
        for values in zip(*branches):
            data = any(v.data for v in values)
            origins = [v.origins for v in values if v.origins is not None]
            outs.append(
                _Value(
                    None if data or not origins else _union(origins),
                    data,
                    frozenset().union(*(v.after for v in values)),
                    frozenset().union(*(_leaves_of(v) for v in values))
                    if not data
                    else frozenset(),
                )
            )
        return outs


def _sub_jaxpr(eqn: Any) -> Any:
    """The one jaxpr a call-like operation (``jit``, ``remat``, ``custom_jvp_call``,
    ``custom_vjp_call``, ``shard_map``...) runs on its operands, one to one."""
    if eqn.primitive.name in ("scan", "while", "cond"):
        return None
    for key in _JAXPR_PARAMS:
        sub = eqn.params.get(key)
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "invars") and len(inner.invars) == len(eqn.invars):
            return sub
    return None


def trace_structure(fn: Callable[..., Any], params: PyTree, *inputs: Any) -> ModelStructure:
    """Reads the structure of every parameter leaf from the computation ``fn(params, *inputs)``.

    The function is traced once with ``jax.make_jaxpr`` (nothing is computed); every leaf is
    followed to the operations that consume it with the data (module docstring).

    Args:
      fn: the model, a function of the parameters and the inputs.
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      *inputs: example inputs (their shapes and dtypes are used).

    Returns:
      A :class:`ModelStructure`: one :class:`LeafStructure` per leaf of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from optax_sphere.structure import trace_structure
      >>> def model(p, x):  # two stacked layers, scanned
      ...     return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
      >>> s = trace_structure(model, {"w": jnp.ones((2, 3, 3))}, jnp.ones((4, 3)))
      >>> s["w"].input_axes, s["w"].unit_axes, s["w"].stack_axes
      ((1,), (2,), (0,))

    References:
      Kosson et al., "Rotational Equilibrium", sec. 4 (the rotational updates of every
      linear and convolutional layer); Roburin et al., "Spherical Perspective on Learning
      with Batch Norm", sec. 2 (the groups are the inputs of a unit).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    shapes = [tuple(getattr(v, "shape", ())) for _, v in flat]
    closed = jax.make_jaxpr(lambda leaves, *xs: fn(jax.tree.unflatten(treedef, leaves), *xs))(
        [v for _, v in flat], *inputs
    )
    rec = _Recorder(shapes)
    n_inputs = len(jax.tree.leaves(inputs))
    values = [
        _Value(tuple(frozenset({(i, a)}) for a in range(len(s))), leaves=frozenset({i}))
        for i, s in enumerate(shapes)
    ] + [_Value(None, True)] * n_inputs
    outs = _Tracer(rec).run(closed, values)
    heads = frozenset().union(*(v.after for v in outs if v.data))
    structure = ModelStructure(
        tuple(_leaf(i, paths[i], shapes[i], rec, i in heads) for i in range(len(flat)))
    )
    for leaf in structure:  # so that a rule that spans the layers is said at init
        remember_stack_axes(leaf.path, leaf.shape, leaf.stack_axes)
    return structure


def _leaf(i: int, path: str, shape: tuple[int, ...], rec: _Recorder, head: bool) -> LeafStructure:
    uses = list(rec.uses[i])
    consumers = tuple(dict.fromkeys(k for k, _ in uses if k != "elementwise"))
    stack = set(rec.stack[i])
    roles: dict[int, set[str]] = {a: set() for a in range(len(shape))}
    for _, axes in uses:
        for axis, role in axes:
            roles[axis].add(role)
            if role == STACK:
                stack.add(axis)
    if not consumers:
        notes = list(rec.notes[i])
        if any(k == "elementwise" for k, _ in uses):
            notes.insert(0, "used elementwise with the data (a bias, a gain, a position)")
        note = "; ".join(notes) or "the outputs do not depend on it"
        return LeafStructure(path, shape, (), (), tuple(sorted(stack)), (), False, False, note)
    inputs, units, stacks = [], [], []
    for axis in range(len(shape)):
        if INPUT in roles[axis] or shape[axis] == 1 or not roles[axis] and axis not in stack:
            inputs.append(axis)
        elif axis in stack:
            stacks.append(axis)
        else:
            units.append(axis)
    return LeafStructure(
        path,
        shape,
        tuple(inputs),
        tuple(units),
        tuple(stacks),
        consumers,
        "gather" in consumers,
        head,
        "; ".join(rec.notes[i]),
    )


# ---------------------------------------------------------------------------------------------
# What optax users pass: a weight-decay mask and Muon's dimension numbers, from the structure

#: the consumers that make a leaf a matrix of a layer (its input and unit axes are read)
_LAYER_CONSUMERS = frozenset({"dot_general", "conv_general_dilated"})


def _read(
    model: Any, args: tuple, kwargs: dict, batch_axis_name: str | None
) -> tuple[PyTree, ModelStructure]:
    from optax_sphere._models import as_function

    f, params, inputs, _ = as_function(model, args, kwargs, batch_axis_name)
    return params, trace_structure(f, params, *inputs)


def _like_params(params: PyTree, structure: ModelStructure, value: Callable) -> PyTree:
    """``value(leaf_structure)`` in the place of every leaf of ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [value(leaf) for leaf in structure])


def weight_decay_mask(
    model: Any, *args: Any, batch_axis_name: str | None = None, **kwargs: Any
) -> PyTree:
    """An ``optax`` weight-decay mask read from the model's structure: ``True`` for the
    kernels of linear and convolutional layers and for embeddings, ``False`` for what the
    model uses elementwise (biases, norm scales, gains, added position tables).

    Unlike ``lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)``, it is right on stacked
    trees: a scanned block's ``(L, d)`` norm scale is not decayed, its ``(L, d_in, d_out)``
    kernel is.

    Args:
      model: the model, in any form :func:`optax_sphere.find_groups` takes, followed by its
        parameters or variables and example inputs in ``*args``.
      *args: as for :func:`optax_sphere.find_groups`.
      batch_axis_name: as for :func:`optax_sphere.find_groups`.
      **kwargs: passed to the model.

    Returns:
      A tree like the parameters (of :func:`optax_sphere.find_groups`'s form) of booleans,
      for ``optax.adamw(..., mask=...)``, ``optax.add_decayed_weights(..., mask)`` or the
      ``weight_decay_mask`` of ``optax.contrib.muon``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from optax_sphere.structure import weight_decay_mask
      >>> def model(p, x):  # two stacked layers, scanned, each with a gain
      ...     layer = lambda h, w: (jnp.tanh(h @ w["kernel"]) * w["gain"], None)
      ...     return jax.lax.scan(layer, x, p)[0]
      >>> p = {"kernel": jnp.ones((2, 3, 3)), "gain": jnp.ones((2, 3))}
      >>> mask = weight_decay_mask(model, p, jnp.ones((4, 3)))
      >>> mask
      {'gain': False, 'kernel': True}
      >>> tx = optax.adamw(1e-3, weight_decay=0.1, mask=mask)

    References:
      Loshchilov and Hutter, "Decoupled Weight Decay Regularization" (the decay of the
      weights of layers, not of biases and gains); Kosson et al., "Rotational Equilibrium",
      sec. 5 (the matrices decay, the gains and biases do not).
    """
    params, structure = _read(model, args, kwargs, batch_axis_name)
    return _like_params(
        params, structure, lambda leaf: bool(_LAYER_CONSUMERS & set(leaf.consumers) or leaf.lookup)
    )


def _matrix_axes(
    leaf: LeafStructure, head: bool, per_head: bool
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The reduction and output axes of one matrix of ``leaf`` (its contracted and unit
    axes; with ``per_head``, the outer of two unit or input axes left out, a head's axis), or
    ``None`` for a leaf that is not a matrix of a layer (or is the head, unless ``head``)."""
    if not _LAYER_CONSUMERS & set(leaf.consumers) or leaf.lookup or (leaf.head and not head):
        return None
    reduction, output = list(leaf.input_axes), list(leaf.unit_axes)
    if per_head and "conv_general_dilated" not in leaf.consumers:
        if len(output) >= 2:
            output = output[1:]
        elif len(reduction) >= 2:
            reduction = reduction[1:]
    reduction = [a for a in reduction if leaf.shape[a] > 1] or reduction
    if not reduction or not output:
        return None
    return tuple(reduction), tuple(output)


def muon_dimension_numbers(
    model: Any,
    *args: Any,
    head: bool = False,
    per_head: bool = False,
    batch_axis_name: str | None = None,
    **kwargs: Any,
) -> PyTree:
    """``optax.contrib.MuonDimensionNumbers`` for every matrix of the model, read from its
    structure, and ``None`` for the leaves Muon leaves to Adam.

    A kernel consumed by a ``dot_general`` (or a convolution) gets its contracted axes as the
    reduction axes and its unit axes as the output axes; every other axis (the layers of a
    stack, the experts of a batched ``dot_general``) is a batch axis, orthogonalised
    independently. The embeddings, the head (unless ``head=True``), and what the model uses
    elementwise (biases, norm scales, gains) get ``None``, as in Jordan et al.'s Muon.
    ``per_head=True`` makes the outer of several unit axes (``(d, heads, head_dim)``) or of
    several input axes of a ``dot_general`` (``(heads, head_dim, d)``) a batch axis too: one
    orthogonalisation per head.

    Args:
      model: the model, in any form :func:`optax_sphere.find_groups` takes, followed by its
        parameters or variables and example inputs in ``*args``.
      *args: as for :func:`optax_sphere.find_groups`.
      head: orthogonalise the output layer too.
      per_head: one orthogonalisation per attention head (see above).
      batch_axis_name: as for :func:`optax_sphere.find_groups`.
      **kwargs: passed to the model.

    Returns:
      A tree like the parameters whose leaves are ``MuonDimensionNumbers`` or ``None``, for
      ``optax.contrib.muon(..., muon_weight_dimension_numbers=...)``; for an Equinox model,
      whose tree is a (callable) module that optax would call, a function of the parameters
      returning it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from optax_sphere.structure import muon_dimension_numbers
      >>> def model(p, x):  # a stack of 2 layers, scanned, then a head
      ...     h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["blocks"])[0]
      ...     return h @ p["head"]
      >>> p = {"blocks": jnp.ones((2, 3, 3)), "head": jnp.ones((3, 5))}
      >>> numbers = muon_dimension_numbers(model, p, jnp.ones((4, 3)))
      >>> numbers["blocks"], numbers["head"]
      (MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,)), None)

    References:
      Jordan et al., "Muon: an optimizer for hidden layers in neural networks" (2024): the
      hidden matrices, the embedding and head left to AdamW.
    """
    from optax.contrib import MuonDimensionNumbers

    params, structure = _read(model, args, kwargs, batch_axis_name)

    def numbers(leaf: LeafStructure):
        axes = _matrix_axes(leaf, head, per_head)
        return None if axes is None else MuonDimensionNumbers(*axes)

    tree = _like_params(params, structure, numbers)
    if callable(tree):
        # an Equinox module is callable, and optax calls a callable dimension-numbers
        # argument with the parameters: give it a function returning the tree
        return lambda _params: tree
    return tree
