"""A structural proof that a batched JAX computation keeps examples apart.

Ghost clipping needs, for every example i, the gradient of example i's loss
with respect to example i's tapped tensors, and nothing of any other
example (I3/I4 in DESIGN.md). Under `jax.vmap` over batches of one that holds
by construction. A *batched* forward and backward (one pass over the whole
physical batch, the gradient of the summed losses) gives the same numbers
only if no operation lets one example's values reach another's row: no
reduction over the example axis, no contraction over it, no slice or
reshape that moves rows, no layer such as BatchNormalization. A single such
operation would let one example change another's clipped gradient, or one
NaN drop a whole batch.

`example_axes` decides this from the jaxpr, without running it: it follows,
for every value, which axis indexes examples. Each value is

- `None`: independent of every example (weights, constants, random bits
  from an unbatched key);
- an axis `k`: entry j along axis k depends on example j only (and on
  example-independent values);
- `MIXED`: anything else.

Rules exist for the primitives a Keras forward and its gradient use
(elementwise ops, dot_general, convolutions, reductions, reshapes,
transposes, slices, pads, gathers from example-independent tables, windows,
nested jit/custom calls). An unknown primitive with an example-dependent
input gives `MIXED`, so the proof can only fail safe: the caller then uses
the vmap path.
"""

import math

MIXED = "mixed"

_ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp clz complex conj
convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge
gt igamma igammac imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg
nextafter not one_minus_square or population_count pow real reduce_precision rem round rsqrt select_n
shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient sub
tan tanh xor optimization_barrier sharding_constraint device_put
""".split())

# Reductions: param name of the reduced axes.
_REDUCTIONS = {"reduce_sum": "axes", "reduce_max": "axes", "reduce_min": "axes",
               "reduce_prod": "axes", "reduce_and": "axes", "reduce_or": "axes",
               "reduce_xor": "axes", "argmax": "axes", "argmin": "axes"}
_CUMULATIVE = frozenset(["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"])
_WINDOWED = frozenset(["reduce_window_sum", "reduce_window_max", "reduce_window_min",
                       "reduce_window", "select_and_scatter_add", "select_and_gather_add"])
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Mixed(Exception):
    pass


def _inner(jaxpr):
    return getattr(jaxpr, "jaxpr", jaxpr)


def example_axes(jaxpr, in_axes, batch):
    """Example axes of a jaxpr's outputs, given its inputs' (None, an int or
    MIXED). Returns (out_axes, reason): reason names the first equation that
    mixed examples (None if none did)."""
    state = {"reason": None}
    outs = _run(_inner(jaxpr), list(in_axes), batch, state)
    return outs, state["reason"]


def _run(jaxpr, in_axes, batch, state):
    env = {}

    def read(v):
        if type(v).__name__ == "Literal":
            return None
        return env.get(v, None)

    for v, a in zip(jaxpr.invars, in_axes):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if all(a is None for a in ins):
            outs = [None] * len(eqn.outvars)
        elif any(a is MIXED for a in ins):
            outs = [MIXED] * len(eqn.outvars)
        else:
            try:
                outs = _rule(eqn, ins, batch, state)
            except _Mixed as e:
                if state["reason"] is None:
                    state["reason"] = f"{eqn.primitive.name}: {e}"
                outs = [MIXED] * len(eqn.outvars)
            # Every claimed example axis must have the batch's length.
            checked = []
            for v, a in zip(eqn.outvars, outs):
                if a not in (None, MIXED) and v.aval.shape[a] != batch:
                    if state["reason"] is None:
                        state["reason"] = f"{eqn.primitive.name}: axis {a} of {v.aval.shape} is not the batch"
                    a = MIXED
                checked.append(a)
            outs = checked
        for v, a in zip(eqn.outvars, outs):
            env[v] = a
    return [read(v) for v in jaxpr.outvars]


def _join(a, b):
    """Both possible (branches, loop iterations): example-independent joins any axis."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    return MIXED


def _shape(v):
    return tuple(v.aval.shape)


