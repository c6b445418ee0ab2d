"""torch backend: per-example gradients by `torch.func.vmap(torch.func.grad)`.

`train_step(model, data)` runs one physical batch `(x, y, sample_weight, mask,
is_last)` eagerly: per-example losses and gradients through
`model.stateless_call` under `vmap(grad)`, clipping and masked summation, then
the optimizer's `accumulate` or `apply` (one noisy update per logical step,
I2). `Runner` calls it once per physical batch.
"""

import contextlib
import hashlib

import keras
import numpy as np
import torch
from keras import tree
from keras.src.backend.torch.core import get_device

from keras_dpsgd import clipping
from keras_dpsgd.backend import common


def _as_int(value):
    return int(np.asarray(keras.ops.convert_to_numpy(value)).reshape(()))


def gaussian_noise(seed_words, step, index, shape):
    """Standard normal float32 noise for (seed, logical step, variable index).

    A fresh `torch.Generator` seeded from a hash of the three values, so the
    noise is a pure function of them (not of torch's global RNG).
    """
    words = np.asarray(keras.ops.convert_to_numpy(seed_words)).astype(np.int64).reshape(-1)
    text = ",".join(str(int(w) & 0xFFFFFFFF) for w in words)
    text = f"{text};{_as_int(step)};{int(index)}"
    digest = hashlib.sha256(text.encode()).digest()
    generator = torch.Generator(device=get_device())
    generator.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=get_device())


@contextlib.contextmanager
def _vmappable_keras_ops():
    """Keras' torch conv converts its operands to the channels_last memory
    format, a layout hint that vmap cannot batch (`Tensor.contiguous
    (memory_format=...)` is not implemented under vmap). The values are the
    same either way, so the hint is switched off while the step is vmapped."""
    from keras.src.backend.torch import nn as keras_torch_nn

    original = getattr(keras_torch_nn, "_maybe_convert_to_channels_last", None)
    if original is None:
        yield
        return
    keras_torch_nn._maybe_convert_to_channels_last = lambda tensor: tensor
    try:
        yield
    finally:
        keras_torch_nn._maybe_convert_to_channels_last = original


def per_example_grads(model, x, y, sample_weight):
    """Per-example losses (B,), predictions and gradients ((B, *w.shape) each).

    `randomness="different"` gives every example its own dropout mask (from
    torch's global RNG for unseeded layers, or from the layer's seeded
    generator, which vmap then draws independently per example); the seed
    states are advanced once per physical batch.
    """
    trainable = [v.value.detach() for v in model.trainable_variables]
    non_trainable = [v.value.detach() for v in model.non_trainable_variables]
    metrics_vars = [v.value.detach() for v in model.metrics_variables]

    def one(tv, xi, yi, swi):
        loss, y_pred = common.stateless_loss(model, tv, non_trainable, metrics_vars, common.add_batch_axis(xi),
                             common.add_batch_axis(yi), common.add_batch_axis(swi))
        return loss, (loss.detach(), tree.map_structure(lambda a: a[0].detach(), y_pred))

    in_dims = (None, 0, None if y is None else 0, None if sample_weight is None else 0)
    grad_fn = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=in_dims,
                              randomness="different")
    with _vmappable_keras_ops():
        grads, (losses, y_pred) = grad_fn(trainable, x, y, sample_weight)
    with torch.no_grad():
        for i in common.seed_state_positions(model):
            v = model.non_trainable_variables[i]
            v.assign(v.value + torch.tensor([0, 1], dtype=v.value.dtype, device=v.value.device))
    return losses, y_pred, grads


def _to_tensor(a):
    return None if a is None else tree.map_structure(keras.ops.convert_to_tensor, a)


def train_step(model, data):
    x, y, sample_weight, mask, is_last = data
    x, y, sample_weight = _to_tensor(x), _to_tensor(y), _to_tensor(sample_weight)
    mask = keras.ops.convert_to_tensor(mask, "bool")
    opt = model.optimizer
    losses, y_pred, grads = per_example_grads(model, x, y, sample_weight)
    with torch.no_grad():
        sums, keep, num_nonfinite = clipping.clip_and_sum(grads, mask, opt.l2_norm_clip)
        # I2: one noisy update on the last physical batch of the logical batch.
        if bool(np.asarray(keras.ops.convert_to_numpy(is_last)).reshape(-1)[0]):
            opt.apply(sums, model.trainable_variables)
        else:
            opt.accumulate(sums)
        return update_metrics(model, losses, mask, x, y, y_pred, sample_weight, num_nonfinite)


def update_metrics(model, losses, mask, x, y, y_pred, sample_weight, num_nonfinite):
    """Loss and compiled metrics over real rows only (I4); the logged loss is
    the mean over real rows with a finite loss."""
    real = mask.to(torch.float32)
    losses = losses.to(torch.float32)
    finite = mask & torch.isfinite(losses)
    num_finite = torch.sum(finite.to(torch.float32))
    mean_loss = torch.sum(torch.where(finite, losses, torch.zeros_like(losses))) / torch.clamp(num_finite, min=1.0)
    if sample_weight is None:
        weights = real
    else:
        weights = real * sample_weight.to(torch.float32).reshape(real.shape[0], -1)[:, 0]
    model._loss_tracker.update_state(mean_loss, sample_weight=num_finite)
    tracker = getattr(model, "_nonfinite_tracker", None)
    if tracker is not None:
        tracker.update_state(num_nonfinite)
    return model.compute_metrics(x, y, y_pred, weights)


class Runner:
    """Feeds physical batches to the eager step."""

    def __init__(self, model):
        self.model = model

    def begin_epoch(self):
        pass

    def run(self, data):
        return self.model.train_step(data)

    def sync(self):
        pass

    def end(self):
        pass
