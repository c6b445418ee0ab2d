"""Backend-specific pieces: the per-example gradient primitive, the compiled
step and noise generation. Everything else in keras_dpsgd uses `keras.ops`."""

import keras

_name = keras.backend.backend()
if _name == "jax":
    from keras_dpsgd.backend import jax as impl
elif _name == "tensorflow":
    from keras_dpsgd.backend import tensorflow as impl
elif _name == "torch":
    from keras_dpsgd.backend import torch as impl
else:  # pragma: no cover
    raise ImportError(
        f"keras_dpsgd supports the jax, tensorflow and torch backends; "
        f"KERAS_BACKEND is {_name!r}."
    )

gaussian_noise = impl.gaussian_noise


def _each_noise(seed_words, step, shapes):
    return [gaussian_noise(seed_words, step, i, shape) for i, shape in enumerate(shapes)]


# One logical step's noise for variables 0..n-1 (what the optimizer calls):
# element i equals gaussian_noise(seed_words, step, i, shapes[i]).
gaussian_noises = getattr(impl, "gaussian_noises", _each_noise)
# Data parallelism (JAX only for now); one shard and no-ops elsewhere.
num_data_shards = getattr(impl, "num_data_shards", lambda: 1)
shard_leading_axis = getattr(impl, "shard_leading_axis", lambda variable: None)
agree_on_seed = getattr(impl, "agree_on_seed", lambda words: words)
# Per-fit set-up of the backend's step state (JAX: per-device loss partials).
prepare_fit = getattr(impl, "prepare_fit", lambda model: None)


def _vectorized_only(model, clipping, sample_batch):
    if clipping == "ghost":
        raise ValueError(f"clipping='ghost' needs the JAX backend (KERAS_BACKEND is {_name!r}); "
                         "use 'auto' or 'vectorized'.")
    object.__setattr__(model, "_dp_clipping", "vectorized")


# How per-example gradients are clipped: ghost norms where the backend has them.
select_clipping = getattr(impl, "select_clipping", _vectorized_only)
