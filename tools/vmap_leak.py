"""Does jax.vmap keep examples apart in convolution kernel gradients here?

Prints, for grouped and ungrouped convolutions, which examples' vmapped
per-example kernel gradients are non-finite when only example 1 has a NaN
input. On XLA:CPU (jax 0.10) grouped convolutions with several channels per
group give every example NaN (`ghost.unisolated_vmap_weights`); this runs the
same check on whatever device JAX uses (a GPU on the lent machine).

    python tools/vmap_leak.py
"""

import jax
import jax.numpy as jnp
import numpy as np


def nonfinite_rows(c_in, c_out, groups):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 5, c_in)).astype("float32")
    x[1, 0, 0, 0] = np.nan
    w = jnp.asarray(rng.normal(size=(3, 3, c_in // groups, c_out)).astype("float32"))

    def loss(w, xi):
        out = jax.lax.conv_general_dilated(xi[None], w, (1, 1), "VALID", feature_group_count=groups,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(out ** 2)

    g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, jnp.asarray(x))
    g = np.asarray(g).reshape(4, -1)
    return np.where(~np.all(np.isfinite(g), axis=1))[0].tolist()


def main():
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
    cases = [("Conv2D(4, groups=2) on 4 channels", 4, 4, 2), ("depthwise, multiplier 2", 2, 4, 2),
             ("Conv2D(4), groups=1", 4, 4, 1), ("pure depthwise", 2, 2, 2)]
    for name, c_in, c_out, groups in cases:
        rows = nonfinite_rows(c_in, c_out, groups)
        print(f"{name:36s} non-finite rows {rows}  ({'ISOLATED' if rows == [1] else 'MIXED'})")


if __name__ == "__main__":
    main()
