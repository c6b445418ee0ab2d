"""JAX backend: vmapped per-example gradients and the jitted physical step.

The step is `train_step(model, state, data)` with Keras' stateless state tuple
(trainable, non_trainable, optimizer, metrics variables). `data` is one
physical batch `(x, y, sample_weight, mask, is_last)` of fixed shape, so the
step compiles once whatever the Poisson batch size (DESIGN.md section 3).
On JAX the step only clips and accumulates (is_last is not read): the host
knows which physical batch is last and then calls `dp_apply_step` (noise once,
÷ qN, update), a second, small jitted function. So the physical step holds no
branch and no gradient reduction. (An on-device `lax.cond` on the batch-sharded
`is_last` needed its predicate all-reduced across devices on every physical
batch.)
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import tree

from keras_dpsgd import clipping
from keras_dpsgd.backend import common


def _key(seed_words):
    return jax.lax.bitcast_convert_type(jnp.asarray(seed_words, jnp.int32), jnp.uint32)


def gaussian_noise(seed_words, step, index, shape):
    """Standard normal float32 noise for (seed, logical step, variable index)."""
    key = jax.random.fold_in(jax.random.fold_in(_key(seed_words), step), index)
    return jax.random.normal(key, shape, dtype=jnp.float32)


def gaussian_noises(seed_words, step, shapes):
    """`gaussian_noise(seed_words, step, i, shapes[i])` for every i, the same
    numbers, with the per-variable keys derived in one vectorized op: in the
    compiled apply step that is one small kernel instead of two per variable
    (a CUDA graph's host launch cost grows with its kernel count)."""
    step_key = jax.random.fold_in(_key(seed_words), step)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(len(shapes), dtype=jnp.uint32))
    return [jax.random.normal(keys[i], tuple(shape), dtype=jnp.float32) for i, shape in enumerate(shapes)]


def _data_parallel():
    """(distribution, mesh axis size) of a keras.distribution batch axis, or (None, 1)."""
    dist = keras.distribution.distribution()
    if dist is None or getattr(dist, "batch_dim_name", None) is None:
        return None, 1
    mesh = dist.device_mesh
    return dist, int(mesh.shape[mesh.axis_names.index(dist.batch_dim_name)])


def num_data_shards():
    """Number of data-parallel shards (devices along the batch axis)."""
    return _data_parallel()[1]


def _shard_spec(dist, ndim):
    from keras.src.distribution.distribution_lib import TensorLayout

    return TensorLayout([dist.batch_dim_name] + [None] * (ndim - 1), dist.device_mesh)


def shard_leading_axis(variable):
    """Shards a (D, ...) accumulator over the data axis: one partial sum per device."""
    dist, shards = _data_parallel()
    if dist is None or shards == 1:
        return
    variable._layout = _shard_spec(dist, len(variable.shape))
    variable.assign(variable.value)


def _constrain_to_shards(partials):
    dist, shards = _data_parallel()
    if dist is None or shards == 1:
        return partials
    return [jax.lax.with_sharding_constraint(p, _shard_spec(dist, p.ndim).backend_layout)
            for p in partials]


def agree_on_seed(words):
    """Every process samples the same batches: process 0's seed wins."""
    if jax.process_count() == 1:
        return words
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(words)))


def select_clipping(model, clipping, sample_batch):
    """Chooses vectorized or ghost clipping for this model (keras_dpsgd.ghost)."""
    from keras_dpsgd import ghost

    ghost.select_clipping(model, clipping, sample_batch)


def per_example_seed_states(model, non_trainable, batch):
    """Per-example keys for random layers, and the state after this batch.

    vmap does not batch the SeedGenerator states, so every example would
    share one dropout mask (a verified pitfall): example i gets
    fold_in(state, i). Each state then advances once per physical batch.
    Returns (per-example non-trainable values, their vmap in_axes, new state).
    """
    seed_pos = set(common.seed_state_positions(model))
    per_example, axes = [], []
    for i, v in enumerate(non_trainable):
        if i in seed_pos:
            per_example.append(jax.vmap(lambda k, s=v: jax.random.fold_in(s, k))(jnp.arange(batch)))
            axes.append(0)
        else:
            per_example.append(v)
            axes.append(None)
    # Other non-trainable state is not updated by private training.
    new = [v + jnp.array([0, 1], dtype=v.dtype) if i in seed_pos else v
           for i, v in enumerate(non_trainable)]
    return per_example, axes, new


