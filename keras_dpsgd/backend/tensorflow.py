"""TensorFlow backend: vectorized per-example gradients in one tf.function.

`train_step(model, data)` runs one physical batch `(x, y, sample_weight, mask,
is_last)` of fixed shape: per-example losses and gradients by
`tf.vectorized_map` (one forward and backward per example, O(B) work, unlike
`GradientTape.jacobian` of the batch loss, which is O(B^2) for dense layers),
clipping and masked summation, then the optimizer's `accumulate` or `apply`
(one noisy update per logical step, I2) under `tf.cond`. `Runner` wraps it in
one `tf.function` per fit, traced once for the fixed physical shape
(DESIGN.md section 3).
"""

import contextlib
import logging

import keras
import tensorflow as tf
from keras import tree

from keras_dpsgd import clipping
from keras_dpsgd.backend import common


def _seed(seed_words):
    return tf.cast(tf.convert_to_tensor(seed_words), tf.int32)


def gaussian_noise(seed_words, step, index, shape):
    """Standard normal float32 noise for (seed, logical step, variable index)."""
    seed = tf.random.experimental.stateless_fold_in(_seed(seed_words), tf.cast(step, tf.int64))
    seed = tf.random.experimental.stateless_fold_in(seed, int(index))
    return tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32)


class _ExpectedPforFallback(logging.Filter):
    # Per-example dropout seeds vary across the vectorized loop, and pfor has
    # no batched converter for stateless random ops with such seeds: it runs
    # those few ops in a while_loop (correct, a little slower). That is by
    # design here, so its warning is noise; other fallbacks still warn.
    def filter(self, record):
        message = record.getMessage()
        return not (message.startswith("Using a while_loop for converting StatelessRandom")
                    or message.startswith("Using a while_loop for converting RngReadAndSkip"))


@contextlib.contextmanager
def _quiet_expected_pfor_fallback():
    logger = tf.get_logger()
    quiet = _ExpectedPforFallback()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def per_example_grads(model, x, y, sample_weight):
    """Per-example losses (B,), predictions and gradients ((B, *w.shape) each).

    Random layers get a different seed per example: their SeedGenerator state
    is replaced, inside the vectorized function, by a per-example seed drawn
    from it, so examples do not share one dropout mask. Each seed state is
    then advanced once per physical batch.
    """
    trainable = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
    metrics_vars = [tf.convert_to_tensor(v.value) for v in model.metrics_variables]
    batch = tf.shape(tree.flatten(x)[0])[0]
    seed_pos = common.seed_state_positions(model)
    example_seeds = []
    for i in seed_pos:
        state = non_trainable[i]
        example_seeds.append(tf.random.stateless_uniform(
            tf.stack([batch, 2]), seed=tf.cast(tf.math.floormod(state, tf.int32.max - 1), tf.int32),
            minval=None, maxval=None, dtype=state.dtype))

    def one(args):
        xi, yi, swi, seeds = args["x"], args.get("y"), args.get("sw"), args["seeds"]

        ntv = list(non_trainable)
        for i, s in zip(seed_pos, seeds):
            ntv[i] = s
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            loss, y_pred = common.stateless_loss(model, trainable, ntv, metrics_vars, common.add_batch_axis(xi),
                                         common.add_batch_axis(yi), common.add_batch_axis(swi))
        grads = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, tree.map_structure(lambda a: a[0], y_pred), grads

    elems = {"x": x, "seeds": example_seeds}
    if y is not None:
        elems["y"] = y
    if sample_weight is not None:
        elems["sw"] = sample_weight
    with _quiet_expected_pfor_fallback():
        losses, y_pred, grads = tf.vectorized_map(one, elems, fallback_to_while_loop=True)
    for i in seed_pos:
        v = model.non_trainable_variables[i]
        v.assign(v.value + tf.constant([0, 1], dtype=v.dtype))
    return losses, y_pred, grads


def train_step(model, data):
    x, y, sample_weight, mask, is_last = data
    opt = model.optimizer
    losses, y_pred, grads = per_example_grads(model, x, y, sample_weight)
    sums, keep, num_nonfinite = clipping.clip_and_sum(grads, mask, opt.l2_norm_clip)

    def apply():
        opt.apply(sums, model.trainable_variables)
        return tf.constant(True)

    def accumulate():
        opt.accumulate(sums)
        return tf.constant(False)

    # I2: one noisy update on the last physical batch of the logical batch.
    tf.cond(tf.convert_to_tensor(is_last)[0], apply, accumulate)
    return update_metrics(model, losses, mask, x, y, y_pred, sample_weight, num_nonfinite)