def _rule(eqn, ins, batch, state):
    name = eqn.primitive.name
    p = eqn.params
    n_out = len(eqn.outvars)

    if name in _ELEMENTWISE:
        rank = len(_shape(eqn.outvars[0]))
        axes = {a for a, v in zip(ins, eqn.invars) if a is not None}
        if len(axes) != 1:
            raise _Mixed(f"operands batched along different axes {sorted(axes)}")
        (k,) = axes
        for a, v in zip(ins, eqn.invars):
            if a is not None and len(_shape(v)) != rank:
                raise _Mixed("batched operand of another rank")
        return [k] * n_out

    if name == "broadcast_in_dim":
        k = ins[0]
        return [p["broadcast_dimensions"][k]] + [None] * (n_out - 1)

    if name == "transpose":
        return [list(p["permutation"]).index(ins[0])]

    if name == "reshape":
        if any(a is not None for a in ins[1:]):
            raise _Mixed("dynamic shape")
        k = ins[0]
        src, dst = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        before = math.prod(src[:k])
        for j in range(len(dst)):
            if math.prod(dst[:j]) == before and dst[j] == src[k]:
                return [j]
        raise _Mixed(f"{src} -> {dst} merges or splits the example axis {k}")

    if name == "squeeze":
        k, dims = ins[0], [d % len(_shape(eqn.invars[0])) for d in p["dimensions"]]
        if k in dims:
            raise _Mixed("squeezes the example axis")
        return [k - sum(d < k for d in dims)]

    if name == "expand_dims":
        k, dims = ins[0], sorted(p["dimensions"])
        for d in dims:
            if d <= k:
                k += 1
        return [k]

    if name in _REDUCTIONS:
        k, axes = ins[0], tuple(p[_REDUCTIONS[name]])
        if k in axes:
            raise _Mixed(f"reduces over the example axis {k}")
        return [k - sum(a < k for a in axes)] * n_out

    if name in _CUMULATIVE:
        if ins[0] == p["axis"]:
            raise _Mixed("accumulates along the example axis")
        return [ins[0]]

    if name == "sort":
        axes = {a for a in ins if a is not None}
        if len(axes) != 1 or p["dimension"] in axes:
            raise _Mixed("sorts along or across the example axis")
        return [axes.pop()] * n_out

    if name == "top_k":
        k = ins[0]
        if k == len(_shape(eqn.invars[0])) - 1:
            raise _Mixed("top_k along the example axis")
        return [k] * n_out

    if name == "rev":
        if ins[0] in p["dimensions"]:
            raise _Mixed("reverses the example axis")
        return [ins[0]]

    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        lhs, rhs = ins
        l_rank, r_rank = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
        l_free = [d for d in range(l_rank) if d not in lc and d not in lb]
        r_free = [d for d in range(r_rank) if d not in rc and d not in rb]
        if lhs is not None and lhs in lc or rhs is not None and rhs in rc:
            raise _Mixed("contracts over the example axis")
        if lhs is not None and rhs is not None:
            if lhs in lb and rhs in rb and list(lb).index(lhs) == list(rb).index(rhs):
                return [list(lb).index(lhs)]
            raise _Mixed("both operands batched, not as one dot batch dimension")
        if lhs is not None:
            return [list(lb).index(lhs) if lhs in lb else len(lb) + l_free.index(lhs)]
        if rhs in rb:
            return [list(rb).index(rhs)]
        return [len(lb) + len(l_free) + r_free.index(rhs)]

    if name == "conv_general_dilated":
        lhs, rhs = ins
        dn = p["dimension_numbers"]
        if rhs is not None or p["batch_group_count"] != 1 or lhs != dn.lhs_spec[0]:
            raise _Mixed("convolution not batched along its batch dimension alone")
        return [dn.out_spec[0]]

    if name == "concatenate":
        axes = {a for a in ins if a is not None}
        if len(axes) != 1 or p["dimension"] in axes:
            raise _Mixed("concatenates along or across the example axis")
        return [axes.pop()]

    if name == "split":
        if ins[0] == p["axis"]:
            raise _Mixed("splits the example axis")
        return [ins[0]] * n_out

    if name == "pad":
        k = ins[0]
        if ins[1] is not None or tuple(p["padding_config"][k]) != (0, 0, 0):
            raise _Mixed("pads the example axis")
        return [k]

    if name == "slice":
        k = ins[0]
        strides = p["strides"] or (1,) * len(p["start_indices"])
        if p["start_indices"][k] != 0 or p["limit_indices"][k] != batch or strides[k] != 1:
            raise _Mixed("slices the example axis")
        return [k]

    if name == "dynamic_slice":
        k = ins[0]
        if k is None or any(a is not None for a in ins[1:]) or p["slice_sizes"][k] != batch:
            raise _Mixed("dynamic slice across examples")
        return [k]

    if name == "dynamic_update_slice":
        op, upd, idx = ins[0], ins[1], ins[2:]
        if any(a is not None for a in idx) or op is None and upd is not None:
            raise _Mixed("dynamic update across examples")
        if upd is not None and (upd != op or _shape(eqn.invars[1])[upd] != batch):
            raise _Mixed("dynamic update across examples")
        return [op]

    if name == "gather":
        op, idx = ins
        dn = p["dimension_numbers"]
        out_rank = len(_shape(eqn.outvars[0]))
        idx_rank = len(_shape(eqn.invars[1]))
        batch_out = [d for d in range(out_rank) if d not in dn.offset_dims]
        idx_batch = list(range(idx_rank - 1))  # the index vector is the last axis
        if op is None:
            if idx == idx_rank - 1:
                raise _Mixed("index vector along the example axis")
            return [batch_out[idx_batch.index(idx)]]
        if idx is None:
            if op in dn.collapsed_slice_dims or op in dn.start_index_map or op in dn.operand_batching_dims \
                    or p["slice_sizes"][op] != batch:
                raise _Mixed("gathers across the example axis of the operand")
            kept = [d for d in range(len(_shape(eqn.invars[0])))
                    if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
            return [dn.offset_dims[kept.index(op)]]
        if op in dn.operand_batching_dims and idx in dn.start_indices_batching_dims and \
                list(dn.operand_batching_dims).index(op) == list(dn.start_indices_batching_dims).index(idx):
            return [batch_out[idx_batch.index(idx)]]
        raise _Mixed("operand and indices batched, not as one gather batch dimension")

    if name in _WINDOWED:
        axes = {a for a in ins if a is not None}
        if len(axes) != 1:
            raise _Mixed("window operands batched along different axes")
        k = axes.pop()
        dims = p.get("window_dimensions")
        strides = p.get("window_strides")
        pad = p.get("padding")
        if dims is None or dims[k] != 1 or (strides is not None and strides[k] != 1) or \
                (pad is not None and tuple(pad[k]) != (0, 0)):
            raise _Mixed("a window spans examples")
        for key in ("base_dilation", "window_dilation"):
            if p.get(key) is not None and p[key][k] != 1:
                raise _Mixed("a dilated window along the example axis")
        return [k] * n_out

    if name == "cond":
        if ins[0] is not None:
            raise _Mixed("the branch taken depends on an example")
        outs = None
        for branch in p["branches"]:
            got = _run(_inner(branch), ins[1:], batch, state)
            outs = got if outs is None else [_join(a, b) for a, b in zip(outs, got)]
        return outs

    if name == "scan":
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
        if 0 in xs:
            raise _Mixed("scans over the example axis")
        xs = [None if a is None else a - 1 for a in xs]
        for _ in range(len(carry) + 2):
            got = _run(_inner(p["jaxpr"]), consts + carry + xs, batch, state)
            new = [_join(a, b) for a, b in zip(carry, got[:nk])]
            if new == carry:
                break
            carry = new
        else:
            raise _Mixed("scan carry does not settle")
        return carry + [a if a in (None, MIXED) else a + 1 for a in got[nk:]]

    for key in _CALLS:
        if key in p and p[key] is not None:
            return _run(_inner(p[key]), ins, batch, state)

    if name == "custom_vjp_call" and "call_jaxpr" not in p:
        raise _Mixed("custom_vjp_call without a jaxpr")

    raise _Mixed("no isolation rule for this primitive")
