"""The empirical privacy audit passes a correct run and catches a broken one."""

import pytest

from tests.conftest import BACKEND

pytest.importorskip("jax_privacy")


@pytest.mark.skipif(BACKEND != "jax", reason="the audit's model runs once, on the default backend")
def test_audit_accepts_correct_dp_and_detects_training_without_noise():
    from tools.audit import run_audit

    kw = dict(canaries=500, normal=500, epochs=3, target_epsilon=1.0, seed=0)
    ok = run_audit(**kw)
    assert ok["epsilon_lower"] <= ok["epsilon_claimed"] == pytest.approx(1.0, abs=0.05)
    broken = run_audit(break_mode="noise", **kw)
    # Same claimed epsilon, but the canaries are found: the claim is falsified.
    assert broken["epsilon_claimed"] == ok["epsilon_claimed"]
    assert broken["epsilon_lower"] > broken["epsilon_claimed"]
    assert broken["auroc"] > 0.9 > ok["auroc"]
