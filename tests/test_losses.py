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


@pytest.mark.parametrize(
    "rho_pos, rho_neg, dtype",
    [(0.5, 0.49999999, tf.float32), (0.3, 0.6999, tf.float16), (0.4999, 0.5, tf.float16)],
)
def test_rates_valid_in_float64_but_not_in_the_loss_dtype_are_refused(rho_pos, rho_neg, dtype):
    # 1 - rho_pos - rho_neg > 0 in float64, but 0 in `dtype` (a division by zero), or so
    # small that the loss overflows there.
    with pytest.raises(ValueError, match=rf"in {dtype.name}, where the loss is computed"):
        unbiased_loss(tf.constant([0.3], dtype), [1.0], rho_pos, rho_neg)
    np.testing.assert_array_less(0, 1.0 - rho_pos - rho_neg)
    assert np.isfinite(unbiased_loss(tf.constant([0.3], tf.float64), [1.0], rho_pos, rho_neg)).all()


def test_the_quantizer_refuses_rates_its_float32_loss_cannot_take():
    import larq_noisy

    with pytest.raises(ValueError, match="in float32, where the loss is computed"):
        larq_noisy.NoisyMappedQuantizer(rho_pos=0.5, rho_neg=0.49999999)


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32])
def test_near_singular_rates_are_as_accurate_as_the_dtype(dtype):
    # The coefficients 1 / (1 - rho_pos - rho_neg) are computed in float64 and then
    # cast: in float16, 1 - 0.3 - 0.6997 would be 4.9e-4 instead of 3e-4 (60% off).
    rho_pos, rho_neg = 0.3, 0.6997
    t = np.linspace(-1, 1, 9)
    y = np.where(np.arange(9) % 2 == 0, 1.0, -1.0)
    exact = unbiased_loss(t, y, rho_pos, rho_neg).numpy()
    got = unbiased_loss(tf.constant(t, dtype), y, rho_pos, rho_neg)
    assert got.dtype == dtype and np.isfinite(got.numpy()).all()
    resolution = float(np.finfo(dtype.as_numpy_dtype).eps)
    np.testing.assert_allclose(got.numpy().astype("float64"), exact, rtol=8 * resolution,
                               atol=8 * resolution * np.abs(exact).max())
