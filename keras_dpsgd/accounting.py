"""Privacy accounting for Poisson-sampled DP-SGD, over Google's `dp-accounting`.

The mechanism is described as data: one logical step of DP-SGD is
`PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`, and `steps` of them are a
`SelfComposedDpEvent`. An accountant (RDP by default, or PLD) interprets the
event. No privacy formula is written here by hand.
"""

import functools
import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

ACCOUNTANTS = ("rdp", "pld")

# RDP orders: a dense grid of integer orders (dp-accounting's fractional-order
# series fails to converge near 1 for large q and logs warnings).
_RDP_ORDERS = tuple(
    list(range(2, 64))
    + [80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024]
)


def dp_sgd_event(sampling_rate, noise_multiplier, steps):
    """The `DpEvent` of `steps` logical steps of Poisson-sampled DP-SGD.

    Args:
        sampling_rate: q, the probability that an example is in a logical
            batch (expected batch size / number of examples), in (0, 1].
        noise_multiplier: sigma, noise std divided by the clipping norm, >= 0.
        steps: number of logical steps (noisy updates), int >= 0.

    Returns:
        A `dp_accounting.DpEvent`.
    """
    _check_rate_sigma_steps(sampling_rate, noise_multiplier, steps)
    one_step = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(one_step, int(steps))


def _check_rate_sigma_steps(sampling_rate, noise_multiplier, steps):
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(
            f"sampling_rate must be in (0, 1], got {sampling_rate}. It is the "
            "expected batch size divided by the number of training examples."
        )
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier}."
        )
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be an integer >= 0, got {steps}.")


def _check_delta(delta):
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")


def _make_accountant(accountant, pld_discretization=1e-4):
    if accountant == "rdp":
        return rdp.RdpAccountant(list(_RDP_ORDERS))
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=pld_discretization)
    raise ValueError(
        f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}."
    )


def epsilon(sampling_rate, noise_multiplier, steps, delta, accountant="rdp"):
    """The epsilon spent by `steps` logical steps of Poisson-sampled DP-SGD.

    Args:
        sampling_rate: q in (0, 1].
        noise_multiplier: sigma >= 0 (0 gives `inf`).
        steps: number of logical steps taken, int >= 0 (0 gives 0.0).
        delta: target delta in (0, 1).
        accountant: "rdp" (default; fast, slightly loose) or "pld" (tighter,
            slower).

    Returns:
        epsilon, a float (`math.inf` when noise_multiplier is 0 and steps > 0).

    Example:
        >>> round(epsilon(256 / 60000, 1.1, 3515, 1e-5), 2)
        1.28
    """
    _check_rate_sigma_steps(sampling_rate, noise_multiplier, steps)
    _check_delta(delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if accountant == "rdp":
        # Composition is linear in RDP: compute one step once, scale by steps.
        orders, one_step = _rdp_one_step(float(sampling_rate), float(noise_multiplier))
        eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(
            orders, one_step * steps, delta
        )
        return float(eps)
    acc = _make_accountant(accountant)
    acc.compose(dp_sgd_event(sampling_rate, noise_multiplier, steps))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def _rdp_one_step(sampling_rate, noise_multiplier):
    acc = _make_accountant("rdp")
    acc.compose(dp_sgd_event(sampling_rate, noise_multiplier, 1))
    return acc.orders, acc.rdp


def calibrate_noise(target_epsilon, delta, sampling_rate, steps, accountant="rdp"):
    """The smallest noise multiplier sigma whose epsilon is <= target_epsilon.

    Uses `dp_accounting.mechanism_calibration.calibrate_dp_mechanism`, then
    checks the answer and nudges it up if the search tolerance overshot, so the
    returned sigma never exceeds the budget.

    Args:
        target_epsilon: epsilon budget, > 0.
        delta: delta in (0, 1).
        sampling_rate: q in (0, 1].
        steps: number of logical steps the run will take, int >= 1.
        accountant: "rdp" or "pld".

    Returns:
        sigma, a float > 0.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}.")
    _check_delta(delta)
    _check_rate_sigma_steps(sampling_rate, 1.0, steps)
    if steps < 1:
        raise ValueError("calibrate_noise needs steps >= 1.")
    tol = 1e-4

    def calibrate(acct, low, high):
        return dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(acct),
            lambda s: dp_sgd_event(sampling_rate, s, steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
            tol=tol,
        )

    sigma = calibrate("rdp", 1e-3, 1e3)
    if accountant == "pld":
        # PLD is tighter than RDP, so its sigma lies below RDP's. Searching a
        # narrow bracket avoids PLD's huge discretization at tiny sigma.
        try:
            sigma = calibrate("pld", 0.5 * float(sigma), float(sigma))
        except Exception:  # no root in the bracket: RDP's sigma is valid
            pass
    sigma = float(sigma)
    while epsilon(sampling_rate, sigma, steps, delta, accountant) > target_epsilon:
        sigma += tol
    return sigma


def max_steps(target_epsilon, delta, sampling_rate, noise_multiplier, accountant="rdp"):
    """The largest number of logical steps whose epsilon is <= target_epsilon.

    Returns 0 if even one step exceeds the budget. Capped at 10**9.
    """
    if epsilon(sampling_rate, noise_multiplier, 1, delta, accountant) > target_epsilon:
        return 0
    lo, hi = 1, 2
    cap = 10**9
    while hi < cap and epsilon(sampling_rate, noise_multiplier, hi, delta, accountant) <= target_epsilon:
        lo, hi = hi, hi * 2
    if hi >= cap:
        return cap
    while hi - lo > 1:  # invariant: eps(lo) <= target < eps(hi)
        mid = (lo + hi) // 2
        if epsilon(sampling_rate, noise_multiplier, mid, delta, accountant) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def default_delta(num_examples):
    """The default delta: 1 / (10 N), below 1/N as DP practice requires."""
    return 1.0 / (10.0 * num_examples)
