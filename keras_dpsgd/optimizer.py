"""The noise-adding optimizer (invariants I2, I5, I6, I7).

`DPOptimizer` wraps any Keras optimizer. The train step hands it, for every
physical batch, the *sum* of clipped, masked per-example gradients:

- `accumulate` (all but the last physical batch of a logical step) adds the sum
  to float32 accumulators: no noise, no update;
- `apply` (the last physical batch) adds the accumulators, adds Gaussian noise
  N(0, sigma^2 C^2) once (I5), divides by the *expected* batch size q*N, never
  the actual size (I6), hands the result to the inner optimizer (one update,
  I2) and zeroes the accumulators.

`iterations` is the inner optimizer's counter, so it counts logical steps. The
noise of step t is a pure function of (noise seed, t, variable index): the seed
is an optimizer *variable*, so it is traced as state, not baked in as a
constant (the silent "same noise every step" pitfall on JAX), and it is saved
and restored with the optimizer (I7), together with the sampler seed and the
DP configuration (C, sigma, q*N, q, delta).
"""

import keras
import numpy as np
from keras import ops

from keras_dpsgd import backend as dp_backend

_CONFIG_VARIABLES = ("l2_norm_clip", "noise_multiplier", "expected_batch_size",
                     "sampling_rate", "target_delta", "target_epsilon")


