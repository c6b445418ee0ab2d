"""Refuse what would silently break the privacy guarantee (I8, I9, parameters).

Every error says what is wrong and what to do instead.
"""

import math
import types

import numpy as np


def check_sampling(num_examples, sampling_rate):
    if int(num_examples) < 1:
        raise ValueError("The training set is empty; DP-SGD needs N >= 1 examples.")
    if not (0.0 < sampling_rate <= 1.0):
        raise ValueError(
            f"The sampling rate q = batch_size / N must be in (0, 1]; got "
            f"{sampling_rate} (N = {num_examples}). Pass a batch_size between 1 "
            "and the number of training examples."
        )


def check_dp_params(l2_norm_clip, noise_multiplier, target_epsilon, target_delta,
                    physical_batch_size, batch_size, num_examples):
    if batch_size is None:
        raise ValueError(
            "fit() needs batch_size: the expected logical batch size q*N of "
            "Poisson sampling (each example is in a batch with probability "
            "batch_size / N)."
        )
    if isinstance(batch_size, bool) or not float(batch_size) > 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}.")
    if float(batch_size) > num_examples:
        raise ValueError(
            f"batch_size ({batch_size}) is larger than the number of training "
            f"examples ({num_examples}); the sampling rate q = batch_size / N "
            "must be <= 1."
        )
    if l2_norm_clip is None:
        raise ValueError(
            "fit() needs l2_norm_clip (C > 0): every per-example gradient is "
            "clipped to this L2 norm before summation."
        )
    if not (float(l2_norm_clip) > 0 and math.isfinite(float(l2_norm_clip))):
        raise ValueError(f"l2_norm_clip must be finite and > 0, got {l2_norm_clip}.")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "Pass exactly one of noise_multiplier (sigma) or target_epsilon "
            "(then sigma is calibrated for epochs * steps_per_epoch logical "
            f"steps); got noise_multiplier={noise_multiplier}, "
            f"target_epsilon={target_epsilon}."
        )
    if noise_multiplier is not None and not (
        float(noise_multiplier) >= 0 and math.isfinite(float(noise_multiplier))
    ):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}.")
    if target_epsilon is not None and not (
        float(target_epsilon) > 0 and math.isfinite(float(target_epsilon))
    ):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}.")
    if target_delta is not None and not (0.0 < float(target_delta) < 1.0):
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}.")
    if physical_batch_size is not None and (
        isinstance(physical_batch_size, bool)
        or int(physical_batch_size) != physical_batch_size
        or int(physical_batch_size) < 1
    ):
        raise ValueError(
            f"physical_batch_size must be an integer >= 1, got {physical_batch_size}."
        )


def check_random_access(value, name):
    """I9: only inputs that can be indexed by an array of example indices."""
    if value is None or isinstance(value, np.ndarray):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_random_access(v, f"{name}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_random_access(v, f"{name}[{i}]")
        return
    why = (
        "DP-SGD's privacy guarantee needs Poisson sampling, which draws every "
        "example independently with probability q at every step; that needs "
        "random access by index. Pass numpy arrays (np.load(..., "
        "mmap_mode='r') for data larger than memory), a dict/tuple of arrays, "
        "or an object with __len__ and __getitem__(index_array)."
    )
    module = type(value).__module__ or ""
    cls = type(value).__name__
    if isinstance(value, (types.GeneratorType, map, filter, zip)) or (
        hasattr(value, "__next__") and not hasattr(value, "__getitem__")
    ):
        raise ValueError(f"{name} is a generator/iterator ({cls}), which cannot be Poisson-sampled. {why}")
    if module.startswith("tensorflow") and "Dataset" in cls:
        raise ValueError(f"{name} is a tf.data.Dataset, which cannot be Poisson-sampled. {why}")
    if module.startswith("torch.utils.data"):
        raise ValueError(f"{name} is a torch {cls}, which fixes its own batching. {why}")
    if _is_pydataset(value):
        raise ValueError(
            f"{name} is a keras.utils.PyDataset, which yields whole batches in "
            f"its own order and cannot be Poisson-sampled. {why}"
        )
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return  # array-like (jax/tf/torch tensor, memmap, custom random-access source)
    raise ValueError(f"{name} of type {cls} cannot be indexed by example. {why}")


def _is_pydataset(value):
    try:
        import keras

        return isinstance(value, keras.utils.PyDataset)
    except Exception:  # pragma: no cover
        return False


# Layers whose output for one example depends on other examples in the batch.
_MIXING_LAYERS = {
    "BatchNormalization": "keras.layers.GroupNormalization or keras.layers.LayerNormalization",
    "SyncBatchNormalization": "keras.layers.GroupNormalization or keras.layers.LayerNormalization",
}


def check_layers(model):
    """I8: refuse layers that mix examples, naming the layer and the fix."""
    for layer in _all_layers(model):
        for cls in type(layer).__mro__:
            fix = _MIXING_LAYERS.get(cls.__name__)
            if fix is not None and cls.__module__.startswith("keras"):
                raise ValueError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) mixes examples: "
                    "its output for one example depends on the other examples of "
                    "the batch, so per-example gradients (and DP-SGD's "
                    f"guarantee) do not exist. Replace it with {fix}."
                )


def _all_layers(model):
    seen = set()
    stack = [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        sub = getattr(layer, "_flatten_layers", None)
        if sub is not None:
            stack.extend(l for l in sub(include_self=False, recursive=True))
