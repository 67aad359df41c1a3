"""Tests of drpl_jax.train.losses against independent numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drpl_jax.train import losses

LOGITS = np.array(
    [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]], np.float32
)
LABELS = np.array([0, 1, 2])


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_ce(logits, onehot):
  return -(onehot * np_log_softmax(logits)).sum(-1)


def test_smooth_targets_by_hand():
  t = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
  got = np.asarray(losses.smooth_targets(t, 0.2))
  # 1 * 0.8 + 0.2/4 = 0.85, 0 -> 0.05, 0.5 -> 0.45.
  np.testing.assert_allclose(got[0], [0.85, 0.05, 0.05, 0.05], rtol=1e-6)
  np.testing.assert_allclose(got[1], [0.05, 0.45, 0.45, 0.05], rtol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.smooth_targets(t, 1.5)


def test_cross_entropy_hand_value():
  # Two classes, logits (0, 0): CE = log 2 for any label.
  got = losses.cross_entropy(jnp.zeros((2, 2)), jnp.array([0, 1]))
  np.testing.assert_allclose(got, np.log(2.0), rtol=1e-6)
  # logits (log 3, 0) -> p = (3/4, 1/4); label 0: -log(3/4).
  got = losses.cross_entropy(jnp.array([[np.log(3.0), 0.0]]), jnp.array([0]))
  np.testing.assert_allclose(got, -np.log(0.75), rtol=1e-6)


def test_cross_entropy_matches_numpy_with_smoothing():
  onehot = np.eye(3)[LABELS]
  ls = 0.1
  want = np_ce(LOGITS, onehot * (1 - ls) + ls / 3).mean()
  got = losses.cross_entropy(LOGITS, onehot, label_smoothing=ls)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Integer labels are the same as one-hot targets.
  got_int = losses.cross_entropy(LOGITS, LABELS, label_smoothing=ls)
  np.testing.assert_allclose(got_int, want, rtol=1e-6)


def test_cross_entropy_soft_targets():
  targets = np.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.2, 0.2, 0.6]])
  want = np_ce(LOGITS, targets).mean()
  np.testing.assert_allclose(
      losses.cross_entropy(LOGITS, targets), want, rtol=1e-5
  )


def test_cross_entropy_mask_excludes_padding():
  onehot = np.eye(3)[LABELS]
  mask = np.array([1.0, 1.0, 0.0])
  got = losses.cross_entropy(LOGITS, onehot, mask=mask)
  want = np_ce(LOGITS[:2], onehot[:2]).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Garbage in the padded row changes nothing.
  noisy = LOGITS.copy()
  noisy[2] = [100.0, -100.0, 50.0]
  np.testing.assert_allclose(
      losses.cross_entropy(noisy, onehot, mask=mask), want, rtol=1e-5
  )
  # Everything masked: 0, not NaN.
  assert float(losses.cross_entropy(LOGITS, onehot, mask=np.zeros(3))) == 0.0


def test_cross_entropy_class_weights():
  onehot = np.eye(3)[LABELS]
  w = np.array([1.0, 2.0, 4.0])
  ce = np_ce(LOGITS, onehot)
  want = (ce * w[LABELS]).sum() / w[LABELS].sum()
  got = losses.cross_entropy(LOGITS, onehot, class_weights=w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(got) - ce.mean()) > 1e-3
  # Uniform weights of any value give the plain mean.
  got_uniform = losses.cross_entropy(LOGITS, onehot, class_weights=[5.0] * 3)
  np.testing.assert_allclose(got_uniform, ce.mean(), rtol=1e-5)
  # Mixed targets weight by sum_c t_c w_c.
  mixed = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  ew = mixed @ w
  want = (np_ce(LOGITS, mixed) * ew).sum() / ew.sum()
  np.testing.assert_allclose(
      losses.cross_entropy(LOGITS, mixed, class_weights=w), want, rtol=1e-5
  )
  with pytest.raises(ValueError, match='class_weights'):
    losses.cross_entropy(LOGITS, onehot, class_weights=[1.0, 2.0])


def test_hard_distillation_uses_teacher_argmax():
  teacher = np.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
  want = np_ce(LOGITS, np.eye(3)[[1, 0, 2]]).mean()
  got = losses.hard_distillation(LOGITS, teacher)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  mask = np.array([0.0, 1.0, 1.0])
  want = np_ce(LOGITS[1:], np.eye(3)[[0, 2]]).mean()
  np.testing.assert_allclose(
      losses.hard_distillation(LOGITS, teacher, mask=mask), want, rtol=1e-5
  )


def np_soft(student, teacher, tau):
  lpt = np_log_softmax(teacher / tau)
  lps = np_log_softmax(student / tau)
  return (np.exp(lpt) * (lpt - lps)).sum(-1).mean() * tau**2


def test_soft_distillation_matches_numpy_and_tau_squared():
  teacher = np.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
  for tau in (1.0, 2.0, 4.0):
    got = losses.soft_distillation(LOGITS, teacher, tau=tau)
    np.testing.assert_allclose(got, np_soft(LOGITS, teacher, tau), rtol=1e-5)
  # Batch-mean, not batch x classes: one example, two classes, by hand.
  s = np.array([[0.0, 0.0]])
  t = np.array([[np.log(3.0), 0.0]])  # p_t = (3/4, 1/4), p_s = (1/2, 1/2)
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  np.testing.assert_allclose(
      losses.soft_distillation(s, t, tau=1.0), kl, rtol=1e-5
  )
  # tau^2 scaling: at tau=2 the logits are halved, then multiplied by 4.
  t2 = np.array([[2 * np.log(3.0), 0.0]])
  np.testing.assert_allclose(
      losses.soft_distillation(s, t2, tau=2.0), 4 * kl, rtol=1e-5
  )
  # Identical distributions: zero.
  np.testing.assert_allclose(
      losses.soft_distillation(LOGITS, LOGITS, tau=3.0), 0.0, atol=1e-6
  )
  with pytest.raises(ValueError, match='tau'):
    losses.soft_distillation(LOGITS, teacher, tau=0.0)


def test_total_loss_alpha_weighting():
  cls = LOGITS
  dist = LOGITS[::-1].copy()
  teacher = np.array([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
  onehot = np.eye(3)[LABELS]
  ce_cls = np_ce(cls, onehot).mean()
  hard = np_ce(dist, np.eye(3)[[1, 0, 2]]).mean()
  for alpha in (0.0, 0.3, 1.0):
    loss, aux = losses.total_loss(
        (cls, dist), onehot, teacher, distill_kind='hard', alpha=alpha
    )
    np.testing.assert_allclose(
        loss, (1 - alpha) * ce_cls + alpha * hard, rtol=1e-5
    )
    np.testing.assert_allclose(aux['loss_cls'], ce_cls, rtol=1e-5)
    np.testing.assert_allclose(aux['loss_dist'], hard, rtol=1e-5)
    assert set(aux) == {'loss_cls', 'loss_dist', 'loss'}
  loss, aux = losses.total_loss(
      (cls, dist), onehot, teacher, distill_kind='soft', alpha=0.5, tau=3.0
  )
  np.testing.assert_allclose(
      loss, 0.5 * ce_cls + 0.5 * np_soft(dist, teacher, 3.0), rtol=1e-5
  )


def test_total_loss_without_distillation():
  onehot = np.eye(3)[LABELS]
  ce_cls = np_ce(LOGITS, onehot).mean()
  loss, aux = losses.total_loss(LOGITS, onehot)
  np.testing.assert_allclose(loss, ce_cls, rtol=1e-5)
  assert float(aux['loss_dist']) == 0.0
  dist = LOGITS[::-1].copy()
  loss, aux = losses.total_loss((LOGITS, dist), onehot)
  want = 0.5 * (ce_cls + np_ce(dist, onehot).mean())
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_total_loss_errors():
  onehot = np.eye(3)[LABELS]
  with pytest.raises(ValueError, match='unknown distill_kind'):
    losses.total_loss((LOGITS, LOGITS), onehot, LOGITS, distill_kind='kl')
  with pytest.raises(ValueError, match='teacher_logits'):
    losses.total_loss((LOGITS, LOGITS), onehot, distill_kind='hard')
  with pytest.raises(ValueError, match='dist'):
    losses.total_loss(LOGITS, onehot, LOGITS, distill_kind='soft')
  with pytest.raises(ValueError, match='alpha'):
    losses.total_loss(
        (LOGITS, LOGITS), onehot, LOGITS, distill_kind='soft', alpha=1.5
    )


def test_gradients_finite_under_jit_and_bf16():
  onehot = np.eye(3)[LABELS]
  teacher = jnp.asarray(LOGITS[::-1])
  mask = jnp.array([1.0, 1.0, 0.0])

  @jax.jit
  def loss_fn(cls, dist):
    loss, _ = losses.total_loss(
        (cls, dist),
        onehot,
        teacher,
        distill_kind='soft',
        tau=2.0,
        label_smoothing=0.1,
        class_weights=jnp.array([1.0, 2.0, 3.0]),
        mask=mask,
    )
    return loss

  cls = jnp.asarray(LOGITS * 50).astype(jnp.bfloat16)  # extreme logits
  dist = jnp.asarray(LOGITS).astype(jnp.bfloat16)
  loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(cls, dist)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  for g in grads:
    g = np.asarray(g, np.float32)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[2], 0.0)  # masked row gets no gradient
  # The teacher gets no gradient.
  g_teacher = jax.grad(
      lambda t: losses.soft_distillation(jnp.asarray(LOGITS), t, tau=1.0)
  )(teacher)
  np.testing.assert_array_equal(np.asarray(g_teacher), 0.0)
