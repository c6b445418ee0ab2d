"""Empirical privacy audit: a one-run canary membership audit of DPModel.fit.

Method (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training
Run"): m canaries, each put in the training set independently with probability
1/2; one DP training run; every canary is scored by the final model (the
log-probability of its label: trained-on canaries score higher); the auditor
turns the attack's guesses into an epsilon lower bound that holds with
confidence 1 - significance. The statistics are jax-privacy's
`CanaryScoreAuditor.epsilon_one_run` (no hand-rolled statistics).

Canaries are "dirac" inputs: canary i lights one input coordinate of its own
with a random label, so its gradient touches only its own weight row; the
normal training examples live on the other coordinates. That makes the attack
close to optimal for the Gaussian mechanism while staying tiny.

A correct run must give epsilon_lower <= epsilon (the claimed guarantee).
`--break noise` trains without noise while still reporting the claimed
epsilon: the audit must catch it (epsilon_lower > epsilon).

Usage:
    python tools/audit.py --canaries 1000 --epochs 4 --target-epsilon 2
    python tools/audit.py --canaries 1000 --break noise
"""

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402


def build_data(num_normal, num_canaries, dim, classes, rng):
    width = dim + num_canaries
    x = np.zeros((num_normal, width), "float32")
    x[:, :dim] = rng.normal(size=(num_normal, dim))
    w = rng.normal(size=(dim, classes))
    y = np.argmax(x[:, :dim] @ w, axis=1).astype("int32")
    cx = np.zeros((num_canaries, width), "float32")
    cx[np.arange(num_canaries), dim + np.arange(num_canaries)] = 10.0
    cy = rng.integers(0, classes, size=num_canaries).astype("int32")
    is_in = rng.random(num_canaries) < 0.5
    return x, y, cx, cy, is_in


def run_audit(canaries=1000, normal=1000, dim=16, classes=4, epochs=4, batch_size=100,
              target_epsilon=2.0, delta=1e-5, l2_norm_clip=1.0, learning_rate=2.0,
              break_mode="none", significance=0.05, seed=0, verbose=0):
    import keras

    import keras_dpsgd
    from keras_dpsgd import backend as dp_backend

    from jax_privacy.auditing import CanaryScoreAuditor

    rng = np.random.default_rng(seed)
    x, y, cx, cy, is_in = build_data(normal, canaries, dim, classes, rng)
    train_x = np.concatenate([x, cx[is_in]])
    train_y = np.concatenate([y, cy[is_in]])

    saved = dp_backend.gaussian_noises
    if break_mode == "noise":
        # Deliberately broken DP: no noise, while epsilon is still reported.
        dp_backend.gaussian_noises = lambda seed_words, step, shapes: [keras.ops.zeros(s, "float32") for s in shapes]
    try:
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((x.shape[1],))
        model = keras_dpsgd.DPModel(inputs, keras.layers.Dense(classes, kernel_initializer="zeros")(inputs))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(train_x, train_y, batch_size=batch_size, epochs=epochs, l2_norm_clip=l2_norm_clip,
                  target_epsilon=target_epsilon, target_delta=delta, seed=seed, verbose=verbose)
    finally:
        dp_backend.gaussian_noises = saved

    logits = np.asarray(keras.ops.convert_to_numpy(model.predict(cx, verbose=0)), np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) - logits.max(1, keepdims=True)
    scores = logp[np.arange(canaries), cy]
    auditor = CanaryScoreAuditor(scores[is_in], scores[~is_in])
    eps_claimed, _ = model.privacy_spent()
    return {
        "break": break_mode,
        "canaries": int(canaries),
        "canaries_in": int(is_in.sum()),
        "epsilon_claimed": float(eps_claimed),
        "delta": delta,
        "epsilon_lower": float(auditor.epsilon_one_run(significance=significance, delta=delta)),
        "significance": significance,
        "auroc": float(auditor.attack_auroc()),
        "noise_multiplier": model.optimizer.config_values()["noise_multiplier"],
        "logical_steps": model.optimizer.config_values()["logical_steps"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--normal", type=int, default=1000, help="non-canary training examples")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--target-epsilon", type=float, default=2.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--break", dest="break_mode", choices=["none", "noise"], default="none")
    p.add_argument("--significance", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)
    r = run_audit(canaries=a.canaries, normal=a.normal, epochs=a.epochs, batch_size=a.batch_size,
                  target_epsilon=a.target_epsilon, delta=a.delta, break_mode=a.break_mode,
                  significance=a.significance, seed=a.seed)
    verdict = "OK (epsilon_lower <= epsilon)" if r["epsilon_lower"] <= r["epsilon_claimed"] else \
        "VIOLATION (epsilon_lower > epsilon: the claimed guarantee does not hold)"
    print(f"{'run':<10} {'canaries':>8} {'sigma':>7} {'steps':>6} {'epsilon':>8} {'eps_lower':>10} {'AUROC':>6}")
    print(f"{r['break']:<10} {r['canaries']:>8} {r['noise_multiplier']:>7.3f} {r['logical_steps']:>6} "
          f"{r['epsilon_claimed']:>8.3f} {r['epsilon_lower']:>10.3f} {r['auroc']:>6.3f}")
    print(f"epsilon_lower at {100 * (1 - r['significance']):.0f}% confidence, delta={r['delta']:g}: {verdict}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
