"""Poisson subsampling and masked physical batches (invariants I1, I2, I9).

A logical step t draws a fresh Poisson sample of the whole training set: each
example is in independently with probability q, so the size is
Binomial(N, q) and, given the size, the members are a uniform subset (I1).
The draw is split into fixed-shape physical batches with a mask; the last one is
padded and flagged, so the compiled train step never changes shape (I2).

The sampler is counter-based: the sample of logical step t is a pure function of
(seed, t). Its whole state is the 128-bit seed plus the number of logical steps
taken, both model state, so a saved and resumed run continues the same stream
(I7) and the draw of step t is never repeated or skipped.
"""

import math
import queue
import secrets
import threading
import numpy as np

from keras_dpsgd import validation


def new_seed_words(seed=None):
    """Four uint32 words (128 bits) of sampler seed.

    OS entropy (`secrets`) when `seed` is None (I10); with an int seed the
    stream is reproducible, which is for experiments, not for production.
    """
    if seed is None:
        return np.frombuffer(secrets.token_bytes(16), dtype=np.uint32).copy()
    entropy = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in entropy):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}.")
    return np.random.SeedSequence([int(s) for s in entropy]).generate_state(4, np.uint32)


class PoissonSampler:
    """Draws the members of each logical batch by Poisson subsampling.

    Args:
        num_examples: N, the number of training examples (>= 1).
        sampling_rate: q in (0, 1]; expected batch size is q * N.
        seed_words: four uint32 words (see `new_seed_words`).

    Example:
        >>> s = PoissonSampler(1000, 0.01, new_seed_words(0))
        >>> idx = s.sample(step=0)   # sorted int64 indices, size ~ Binomial(1000, 0.01)
    """

    def __init__(self, num_examples, sampling_rate, seed_words):
        validation.check_sampling(num_examples, sampling_rate)
        self.num_examples = int(num_examples)
        self.sampling_rate = float(sampling_rate)
        words = np.asarray(seed_words, dtype=np.uint32).reshape(4)
        self._key = words.view(np.uint64)  # Philox key: 2 x uint64 = 128 bits

    def _rng(self, step):
        # Counter-based stream: step t owns counter block t in the high word,
        # so streams of different steps never overlap.
        return np.random.Generator(
            np.random.Philox(key=self._key, counter=np.array([0, 0, 0, int(step)], dtype=np.uint64))
        )

    def sample(self, step):
        """Sorted indices of logical step `step` (I1). May be empty."""
        rng = self._rng(step)
        size = int(rng.binomial(self.num_examples, self.sampling_rate))
        if size == 0:
            return np.zeros((0,), dtype=np.int64)
        # Uniform subset of that size: Floyd / tail-shuffle inside numpy, O(size)
        # when size << N. Sorted for locality (memory-mapped data); the clipped
        # sum does not depend on order.
        idx = rng.choice(self.num_examples, size=size, replace=False, shuffle=False)
        return np.sort(idx.astype(np.int64))


class SecurePoissonSampler:
    """Poisson sampling from the operating system's CSPRNG (`secure_mode=True`).

    Inclusion is drawn by geometric skipping: the gaps between included
    indices are i.i.d. Geometric(q), which is exactly independent
    Bernoulli(q) per example, in O(expected batch size), with uniforms from
    `os.urandom`. Nothing is derived from a stored seed, so no saved state can
    recompute which examples were in a batch; the price is that a run is not
    reproducible.
    """

    def __init__(self, num_examples, sampling_rate):
        validation.check_sampling(num_examples, sampling_rate)
        self.num_examples = int(num_examples)
        self.sampling_rate = float(sampling_rate)

    def _uniforms(self, count):
        # 53 random bits per double in (0, 1].
        bits = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64) >> np.uint64(11)
        return (bits.astype(np.float64) + 1.0) / float(1 << 53)

    def sample(self, step=None):
        """Sorted indices of one logical step; `step` is ignored."""
        n, q = self.num_examples, self.sampling_rate
        if q >= 1.0:
            return np.arange(n, dtype=np.int64)
        log1mq = np.log1p(-q)
        out = []
        pos = -1
        while True:
            # Enough gaps for the rest of the set with high probability.
            expect = int((n - pos) * q + 6 * np.sqrt((n - pos) * q + 1) + 8)
            gaps = np.floor(np.log(self._uniforms(expect)) / log1mq).astype(np.int64) + 1
            idx = pos + np.cumsum(gaps)
            inside = idx[idx < n]
            out.append(inside)
            if len(inside) < len(idx):
                break
            pos = int(idx[-1])
        return np.concatenate(out).astype(np.int64)


def physical_batches(indices, physical_batch_size):
    """Split one logical batch into fixed-size (index, mask, is_last) triples.

    Always at least one batch: an empty logical batch gives one fully masked
    batch, so the step still adds noise and counts (I1: no resampling).
    Padded rows point at example 0 and are masked out.
    """
    p = int(physical_batch_size)
    n = max(1, math.ceil(len(indices) / p))
    for k in range(n):
        chunk = indices[k * p : (k + 1) * p]
        idx = np.zeros((p,), dtype=np.int64)
        idx[: len(chunk)] = chunk
        mask = np.zeros((p,), dtype=bool)
        mask[: len(chunk)] = True
        yield idx, mask, k == n - 1


