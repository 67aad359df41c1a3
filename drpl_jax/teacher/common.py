"""Shared pieces of the Flax ports of torchvision CNN teachers.

Everything here follows PyTorch's numerics so that converted weights give the
same logits: explicit symmetric padding on every convolution (never 'SAME'),
max-pooling padded with -inf, BatchNorm with eps 1e-5 in inference mode
(running averages), and the input preprocessing of torchvision's eval
transforms (resize with antialiasing, then mean/std normalisation).

The teachers take NHWC images; PyTorch takes NCHW. Only the weight layout
differs (see `drpl_jax.teacher.weights`), the arithmetic is the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5  # torchvision's BatchNorm2d default.
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """What a teacher is and how it sees its input.

  arch: a key of `drpl_jax.teacher.TEACHER_ARCHS` (torchvision's name).
  num_classes: size of the classifier.
  image_size: the resolution the teacher was trained at; inputs of another
    size are resized to it (bilinear, antialiased, as torchvision's
    `transforms.Resize` on tensors).
  mean, std: per-channel normalisation the teacher was trained with; the
    teacher applies it itself to images in [0, 1].
  dtype: compute dtype ('float32', or 'bfloat16' on accelerators);
    parameters stay float32 and logits are returned as float32.
  """

  arch: str
  num_classes: int
  image_size: int = 224
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  dtype: str = 'float32'

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}')
    if self.image_size < 1:
      raise ValueError(f'image_size must be >= 1, got {self.image_size}')
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(
          f'mean and std need 3 values (RGB), got mean={self.mean} '
          f'std={self.std}'
      )
    if any(s <= 0 for s in self.std):
      raise ValueError(f'std values must be > 0, got {self.std}')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
    # Tuples keep the config hashable when lists come from a CLI or config.
    object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))
    object.__setattr__(self, 'std', tuple(float(s) for s in self.std))


def _precision(dtype: jnp.dtype, rngs: nnx.Rngs) -> dict:
  """Compute in `dtype`, keep parameters float32 (see `TeacherConfig`)."""
  return {'dtype': dtype, 'param_dtype': jnp.float32, 'rngs': rngs}


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = False,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """A PyTorch-style Conv2d: explicit symmetric padding (default k // 2)."""
  pad = kernel // 2 if padding is None else padding
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=use_bias,
      **_precision(dtype, rngs),
  )


def batch_norm(
    features: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs
) -> nnx.BatchNorm:
  """A BatchNorm2d in inference mode (running averages, eps 1e-5)."""
  return nnx.BatchNorm(
      features,
      use_running_average=True,
      momentum=0.9,  # PyTorch momentum 0.1; unused in inference.
      epsilon=BN_EPS,
      **_precision(dtype, rngs),
  )


def linear(
    in_features: int,
    out_features: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """A Linear layer (kernel [in, out], the transpose of PyTorch's)."""
  return nnx.Linear(in_features, out_features, **_precision(dtype, rngs))


def conv_bn(
    in_features: int,
    out_features: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.List:
  """torchvision's `Conv2dNormActivation` minus the activation: [conv, bn].

  A list so that parameter paths read `stem.0.kernel`, `stem.1.scale` like
  the state-dict keys `stem.0.weight`, `stem.1.weight`.
  """
  kw = dict(dtype=dtype, rngs=rngs)
  return nnx.List(
      [
          conv(
              in_features,
              out_features,
              kernel,
              stride=stride,
              groups=groups,
              **kw,
          ),
          batch_norm(out_features, **kw),
      ]
  )


def projection(
    in_features: int,
    out_features: int,
    stride: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.List | None:
  """A residual's 1x1 conv + BN shortcut; None when the shape is unchanged."""
  if stride == 1 and in_features == out_features:
    return None
  return conv_bn(
      in_features, out_features, 1, stride=stride, dtype=dtype, rngs=rngs
  )


def apply_conv_bn(layers: nnx.List, x: jax.Array, *, relu: bool) -> jax.Array:
  """Runs a `conv_bn` pair, optionally followed by ReLU."""
  x = layers[1](layers[0](x))
  return jax.nn.relu(x) if relu else x


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch MaxPool2d(3, stride=2, padding=1): padding counts as -inf."""
  return nnx.max_pool(
      x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
  )


def global_avg_pool(x: jax.Array) -> jax.Array:
  """AdaptiveAvgPool2d(1) + flatten: [B, H, W, C] -> [B, C]."""
  return jnp.mean(x, axis=(1, 2))


def preprocess(images: jax.Array, cfg: TeacherConfig) -> jax.Array:
  """Turns [B, H, W, C] images in [0, 1] into the teacher's network input.

  C may be 3 (RGB) or 1 (grayscale, repeated to 3 channels). Images whose
  spatial size is not `cfg.image_size` are resized to it with bilinear
  interpolation and antialiasing (`jax.image.resize(..., antialias=True)`);
  this equals torchvision's `Resize` on tensors (antialias=True, the default
  since torchvision 0.17, half-pixel centres) for both up- and downsampling,
  so a teacher trained with torchvision transforms sees the same pixels.
  Inputs already at `image_size` are not touched. Then the teacher's own
  mean/std normalisation is applied; the result has the compute dtype.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        'teacher input must be [B, H, W, 3] (or [B, H, W, 1]) images in '
        f'[0, 1], got shape {tuple(images.shape)}'
    )
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # [B, H, W, 3]
  size = cfg.image_size
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(
        x, (x.shape[0], size, size, 3), method='bilinear', antialias=True
    )  # [B, size, size, 3]
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  return ((x - mean) / std).astype(jnp.dtype(cfg.dtype))


def finish_logits(logits: jax.Array) -> jax.Array:
  """float32 logits with no gradient path: the teacher is never trained."""
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


class TeacherCNN(nnx.Module):
  """What every teacher CNN shares: its config, the input preprocessing,
  global average pooling and the float32, gradient-free logits.

  A subclass builds its layers (keeping torchvision's names, which the
  converters map) and defines `trunk` (preprocessed images -> the last
  feature map) and `head` (its final linear layer).
  """

  def __init__(self, cfg: TeacherConfig):
    self.arch = cfg.arch
    self.cfg = cfg

  def trunk(self, x: jax.Array) -> jax.Array:
    """[B, H, W, 3] network input -> [B, h, w, C] features."""
    raise NotImplementedError

  def head(self) -> nnx.Linear:
    """The classifier applied to the pooled features."""
    raise NotImplementedError

  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] images in [0, 1] -> [B, num_classes] float32 logits."""
    x = self.trunk(preprocess(images, self.cfg))
    return finish_logits(self.head()(global_avg_pool(x)))
