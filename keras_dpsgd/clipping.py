"""Per-example clipping and masked summation (invariants I3, I4), in keras.ops.

`clip_and_sum` takes per-example gradients (a leading batch axis on every
weight's gradient) and returns, for each weight, sum_i keep_i * c_i * g_i with
c_i = min(1, C / ||g_i||), the norm taken over *all* trainable weights (flat
clipping, I3). Rows are selected with `where`, never multiplied by the mask,
so a padded (or non-finite) row contributes exactly zero even when its
gradient is NaN or Inf (I4: NaN * 0 is NaN).
"""

from keras import ops


def per_example_sq_norms(per_example_grads):
    """Squared L2 norm of each example's whole gradient, float32, shape (B,)."""
    total = None
    for g in per_example_grads:
        g = ops.cast(g, "float32")
        sq = ops.sum(ops.reshape(ops.square(g), (ops.shape(g)[0], -1)), axis=1)
        total = sq if total is None else total + sq
    return total


def clip_factors(sq_norms, mask, l2_norm_clip):
    """c_i = C / max(||g_i||, C) for kept rows, 0 for padded / non-finite rows.

    Returns (factors, keep): float32 (B,) and bool (B,).
    """
    norms = ops.sqrt(sq_norms)
    keep = ops.logical_and(ops.cast(mask, "bool"), ops.isfinite(norms))
    clip = ops.cast(l2_norm_clip, "float32")
    factors = clip / ops.maximum(norms, clip)
    factors = ops.where(keep, factors, ops.zeros_like(factors))
    return factors, keep


def weighted_sum(per_example_grads, factors, keep, num_shards=None):
    """sum_i where(keep_i, c_i * g_i, 0) for every weight, float32.

    With `num_shards=D`, the batch axis is split into D contiguous groups and
    each group is summed on its own, giving partial sums of shape (D, ...):
    under data parallelism each device sums only its own rows, so
    accumulating needs no cross-device communication (DESIGN.md section 4).
    """
    out = []
    for g in per_example_grads:
        g = ops.cast(g, "float32")
        shape = (-1,) + (1,) * (len(g.shape) - 1)
        k = ops.reshape(keep, shape)
        c = ops.reshape(factors, shape)
        kept = ops.where(k, g * c, ops.zeros_like(g))
        if num_shards is None:
            out.append(ops.sum(kept, axis=0))
        else:
            grouped = ops.reshape(kept, (num_shards, -1) + tuple(g.shape[1:]))
            out.append(ops.sum(grouped, axis=1))
    return out


def clip_and_sum(per_example_grads, mask, l2_norm_clip, num_shards=None):
    """Clip every example's gradient to `l2_norm_clip`, mask, and sum.

    Args:
        per_example_grads: list of tensors, each (B, *weight_shape).
        mask: bool (B,), True for real rows.
        l2_norm_clip: C > 0 (scalar tensor or float).
        num_shards: None, or D to return per-shard partial sums (D, ...).

    Returns:
        (sums, keep, num_nonfinite): float32 sums shaped like the weights; the
        bool (B,) rows kept; the number of real rows dropped because their
        gradient was not finite (they contribute zero, like padding).
    """
    sq = per_example_sq_norms(per_example_grads)
    factors, keep = clip_factors(sq, mask, l2_norm_clip)
    nonfinite = ops.logical_and(ops.cast(mask, "bool"), ops.logical_not(keep))
    sums = weighted_sum(per_example_grads, factors, keep, num_shards)
    return sums, keep, ops.sum(ops.cast(nonfinite, "int32"))