class BatchFeeder:
    """Draws logical batches and prepares their physical batches ahead of the
    train step, on a background thread (gather rows, build mask and last flag,
    place on the device), so the accelerator does not wait for the host.

    Drawing ahead is safe: a sample that is drawn but never trained on reveals
    nothing. Each logical step is still exactly one draw, consumed whole (I2).

    Args:
        sampler: `PoissonSampler` or `SecurePoissonSampler`.
        data: `RandomAccessData`.
        physical_batch_size: rows per physical batch.
        first_step: logical step index of the first draw.
        prepare: optional function applied to each physical batch
            `(x, y, sample_weight, mask, is_last)` on the background thread
            (the backend's device placement).
        depth: physical batches buffered ahead (default 3).
        load: optional `(data, indices, mask, is_last) -> batch` that gathers
            and places one physical batch itself (replaces `data.take` then
            `prepare`; the JAX backend gathers each device's rows in
            parallel under data parallelism).
    """

    _DONE = object()

    def __init__(self, sampler, data, physical_batch_size, first_step, prepare=None, depth=3, load=None):
        self._sampler, self._data = sampler, data
        self._p = int(physical_batch_size)
        self._next_step = int(first_step)
        self._prepare = prepare or (lambda batch: batch)
        self._load = load or self._take_and_prepare
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(int(first_step),), daemon=True,
                                        name="keras_dpsgd-batch-feeder")
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, step):
        try:
            while not self._stop.is_set():
                indices = self._sampler.sample(step)
                for idx, mask, is_last in physical_batches(indices, self._p):
                    batch = self._load(self._data, idx, mask, np.full(mask.shape, is_last))
                    if not self._put((step, batch, is_last)):
                        return
                step += 1
        except BaseException as e:  # surfaced in the training thread
            self._put((None, e, True))

    def _take_and_prepare(self, data, idx, mask, is_last):
        bx, by, bsw = data.take(idx)
        return self._prepare((bx, by, bsw, mask, is_last))

    def logical_batch(self, step):
        """The prepared physical batches of logical step `step`, in order."""
        if step != self._next_step:
            raise RuntimeError(f"BatchFeeder: asked for logical step {step}, next is {self._next_step}.")
        self._next_step += 1
        while True:
            got_step, batch, is_last = self._queue.get()
            if got_step is None:
                raise batch
            if got_step != step:  # pragma: no cover - would be a feeder bug
                raise RuntimeError(f"BatchFeeder: got logical step {got_step}, expected {step}.")
            yield batch
            if is_last:
                return

    def close(self):
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class RandomAccessData:
    """Training inputs that can be indexed by an array of example indices (I9).

    Accepts numpy/JAX/TF/torch arrays, memory-mapped arrays, nested dicts /
    tuples / lists of them, and any object with `__len__` and
    `__getitem__(index_array)`. Refuses datasets and generators, whose order
    the pipeline fixes and which cannot be Poisson-sampled.
    """

    def __init__(self, x, y=None, sample_weight=None):
        for name, value in (("x", x), ("y", y), ("sample_weight", sample_weight)):
            validation.check_random_access(value, name)
        self.structure = (x, y, sample_weight)
        leaves = [*_leaves(x, "x"), *_leaves(y, "y"), *_leaves(sample_weight, "sample_weight")]
        if not leaves:
            raise ValueError("fit() needs training data: x is None.")
        lengths = {}
        for path, leaf in leaves:
            dtype = getattr(leaf, "dtype", None)
            if isinstance(dtype, np.dtype) and dtype.kind not in "biuf":
                raise ValueError(
                    f"{path} has dtype {dtype}; training data must be numeric (bool, int or float). "
                    "Encode strings or objects first (e.g. with a keras.layers.StringLookup outside the model).")
            if not hasattr(leaf, "__len__"):
                raise ValueError(f"{path} is a {type(leaf).__name__}, not an array with one row per example.")
            lengths[path] = len(leaf)
        if len(set(lengths.values())) != 1:
            detail = ", ".join(f"{k}: {v}" for k, v in lengths.items())
            raise ValueError(
                "All inputs must have the same number of examples (first "
                f"dimension); got {detail}."
            )
        self.num_examples = next(iter(lengths.values()))
        if self.num_examples < 1:
            raise ValueError("The training set is empty; DP-SGD needs N >= 1 examples.")

    def take(self, indices):
        """The examples at `indices`, as numpy arrays in the input structure."""
        return _map(lambda leaf: _gather(leaf, indices), self.structure)


def _gather(leaf, indices):
    if isinstance(leaf, np.ndarray):
        return leaf[indices]
    out = leaf[indices]
    if hasattr(out, "numpy") and not isinstance(out, np.ndarray):
        out = out.numpy() if not hasattr(out, "detach") else out.detach().cpu().numpy()
    return np.asarray(out)


def _leaves(structure, path="data"):
    if structure is None:
        return
    if isinstance(structure, dict):
        for k in structure:
            yield from _leaves(structure[k], f"{path}[{k!r}]")
    elif isinstance(structure, (list, tuple)):
        for i, v in enumerate(structure):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, structure


def _map(fn, structure):
    if structure is None:
        return None
    if isinstance(structure, dict):
        return {k: _map(fn, v) for k, v in structure.items()}
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):
        return type(structure)(*[_map(fn, v) for v in structure])
    if isinstance(structure, (list, tuple)):
        return type(structure)(_map(fn, v) for v in structure)
    return fn(structure)
