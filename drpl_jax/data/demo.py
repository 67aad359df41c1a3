"""`demo`: a tiny image data set that installs with the project's dependencies.

scikit-learn's bundled 8x8 handwritten digits (1797 images, classes '0'..'9',
no download), values 0..16 scaled to 0..255, upsampled to 32x32 (bilinear),
grayscale replicated to RGB. Seeded stratified 80/10/10 split. It is the data
set of the README's demo command and prepares in seconds.
"""

import functools

import numpy as np
import PIL.Image

from drpl_jax.data import builder
from drpl_jax.data.files import DataError

CLASS_NAMES = tuple(str(d) for d in range(10))
IMAGE_SIZE = 32


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 8, 8], labels int [1797]) from scikit-learn."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return pixels, digits.target.astype(np.int64)


def digit_image(index: int) -> np.ndarray:
  """The demo image `index` as uint8 [32, 32, 3]."""
  small = PIL.Image.fromarray(_digits()[0][index])
  big = small.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.Resampling.BILINEAR)
  gray = np.asarray(big, dtype=np.uint8)
  return np.repeat(gray[:, :, None], 3, axis=2)  # [32, 32] -> [32, 32, 3]


class Demo(builder.CxrBuilder, skip_registration=True):
  """scikit-learn digits as 32x32 RGB images (see module docstring)."""

  name = 'demo'
  USES_MANUAL_DIR = False
  HOMEPAGE = (
      'https://scikit-learn.org/stable/modules/generated/'
      'sklearn.datasets.load_digits.html'
  )

  def _list(self) -> builder.Listing:
    classes = self.builder_config.classes or CLASS_NAMES
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown:
      raise DataError(
          f'demo: unknown classes {unknown}; the classes are '
          f'{list(CLASS_NAMES)}'
      )
    index = {name: i for i, name in enumerate(classes)}
    labels = _digits()[1]
    items = tuple(
        builder.Item(
            id=f'{labels[i]}/digit-{i:04d}', label=index[str(labels[i])], ref=i
        )
        for i in range(len(labels))
        if str(labels[i]) in index
    )
    return builder.Listing(
        class_names=tuple(classes),
        items=items,
        source='sklearn.datasets.load_digits',
    )

  def _load(self, item: builder.Item) -> np.ndarray:
    return digit_image(item.ref)
