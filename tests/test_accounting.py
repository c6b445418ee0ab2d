"""I7 (accounting half): epsilon is dp-accounting's for the same DpEvent."""

import math
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from keras_dpsgd import accounting


@pytest.mark.parametrize("q,sigma,steps", [(256 / 60000, 1.1, 3515), (0.01, 0.8, 500), (0.5, 2.0, 10)])
def test_rdp_epsilon_equals_dp_accounting_for_the_same_event(q, sigma, steps):
    acc = rdp.RdpAccountant(list(accounting._RDP_ORDERS))
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert accounting.epsilon(q, sigma, steps, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_pld_epsilon_equals_dp_accounting_for_the_same_event():
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(accounting.dp_sgd_event(0.01, 1.0, 200))
    assert accounting.epsilon(0.01, 1.0, 200, 1e-5, "pld") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_matches_the_published_tf_privacy_figure():
    # TF-Privacy's compute_dp_sgd_privacy(60000, 256, 1.1, 15 epochs, 1e-5) = 1.2813
    # (measured in shared/notes/keras-internals.md); same q, sigma, steps.
    assert accounting.epsilon(256 / 60000, 1.1, 3515, 1e-5) == pytest.approx(1.2813, abs=2e-3)


def test_zero_steps_is_zero_and_zero_noise_is_infinite():
    assert accounting.epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert math.isinf(accounting.epsilon(0.1, 0.0, 1, 1e-5))


def test_epsilon_grows_with_steps():
    eps = [accounting.epsilon(0.02, 1.0, s, 1e-5) for s in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]


@pytest.mark.parametrize("acct", ["rdp", "pld"])
def test_calibrated_sigma_is_the_smallest_within_budget(acct):
    sigma = accounting.calibrate_noise(2.0, 1e-5, 0.01, 300, acct)
    assert accounting.epsilon(0.01, sigma, 300, 1e-5, acct) <= 2.0
    assert accounting.epsilon(0.01, sigma * 0.99, 300, 1e-5, acct) > 2.0


def test_max_steps_is_the_budget_boundary():
    t = accounting.max_steps(3.0, 1e-5, 0.01, 1.0)
    assert accounting.epsilon(0.01, 1.0, t, 1e-5) <= 3.0 < accounting.epsilon(0.01, 1.0, t + 1, 1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(sampling_rate=0.0, noise_multiplier=1.0, steps=1, delta=1e-5),
    dict(sampling_rate=1.5, noise_multiplier=1.0, steps=1, delta=1e-5),
    dict(sampling_rate=0.1, noise_multiplier=-1.0, steps=1, delta=1e-5),
    dict(sampling_rate=0.1, noise_multiplier=1.0, steps=1, delta=0.0),
    dict(sampling_rate=0.1, noise_multiplier=1.0, steps=1, delta=1.0),
    dict(sampling_rate=0.1, noise_multiplier=1.0, steps=-1, delta=1e-5),
])
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        accounting.epsilon(**kwargs)


def test_command_line_prints_a_privacy_statement():
    out = subprocess.run(
        [sys.executable, "-m", "keras_dpsgd.privacy", "-N", "60000", "--batch-size", "256",
         "--epochs", "15", "--noise-multiplier", "1.1", "--delta", "1e-5"],
        capture_output=True, text=True, check=True).stdout
    assert "(1.28, 1e-05)-DP" in out and "Poisson" in out
    bad = subprocess.run([sys.executable, "-m", "keras_dpsgd.privacy", "-N", "100", "--batch-size", "10",
                          "--epochs", "1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "noise-multiplier" in bad.stderr
