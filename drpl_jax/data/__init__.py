"""Chest X-ray data sets: TFDS builders, image decoding, random-access sources.

  info = ensure_prepared(config.data)  # once, in setup: builds or finds
  source = get_source(info, 'train')   # source[i] -> image, label, ...

Data sets (`BUILDERS`): `demo` (scikit-learn digits, no download),
`covid19_radiography` (Kaggle, manual download), `cxr_folder` (your own class
folders or manifest.csv). CLI: `python -m drpl_jax.data prepare --name NAME
--manual_dir PATH --data_dir DIR`. `BUILDERS` imports TFDS on first access;
the rest of this package imports TFDS only when it builds or reads.
"""

from drpl_jax.data.api import builders
from drpl_jax.data.api import DatasetInfo
from drpl_jax.data.api import default_data_dir
from drpl_jax.data.api import ensure_prepared
from drpl_jax.data.api import find_prepared
from drpl_jax.data.api import get_source
from drpl_jax.data.api import parse_classes
from drpl_jax.data.api import prepare
from drpl_jax.data.api import prepare_command
from drpl_jax.data.api import prepared_dir
from drpl_jax.data.api import Source
from drpl_jax.data.files import DataError
from drpl_jax.data.images import decode_image
from drpl_jax.data.images import ImageError

__all__ = [
    'BUILDERS',
    'DataError',
    'DatasetInfo',
    'ImageError',
    'Source',
    'builders',
    'decode_image',
    'default_data_dir',
    'ensure_prepared',
    'find_prepared',
    'get_source',
    'parse_classes',
    'prepare',
    'prepare_command',
    'prepared_dir',
]


def __getattr__(name: str):
  """`BUILDERS` (name -> TFDS builder class), loaded lazily (imports TFDS)."""
  if name == 'BUILDERS':
    return builders()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
