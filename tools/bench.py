#!/usr/bin/env python
"""Throughput and peak memory of DP-SGD implementations on one model.

One command times, on the same model, input shape, physical batch and
precision, the training step of:

  keras              Keras 3 on JAX, not private (the jitted stateless step
                     from make_train_function, called on fixed device data)
  keras_dpsgd        keras-dpsgd: the physical DP step (vectorized per-example
                     clipping), called directly with mask all True and
                     is_last True; the same process also times DPModel.fit
                     with Poisson sampling (expected logical batch = physical
                     batch) and reports it as keras_dpsgd_fit
  jax_privacy        jax-privacy's keras_api.make_private, Poisson sampling in
                     fit (it pads each draw to a multiple of 32)
  torch              PyTorch, not private
  opacus_hooks       Opacus per-sample gradients by hooks
  opacus_ghost       Opacus ghost clipping
  opacus_hooks_ootb  the same two on the model out of the box (ViT only: see
  opacus_ghost_ootb  below)

Step variants report batch / median step time over --steps steps after
--warmup steps, each step device-synchronized. Fit variants (keras_dpsgd_fit,
jax_privacy) report real examples / wall time over the timed logical steps,
leaving out steps during which the train step compiled (counted separately).
Peak device memory: JAX memory_stats()['peak_bytes_in_use'], PyTorch
torch.cuda.max_memory_allocated(). Each variant runs in its own subprocess (JAX
with XLA_PYTHON_CLIENT_PREALLOCATE=false), so the frameworks never share GPU
memory; one variant failing is reported in the table, not fatal.

timm's ViT keeps cls_token and pos_embed on the root module, so Opacus 1.6
falls back to functorch over the whole model. The opacus_* variants move them
into a leaf module with an exact grad sampler and register timm's LayerNorm
subclass with Opacus' LayerNorm sampler; *_ootb leave the model as timm
builds it. The PyTorch ResNet uses out-of-place adds and ReLUs in every torch
variant (Opacus hooks need them), so all torch variants train the same model.

--poisson instead measures keras-dpsgd at a large logical batch (default
expected 32492 examples, physical batches of 64): wall time and real
examples/s per logical step, and how many times the train step was lowered
and compiled over the logical steps (jax.monitoring events).

Examples:
  python tools/bench.py --models vit_b16 --batch 64 --precision tf32 --steps 20
  python tools/bench.py --tiny --only keras,keras_dpsgd --steps 3
  python tools/bench.py --poisson --models vit_b16 --poisson-steps 3
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ["keras", "keras_dpsgd", "jax_privacy", "torch", "opacus_hooks", "opacus_ghost",
            "opacus_hooks_ootb", "opacus_ghost_ootb"]
JAX_VARIANTS = {"keras", "keras_dpsgd", "jax_privacy", "keras_dpsgd_poisson"}
LABELS = {
    "keras": "Keras 3 / JAX, not private (jitted step)",
    "keras_dpsgd": "keras-dpsgd, physical DP step",
    "keras_dpsgd_fit": "keras-dpsgd, DPModel.fit (Poisson, E[B]=batch)",
    "keras_dpsgd_accumulate": "keras-dpsgd, physical DP step that only accumulates (not last)",
    "jax_privacy": "jax-privacy keras_api (Poisson in fit)",
    "torch": "PyTorch, not private",
    "opacus_hooks": "Opacus hooks (ViT fixed)",
    "opacus_ghost": "Opacus ghost clipping (ViT fixed)",
    "opacus_hooks_ootb": "Opacus hooks, timm ViT out of the box",
    "opacus_ghost_ootb": "Opacus ghost, timm ViT out of the box",
    "keras_dpsgd_poisson": "keras-dpsgd, large Poisson logical batch",
}
MODELS = ["vit_b16", "resnet18_gn", "bert_base"]
GIB = 1024 ** 3


# ----------------------------------------------------------------- model specs
def model_spec(name, tiny):
    if name == "vit_b16":
        if tiny:
            return dict(kind="image", image=32, channels=3, patch=8, dim=64, depth=2, heads=2,
                        mlp=128, classes=10)
        return dict(kind="image", image=224, channels=3, patch=16, dim=768, depth=12, heads=12,
                    mlp=3072, classes=10)
    if name == "resnet18_gn":
        if tiny:
            return dict(kind="image", image=16, channels=3, widths=(8, 16, 32, 64), groups=4,
                        classes=10)
        return dict(kind="image", image=32, channels=3, widths=(64, 128, 256, 512), groups=32,
                    classes=10)
    if name == "bert_base":
        if tiny:
            return dict(kind="text", vocab=500, seq=16, max_pos=32, dim=64, depth=2, heads=2,
                        mlp=128, classes=2)
        return dict(kind="text", vocab=30522, seq=256, max_pos=512, dim=768, depth=12, heads=12,
                    mlp=3072, classes=2)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def make_data(spec, n, layout, seed=0):
    """Random inputs and labels as numpy (images NHWC for Keras, NCHW for torch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if spec["kind"] == "image":
        s, c = spec["image"], spec["channels"]
        shape = (n, s, s, c) if layout == "nhwc" else (n, c, s, s)
        x = rng.standard_normal(shape, dtype=np.float32)
    else:
        x = rng.integers(0, spec["vocab"], size=(n, spec["seq"]), dtype=np.int32)
    y = rng.integers(0, spec["classes"], size=(n,), dtype=np.int32)
    return x, y


class SyntheticRows:
    """Random-access rows for a large N without N rows of memory: row i is
    base[i % len(base)]. Indexing by an index array returns a numpy array."""

    def __init__(self, n, base):
        self.n = int(n)
        self.base = base

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        import numpy as np

        index = np.asarray(index)
        return self.base[index % len(self.base)]

    @property
    def shape(self):
        return (self.n,) + tuple(self.base.shape[1:])


# ------------------------------------------------------------- keras models
def build_keras_model(name, spec):
    import keras
    from keras import layers, ops

    out_dtype = "float32"  # logits in float32 under mixed precision

    if name == "vit_b16":
        num_patches = (spec["image"] // spec["patch"]) ** 2
        dim = spec["dim"]

        class ClsPosEmbed(layers.Layer):
            def build(self, input_shape):
                self.cls = self.add_weight(shape=(1, 1, dim), initializer="zeros", name="cls")
                self.pos = self.add_weight(
                    shape=(1, num_patches + 1, dim),
                    initializer=keras.initializers.RandomNormal(stddev=0.02), name="pos")

            def call(self, x):
                cls = ops.broadcast_to(ops.cast(self.cls, x.dtype), (ops.shape(x)[0], 1, dim))
                return ops.concatenate([cls, x], axis=1) + ops.cast(self.pos, x.dtype)

        class TakeToken(layers.Layer):
            def call(self, x):
                return x[:, 0]

        inp = keras.Input((spec["image"], spec["image"], spec["channels"]))
        x = layers.Conv2D(dim, spec["patch"], strides=spec["patch"], name="patch_embed")(inp)
        x = layers.Reshape((num_patches, dim))(x)
        x = ClsPosEmbed(name="cls_pos")(x)
        for i in range(spec["depth"]):
            h = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
            h = layers.MultiHeadAttention(spec["heads"], dim // spec["heads"], name=f"block{i}_attn")(h, h)
            x = layers.Add()([x, h])
            h = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
            h = layers.Dense(spec["mlp"], activation="gelu", name=f"block{i}_fc1")(h)
            h = layers.Dense(dim, name=f"block{i}_fc2")(h)
            x = layers.Add()([x, h])
        x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
        x = TakeToken()(x)
        out = layers.Dense(spec["classes"], dtype=out_dtype, name="head")(x)
        return keras.Model(inp, out, name="vit")

    if name == "resnet18_gn":
        g = spec["groups"]

        def conv(x, filters, k, stride, name):
            if k > 1:
                x = layers.ZeroPadding2D(k // 2)(x)
            return layers.Conv2D(filters, k, strides=stride, use_bias=False, name=name)(x)

        def gn(x, name):
            return layers.GroupNormalization(g, epsilon=1e-5, name=name)(x)

        inp = keras.Input((spec["image"], spec["image"], spec["channels"]))
        x = conv(inp, spec["widths"][0], 7, 2, "stem")
        x = layers.ReLU()(gn(x, "stem_gn"))
        x = layers.ZeroPadding2D(1)(x)
        x = layers.MaxPooling2D(3, strides=2)(x)
        in_ch = spec["widths"][0]
        for s, filters in enumerate(spec["widths"]):
            for b in range(2):
                stride = 2 if (s > 0 and b == 0) else 1
                y = conv(x, filters, 3, stride, f"l{s}b{b}_conv1")
                y = layers.ReLU()(gn(y, f"l{s}b{b}_gn1"))
                y = gn(conv(y, filters, 3, 1, f"l{s}b{b}_conv2"), f"l{s}b{b}_gn2")
                identity = x
                if stride != 1 or in_ch != filters:
                    identity = gn(conv(x, filters, 1, stride, f"l{s}b{b}_down"), f"l{s}b{b}_down_gn")
                x = layers.ReLU()(layers.Add()([y, identity]))
                in_ch = filters
        x = layers.GlobalAveragePooling2D()(x)
        out = layers.Dense(spec["classes"], dtype=out_dtype, name="fc")(x)
        return keras.Model(inp, out, name="resnet18_gn")

    if name == "bert_base":
        dim, seq = spec["dim"], spec["seq"]

        class PositionAndType(layers.Layer):
            """Adds BERT's position and (single) token-type embeddings."""

            def build(self, input_shape):
                init = keras.initializers.RandomNormal(stddev=0.02)
                self.pos = self.add_weight(shape=(spec["max_pos"], dim), initializer=init, name="pos")
                self.type = self.add_weight(shape=(2, dim), initializer=init, name="type")

            def call(self, x):
                return x + self.pos[None, :seq] + self.type[None, :1]

        class TakeToken(layers.Layer):
            def call(self, x):
                return x[:, 0]

        inp = keras.Input((seq,), dtype="int32")
        init = keras.initializers.RandomNormal(stddev=0.02)
        x = layers.Embedding(spec["vocab"], dim, embeddings_initializer=init, name="word_embeddings")(inp)
        x = PositionAndType(name="pos_type_embeddings")(x)
        x = layers.LayerNormalization(epsilon=1e-12, name="emb_ln")(x)
        for i in range(spec["depth"]):
            h = layers.MultiHeadAttention(spec["heads"], dim // spec["heads"], name=f"layer{i}_attn")(x, x)
            x = layers.LayerNormalization(epsilon=1e-12, name=f"layer{i}_ln1")(layers.Add()([x, h]))
            h = layers.Dense(spec["mlp"], activation="gelu", name=f"layer{i}_fc1")(x)
            h = layers.Dense(dim, name=f"layer{i}_fc2")(h)
            x = layers.LayerNormalization(epsilon=1e-12, name=f"layer{i}_ln2")(layers.Add()([x, h]))
        x = layers.Dense(dim, activation="tanh", name="pooler")(TakeToken()(x))
        out = layers.Dense(spec["classes"], dtype=out_dtype, name="classifier")(x)
        return keras.Model(inp, out, name="bert")

    raise ValueError(name)


# ------------------------------------------------------------- torch models
def build_torch_model(name, spec, fix_vit):
    import torch
    from torch import nn
    import torch.nn.functional as F

    if name == "vit_b16":
        import timm
        from timm.models.vision_transformer import VisionTransformer

        if spec["image"] == 224 and spec["dim"] == 768:
            model = timm.create_model("vit_base_patch16_224", pretrained=False,
                                      num_classes=spec["classes"])
        else:
            model = VisionTransformer(img_size=spec["image"], patch_size=spec["patch"],
                                      embed_dim=spec["dim"], depth=spec["depth"],
                                      num_heads=spec["heads"], mlp_ratio=spec["mlp"] / spec["dim"],
                                      num_classes=spec["classes"])
        if fix_vit:
            fix_timm_vit_for_opacus(model)
        return model

    if name == "resnet18_gn":
        g = spec["groups"]

        class Block(nn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.gn1 = nn.GroupNorm(g, cout)
                self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.gn2 = nn.GroupNorm(g, cout)
                self.down = None
                if stride != 1 or cin != cout:
                    self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.GroupNorm(g, cout))

            def forward(self, x):
                y = F.relu(self.gn1(self.conv1(x)))  # not in place (Opacus hooks)
                y = self.gn2(self.conv2(y))
                identity = x if self.down is None else self.down(x)
                return F.relu(y + identity)  # out-of-place add

        class ResNet18GN(nn.Module):
            def __init__(self):
                super().__init__()
                w = spec["widths"]
                self.stem = nn.Conv2d(spec["channels"], w[0], 7, 2, 3, bias=False)
                self.stem_gn = nn.GroupNorm(g, w[0])
                blocks, cin = [], w[0]
                for s, cout in enumerate(w):
                    for b in range(2):
                        blocks.append(Block(cin, cout, 2 if (s > 0 and b == 0) else 1))
                        cin = cout
                self.blocks = nn.Sequential(*blocks)
                self.fc = nn.Linear(w[-1], spec["classes"])

            def forward(self, x):
                x = F.relu(self.stem_gn(self.stem(x)))
                x = F.max_pool2d(x, 3, 2, 1)
                x = self.blocks(x)
                return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

        return ResNet18GN()

    if name == "bert_base":
        dim, heads = spec["dim"], spec["heads"]

        class Attention(nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

            def forward(self, x):
                b, l, _ = x.shape

                def split(t):
                    return t.view(b, l, heads, dim // heads).transpose(1, 2)

                a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
                return self.o(a.transpose(1, 2).reshape(b, l, dim))

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = Attention()
                self.ln1 = nn.LayerNorm(dim, eps=1e-12)
                self.fc1 = nn.Linear(dim, spec["mlp"])
                self.fc2 = nn.Linear(spec["mlp"], dim)
                self.ln2 = nn.LayerNorm(dim, eps=1e-12)

            def forward(self, x):
                x = self.ln1(x + self.attn(x))
                return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))

        class Bert(nn.Module):
            def __init__(self):
                super().__init__()
                self.word = nn.Embedding(spec["vocab"], dim)
                self.pos = nn.Embedding(spec["max_pos"], dim)
                self.token_type = nn.Embedding(2, dim)  # not `type`: nn.Module.type is a method
                self.emb_ln = nn.LayerNorm(dim, eps=1e-12)
                self.layers = nn.Sequential(*[Layer() for _ in range(spec["depth"])])
                self.pooler = nn.Linear(dim, dim)
                self.classifier = nn.Linear(dim, spec["classes"])

            def forward(self, ids):
                b, l = ids.shape
                pos = torch.arange(l, device=ids.device).repeat(b, 1)  # contiguous: Opacus ghost views it
                x = self.word(ids) + self.pos(pos) + self.token_type(torch.zeros_like(ids))
                x = self.layers(self.emb_ln(x))
                return self.classifier(torch.tanh(self.pooler(x[:, 0])))

        return Bert()

    raise ValueError(name)


def fix_timm_vit_for_opacus(model):
    """Move cls_token / pos_embed off timm's root module into a leaf module
    with an exact grad sampler, and register timm's LayerNorm subclass with
    Opacus' LayerNorm sampler, so Opacus needs no functorch fallback."""
    import types

    from torch import nn
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.utils import register_grad_sampler

    cls_pos_type = _cls_pos_module_type()
    if cls_pos_type not in GradSampleModule.GRAD_SAMPLERS:
        @register_grad_sampler(cls_pos_type)
        def _cls_pos_grad_sample(layer, activations, backprops):
            # y = cat(cls, x) + pos: dy/dpos = backprops; dy/dcls = backprops[:, :1].
            return {layer.pos_embed: backprops, layer.cls_token: backprops[:, :1]}

    ln_sampler = GradSampleModule.GRAD_SAMPLERS[nn.LayerNorm]
    ln_types = {type(m) for m in model.modules()
                if isinstance(m, nn.LayerNorm) and type(m) is not nn.LayerNorm}
    if ln_types:
        register_grad_sampler(sorted(ln_types, key=str))(ln_sampler)

    leaf = cls_pos_type(model.cls_token.data, model.pos_embed.data)
    del model.cls_token
    del model.pos_embed
    model.cls_token = None
    model.pos_embed = None
    model.cls_pos = leaf
    model._pos_embed = types.MethodType(lambda self, x: self.pos_drop(self.cls_pos(x)), model)
    return model


_CLS_POS_TYPE = None


def _cls_pos_module_type():
    global _CLS_POS_TYPE
    if _CLS_POS_TYPE is None:
        import torch
        from torch import nn

        class ClsPosEmbed(nn.Module):
            def __init__(self, cls_token, pos_embed):
                super().__init__()
                self.cls_token = nn.Parameter(cls_token.clone())
                self.pos_embed = nn.Parameter(pos_embed.clone())

            def forward(self, x):
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                cls = self.cls_token.expand(x.shape[0], -1, -1)
                return torch.cat([cls, x], dim=1) + self.pos_embed

        _CLS_POS_TYPE = ClsPosEmbed
    return _CLS_POS_TYPE


# ------------------------------------------------------------- jax helpers
class CompileCounter:
    """Counts lowerings, XLA compiles and persistent-cache hits via
    jax.monitoring; compiles of functions whose name contains 'train_step'
    are the train-step compiles."""

    def __init__(self):
        self.events = []  # (kind, fun_name, seconds, wall time)
        self.error = None
        try:
            import jax.monitoring as mon

            mon.register_event_duration_secs_listener(self._duration)
            mon.register_event_listener(self._event)
        except Exception as e:  # pragma: no cover - counts are then unknown
            self.error = f"{type(e).__name__}: {e}"

    def _duration(self, event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            self.events.append(("compile", str(kw.get("fun_name", "")), float(duration), time.time()))
        elif event.endswith("jaxpr_to_mlir_module_duration"):
            self.events.append(("lower", str(kw.get("fun_name", "")), float(duration), time.time()))

    def _event(self, event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            self.events.append(("cache_hit", "", 0.0, time.time()))

    def train_compiles(self):
        return [e for e in self.events if e[0] == "compile" and "train_step" in e[1]]

    def count(self):
        return len(self.train_compiles())

    def summary(self):
        if self.error:
            return {"error": self.error}
        comp = self.train_compiles()
        lowers = [e for e in self.events if e[0] == "lower" and "train_step" in e[1]]
        return {
            "train_step_lowerings": len(lowers),
            "train_step_compiles": len(comp),
            "train_step_compile_s": [round(e[2], 2) for e in comp],
            "persistent_cache_hits": sum(1 for e in self.events if e[0] == "cache_hit"),
            "all_compiles": sum(1 for e in self.events if e[0] == "compile"),
        }


def jax_setup(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax

    if args.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if args.precision == "fp32":
        jax.config.update("jax_default_matmul_precision", "highest")
    elif args.precision == "tf32":
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    counter = CompileCounter()
    import keras

    if args.precision == "bf16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    return jax, keras, counter


def jax_peak_bytes(jax):
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def jax_memory(jax, batch, peak):
    """Peak and an estimate of the largest physical batch that fits: the bytes
    held between steps (weights, optimizer state, accumulators, the batch)
    plus `batch` times the per-example working set (peak - held) / batch,
    scaled up to the device's limit. A linear estimate, not a tried batch."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:
        return {}
    held, limit = stats.get("bytes_in_use"), stats.get("bytes_limit")
    if peak is None or held is None or not limit or peak <= held:
        return {}
    per_example = (peak - held) / batch
    est = int((limit - held) / per_example) // 8 * 8
    return {"held_between_steps_gib": held / GIB, "device_limit_gib": limit / GIB,
            "per_example_mib": per_example / 2 ** 20, "max_batch_estimate": est}


def jax_profile(jax, args, step, sync, name):
    """Traces a few steps into --profile-dir/<name> (Perfetto JSON; summarize
    with tools/profile_summary.py)."""
    if not args.profile_dir:
        return
    d = os.path.join(args.profile_dir, name)
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    try:
        for _ in range(args.profile_steps):
            sync(step())
    finally:
        jax.profiler.stop_trace()


def jax_device(jax):
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def versions(*names):
    out = {"python": platform.python_version()}
    from importlib import metadata

    for n in names:
        try:
            out[n] = metadata.version(n)
        except Exception:
            pass
    return out


class FitTimer:
    """Keras callback: wall time per logical step (between consecutive batch
    ends, so everything in the loop counts), synchronized on the trainable
    state, and whether the train step compiled during the step."""

    def __new__(cls, *a, **k):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self, jax, counter, budget_s=None, on_step=None):
                super().__init__()
                self.jax, self.counter = jax, counter
                self.budget_s, self.on_step = budget_s, on_step
                self.times, self.compiled = [], []

            def on_train_begin(self, logs=None):
                self.t_start = self.t_last = time.perf_counter()
                self.c_last = self.counter.count()

            def on_train_batch_end(self, batch, logs=None):
                state = getattr(self.model, "_jax_state", None)
                if state:
                    self.jax.block_until_ready(state["trainable_variables"])
                now = time.perf_counter()
                c = self.counter.count()
                self.times.append(now - self.t_last)
                self.compiled.append(c - self.c_last)
                self.t_last, self.c_last = now, c
                if self.on_step is not None:
                    self.on_step(self)
                if self.budget_s is not None:
                    elapsed = now - self.t_start
                    if elapsed + self.times[-1] > self.budget_s:
                        self.model.stop_training = True

        return _Timer(*a, **k)


def timed_loop(step, sync, warmup, steps):
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return times


def pipelined_rate(step, sync, batch, steps):
    """Examples per second over `steps` steps dispatched back to back and
    synchronized once at the end, as Keras' fit runs them (its callbacks are
    dispatched asynchronously): host dispatch overlaps the device work, which
    the per-step timings of `timed_loop` (one sync per step) do not allow."""
    out = step()
    sync(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    return batch * steps / (time.perf_counter() - t0)


def dispatch_ms(step, sync, steps):
    """Median host time (ms) to dispatch one step onto an idle device (the
    call returns before the device finishes): what a synchronized step
    exposes as device idle time before its first kernel."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        sync(out)
    return 1e3 * _quantile(times, 0.5)


def step_record(variant, args, times, peak, extra=None):
    med = statistics.median(times)
    rec = {
        "variant": variant, "label": LABELS.get(variant, variant), "model": args.model,
        "batch": args.batch, "precision": args.precision, "mode": "physical step",
        "status": "ok", "steps": len(times), "median_step_ms": med * 1e3,
        "p10_step_ms": _quantile(times, 0.1) * 1e3, "p90_step_ms": _quantile(times, 0.9) * 1e3,
        "examples_per_s": args.batch / med, "peak_gib": None if peak is None else peak / GIB,
    }
    _record_ghost_flags(rec, variant, args)
    rec.update(extra or {})
    return rec


def _record_ghost_flags(rec, variant, args):
    if os.environ.get("XLA_FLAGS", "").strip():
        rec["xla_flags"] = os.environ["XLA_FLAGS"].strip()
    if variant.startswith("keras_dpsgd"):
        for flag in ("gram_kernel", "sum_kernel"):
            if getattr(args, flag, "xla") != "xla":
                rec[flag] = getattr(args, flag)
        if getattr(args, "ghost_set", None):
            rec["ghost_settings"] = dict(_ghost_settings(args))


def _ghost_settings(args):
    """--ghost-set NAME=VALUE pairs as (NAME, Python value)."""
    import ast

    out = []
    for item in getattr(args, "ghost_set", None) or []:
        name, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare string
        out.append((name, value))
    return out


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def fit_record(variant, args, timer, real, warmup, extra=None, rows_run=None):
    """Real examples / wall time over timed steps without a train-step compile.
    rows_run: rows the device computed per step, padding included."""
    rows_run = rows_run or real
    rows = list(zip(timer.times, real, timer.compiled, rows_run))[warmup:]
    kept = [(t, r, p) for t, r, c, p in rows if c == 0]
    total_t = sum(k[0] for k in kept)
    total_r = sum(k[1] for k in kept)
    total_p = sum(k[2] for k in kept)
    rec = {
        "variant": variant, "label": LABELS.get(variant, variant), "model": args.model,
        "batch": args.batch, "precision": args.precision, "mode": "Poisson fit",
        "status": "ok" if kept else "failed", "steps": len(kept),
        "steps_with_compile_left_out": sum(1 for row in rows if row[2]),
        "median_step_ms": statistics.median(k[0] for k in kept) * 1e3 if kept else None,
        "examples_per_s": total_r / total_t if total_t > 0 else None,
        "rows_computed_per_s": total_p / total_t if total_t > 0 else None,
        "real_examples_timed": total_r,
        "padding_fraction": 1 - total_r / total_p if total_p else None,
    }
    if not kept:
        rec["error"] = "no timed step without a compile"
    _record_ghost_flags(rec, variant, args)
    rec.update(extra or {})
    return rec


# ------------------------------------------------------------- jax workers
def worker_keras(args, out):
    jax, keras, counter = jax_setup(args)
    spec = model_spec(args.model, args.tiny)
    model = build_keras_model(args.model, spec)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = make_data(spec, args.batch, "nhwc")
    t0 = time.perf_counter()
    model.train_on_batch(x, y)  # builds, compiles, one step
    first_s = time.perf_counter() - t0
    data = tuple(jax.device_put(a) for a in (x, y)) + (None,)
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True,
                                 purge_model_variables=True)
    box = [state]

    def step():
        logs, box[0] = model.train_function(box[0], iter([data]))
        return box[0][0]

    times = timed_loop(step, jax.block_until_ready, args.warmup, args.steps)
    pipelined = pipelined_rate(step, jax.block_until_ready, args.batch, args.steps)
    dispatch = dispatch_ms(step, jax.block_until_ready, args.steps)
    peak = jax_peak_bytes(jax)
    memory = jax_memory(jax, args.batch, peak)
    jax_profile(jax, args, step, jax.block_until_ready, f"{args.model}_keras")
    out.append(step_record("keras", args, times, peak, {
        "pipelined_examples_per_s": pipelined, "dispatch_ms": dispatch,
        "memory": memory,
        "params": int(model.count_params()), "first_step_s": first_s,
        "compiles": counter.summary(), "device": jax_device(jax),
        "versions": versions("jax", "jaxlib", "keras")}))


def private_model(args):
    """(spec, base Keras model, DP model sharing its weights), compiled with SGD."""
    import keras

    import keras_dpsgd

    spec = model_spec(args.model, args.tiny)
    base = build_keras_model(args.model, spec)
    model = keras_dpsgd.make_private(base)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return spec, base, model


def worker_keras_dpsgd(args, out):
    jax, keras, counter = jax_setup(args)
    import numpy as np
    from keras_dpsgd import sampling

    spec, base, model = private_model(args)
    n = args.fit_examples
    x_all, y_all = make_data(spec, n, "nhwc")
    n_steps = args.warmup + args.steps
    timer = FitTimer(jax, counter)
    t0 = time.perf_counter()
    model.fit(x_all, y_all, batch_size=args.batch, epochs=1, steps_per_epoch=n_steps,
              l2_norm_clip=1.0, noise_multiplier=1.0, physical_batch_size=args.batch,
              seed=0, verbose=0, callbacks=[timer], **_clipping_kwargs(model, args))
    fit_s = time.perf_counter() - t0
    cfg = model.optimizer.config_values()
    sampler = sampling.PoissonSampler(n, args.batch / n, cfg["sampler_seed_words"])
    sizes = [len(sampler.sample(t)) for t in range(len(timer.times))]
    phys = [max(1, math.ceil(s / args.batch)) for s in sizes]
    fit_compiles = counter.summary()

    # The physical step on fixed device data: every row real, last batch of
    # its logical step (clip, sum, noise, update), as fit runs it.
    x, y = x_all[: args.batch], y_all[: args.batch]
    mask = np.ones((args.batch,), bool)
    from keras_dpsgd.backend import jax as jax_backend

    # Newer keras_dpsgd: the step does not read is_last (fit passes None);
    # older ones branch on it inside the step.
    new_api = hasattr(jax_backend, "apply_function")
    data = (jax.device_put(x), jax.device_put(y), None, jax.device_put(mask),
            None if new_api else jax.device_put(mask))
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True,
                                 purge_model_variables=True)
    box = [state]
    # Newer keras_dpsgd applies the noisy update in a separate jitted step
    # after the last physical batch.
    apply = jax_backend.apply_function(model) if new_api else None

    def step():
        logs, box[0] = model.train_function(box[0], iter([data]))
        if apply is not None:
            tv, ntv, ov, mv = box[0]
            tv, ov = apply(tv, ov)
            box[0] = (tv, ntv, ov, mv)
        return box[0][0]

    times = timed_loop(step, jax.block_until_ready, args.warmup, args.steps)
    pipelined = pipelined_rate(step, jax.block_until_ready, args.batch, args.steps)
    dispatch = dispatch_ms(step, jax.block_until_ready, args.steps)
    peak = jax_peak_bytes(jax)
    memory = jax_memory(jax, args.batch, peak)
    jax_profile(jax, args, step, jax.block_until_ready, f"{args.model}_keras_dpsgd_{args.dp_clipping}")
    common = {"params": int(base.count_params()), "device": jax_device(jax), "memory": memory,
              "clipping": _clipping_kwargs(model, args).get("clipping", "vectorized (only mode)"),
              "versions": versions("jax", "jaxlib", "keras")}
    out.append(step_record("keras_dpsgd", args, times, peak, dict(
        common, compiles=counter.summary(), pipelined_examples_per_s=pipelined, dispatch_ms=dispatch,
        recompiled_for_direct_call=counter.count() != fit_compiles["train_step_compiles"])))

    # A physical batch that is not the last of its logical step: clip, sum,
    # accumulate (no noise, no update). Most physical batches of a large
    # logical batch are of this kind. Same executable as above.
    not_last = (data[0], data[1], None, data[3],
                None if new_api else jax.device_put(np.zeros((args.batch,), bool)))
    box_acc = [box[0]]

    def step_acc():
        logs, box_acc[0] = model.train_function(box_acc[0], iter([not_last]))
        return box_acc[0][2]

    times_acc = timed_loop(step_acc, jax.block_until_ready, args.warmup, args.steps)
    box[0] = box_acc[0]
    out.append(step_record("keras_dpsgd_accumulate", args, times_acc, jax_peak_bytes(jax), dict(
        common, compiles=counter.summary())))
    rec = fit_record("keras_dpsgd_fit", args, timer, sizes, args.warmup, rows_run=[
        p * args.batch for p in phys], extra=dict(
        common, peak_gib=None if peak is None else peak / GIB, fit_examples=n, fit_wall_s=fit_s,
        physical_batches_per_step=phys, logical_batch_sizes=sizes, compiles=fit_compiles))
    out.append(rec)


def _clipping_kwargs(model, args):
    """fit(clipping=...) where this keras_dpsgd has it (newer versions choose
    between vectorized and ghost clipping); older ones are vectorized only."""
    import inspect

    for flag, name in (("gram_kernel", "GRAM_KERNEL"), ("sum_kernel", "SUM_KERNEL")):
        if getattr(args, flag, "xla") != "xla":
            from keras_dpsgd import ghost

            if not hasattr(ghost, name):
                raise ValueError(f"this keras_dpsgd has no ghost.{name} (--{flag.replace('_', '-')})")
            setattr(ghost, name, getattr(args, flag))
    for name, value in _ghost_settings(args):
        from keras_dpsgd import ghost

        if not hasattr(ghost, name):
            raise ValueError(f"this keras_dpsgd has no ghost.{name} (--ghost-set)")
        setattr(ghost, name, value)
    if "clipping" in inspect.signature(model.fit).parameters:
        return {"clipping": args.dp_clipping}
    if args.dp_clipping not in ("vectorized", "auto"):
        raise ValueError(f"this keras_dpsgd has no fit(clipping=...); cannot use {args.dp_clipping!r}")
    return {}


def worker_jax_privacy(args, out):
    jax, keras, counter = jax_setup(args)
    from jax_privacy import keras_api

    # Count the real (unpadded) rows of each Poisson batch the dataset serves.
    served = []
    ds_cls = keras_api._PoissonSampledTrainingDataset
    orig_getitem = ds_cls.__getitem__

    def getitem(self, index):
        import numpy as np

        idx = np.asarray(self._epoch_batches[index])
        served.append((int(index), int((idx >= 0).sum()), int(idx.shape[0])))
        return orig_getitem(self, index)

    ds_cls.__getitem__ = getitem

    spec = model_spec(args.model, args.tiny)
    model = build_keras_model(args.model, spec)
    n = args.fit_examples
    n_steps = args.warmup + args.steps
    params = keras_api.DPKerasConfig(
        epsilon=1e6, delta=1e-5, clipping_norm=1.0, batch_size=args.batch,
        gradient_accumulation_steps=1, train_steps=n_steps, train_size=n,
        poisson_sampling_in_fit=True, noise_multiplier=1.0, seed=0)
    model = keras_api.make_private(model, params)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_all, y_all = make_data(spec, n, "nhwc")
    timer = FitTimer(jax, counter)
    t0 = time.perf_counter()
    model.fit(x_all, y_all, batch_size=args.batch, epochs=1, steps_per_epoch=n_steps,
              verbose=0, callbacks=[timer])
    fit_s = time.perf_counter() - t0
    # The symbolic build reads batch 0 once before fit; keep the last serve per index.
    by_index = {}
    for index, real, padded in served:
        by_index[index] = (real, padded)
    real = [by_index.get(i, (args.batch, args.batch))[0] for i in range(len(timer.times))]
    padded = [by_index.get(i, (args.batch, args.batch))[1] for i in range(len(timer.times))]
    peak = jax_peak_bytes(jax)
    out.append(fit_record("jax_privacy", args, timer, real, args.warmup, rows_run=padded, extra={
        "params": int(model.count_params()), "device": jax_device(jax),
        "peak_gib": None if peak is None else peak / GIB, "fit_examples": n, "fit_wall_s": fit_s,
        "logical_batch_sizes": real, "padded_batch_sizes": padded,
        "distinct_padded_shapes": sorted(set(padded)), "compiles": counter.summary(),
        "versions": versions("jax", "jaxlib", "keras", "jax-privacy")}))


def worker_keras_dpsgd_poisson(args, out):
    jax, keras, counter = jax_setup(args)
    from keras_dpsgd import sampling

    spec, base, model = private_model(args)
    n = args.poisson_examples
    xb, _ = make_data(spec, min(n, 1024), "nhwc")
    import numpy as np

    y_all = np.random.default_rng(1).integers(0, spec["classes"], size=(n,), dtype=np.int32)
    x_all = SyntheticRows(n, xb)
    q = args.poisson_batch / n
    phys = args.poisson_physical

    def sizes_for(k):
        cfg = model.optimizer.config_values()
        sampler = sampling.PoissonSampler(n, q, cfg["sampler_seed_words"])
        return [len(sampler.sample(t)) for t in range(k)]

    rec = {"variant": "keras_dpsgd_poisson", "label": LABELS["keras_dpsgd_poisson"],
           "model": args.model, "precision": args.precision, "mode": "Poisson fit, large logical batch",
           "status": "running", "expected_logical_batch": args.poisson_batch,
           "physical_batch": phys, "train_examples": n, "sampling_rate": q,
           "logical_steps_planned": args.poisson_steps, "params": int(base.count_params()),
           "clipping": _clipping_kwargs(model, args).get("clipping", "vectorized (only mode)"),
           "device": jax_device(jax), "versions": versions("jax", "jaxlib", "keras")}

    def on_step(timer):
        k = len(timer.times)
        sizes = sizes_for(k)
        rec["logical_steps_done"] = k
        rec["step_s"] = [round(t, 3) for t in timer.times]
        rec["logical_batch_sizes"] = sizes
        rec["physical_batches_per_step"] = [max(1, math.ceil(s / phys)) for s in sizes]
        rec["examples_per_s_per_step"] = [s / t for s, t in zip(sizes, timer.times)]
        rec["train_step_compiled_in_step"] = list(timer.compiled)
        steady = [(s, t) for s, t, c in zip(sizes, timer.times, timer.compiled) if c == 0]
        rec["examples_per_s"] = (sum(s for s, _ in steady) / sum(t for _, t in steady)) if steady else None
        rec["compiles"] = counter.summary()
        rec["peak_gib"] = (jax_peak_bytes(jax) or 0) / GIB or None
        _write_json(args.result_file, out + [rec])
        print(f"[poisson] logical step {k}: {sizes[-1]} examples in {timer.times[-1]:.2f} s, "
              f"train-step compiles so far {counter.count()}", flush=True)

    timer = FitTimer(jax, counter, budget_s=args.poisson_budget_s, on_step=on_step)
    t0 = time.perf_counter()
    model.fit(x_all, y_all, batch_size=args.poisson_batch, epochs=1,
              steps_per_epoch=args.poisson_steps, l2_norm_clip=1.0, noise_multiplier=1.0,
              physical_batch_size=phys, seed=0, verbose=0, callbacks=[timer],
              **_clipping_kwargs(model, args))
    rec["fit_wall_s"] = time.perf_counter() - t0
    rec["status"] = "ok"
    if len(timer.times) < args.poisson_steps:
        rec["note"] = f"stopped after {len(timer.times)} logical steps by --poisson-budget-s"
    out.append(rec)


# ----------------------------------------------------------- torch workers
def worker_torch(args, out, variant):
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    spec = model_spec(args.model, args.tiny)
    private = variant.startswith("opacus")
    ootb = variant.endswith("_ootb")
    if ootb and args.model != "vit_b16":
        out.append({"variant": variant, "label": LABELS[variant], "model": args.model,
                    "status": "skipped", "error": "out-of-the-box variant only differs for timm ViT"})
        return
    if private:
        import opacus  # noqa: F401  (fail early, before building the model)
    model = build_torch_model(args.model, spec, fix_vit=private and not ootb).to(dev)
    params = sum(p.numel() for p in model.parameters())
    x_np, y_np = make_data(spec, args.batch, "nchw")
    x = torch.from_numpy(x_np).to(dev)
    y = torch.from_numpy(y_np.astype(np.int64)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = torch.nn.CrossEntropyLoss()
    extra = {}
    if private:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.arange(args.batch * 16)), batch_size=args.batch)
        engine = PrivacyEngine()
        mode = "ghost" if "ghost" in variant else "hooks"
        res = engine.make_private(module=model, optimizer=opt, criterion=criterion,
                                  data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                  poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            model, opt, criterion, _ = res
        else:
            model, opt, _ = res
        extra["opacus_mode"] = mode
        extra["functorch_modules"] = _opacus_functorch_modules(model)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else _null())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x)
        loss = criterion(logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = timed_loop(step, sync, args.warmup, args.steps)
    # Back to back as a training loop runs them (one sync at the end), like
    # the JAX rows: compare pipelined with pipelined.
    extra["pipelined_examples_per_s"] = pipelined_rate(step, sync, args.batch, args.steps)
    extra["dispatch_ms"] = dispatch_ms(step, sync, args.steps)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        held, limit = torch.cuda.memory_allocated(), torch.cuda.get_device_properties(0).total_memory
        if peak > held:
            per_example = (peak - held) / args.batch
            extra["memory"] = {"held_between_steps_gib": held / GIB, "device_limit_gib": limit / GIB,
                               "per_example_mib": per_example / 2 ** 20,
                               "max_batch_estimate": int((limit - held) / per_example) // 8 * 8}
    extra.update({"params": int(params), "compiles": None,
                  "device": f"cuda:{torch.cuda.get_device_name(0)}" if cuda else "cpu",
                  "versions": versions("torch", "timm", "opacus")})
    out.append(step_record(variant, args, times, peak, extra))


def _opacus_functorch_modules(model):
    """Names of modules Opacus handles with its functorch fallback."""
    try:
        from opacus.grad_sample import GradSampleModule

        names = []
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own and type(m) not in GradSampleModule.GRAD_SAMPLERS:
                names.append(name or "<root>")
        return names
    except Exception:  # pragma: no cover
        return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------- parent
def _write_json(path, obj):
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def run_worker(variant, model, args, log_file):
    """Runs one variant in a subprocess; returns its records (never raises)."""
    fd, result_file = tempfile.mkstemp(prefix=f"bench_{variant}_", suffix=".json")
    os.close(fd)
    os.unlink(result_file)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--model", model,
           "--batch", str(args.batch), "--precision", args.precision, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--fit-examples", str(args.fit_examples),
           "--result-file", result_file, "--dp-clipping", args.dp_clipping, "--gram-kernel", args.gram_kernel,
           "--sum-kernel", args.sum_kernel, *[f"--ghost-set={g}" for g in args.ghost_set or []],
           "--poisson-batch", str(args.poisson_batch), "--poisson-physical", str(args.poisson_physical),
           "--poisson-examples", str(args.poisson_examples), "--poisson-steps", str(args.poisson_steps),
           "--poisson-budget-s", str(args.poisson_budget_s)]
    if args.tiny:
        cmd.append("--tiny")
    if args.jax_cache_dir:
        cmd += ["--jax-cache-dir", args.jax_cache_dir]
    if args.profile_dir:
        cmd += ["--profile-dir", os.path.abspath(args.profile_dir), "--profile-steps", str(args.profile_steps)]
    env = dict(os.environ)
    pkg = os.path.abspath(args.keras_dpsgd_path or REPO)
    env["PYTHONPATH"] = pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if variant in JAX_VARIANTS:
        env["KERAS_BACKEND"] = "jax"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    t0 = time.time()
    status, err = "ok", None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.variant_timeout)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            status, err = "failed", _error_line(output) or f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        status, err = "failed", f"timed out after {args.variant_timeout} s"
    wall = time.time() - t0
    if log_file:
        with open(log_file, "a") as f:
            f.write(f"\n===== {model} / {variant} ({wall:.1f} s, {status}) =====\n{output}\n")
    records = []
    if os.path.exists(result_file):
        try:
            with open(result_file) as f:
                records = json.load(f)
        except Exception:
            records = []
        os.unlink(result_file)
    if status != "ok" or not records:
        if err is None:
            status, err = "failed", "no result written"
        if not records:
            skipped = err and ("No module named" in err) and variant != "keras"
            records = [{"variant": variant, "label": LABELS.get(variant, variant), "model": model,
                        "batch": args.batch, "precision": args.precision,
                        "status": "skipped" if skipped else "failed", "error": err}]
        else:
            for r in records:
                if r.get("status") in (None, "running"):
                    r["status"], r["error"] = "partial", err
    for r in records:
        r["wall_s"] = round(wall, 1)
    return records


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _error_line(output):
    lines = [l.strip() for l in output.strip().splitlines() if l.strip()]
    for l in reversed(lines):
        if "Error" in l or "error" in l or "Exception" in l:
            return l[:400]
    return lines[-1][:400] if lines else None


def machine_info():
    info = {"host": platform.node(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["gpus"] = [l.strip() for l in q.stdout.strip().splitlines()]
        except Exception:
            pass
    return info


def package_info(path):
    """Where keras_dpsgd comes from, and its git commit when known (a COMMIT
    file beside the package, else git in that directory)."""
    path = os.path.abspath(path)
    info = {"path": path}
    commit_file = os.path.join(path, "COMMIT")
    if os.path.exists(commit_file):
        with open(commit_file) as f:
            info["commit"] = f.read().strip()
    elif shutil.which("git"):
        try:
            rev = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
            dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "keras_dpsgd"],
                                   capture_output=True, text=True, timeout=10)
            if rev.returncode == 0:
                info["commit"] = rev.stdout.strip()
                info["keras_dpsgd_modified"] = bool(dirty.stdout.strip())
        except Exception:
            pass
    return info


def ratios(results):
    out = {}
    for model in {r["model"] for r in results}:
        tp = {r["variant"]: r.get("examples_per_s") for r in results
              if r["model"] == model and r.get("status") == "ok" and r.get("examples_per_s")}
        pairs = [("keras_dpsgd", "keras"), ("keras_dpsgd_accumulate", "keras"), ("keras_dpsgd", "opacus_ghost"),
                 ("keras_dpsgd", "opacus_hooks"), ("keras_dpsgd", "jax_privacy"),
                 ("keras_dpsgd_fit", "jax_privacy"), ("keras_dpsgd_fit", "keras_dpsgd"),
                 ("opacus_hooks", "torch"), ("opacus_ghost", "torch"), ("keras", "torch"),
                 ("keras_dpsgd", "opacus_ghost_ootb"), ("jax_privacy", "keras")]
        out[model] = {f"{a} / {b}": tp[a] / tp[b] for a, b in pairs if a in tp and b in tp}
        # Steps dispatched back to back (`pipelined_rate`), where both rows have them.
        pl = {r["variant"]: r.get("pipelined_examples_per_s") for r in results
              if r["model"] == model and r.get("status") == "ok" and r.get("pipelined_examples_per_s")}
        for a, b in (("keras_dpsgd", "keras"), ("keras_dpsgd", "opacus_ghost"), ("keras_dpsgd", "opacus_hooks"),
                     ("opacus_ghost", "torch")):
            if a in pl and b in pl:
                out[model][f"{a} / {b} (pipelined)"] = pl[a] / pl[b]
    return out


def fmt_table(results):
    head = f"{'model':<12} {'variant':<20} {'mode':<14} {'ex/s':>9} {'ms/step':>9} {'peak GiB':>9} {'compiles':>9} {'piped ex/s':>10} {'disp ms':>7}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        comp = r.get("compiles") or {}
        ncomp = comp.get("train_step_compiles") if isinstance(comp, dict) else None
        eps = r.get("examples_per_s")
        ms = r.get("median_step_ms")
        peak = r.get("peak_gib")
        piped, disp = r.get("pipelined_examples_per_s"), r.get("dispatch_ms")
        status = r.get("status", "?")
        if status != "ok" and r.get("error"):
            status += f": {r['error']}"
        lines.append(
            f"{r.get('model', ''):<12} {r['variant']:<20} {str(r.get('mode', ''))[:14]:<14} "
            f"{(f'{eps:.1f}' if eps else '-'):>9} {(f'{ms:.1f}' if ms else '-'):>9} "
            f"{(f'{peak:.2f}' if peak else '-'):>9} {('-' if ncomp is None else str(ncomp)):>9} "
            f"{(f'{piped:.1f}' if piped else '-'):>10} {(f'{disp:.2f}' if disp else '-'):>7}  {status}")
    return "\n".join(lines)


def fmt_poisson(r):
    lines = [f"keras-dpsgd Poisson: model {r.get('model')}, E[logical batch] {r.get('expected_logical_batch')}, "
             f"physical {r.get('physical_batch')}, N {r.get('train_examples')}, status {r.get('status')}"
             + (f" ({r['error']})" if r.get("error") else "")]
    for i, t in enumerate(r.get("step_s", [])):
        lines.append(f"  logical step {i}: {r['logical_batch_sizes'][i]} examples, "
                     f"{r['physical_batches_per_step'][i]} physical batches, {t:.2f} s, "
                     f"{r['examples_per_s_per_step'][i]:.1f} ex/s"
                     + (", train step compiled" if r["train_step_compiled_in_step"][i] else ""))
    if r.get("compiles"):
        lines.append(f"  compiles: {r['compiles']}")
    if r.get("examples_per_s"):
        lines.append(f"  steady examples/s (steps without a compile): {r['examples_per_s']:.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_b16", help=f"comma list of {MODELS}")
    p.add_argument("--batch", type=int, default=None, help="physical batch (default 64; 8 with --tiny)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles happen here)")
    p.add_argument("--only", default=None, help=f"comma list of variants from {VARIANTS}")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU, test suite)")
    p.add_argument("--json", default=None, help="results file (default out/bench.json)")
    p.add_argument("--log", default=None, help="append every worker's output here (default <json>.log)")
    p.add_argument("--fit-examples", type=int, default=None,
                   help="training-set size N for the Poisson fit variants (default max(1024, 4 x batch); 64 with --tiny)")
    p.add_argument("--variant-timeout", type=float, default=1800.0, help="seconds per variant")
    p.add_argument("--jax-cache-dir", default=None, help="JAX persistent compilation cache dir")
    p.add_argument("--gram-kernel", default="xla", choices=["xla", "triton"],
                   help="keras_dpsgd.ghost.GRAM_KERNEL for the ghost Gram norms (triton: the fused "
                        "Pallas kernel, one GPU)")
    p.add_argument("--sum-kernel", default="xla", choices=["xla", "triton"],
                   help="keras_dpsgd.ghost.SUM_KERNEL for the book-keeping sums (triton: the fused "
                        "select-scale-matmul Pallas kernel)")
    p.add_argument("--ghost-set", action="append", default=[], metavar="NAME=VALUE",
                   help="set keras_dpsgd.ghost.NAME to VALUE (a Python literal) in the keras-dpsgd workers, "
                        "e.g. FINITE_FAST_PATH=False or NORM_METHOD='gram'; repeatable; recorded in the JSON")
    p.add_argument("--dp-clipping", default="vectorized", choices=["vectorized", "ghost", "auto"],
                   help="keras-dpsgd fit(clipping=...) where supported (default vectorized)")
    p.add_argument("--keras-dpsgd-path", default=None,
                   help="directory holding the keras_dpsgd package to benchmark (default: this repo)")
    p.add_argument("--poisson", action="store_true",
                   help="measure keras-dpsgd at a large Poisson logical batch instead")
    p.add_argument("--poisson-batch", type=float, default=32492.0, help="expected logical batch")
    p.add_argument("--poisson-physical", type=int, default=64)
    p.add_argument("--poisson-examples", type=int, default=50000, help="training-set size N")
    p.add_argument("--poisson-steps", type=int, default=3, help="logical steps")
    p.add_argument("--poisson-budget-s", type=float, default=1e9,
                   help="stop after the logical step that would overrun this many seconds of fit")
    p.add_argument("--profile-dir", default=None,
                   help="trace --profile-steps steps of the Keras and keras-dpsgd steps here (Perfetto JSON)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 8 if args.tiny else 64
    if args.fit_examples is None:
        # q = batch / N stays <= 1/4 at large batches (the fit needs q <= 1).
        args.fit_examples = 64 if args.tiny else max(1024, 4 * args.batch)

    if args.worker:
        return worker_main(args)

    # On SIGTERM (e.g. an outer `timeout`), stop the running worker too:
    # subprocess.run kills its child when the wait is interrupted.
    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        model_spec(m, args.tiny)
    variants = VARIANTS if not args.only else [v.strip() for v in args.only.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    json_path = args.json or os.path.join(REPO, "out", "bench.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    log_file = args.log or os.path.splitext(json_path)[0] + ".log"
    doc = {"meta": dict(machine_info(), command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                        batch=args.batch, precision=args.precision, steps=args.steps,
                        warmup=args.warmup, tiny=args.tiny, fit_examples=args.fit_examples,
                        keras_dpsgd=package_info(args.keras_dpsgd_path or REPO)),
           "results": []}
    print(f"# bench: {doc['meta'].get('gpus') or 'no nvidia-smi'}; log: {log_file}", flush=True)

    if args.poisson:
        doc["meta"]["mode"] = "poisson"
        for m in models:
            recs = run_worker("keras_dpsgd_poisson", m, args, log_file)
            doc["results"].extend(recs)
            _write_json(json_path, doc)
            for r in recs:
                print(fmt_poisson(r), flush=True)
        print(f"# wrote {json_path}")
        return 0

    try:
        for m in models:
            for v in variants:
                recs = run_worker(v, m, args, log_file)
                doc["results"].extend(recs)
                doc["ratios"] = ratios(doc["results"])
                _write_json(json_path, doc)
                for r in recs:
                    eps = r.get("examples_per_s")
                    print(f"[{m} {r['variant']}] {r.get('status')}"
                          + (f" {eps:.1f} ex/s" if eps else "")
                          + (f" peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") else "")
                          + (f" max batch ~{r['memory']['max_batch_estimate']}"
                             if (r.get("memory") or {}).get("max_batch_estimate") else "")
                          + (f" ({r['error']})" if r.get("error") else "")
                          + f" [{r.get('wall_s')} s]", flush=True)
    except KeyboardInterrupt as e:
        print(f"# interrupted ({e}); the variants not listed below did not run", flush=True)
        doc["meta"]["interrupted"] = str(e)
        _write_json(json_path, doc)
    print()
    print(fmt_table(doc["results"]))
    print()
    for model, rs in doc.get("ratios", {}).items():
        for k, val in rs.items():
            print(f"{model}: {k} = {val:.3f}")
    print(f"# wrote {json_path}")
    return 0


def worker_main(args):
    out = []
    try:
        if args.worker == "keras":
            worker_keras(args, out)
        elif args.worker == "keras_dpsgd":
            worker_keras_dpsgd(args, out)
        elif args.worker == "jax_privacy":
            worker_jax_privacy(args, out)
        elif args.worker == "keras_dpsgd_poisson":
            worker_keras_dpsgd_poisson(args, out)
        else:
            worker_torch(args, out, args.worker)
    except BaseException:
        traceback.print_exc()
        _write_json(args.result_file, out) if out else None
        return 1
    _write_json(args.result_file, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
