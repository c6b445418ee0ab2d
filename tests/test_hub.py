"""A randomly initialised keras-hub backbone trains with DP (the `hub` extra)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_dpsgd
from keras_dpsgd import accounting

keras_hub = pytest.importorskip("keras_hub")


def test_small_bert_backbone_trains_with_dp_through_make_private():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=12)
    inputs = {name: keras.Input((12,), dtype="int32", name=name)
              for name in ("token_ids", "segment_ids", "padding_mask")}
    classifier = keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)["pooled_output"]))
    model = keras_dpsgd.make_private(classifier)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    n = 96
    x = {"token_ids": rng.integers(1, 50, (n, 12)).astype("int32"),
         "segment_ids": np.zeros((n, 12), "int32"), "padding_mask": np.ones((n, 12), "int32")}
    y = (x["token_ids"][:, 0] > 25).astype("int32")
    before = [np.array(ops.convert_to_numpy(v)) for v in backbone.trainable_variables]
    hist = model.fit(x, y, batch_size=24, epochs=1, steps_per_epoch=3, l2_norm_clip=1.0,
                     noise_multiplier=0.8, physical_batch_size=16, seed=0, verbose=0)
    after = [np.array(ops.convert_to_numpy(v)) for v in backbone.trainable_variables]
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 3
    assert np.isfinite(hist.history["loss"][0])
    assert hist.history["epsilon"][0] == pytest.approx(accounting.epsilon(0.25, 0.8, 3, 1 / 960), rel=1e-5)
    assert sum(not np.allclose(a, b) for a, b in zip(before, after)) >= len(before) // 2


def test_keras_hub_reversible_embedding_uses_the_ghost_rule():
    """keras-hub's ReversibleEmbedding (its language models' token table,
    tied to the output projection) is covered by the ghost rule, not the
    per-example fallback, and matches the vectorized clipped sum."""
    from tests.conftest import BACKEND

    if BACKEND != "jax":
        pytest.skip("ghost clipping is JAX's")
    from keras_dpsgd import ghost
    from tests.test_ghost import _assert_match, _compiled

    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    emb = keras_hub.layers.ReversibleEmbedding(5, 4)
    assert type(emb) is not keras.layers.ReversibleEmbedding
    h = keras.layers.Dense(4, activation="tanh")(emb(ids))
    model = _compiled(ids, keras.layers.Dense(2)(keras.layers.Flatten()(emb(h, reverse=True))))
    assert not ghost.build_plan(model).fallback
    rng = np.random.default_rng(0)
    _assert_match(model, rng.integers(0, 5, size=(4, 6)).astype("int32"),
                  rng.normal(size=(4, 2)).astype("float32"), clip=0.3)

    backbone = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=12)
    plan = ghost.build_plan(backbone)
    positions = {id(v): i for i, v in enumerate(backbone.trainable_variables)}
    assert positions[id(backbone.token_embedding.embeddings)] not in plan.fallback


def test_keras_hub_position_embedding_and_rms_normalization_use_ghost_rules():
    """keras-hub's PositionEmbedding (with a start index, and called twice on
    overlapping rows) and RMSNormalization have ghost rules that match the
    vectorized path; keras-hub's BERT backbone then has no fallback weight."""
    from tests.conftest import BACKEND

    if BACKEND != "jax":
        pytest.skip("ghost clipping is JAX's")
    from keras_dpsgd import ghost
    from tests.test_ghost import _assert_match, _compiled

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = keras.Input((5, 4))
    once = keras_hub.layers.PositionEmbedding(sequence_length=9)
    twice = keras_hub.layers.PositionEmbedding(sequence_length=8)
    rms = keras_hub.layers.RMSNormalization(4)
    h = keras.layers.Dense(4)(x)
    h = h + once(h, start_index=2)
    h = h + twice(h) + twice(h, start_index=3)  # rows 3 and 4 get two positions' gradients
    h = rms(keras.layers.Activation("tanh")(h))
    model = _compiled(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    for layer in (once, twice, rms):
        for v in layer.trainable_variables:
            v.assign(rng.normal(size=v.shape).astype("float32"))
    assert not ghost.build_plan(model).fallback
    xs = rng.normal(size=(6, 5, 4)).astype("float32")
    xs[4, 1, 2] = np.nan  # a non-finite example is dropped, its rows exactly zero (I4)
    vec, _ = _assert_match(model, xs, rng.normal(size=(6, 2)).astype("float32"), clip=0.4,
                           mask=[1, 1, 0, 1, 1, 1])
    assert int(vec["nonfinite"]) == 1
    _assert_match(model, xs[:4], rng.normal(size=(4, 2)).astype("float32"), clip=0.4, num_shards=2)

    backbone = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=12)
    assert not ghost.build_plan(backbone).fallback