def update_metrics(model, losses, mask, x, y, y_pred, sample_weight, num_nonfinite):
    """Loss and compiled metrics over real rows only (I4); the logged loss is
    the mean over real rows with a finite loss."""
    mask = tf.convert_to_tensor(mask)
    real = tf.cast(mask, tf.float32)
    losses = tf.cast(losses, tf.float32)
    finite = tf.logical_and(mask, tf.math.is_finite(losses))
    num_finite = tf.reduce_sum(tf.cast(finite, tf.float32))
    mean_loss = tf.reduce_sum(tf.where(finite, losses, 0.0)) / tf.maximum(num_finite, 1.0)
    if sample_weight is None:
        weights = real
    else:
        sw = tf.reshape(tf.cast(sample_weight, tf.float32), (tf.shape(real)[0], -1))[:, 0]
        weights = real * sw
    model._loss_tracker.update_state(mean_loss, sample_weight=num_finite)
    tracker = getattr(model, "_nonfinite_tracker", None)
    if tracker is not None:
        tracker.update_state(num_nonfinite)
    return model.compute_metrics(x, y, y_pred, weights)


def _onednn_enabled():
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMKLEnabled())
    except Exception:  # pragma: no cover - private API moved
        return True


def use_xla(model):
    """Whether the DP step is XLA-compiled.

    As Keras decides (`model.jit_compile`: XLA on GPU by default), and also on
    CPU when TensorFlow's oneDNN kernels are on (the x86 default): under
    `vectorized_map` a sequence model's matmuls become rank-4 broadcast batch
    matmuls, on which oneDNN's multithreaded BatchMatMul crashes the process
    (segmentation fault; seen with MultiHeadAttention and EinsumDense on TF
    2.21). XLA does not use those kernels. With `TF_ENABLE_ONEDNN_OPTS=0` the
    step follows `model.jit_compile` (no XLA on CPU: faster to start).
    """
    if getattr(model, "jit_compile", False):
        return True
    if not _onednn_enabled():
        return False
    from keras.src.trainers.trainer import model_supports_jit

    return bool(model_supports_jit(model))


class Runner:
    """Feeds physical batches to one tf.function, traced once for the fixed
    physical shape. The function is kept in `model.train_function` (which
    `compile()` resets), so later fits reuse the trace."""

    def __init__(self, model):
        self.model = model
        self._calls = 0
        cached = getattr(model, "train_function", None)
        if getattr(cached, "_keras_dpsgd_step", False):
            self.function, self.jit_compile = cached, cached._keras_dpsgd_jit
        else:
            self._make_function(use_xla(model))

    def _make_function(self, jit):
        model = self.model

        def step(data):
            return model.train_step(data)

        self.jit_compile = jit
        self.function = tf.function(step, jit_compile=jit, reduce_retracing=True)
        self.function._keras_dpsgd_step = True
        self.function._keras_dpsgd_jit = jit
        model.train_function = self.function

    def begin_epoch(self):
        pass

    def run(self, data):
        x, y, sample_weight, mask, is_last = data
        convert = lambda a: None if a is None else tree.map_structure(tf.convert_to_tensor, a)
        data = (convert(x), convert(y), convert(sample_weight),
                tf.convert_to_tensor(mask), tf.convert_to_tensor(is_last))
        first = self._calls == 0
        self._calls += 1
        try:
            return self.function(data)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            # A model XLA cannot compile (an op without an XLA kernel) fails
            # before the first step runs; run it without XLA instead.
            if not (first and self.jit_compile and _is_xla_compile_error(e)):
                raise
            logging.getLogger(__name__).warning(
                "keras_dpsgd: XLA cannot compile this model's DP step (%s); running it "
                "without XLA.", str(e).splitlines()[0][:200])
            self._make_function(False)
            return self.function(data)

    def sync(self):
        pass

    def end(self):
        pass


def _is_xla_compile_error(error):
    message = str(error)
    return ("XLA" in message or "compile" in message.lower()
            or "Detected unsupported operations" in message)