def per_example_grads(model, trainable, non_trainable, metrics_vars, optimizer_vars,
                      x, y, sample_weight):
    """Per-example losses, predictions and gradients, by vmap over the batch.

    Random layers get a different key per example: the SeedGenerator states
    are not batched by vmap, so without this every example would share one
    dropout mask (a verified pitfall). Returns (losses (B,), y_pred, grads) and
    the advanced non-trainable state.
    """
    batch = jax.tree_util.tree_leaves(x)[0].shape[0]
    per_ex_ntv, ntv_axes, new_ntv = per_example_seed_states(model, non_trainable, batch)

    def one(tv, ntv, xi, yi, swi):
        xb, yb, swb = common.add_batch_axis(xi), common.add_batch_axis(yi), common.add_batch_axis(swi)
        loss, (unscaled, y_pred, _, _) = model.compute_loss_and_updates(
            tv, ntv, metrics_vars, xb, yb, swb, training=True,
            optimizer_variables=optimizer_vars)
        return loss, (unscaled, tree.map_structure(lambda a: a[0], y_pred))

    grad_fn = jax.vmap(jax.value_and_grad(one, has_aux=True),
                       in_axes=(None, ntv_axes, 0, 0, 0))
    (_, (losses, y_pred)), grads = grad_fn(trainable, per_ex_ntv, x, y, sample_weight)
    return losses, y_pred, grads, new_ntv


def train_step(model, state, data):
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight, mask, is_last = data
    opt = model.optimizer
    clip = optimizer_vars[opt.variable_position(opt.l2_norm_clip)]

    if getattr(model, "_dp_clipping", "vectorized") == "ghost":
        from keras_dpsgd import ghost  # ghost norms + book-keeping (DESIGN.md section 5)

        r = ghost.clipped_sums(model, trainable, non_trainable, metrics_vars, optimizer_vars,
                               x, y, sample_weight, mask, clip, num_shards=opt.num_shards)
        losses, y_pred, sums, keep, num_nonfinite, non_trainable = (
            r.losses, r.y_pred, r.sums, r.keep, r.num_nonfinite, r.non_trainable)
    else:
        losses, y_pred, grads, non_trainable = per_example_grads(
            model, trainable, non_trainable, metrics_vars, optimizer_vars, x, y, sample_weight)
        # Per-device partial sums (D, ...): no cross-device traffic until apply.
        with jax.named_scope("dp_clip_and_sum"):
            sums, keep, num_nonfinite = clipping.clip_and_sum(grads, mask, clip, num_shards=opt.num_shards)
    sums = _constrain_to_shards(sums)
    # Per-device partial sums only; the noisy update is `dp_apply_step` (I2).
    optimizer_vars = opt.stateless_accumulate(list(optimizer_vars), sums)

    logs, metrics_vars = update_metrics(model, metrics_vars, losses, mask, x, y, y_pred,
                                        sample_weight, num_nonfinite, keep)
    return logs, (list(trainable), non_trainable, optimizer_vars, metrics_vars)


def dp_apply_step(model, trainable, optimizer_vars):
    """End of a logical step (I2, I5, I6): reduce the accumulated clipped sums
    across devices (the one all-reduce of the logical step), add noise once,
    divide by the expected batch size, apply the inner optimizer and reset
    the accumulators. Returns (trainable, optimizer_vars)."""
    with jax.named_scope("dp_noise_and_update"):
        return model.optimizer.stateless_apply(list(optimizer_vars), None, list(trainable))


def apply_function(model):
    """`dp_apply_step` jitted for `model` (cached on it; reset with its train
    function). Under a distribution its outputs keep the state's shardings."""
    fn = model.__dict__.get("_dp_apply_function")
    if fn is not None and fn[0] is model.train_function:
        return fn[1]
    out_shardings = None
    if keras.distribution.distribution() is not None:
        tv_sh, _, ov_sh, _ = model._get_state_sharding_spec()
        out_shardings = (tv_sh, ov_sh)

    def step(trainable, optimizer_vars):
        return dp_apply_step(model, trainable, optimizer_vars)

    step.__name__ = "dp_apply_step"
    jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
    object.__setattr__(model, "_dp_apply_function", (model.train_function, jitted))
    return jitted


class StepPartials(keras.metrics.Metric):
    """Per-device partial sums of the logical step's loss, finite-row count
    and non-finite-row count, (D, 3), sharded like the batch.

    The physical step adds its own rows' sums here without crossing devices;
    `fold_step_metrics` reduces them once per logical step into Keras' loss
    tracker and the nonfinite tracker. Shows nothing in the logs."""

    def __init__(self, shards, **kwargs):
        super().__init__(name="dp_step_partials", **kwargs)
        self.partials = self.add_variable(shape=(shards, 3), initializer="zeros", dtype="float32",
                                          name="partials")
        shard_leading_axis(self.partials)

    def update_state(self, values):
        self.partials.assign(self.partials.value + values)

    def result(self):
        return {}

    def reset_state(self):
        self.partials.assign(self.partials.value * 0.0)  # keeps the sharding