@keras.saving.register_keras_serializable(package="keras_dpsgd")
class DPOptimizer(keras.optimizers.Optimizer):
    """Adds DP-SGD noise once per logical step, then applies `inner_optimizer`.

    You rarely build this yourself: `DPModel.compile(optimizer=...)` wraps the
    optimizer you give, and `DPModel.fit(...)` sets the DP configuration.

    Args:
        inner_optimizer: any `keras.optimizers.Optimizer` (SGD, Adam, AdamW,
            with a learning-rate schedule or not), or its config / name.
        name: optional name.
    """

    def __init__(self, inner_optimizer, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"DPOptimizer does not take {sorted(kwargs)}; set them on the inner optimizer."
            )
        inner_optimizer = keras.optimizers.get(inner_optimizer)
        if isinstance(inner_optimizer, DPOptimizer):
            raise ValueError("The inner optimizer is already a DPOptimizer.")
        if getattr(inner_optimizer, "gradient_accumulation_steps", None):
            raise ValueError(
                "gradient_accumulation_steps on the inner optimizer is not "
                "supported: DP-SGD already accumulates the physical batches of a "
                "logical batch. Raise fit(batch_size=...) for larger logical "
                "batches and set physical_batch_size for memory."
            )
        super().__init__(learning_rate=0.0, name=name or "dp_optimizer")
        self.inner_optimizer = inner_optimizer

    @keras.src.utils.tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        # Accumulators carry a leading axis of one partial sum per data shard
        # (device), sharded over the data axis: accumulating is local to each
        # device and gradients cross devices once per logical step, in apply.
        self.num_shards = dp_backend.num_data_shards()
        self._accumulators = []
        for i, v in enumerate(var_list):
            acc = self.add_variable(shape=(self.num_shards,) + tuple(v.shape), dtype="float32",
                                    initializer="zeros", aggregation="none", name=f"dp_accumulator_{i}")
            dp_backend.shard_leading_axis(acc)
            self._accumulators.append(acc)
        for name in _CONFIG_VARIABLES:
            setattr(self, name, self.add_variable(
                shape=(), dtype="float32", initializer="zeros", aggregation="none", name=name))
        # Seeds are stored as int32 bit patterns of uint32 words (portable dtype).
        self.noise_seed = self.add_variable(
            shape=(2,), dtype="int32", initializer="zeros", aggregation="none", name="noise_seed")
        self.sampler_seed = self.add_variable(
            shape=(4,), dtype="int32", initializer="zeros", aggregation="none", name="sampler_seed")
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        deferred = getattr(self, "_deferred_state", None)
        if deferred is not None:
            self._deferred_state = None
            self.load_own_variables(deferred)

    def load_own_variables(self, store):
        """Restores the DP state; never drops it silently (I7).

        Keras skips (with a warning) optimizer state whose variable count does
        not match, e.g. when weights are loaded before the optimizer is built:
        that would restart the step counter and the accounting at zero. An
        unbuilt DPOptimizer keeps the state and restores it when built.
        Accumulators are zero at every logical-step boundary (where saves
        happen), so they may be restored onto a different number of devices.
        """
        if not self.built:
            self._deferred_state = {k: np.array(store[k]) for k in store.keys()}
            return
        if len(store.keys()) != len(self.variables):
            raise ValueError(
                f"Cannot restore the DP optimizer: the checkpoint has {len(store.keys())} "
                f"optimizer variables, this optimizer has {len(self.variables)}. The model or "
                "the inner optimizer differs from the one saved.")
        accs = {id(a) for a in self._accumulators}
        for i, variable in enumerate(self.variables):
            value = np.asarray(store[str(i)])
            if id(variable) in accs and tuple(value.shape) != tuple(variable.shape):
                if np.any(value):
                    raise ValueError("Cannot restore a partially accumulated logical step "
                                     "onto a different number of devices.")
                value = np.zeros(variable.shape, "float32")
            variable.assign(value)
    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def iterations(self):
        """Number of logical steps taken (noisy updates applied)."""
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if hasattr(self, "inner_optimizer"):
            self.inner_optimizer.learning_rate = learning_rate

    def _get_current_learning_rate(self):
        return self.inner_optimizer._get_current_learning_rate()

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def scale_loss(self, loss):
        return loss

    # --- configuration (host side) ---------------------------------------
    @property
    def is_configured(self):
        return self.built and float(ops.convert_to_numpy(self.expected_batch_size)) > 0

    def configure(self, *, l2_norm_clip, noise_multiplier, expected_batch_size,
                  sampling_rate, target_delta, target_epsilon=None,
                  sampler_seed_words=None, noise_seed_words=None):
        """Sets the DP configuration (variables, so saved with the model)."""
        # float32 storage, rounded in the direction that keeps the accounting
        # conservative: sigma down would mean less noise than calibrated.
        self.l2_norm_clip.assign(float(l2_norm_clip))
        self.noise_multiplier.assign(_f32(noise_multiplier, up=True))
        self.expected_batch_size.assign(float(expected_batch_size))
        self.sampling_rate.assign(_f32(sampling_rate, up=True))
        self.target_delta.assign(_f32(target_delta, up=False))
        self.target_epsilon.assign(_f32(target_epsilon or 0.0, up=False))
        if sampler_seed_words is not None:
            self.sampler_seed.assign(np.asarray(sampler_seed_words, np.uint32).view(np.int32))
        if noise_seed_words is not None:
            self.noise_seed.assign(np.asarray(noise_seed_words, np.uint32).view(np.int32))

    def config_values(self):
        """The DP configuration: the exact stored float32 values (what the
        accountant must use), numpy seed words and the logical step count."""
        out = {n: float(np.float32(ops.convert_to_numpy(getattr(self, n))))
               for n in _CONFIG_VARIABLES}
        out["sampler_seed_words"] = np.asarray(
            ops.convert_to_numpy(self.sampler_seed), np.int32).view(np.uint32)
        out["logical_steps"] = int(ops.convert_to_numpy(self.iterations))
        return out

    # --- the DP pieces (I5, I6), written once in keras.ops ---------------------
    def _partial(self, g, acc):
        """A clipped sum as per-shard partial sums (D, ...) like `acc`."""
        g = ops.cast(g, "float32")
        if len(g.shape) == len(acc.shape) - 1:
            g = ops.expand_dims(g, 0) if self.num_shards == 1 else None
        if g is None:
            raise ValueError("Sums passed to a sharded DPOptimizer need a leading shard axis.")
        return g

    def _noisy_average(self, grads):
        step = self.iterations
        std = ops.cast(self.noise_multiplier * self.l2_norm_clip, "float32")
        # One cross-device reduction per logical step, for all weights at once:
        # flatten, concatenate, sum the shard axis, split back.
        if grads is None:  # everything is in the accumulators already (JAX)
            grads = [None] * len(self._accumulators)
        flat = [ops.reshape(acc if g is None else acc + self._partial(g, acc), (self.num_shards, -1))
                for acc, g in zip(self._accumulators, grads)]
        total = ops.sum(ops.concatenate(flat, axis=1), axis=0)
        shapes = [tuple(acc.shape[1:]) for acc in self._accumulators]
        # I5: noise once, after the reduction, from the replicated seed state;
        # variable i's noise is gaussian_noise(seed, step, i, shape).
        noises = dp_backend.gaussian_noises(self.noise_seed, step, shapes)
        out = []
        offset = 0
        for shape, noise in zip(shapes, noises):
            size = int(np.prod(shape, dtype=np.int64))
            summed = ops.reshape(total[offset:offset + size], shape)
            offset += size
            out.append((summed + std * noise) / self.expected_batch_size)  # I6
        return out

    def _cast_like_variables(self, grads, trainable_variables):
        return [ops.cast(g, v.dtype) for g, v in zip(grads, trainable_variables)]

    # --- stateful path (TensorFlow, torch) --------------------------------------
    def accumulate(self, grads):
        """Adds one physical batch's clipped sum; no noise, no update."""
        for acc, g in zip(self._accumulators, grads):
            acc.assign(acc + self._partial(g, acc))

    def apply(self, grads, trainable_variables=None):
        """Last physical batch of a logical step: noise once, ÷ qN, update."""
        tvs = trainable_variables or self._trainable_variables
        noisy = self._noisy_average(grads)
        for acc in self._accumulators:
            acc.assign(ops.zeros_like(acc.value))
        self.inner_optimizer.apply(self._cast_like_variables(noisy, tvs), tvs)

    # --- stateless path (JAX) ---------------------------------------------------
    def _own_mapping(self, optimizer_variables):
        return list(zip(self.variables, optimizer_variables))

    def stateless_accumulate(self, optimizer_variables, grads):
        n_own = len(self._variables)
        with keras.StatelessScope(state_mapping=self._own_mapping(optimizer_variables)) as scope:
            self.accumulate(grads)
        own = [_current(scope, v, val) for v, val in zip(self._variables, optimizer_variables[:n_own])]
        return own + list(optimizer_variables[n_own:])

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """Noise once, ÷ qN, inner update, accumulators reset; `grads` (the last
        physical batch's sums) may be None when they are accumulated already."""
        n_own = len(self._variables)
        with keras.StatelessScope(state_mapping=self._own_mapping(optimizer_variables)) as scope:
            noisy = self._noisy_average(grads)
            for acc in self._accumulators:
                acc.assign(ops.zeros_like(acc.value))
        own = [_current(scope, v, val) for v, val in zip(self._variables, optimizer_variables[:n_own])]
        new_tv, new_inner = self.inner_optimizer.stateless_apply(
            list(optimizer_variables[n_own:]),
            self._cast_like_variables(noisy, trainable_variables),
            trainable_variables,
        )
        return new_tv, own + list(new_inner)

    def variable_position(self, variable):
        """Index of one of this optimizer's variables in `self.variables`."""
        for i, v in enumerate(self.variables):
            if v is variable:
                return i
        raise KeyError(variable.path)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["inner_optimizer"] = keras.saving.deserialize_keras_object(
            config["inner_optimizer"], custom_objects=custom_objects)
        return cls(**config)


def _f32(value, up):
    """`value` as the nearest float32 at or above (`up`) / below it."""
    f = np.float32(value)
    if up and float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    elif not up and float(f) > value:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def display_float(value):
    """The shortest decimal that rounds to the same float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _current(scope, variable, default):
    value = scope.get_current_value(variable)
    return default if value is None else value
