"""`DPModel`: a keras.Model whose `fit` is DP-SGD without shortcuts.

The fit loop is written once for every backend. Per logical step it draws a
Poisson sample (I1), feeds it as fixed-shape masked physical batches to the
backend's compiled step (I2, I3, I4), whose optimizer adds noise once and
divides by the expected batch size (I5, I6); then it accounts the step (I7).
One Keras "batch" in callbacks and the progress bar is one *logical* step.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops
from keras.src.models.functional import Functional

from keras_dpsgd import accounting
from keras_dpsgd import backend as dp_backend
from keras_dpsgd import sampling
from keras_dpsgd import validation
from keras_dpsgd.optimizer import DPOptimizer
from keras_dpsgd.optimizer import display_float


class PrivacyBudgetExceededError(RuntimeError):
    """Raised when fit() is asked to train past its epsilon budget."""


_FIT_UNSUPPORTED = {
    "shuffle": "Poisson sampling replaces shuffling; there is nothing to shuffle.",
    "class_weight": "pass per-example weights as sample_weight instead.",
    "validation_split": "split the data yourself and pass validation_data.",
    "steps_per_execution": "not supported by DP fit.",
}


@keras.saving.register_keras_serializable(package="keras_dpsgd")
class DPModel(keras.Model):
    """A `keras.Model` trained with DP-SGD (Poisson sampling, per-example
    clipping, Gaussian noise, privacy accounting).

    Use it like `keras.Model`: functionally (`DPModel(inputs, outputs)`) or as
    a base class; or make an existing model private with `make_private`.
    `compile()` is Keras' own (the optimizer is wrapped in a `DPOptimizer`);
    `fit()` takes the DP arguments.

    Example:
        >>> inputs = keras.Input((20,))
        >>> outputs = keras.layers.Dense(2)(inputs)
        >>> model = DPModel(inputs, outputs)
        >>> model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> model.fit(x, y, batch_size=64, epochs=3, l2_norm_clip=1.0, target_epsilon=3.0)
        >>> model.privacy_spent()
        (2.99..., 1e-05)
    """

    def __new__(cls, *args, **kwargs):
        # Keras turns a Model subclass used functionally into a Functional
        # subclass by rewriting the class's __bases__ in place, which would
        # break every later subclassed use of DPModel. Route the functional
        # form to a dedicated class instead.
        if cls is DPModel and _functional_init_arguments(args, kwargs):
            return super().__new__(_FunctionalDPModel)
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        if _functional_init_arguments(args, kwargs):
            raise TypeError(
                f"{type(self).__name__} is a subclass of DPModel; build it by subclassing "
                "(layers in __init__, a call() method), or build a functional keras.Model "
                "and wrap it with keras_dpsgd.make_private(model).")
        super().__init__(*args, **kwargs)

    def compile(self, optimizer="rmsprop", *args, steps_per_execution=1, **kwargs):
        if steps_per_execution != 1:
            raise ValueError("DPModel runs one physical batch per step; steps_per_execution must be 1.")
        if not isinstance(optimizer, DPOptimizer):
            optimizer = DPOptimizer(keras.optimizers.get(optimizer))
        super().compile(optimizer, *args, **kwargs)
        # Real rows whose gradient was NaN/Inf: they contribute zero (like
        # padding) and are counted here, shown as "nonfinite" in the logs.
        # Like Keras' own loss tracker: not a tracked attribute (the model may be
        # built already), listed explicitly in `metrics`.
        object.__setattr__(self, "_nonfinite_tracker", keras.metrics.Sum(name="nonfinite"))

    @property
    def metrics(self):
        metrics = super().metrics
        # Not in evaluate(): it keeps Keras' return values.
        if not self.compiled or getattr(self, "_dp_evaluating", False):
            return metrics
        # The nonfinite tracker; on JAX also the per-device loss partials of
        # the logical step (backend/jax.py, StepPartials; no logged value).
        for extra in (getattr(self, "_nonfinite_tracker", None), self.__dict__.get("_dp_partials")):
            if extra is not None and all(m is not extra for m in metrics):
                metrics = metrics + [extra]
        return metrics

    def evaluate(self, *args, **kwargs):
        object.__setattr__(self, "_dp_evaluating", True)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            object.__setattr__(self, "_dp_evaluating", False)

    def get_compile_config(self):
        return super().get_compile_config()

    def compile_from_config(self, config):
        # Keras skips compile() for models that override it; ours only wraps the
        # optimizer (already a DPOptimizer in a saved config), so compile here.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def train_step(self, *args):
        return dp_backend.impl.train_step(self, *args)

    # ------------------------------------------------------------------ fit
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto",
            callbacks=None, validation_data=None, sample_weight=None,
            initial_epoch=0, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, validation_freq=1, *,
            l2_norm_clip=None, noise_multiplier=None, target_epsilon=None,
            target_delta=None, physical_batch_size=None, seed=None,
            accountant="rdp", clipping="auto", secure_mode=False, **kwargs):
        """Trains with DP-SGD. Returns a `keras.callbacks.History`.

        Args:
            x, y, sample_weight: training data with random access by index
                (arrays, memory-mapped arrays, dicts/tuples of arrays, or an
                object with `__len__` and `__getitem__(index_array)`).
                Datasets and generators are refused: they cannot be
                Poisson-sampled. Sample weights scale each example's loss
                before clipping.
            batch_size: the **expected** logical batch size q*N; each example
                is in a logical batch independently with probability q.
            epochs: number of epochs of `steps_per_epoch` logical steps.
            steps_per_epoch: logical steps per epoch. Default round(1/q), so
                an epoch sees each example once in expectation.
            l2_norm_clip: C > 0, the L2 norm each per-example gradient is
                clipped to (over all trainable weights).
            noise_multiplier: sigma >= 0; noise std is sigma*C on the sum.
                0 is allowed for debugging (epsilon is infinite; warns).
            target_epsilon: epsilon budget > 0 instead of noise_multiplier;
                sigma is calibrated so that epochs*steps_per_epoch logical
                steps spend it, and fit stops before exceeding it.
            target_delta: delta in (0, 1). Default 1/(10 N).
            physical_batch_size: rows per compiled step (memory knob; the
                result does not depend on it). Default: room for the batch
                size's upper tail, batch_size + 2 sd rounded up to a multiple
                of 8, at most 128 (e.g. 80 for an expected batch of 64).
            seed: int for reproducible sampling and noise (experiments only;
                not for production). Default None: OS entropy. Only the first
                fit of a model sets it; later fits continue the same streams.
            accountant: "rdp" (default) or "pld".
            secure_mode: draw every logical batch and every noise key from the
                operating system's CSPRNG (`os.urandom`) instead of seeded
                counter-based streams: nothing saved can recompute the batches
                or the noise; runs are not reproducible and `seed` is refused.
                Default False (OS-entropy seeds, reproducible given the
                checkpoint).
            clipping: how per-example gradients are clipped (same result,
                different cost): "vectorized" (per-example gradients by
                vmap), "ghost" (JAX only: ghost norms and book-keeping,
                keras_dpsgd.ghost) or "auto" (default: ghost on JAX when the
                model's weights are covered by ghost rules, else vectorized;
                the choice is logged once).
            callbacks, verbose, validation_data, validation_steps,
            validation_batch_size, validation_freq, initial_epoch: as in Keras.
        """
        for name in kwargs:
            if name in _FIT_UNSUPPORTED:
                raise ValueError(f"DPModel.fit does not take {name}: {_FIT_UNSUPPORTED[name]}")
            raise TypeError(f"DPModel.fit() got an unexpected keyword argument {name!r}.")
        self._assert_compile_called("fit")
        if not isinstance(self.optimizer, DPOptimizer):
            raise ValueError("DPModel needs a DPOptimizer; compile() wraps yours, so call compile() again.")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {accounting.ACCOUNTANTS}, got {accountant!r}.")
        if clipping not in ("auto", "vectorized", "ghost"):
            raise ValueError(f"clipping must be 'auto', 'vectorized' or 'ghost', got {clipping!r}.")

        if secure_mode and seed is not None:
            raise ValueError("secure_mode=True draws all randomness from the OS CSPRNG and refuses "
                             "a user seed; pass seed=None, or secure_mode=False for reproducible runs.")
        data = sampling.RandomAccessData(x, y, sample_weight)
        n = data.num_examples
        validation.check_dp_params(l2_norm_clip, noise_multiplier, target_epsilon, target_delta,
                                   physical_batch_size, batch_size, n)
        q = float(batch_size) / n
        if physical_batch_size is None:
            # Room for the Binomial's upper tail (mean + 2 sd), so most logical
            # steps fit one physical batch instead of a second, mostly padded one.
            tail = batch_size + 2.0 * math.sqrt(batch_size * (1.0 - q))
            physical_batch_size = min(int(8 * math.ceil(tail / 8)), 128)
        physical_batch_size = int(physical_batch_size)
        shards = dp_backend.num_data_shards()
        if physical_batch_size % shards:
            # Each device gets the same number of rows; the extra rows are padding (masked).
            physical_batch_size += shards - physical_batch_size % shards
        if steps_per_epoch is None:
            steps_per_epoch = max(1, int(round(1.0 / q)))
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch}.")
        steps_per_epoch = int(steps_per_epoch)
        delta = float(target_delta) if target_delta is not None else accounting.default_delta(n)
        planned_steps = max(0, int(epochs) - int(initial_epoch)) * steps_per_epoch

        # Build model, metrics and optimizer from one batch's shapes, without
        # drawing a sample (the sampler stream must not move).
        sample_batch = data.take(np.zeros((physical_batch_size,), np.int64))
        self._symbolic_build(data_batch=sample_batch)
        validation.check_layers(self)
        opt = self.optimizer
        if not opt.built:
            opt.build(self.trainable_variables)
        if opt.num_shards != shards:
            raise ValueError(
                f"The DP optimizer was built for {opt.num_shards} data-parallel shard(s), but the "
                f"current keras.distribution has {shards}. Set the distribution before building "
                "and compiling the model.")
        dp_backend.select_clipping(self, clipping, sample_batch)
        dp_backend.prepare_fit(self)

        sigma = self._configure_privacy(opt, q=q, batch_size=float(batch_size), clip=float(l2_norm_clip),
                                        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
                                        delta=delta, planned_steps=planned_steps, seed=seed,
                                        accountant=accountant)
        # Account with the stored float32 values, which configure() rounded in
        # the conservative direction (sigma and q up, delta and the target down).
        stored = opt.config_values()
        sigma, acct_q, acct_delta = stored["noise_multiplier"], stored["sampling_rate"], stored["target_delta"]
        shown_delta = display_float(acct_delta)

        def eps_after(steps, acct=accountant):
            return accounting.epsilon(acct_q, sigma, steps, acct_delta, acct)

        budget = None
        if target_epsilon is not None:
            budget = accounting.max_steps(min(float(target_epsilon), stored["target_epsilon"]),
                                          acct_delta, acct_q, sigma, accountant)
        self._dp_last_accountant = accountant
        if validation_data is not None:
            val_x, val_y, val_sw = keras.utils.unpack_x_y_sample_weight(validation_data)

        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = keras.callbacks.CallbackList(
                callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
                epochs=epochs, steps=steps_per_epoch, model=self)
        runner = dp_backend.impl.Runner(self)
        self.stop_training = False
        logs = {}
        training_logs = {}
        training_finished = False
        callbacks.on_train_begin()
        # Read the DP state only now: a callback (BackupAndRestore) may have
        # restored the step counter and seeds in on_train_begin (I7).
        cfg = opt.config_values()
        steps_taken = cfg["logical_steps"]
        if not math.isclose(cfg["sampling_rate"], q, rel_tol=1e-6) or not math.isclose(
                cfg["noise_multiplier"], sigma, rel_tol=1e-6):
            raise ValueError(
                f"The restored DP state (q = {cfg['sampling_rate']:.6g}, sigma = "
                f"{cfg['noise_multiplier']:.6g}) differs from this fit's (q = {q:.6g}, "
                f"sigma = {sigma:.6g}); resume with the arguments of the interrupted run.")
        if budget is not None and steps_taken >= budget and planned_steps > 0:
            raise PrivacyBudgetExceededError(
                f"The privacy budget is spent: {steps_taken} logical steps already give "
                f"epsilon = {eps_after(steps_taken):.4g} "
                f"(delta = {shown_delta:.3g}), and one more would exceed target_epsilon = "
                f"{target_epsilon}. Stop training, or start a new model with a larger budget.")
        if secure_mode:
            sampler = sampling.SecurePoissonSampler(n, q)
        else:
            sampler = sampling.PoissonSampler(n, q, cfg["sampler_seed_words"])
        initial_epoch = self._initial_epoch or initial_epoch
        # I1: one fresh Poisson draw per logical step, drawn and prepared ahead.
        feeder = sampling.BatchFeeder(sampler, data, physical_batch_size, steps_taken,
                                      prepare=getattr(runner, "prepare", None),
                                      load=getattr(runner, "load", None))
        try:
            for epoch in range(initial_epoch, epochs):
                self.reset_metrics()
                callbacks.on_epoch_begin(epoch)
                runner.begin_epoch()
                for step in range(steps_per_epoch):
                    if budget is not None and steps_taken >= budget:
                        self.stop_training = True
                        warnings.warn(
                            f"Stopping DP training: {steps_taken} logical steps spend "
                            f"epsilon = {eps_after(steps_taken):.4g}, "
                            f"and the next step would exceed target_epsilon = {target_epsilon} "
                            f"(delta = {shown_delta:.3g}).", stacklevel=2)
                        break
                    callbacks.on_train_batch_begin(step)
                    if secure_mode:  # a fresh noise key from the OS for this step
                        assign = getattr(runner, "assign", lambda var, value: var.assign(value))
                        assign(opt.noise_seed, sampling.new_seed_words(None)[:2].view(np.int32))
                    for batch in feeder.logical_batch(steps_taken):
                        logs = runner.run(batch)  # the last one also adds noise and updates (I2)
                    steps_taken += 1
                    step_logs = dict(logs)
                    if accountant == "rdp":
                        step_logs["epsilon"] = eps_after(steps_taken)
                    callbacks.on_train_batch_end(step, step_logs)
                    if self.stop_training:
                        break
                runner.sync()
                epoch_logs = dict(self._get_metrics_result_or_logs(logs))
                epoch_logs["epsilon"] = eps_after(steps_taken)
                epoch_logs["delta"] = shown_delta
                if validation_data is not None and self._should_eval(epoch, validation_freq):
                    val_logs = self.evaluate(
                        x=val_x, y=val_y, sample_weight=val_sw,
                        batch_size=validation_batch_size or physical_batch_size,
                        steps=validation_steps, callbacks=callbacks, return_dict=True)
                    epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
                callbacks.on_epoch_end(epoch, epoch_logs)
                training_logs = epoch_logs
                if self.stop_training:
                    break
            training_finished = True
        finally:
            feeder.close()
            runner.end()
            if planned_steps > 0:
                opt.finalize_variable_values(self.trainable_weights)
            if training_finished:
                callbacks.on_train_end(logs=training_logs)
        return self.history

    def _configure_privacy(self, opt, *, q, batch_size, clip, noise_multiplier, target_epsilon,
                           delta, planned_steps, seed, accountant):
        """Sets or checks the DP configuration; returns sigma."""
        cfg = opt.config_values() if opt.is_configured else None
        steps_taken = cfg["logical_steps"] if cfg else int(ops.convert_to_numpy(opt.iterations))
        if cfg is not None and steps_taken > 0:
            # Continuing: the accountant composes identical steps only.
            if not math.isclose(cfg["sampling_rate"], q, rel_tol=1e-6):
                raise ValueError(
                    f"This model already took {steps_taken} logical steps with sampling rate "
                    f"q = {cfg['sampling_rate']:.6g}; continuing with q = {q:.6g} (a different "
                    "batch_size or training set) is not supported by the accountant. Keep "
                    "batch_size and the data fixed, or train a new model.")
            sigma = cfg["noise_multiplier"]
            if noise_multiplier is not None and not math.isclose(sigma, noise_multiplier, rel_tol=1e-6):
                raise ValueError(
                    f"This model already took {steps_taken} logical steps with noise_multiplier "
                    f"{sigma:.6g}; continuing with {noise_multiplier} is not supported.")
            if target_epsilon is not None and not math.isclose(cfg["target_epsilon"], target_epsilon, rel_tol=1e-6):
                raise ValueError(
                    f"This model was trained under target_epsilon = {cfg['target_epsilon']:.6g}; "
                    f"a new target ({target_epsilon}) would need a different noise level for the "
                    "remaining steps, which is not supported. Keep the same target_epsilon.")
            if seed is not None:
                warnings.warn("seed is ignored: this model continues its sampling and noise streams.",
                              stacklevel=3)
            opt.configure(l2_norm_clip=clip, noise_multiplier=sigma, expected_batch_size=batch_size,
                          sampling_rate=q, target_delta=delta, target_epsilon=cfg["target_epsilon"] or None)
            return sigma
        if target_epsilon is not None:
            if planned_steps < 1:
                raise ValueError("target_epsilon needs epochs > initial_epoch to calibrate sigma.")
            sigma = accounting.calibrate_noise(float(target_epsilon), delta, q, planned_steps, accountant)
        else:
            sigma = float(noise_multiplier)
            if sigma == 0:
                warnings.warn(
                    "noise_multiplier=0: NO PRIVACY. Gradients are clipped but no noise is "
                    "added, so epsilon is infinite. Use this only for debugging.", stacklevel=3)
        sampler_words = dp_backend.agree_on_seed(sampling.new_seed_words(seed))
        noise_words = dp_backend.agree_on_seed(
            sampling.new_seed_words(None if seed is None else [int(seed), 1])[:2])
        opt.configure(l2_norm_clip=clip, noise_multiplier=sigma, expected_batch_size=batch_size,
                      sampling_rate=q, target_delta=delta, target_epsilon=target_epsilon,
                      sampler_seed_words=sampler_words, noise_seed_words=noise_words)
        return sigma

    # ------------------------------------------------------------ privacy
    def privacy_spent(self, delta=None, accountant=None):
        """(epsilon, delta) for the logical steps this model actually took.

        Args:
            delta: delta to report at. Default: the fit's target_delta.
            accountant: "rdp" or "pld". Default: the last fit's (or "rdp").
        """
        opt = self.optimizer
        if not isinstance(opt, DPOptimizer) or not opt.is_configured:
            return 0.0, delta
        cfg = opt.config_values()
        accountant = accountant or getattr(self, "_dp_last_accountant", "rdp")
        if delta is None:  # the stored delta is rounded down: epsilon is conservative
            delta, shown = cfg["target_delta"], display_float(cfg["target_delta"])
        else:
            delta = shown = float(delta)
        eps = accounting.epsilon(cfg["sampling_rate"], cfg["noise_multiplier"], cfg["logical_steps"],
                                 delta, accountant)
        return eps, shown


def _functional_init_arguments(args, kwargs):
    return (len(args) == 2 or (len(args) == 1 and "outputs" in kwargs)
            or ("inputs" in kwargs and "outputs" in kwargs))


@keras.saving.register_keras_serializable(package="keras_dpsgd")
class _FunctionalDPModel(DPModel, Functional):
    """`DPModel(inputs, outputs)`: a functional model with DP fit."""

    def __init__(self, inputs, outputs, name=None, **kwargs):
        # The class name would auto-name it "__functional_dp_model", which
        # TensorFlow refuses as a root name scope (leading underscore).
        if name is None:
            name = keras.src.utils.naming.auto_name("functional_dp_model")
        Functional.__init__(self, inputs, outputs, name=name, **kwargs)

    def __new__(cls, *args, **kwargs):
        return keras.Model.__new__(cls)


@keras.saving.register_keras_serializable(package="keras_dpsgd")
class _PrivateModel(DPModel):
    """A DPModel around an existing model: same layers, same weights."""

    def __init__(self, model, **kwargs):
        super().__init__(name=kwargs.pop("name", f"private_{model.name}"), **kwargs)
        self.model = model

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def build(self, input_shape):
        # The wrapped model builds itself on its first (symbolic) call.
        self.built = True

    def get_config(self):
        return {"model": keras.saving.serialize_keras_object(self.model), "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"], custom_objects=custom_objects)
        return cls(**config)


def make_private(model):
    """A DP-trainable model that shares the weights of `model`.

    Works for Sequential, functional and subclassed models (and keras-hub
    task models). Training the returned model trains `model`'s weights; call
    `compile()` on the returned model.

    Example:
        >>> base = keras.Sequential([keras.Input((20,)), keras.layers.Dense(2)])
        >>> private = make_private(base)
        >>> private.compile(optimizer="adam", loss="mse")
    """
    if isinstance(model, DPModel):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private expects a keras.Model, got {type(model).__name__}.")
    validation.check_layers(model)
    private = _PrivateModel(model)
    if model.built and getattr(model, "inputs", None):
        try:
            private.build(None)
        except Exception:  # pragma: no cover - building lazily on first fit is fine
            pass
    return private
