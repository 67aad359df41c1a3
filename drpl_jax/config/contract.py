"""Typed configs <-> ml_collections sections, so the two cannot drift.

`section(cls)` makes one ConfigDict key per dataclass field, holding the
field's default (defaults live only in the dataclass); `build(cls, section)`
is the inverse and rejects keys the dataclass does not have, naming them.
Optional fields (`float | None`) become typed placeholders, so that
`--config.<section>.<field>=value` still parses to the right type.

A typed config whose fields come from several sections (the train step's:
`loss.*`, `distill.*`, `mixup.*`, `nonfinite`, and keys owned by other
sections such as `model.num_classes`) declares each field with
`bound(key, default)`: `place` writes the defaults of the keys it owns into
the ConfigDict and `read_bound` reads every field back from its key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar('T')


def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional_inner(hint: Any) -> Any | None:
  """For `X | None` the type X (its origin for generics); else None."""
  if typing.get_origin(hint) not in (typing.Union, types.UnionType):
    return None
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if len(args) != 1 or len(args) == len(typing.get_args(hint)):
    return None
  return typing.get_origin(args[0]) or args[0]


def _default(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return dataclasses.MISSING


def section(
    cls: type, *, exclude: Iterable[str] = (), **values: Any
) -> ml_collections.ConfigDict:
  """The ConfigDict section of dataclass `cls`: one key per field.

  A field's value is `values[name]` if given, else its default; a nested
  dataclass becomes a nested section; a field without a default must be in
  `values` or `exclude`.
  """
  hints = _hints(cls)
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    value = values.pop(field.name, _default(field))
    if value is dataclasses.MISSING:
      raise ValueError(
          f'{cls.__name__}.{field.name} has no default: pass '
          'a value or exclude it'
      )
    if dataclasses.is_dataclass(value):
      value = section(type(value), **dataclasses.asdict(value))
    elif value is None:  # a typed placeholder: overrides still parse
      hint = hints[field.name]
      inner = _optional_inner(hint) or typing.get_origin(hint) or hint
      value = (
          config_dict.placeholder(inner) if isinstance(inner, type) else None
      )
    setattr(out, field.name, value)
  if values:
    raise ValueError(f'{cls.__name__} has no fields {sorted(values)}')
  return out


def bound(
    key: str,
    default: Any = dataclasses.MISSING,
    *,
    stored: Any = dataclasses.MISSING,
) -> Any:
  """A dataclass field read from the dotted config `key`.

  Without `default` the key is owned by another typed section (whose
  dataclass holds its default). `stored` is the ConfigDict's default when
  it is spelled differently from the typed one (e.g. '' for None).
  """
  metadata = {'key': key}
  if stored is not dataclasses.MISSING:
    metadata['stored'] = stored
  return dataclasses.field(default=default, metadata=metadata)


def _bound_fields(cls: type) -> list[dataclasses.Field]:
  fields = [f for f in dataclasses.fields(cls) if 'key' in f.metadata]
  if len(fields) != len(dataclasses.fields(cls)):
    raise TypeError(
        f'every field of {cls.__name__} must be declared with '
        'contract.bound(key, ...)'
    )
  return fields


def place(config: ml_collections.ConfigDict, cls: type) -> None:
  """Writes the default of every key `cls` owns into `config`.

  Owned keys are the fields with a default; their sections are created as
  needed. Keys without a default belong to another section and must exist.
  """
  for field in _bound_fields(cls):
    *sections, leaf = field.metadata['key'].split('.')
    node = config
    for name in sections:
      if name not in node:
        setattr(node, name, ml_collections.ConfigDict())
      node = node[name]
    if field.default is dataclasses.MISSING:
      if leaf not in node:
        raise ValueError(
            f'{cls.__name__}.{field.name} reads config key '
            f'{field.metadata["key"]}, which is not set'
        )
      continue
    stored = field.metadata.get('stored', field.default)
    setattr(node, leaf, stored)


def read_bound(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
  """Every field of `cls` as its config key holds it (stored spelling)."""
  out = {}
  for field in _bound_fields(cls):
    node = config
    for name in field.metadata['key'].split('.'):
      if name not in node:
        raise ValueError(
            f'config key {field.metadata["key"]} is missing '
            f'({cls.__name__}.{field.name} reads it)'
        )
      node = node[name]
    out[field.name] = _plain(node)
  return out


def _plain(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(value)
  return value


def build(
    cls: type[T],
    values: Mapping[str, Any],
    name: str,
    *,
    ignore: Iterable[str] = (),
    **extra: Any,
) -> T:
  """The dataclass `cls` from its section `values` (a ConfigDict or dict).

  Keys in `ignore` are run settings kept beside the typed fields; `extra`
  supplies fields that live elsewhere in the config. Any other key that is
  not a field is an error naming `name.key`.
  """
  d = dict(values.to_dict() if hasattr(values, 'to_dict') else values)
  for key in ignore:
    d.pop(key, None)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(
        f'unknown config key {name}.{unknown[0]}; '
        f'{cls.__name__} has {sorted(fields)}'
    )
  hints = _hints(cls)
  kwargs = {}
  for key, value in d.items():
    hint = hints[key]
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
      value = build(hint, value, f'{name}.{key}')
    kwargs[key] = _plain(value)
  kwargs.update(extra)
  return cls(**kwargs)