def prepare_fit(model):
    """Called by `fit` once the optimizer is built: the per-device loss
    partials (`StepPartials`), created once per model; `metrics` lists them."""
    shards = model.optimizer.num_shards
    current = model.__dict__.get("_dp_partials")
    if current is None or current.partials.shape[0] != shards:
        object.__setattr__(model, "_dp_partials", StepPartials(shards))
        model.train_function = None


def fold_step_metrics(model, metrics_vars):
    """End of a logical step: reduce the per-device partials once (3 floats)
    into Keras' loss tracker and the nonfinite tracker, zero them. Returns
    (metrics_vars, {"loss": ..., "nonfinite": ...}) as after a Keras step."""
    partials = model._dp_partials
    mapping = list(zip(model.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        total = jnp.sum(partials.partials.value, axis=0)
        model._loss_tracker.update_state(total[0] / jnp.maximum(total[1], 1.0), sample_weight=total[1])
        model._nonfinite_tracker.update_state(total[2])
        partials.reset_state()
        logs = {"loss": model._loss_tracker.result(), "nonfinite": model._nonfinite_tracker.result()}
    return _metrics_after(model, scope, metrics_vars), logs


def metrics_function(model):
    """`fold_step_metrics` jitted for `model` (cached like `apply_function`)."""
    fn = model.__dict__.get("_dp_metrics_function")
    if fn is not None and fn[0] is model.train_function:
        return fn[1]
    out_shardings = None
    dist = keras.distribution.distribution()
    if dist is not None:
        _, _, _, mv_sh = model._get_state_sharding_spec()
        replicated = jax.sharding.NamedSharding(dist.device_mesh.backend_mesh, jax.sharding.PartitionSpec())
        out_shardings = (mv_sh, {"loss": replicated, "nonfinite": replicated})

    def step(metrics_vars):
        return fold_step_metrics(model, metrics_vars)

    step.__name__ = "dp_fold_step_metrics"
    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)
    object.__setattr__(model, "_dp_metrics_function", (model.train_function, jitted))
    return jitted


def update_metrics(model, metrics_vars, losses, mask, x, y, y_pred, sample_weight, num_nonfinite, keep=None):
    """Loss and compiled metrics over real rows only (I4).

    After `prepare_fit`, the loss and the non-finite count go to per-device
    partial sums (no cross-device reduction in the physical step); Keras'
    trackers get them once per logical step (`fold_step_metrics`)."""
    real = mask.astype(jnp.float32)
    finite = mask & jnp.isfinite(losses)
    partials = model.__dict__.get("_dp_partials")
    weights = real if sample_weight is None else real * jnp.asarray(sample_weight, jnp.float32).reshape(real.shape[0], -1)[:, 0]
    mapping = list(zip(model.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        if partials is not None and keep is not None:
            shards = partials.partials.shape[0]

            def per_shard(v):
                return jnp.sum(jnp.reshape(v.astype(jnp.float32), (shards, -1)), axis=1)

            nonfinite_rows = mask & jnp.logical_not(keep)
            partials.update_state(jnp.stack([per_shard(jnp.where(finite, losses, 0.0)), per_shard(finite),
                                             per_shard(nonfinite_rows)], axis=1))
        else:
            num_finite = jnp.sum(finite.astype(jnp.float32))
            mean_loss = jnp.sum(jnp.where(finite, losses, 0.0)) / jnp.maximum(num_finite, 1.0)
            model._loss_tracker.update_state(mean_loss, sample_weight=num_finite)
            model._nonfinite_tracker.update_state(num_nonfinite)
        logs = model.compute_metrics(x, y, y_pred, weights)
    return logs, _metrics_after(model, scope, metrics_vars)


def _metrics_after(model, scope, metrics_vars):
    """The metric variables' values after a stateless scope (unchanged ones as given)."""
    new_vars = []
    for ref, old in zip(model.metrics_variables, metrics_vars):
        v = scope.get_current_value(ref)
        new_vars.append(old if v is None else v)
    return new_vars


class Runner:
    """Feeds physical batches to the jitted step, threading the JAX state like
    Keras' own fit loop (state stays on device; synced at epoch end or when a
    callback asks)."""

    def __init__(self, model):
        self.model = model
        model.make_train_function()
        self.state = None
        # Keras keeps the distribution in thread-local state: the feeder
        # thread would not see it, so it is captured here (the training
        # thread) and re-entered there.
        self._dist, self._shards = _data_parallel()
        self._pool = None
        self._apply = apply_function(model)
        # (Both read the state's shardings now, before `run` purges the variables.)
        self._fold = metrics_function(model) if model.__dict__.get("_dp_partials") is not None else None

    def begin_epoch(self):
        self.model._jax_state_synced = True

    def run(self, data):
        m = self.model
        if m._jax_state_synced:
            self.state = m._get_jax_state(
                trainable_variables=True, non_trainable_variables=True,
                optimizer_variables=True, metrics_variables=True,
                purge_model_variables=True)
            if _data_parallel()[0] is not None:
                # Commit the state to its shardings: the step's outputs are
                # committed, and uncommitted inputs on the first call would
                # otherwise compile the step a second time (seen on 1 GPU).
                self.state = jax.tree_util.tree_map(
                    lambda a: jax.device_put(a, a.sharding), self.state)
            m._jax_state_synced = False
        x, y, sample_weight, mask, is_last = data
        logs, self.state = m.train_function(self.state, iter([(x, y, sample_weight, mask, None)]))
        self._publish()
        # The step does not read is_last; `load` / `prepare` keep it on the host.
        if bool(np.asarray(jax.device_get(is_last)).reshape(-1)[0]):
            logs = {**logs, **self.end_logical_step()}
        return logs

    def end_logical_step(self):
        """After the last physical batch of a logical step: the noisy update
        (`run` calls it when the batch's is_last is set), and the step's loss
        partials folded into the logged metrics. Returns those logs."""
        tv, ntv, ov, mv = self.state
        tv, ov = self._apply(tv, ov)
        logs = {}
        if self._fold is not None:
            mv, logs = self._fold(mv)
        self.state = (tv, ntv, ov, mv)
        self._publish()
        return logs

    def _publish(self):
        """Where Keras' `jax_state_sync` (callbacks, saving) finds the state.
        Set past Keras' attribute tracking: it would wrap the four lists on
        every physical batch (0.26 ms for a 200-variable model) to track
        nothing, since they hold arrays, not variables."""
        tv, ntv, ov, mv = self.state
        object.__setattr__(self.model, "_jax_state", {
            "trainable_variables": tv, "non_trainable_variables": ntv,
            "optimizer_variables": ov, "metrics_variables": mv})

    def assign(self, variable, value):
        """Sets an optimizer variable between steps, wherever the state lives now."""
        m = self.model
        if m._jax_state_synced or self.state is None:
            variable.assign(value)
            return
        tv, ntv, ov, mv = self.state
        ov = list(ov)
        pos = m.optimizer.variable_position(variable)
        ov[pos] = jax.device_put(jnp.asarray(value, ov[pos].dtype), ov[pos].sharding)
        self.state = (tv, ntv, ov, mv)

    def load(self, source, idx, mask, is_last):
        """Gathers and places one physical batch (the feeder thread calls this).

        Under data parallelism each addressable device's rows are gathered
        and copied by their own worker thread (numpy's gather and the
        host-to-device copy release the GIL), and the global arrays are
        assembled from the per-device pieces: on k GPUs the host work per
        physical batch is spread over k threads instead of one. Each process
        gathers only the rows of its own devices (all processes draw the
        same indices).
        """
        dist, shards = self._dist, self._shards
        if dist is None or shards == 1 or len(jax.local_devices()) == 1:
            bx, by, bsw = source.take(idx)
            return self.prepare((bx, by, bsw, mask, is_last))
        is_last = np.asarray(is_last)
        p = len(idx)
        rows = _shard_spec(dist, 1).backend_layout.addressable_devices_indices_map((p,))
        order = list(rows)

        def one(device):
            (sl,) = rows[device]
            bx, by, bsw = source.take(idx[sl])
            return jax.device_put((bx, by, bsw, mask[sl]), device)

        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(len(order), thread_name_prefix="keras_dpsgd-gather")
        pieces = list(self._pool.map(one, order))

        def assemble(*parts):
            shape = (p,) + tuple(parts[0].shape[1:])
            sharding = _shard_spec(dist, len(shape)).backend_layout
            return jax.make_array_from_single_device_arrays(shape, sharding, list(parts))

        return jax.tree_util.tree_map(assemble, *pieces) + (is_last,)

    def prepare(self, data):
        """Places one physical batch on the device(s), all but is_last, which
        stays on the host for `run`; runs on the feeder thread."""
        data, is_last = tuple(data[:4]), np.asarray(data[4])
        return self._place(data) + (is_last,)

    def _place(self, data):
        dist = self._dist
        if dist is None:
            return jax.device_put(data)
        from keras.src.backend.jax.trainer import _distribute_data

        if jax.process_count() > 1:
            # Every process draws the same global physical batch (same seed);
            # each feeds its own contiguous slice of rows.
            n, k = jax.process_count(), jax.process_index()
            data = jax.tree_util.tree_map(
                lambda a: a[k * (len(a) // n):(k + 1) * (len(a) // n)], data)
        with dist.scope():  # this may run on the feeder thread
            return _distribute_data(data)

    def sync(self):
        self.model.jax_state_sync()

    def end(self):
        self.model.jax_state_sync()
        self.model._jax_state = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
