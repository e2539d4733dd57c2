import numpy as np
import pytest
import tensorflow as tf

from larq_noisy import unbiased_loss


@pytest.mark.parametrize("seed", range(5))
def test_unbiased_in_expectation_over_label_noise(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1, 1, size=1000).astype("float64")
    y = rng.choice([-1.0, 1.0], size=1000)
    rho_pos, rho_neg = rng.uniform(0, 0.45, size=2)
    rho_y = np.where(y > 0, rho_pos, rho_neg)
    expected = (1 - rho_y) * unbiased_loss(t, y, rho_pos, rho_neg) + rho_y * unbiased_loss(
        t, -y, rho_pos, rho_neg
    )
    np.testing.assert_allclose(expected, (t - y) ** 2, rtol=1e-9, atol=1e-12)


def test_matches_paper_formula_elementwise():
    t, y, rho_pos, rho_neg = 0.3, -1.0, 0.1, 0.2
    # y = -1: rho_y = rho_neg, rho_{-y} = rho_pos.
    by_hand = ((1 - rho_pos) * (t - y) ** 2 - rho_neg * (t + y) ** 2) / (1 - 0.1 - 0.2)
    got = float(unbiased_loss(tf.constant([t], tf.float64), [y], rho_pos, rho_neg)[0])
    assert got == pytest.approx(by_hand, rel=1e-12)


def test_zero_noise_is_squared_loss():
    t = tf.constant([-0.7, 0.0, 0.4, 1.0])
    y = tf.constant([1.0, -1.0, -1.0, 1.0])
    np.testing.assert_allclose(unbiased_loss(t, y, 0.0, 0.0), (t - y) ** 2, rtol=1e-6)


def test_symmetric_noise_amplifies_the_label_term():
    # With rho_pos = rho_neg = rho the estimator is t^2 + 1 - 2 t y / (1 - 2 rho): its
    # minimiser y / (1 - 2 rho) lies beyond +-1, so agreeing with the label pays more.
    t = np.linspace(-1, 1, 11)
    y = np.where(np.arange(11) % 2 == 0, 1.0, -1.0)
    rho = 0.1
    np.testing.assert_allclose(
        unbiased_loss(t, y, rho, rho), t**2 + 1 - 2 * t * y / (1 - 2 * rho), rtol=1e-12
    )


@pytest.mark.parametrize(
    "rho_pos, rho_neg, needle",
    [(-0.1, 0.0, "rho_pos=-0.1"), (1.0, 0.0, "rho_pos=1.0"), (0.0, 1.5, "rho_neg=1.5"),
     (0.6, 0.5, "must be < 1")],
)
def test_invalid_rates_are_refused(rho_pos, rho_neg, needle):
    with pytest.raises(ValueError, match=needle) as info:
        unbiased_loss([0.0], [1.0], rho_pos, rho_neg)
    assert "[0, 1)" in str(info.value) or "< 1" in str(info.value)
