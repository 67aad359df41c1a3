"""Every field of the typed configs is a --config key that reaches them.

Each override goes through absl's real config_flags parsing of
configs/drpl_vit.py, then through the function the code builds the typed
config with. The tables must name every dataclass field, so a field added
without a config key fails here.
"""

import dataclasses
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from drpl_jax.config import base, contract
from drpl_jax.input.augment import AugmentConfig
from drpl_jax.input.config import DataConfig
from drpl_jax.models.config import ConvConfig, ModelConfig, RPEConfig
from drpl_jax.teacher.common import TeacherConfig
from drpl_jax.train.optim import OptimConfig
from drpl_jax.train.step import StepConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = (
    os.path.join(ROOT, 'configs', 'drpl_vit.py') + ':variant=micro,runlocal'
)


def parse(*overrides: str):
  """The ConfigDict drpl_jax.main gets for `--config.<override>` flags."""
  argv = ['prog', f'--config={CONFIG}', *(f'--config.{o}' for o in overrides)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'config', flag_values=values, sys_argv=argv
  )
  values(argv)
  return values.config


def typed_model(config):
  return ModelConfig.from_config(config.model)


def typed_step(config):
  return StepConfig.from_config(config, typed_model(config))


def plain(section, **values):
  """{field: ([flag], value)}: `--config.<section>.<field>=<value>` sets
  the field to `value` (fields dotted for nested sections)."""
  return {k: ([f'{section}.{k}={v}'], v) for k, v in values.items()}


def bound(cls, **values):
  """As `plain`, for a config whose fields name their own config keys."""
  keys = {f.name: f.metadata['key'] for f in dataclasses.fields(cls)}
  return {k: ([f'{keys[k]}={v}'], v) for k, v in values.items()}


# field (dotted for nested) -> (flags, expected typed value)
MODEL = {
    **plain(
        'model',
        num_classes=3,
        image_size=96,
        patch_size=16,
        width=96,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        distilled=False,
        abs_pos_embed=False,
        stem='conv',
        stem_channels=32,
        qkv_bias=False,
        dropout_rate=0.1,
        attn_dropout_rate=0.2,
        drop_path_rate=0.3,
        layer_scale_init=1e-5,
        dtype='bfloat16',
        param_dtype='bfloat16',
        materialize='off',
    ),
    **plain(
        'model',
        **{
            'rpe.kind': 'bias',
            'rpe.ratio': 2.5,
            'rpe.on_q': True,
            'rpe.on_v': True,
            'rpe.shared_heads': False,
            'conv.kind': 'mlp',
            'conv.kernel_size': 5,
            'conv.norm': 'layer',
            'conv.prefix': 'shared',
        },
    ),
    # Fields valid only beside another setting.
    'attention_impl': (
        ['model.dtype=bfloat16', 'model.attention_impl=cudnn'],
        'cudnn',
    ),
    'rpe.on_k': (['model.rpe.on_q=True', 'model.rpe.on_k=False'], False),
}
AUGMENT = plain(
    'data.augment',
    random_resized_crop=False,
    crop_scale=(0.5, 1.0),
    crop_ratio=(0.5, 2.0),
    hflip=True,
    randaugment_ops=3,
    randaugment_magnitude=7.0,
    randaugment_mstd=0.0,
    random_erase=0.5,
    repeated_aug=3,
    interpolation='bilinear',
    teacher_view='crop',
)
TEACHER = {
    **plain(
        'teacher',
        arch='resnet18',
        image_size=48,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        dtype='bfloat16',
    ),
    'num_classes': (['model.num_classes=3'], 3),  # the model's classes
}
STEP = {
    **bound(
        StepConfig,
        num_classes=3,
        distilled=False,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        label_smoothing=0.2,
        distill_kind='soft',
        distill_alpha=0.25,
        distill_tau=2.0,
        mixup_alpha=0.4,
        cutmix_alpha=0.5,
        mixup_prob=0.5,
        mixup_switch_prob=0.25,
        ema_decay=0.999,
        grad_accum_steps=2,
    ),
    # Spelled differently in the config than in the typed config.
    'class_weights': (['loss.class_weights=1,2,1,1'], (1.0, 2.0, 1.0, 1.0)),
    'skip_nonfinite': (['nonfinite=stop'], False),
}
DATA = {
    **plain(
        'data',
        name='demo',
        manual_dir='/raw',
        data_dir='/tfds',
        classes='COVID,Normal',
        split_seed=3,
        min_side=64,
        image_size=96,
        train_split='train_all',
        eval_split='test',
        test_split='validation',
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        num_workers=2,
        balanced_sampler=True,
        eval_crop_ratio=1.0,
    ),
    **{f'augment.{k}': v for k, v in AUGMENT.items()},
}
OPTIM = plain(
    'optim',
    base_lr=1e-3,
    min_lr=1e-5,
    warmup_steps=7,
    weight_decay=0.3,
    rpe_weight_decay=False,
    b1=0.8,
    b2=0.95,
    grad_clip=0.5,
    ema_decay=0.99,
    grad_accum_steps=4,
    mu_dtype='bfloat16',
    layer_decay=0.75,
)
CASES = [
    (name, typed, table)
    for name, typed, table in (
        ('model', typed_model, MODEL),
        (
            'augment',
            lambda c: AugmentConfig.from_config(c.data.augment),
            AUGMENT,
        ),
        ('teacher', base.teacher_config, TEACHER),
        ('step', typed_step, STEP),
        ('data', lambda c: DataConfig.from_config(c.data), DATA),
        ('optim', lambda c: OptimConfig.from_config(c.optim), OPTIM),
    )
]
NESTED = {
    (ModelConfig, 'rpe'): RPEConfig,
    (ModelConfig, 'conv'): ConvConfig,
    (DataConfig, 'augment'): AugmentConfig,
}


def field_names(cls, prefix=''):
  """Dotted names of every (nested) dataclass field."""
  out = set()
  for f in dataclasses.fields(cls):
    nested = NESTED.get((cls, f.name))
    if nested:
      out |= field_names(nested, f'{prefix}{f.name}.')
    else:
      out.add(prefix + f.name)
  return out


def get(obj, dotted):
  for part in dotted.split('.'):
    obj = getattr(obj, part)
  return obj


@pytest.mark.parametrize(
    'cls,table',
    [
        (ModelConfig, MODEL),
        (AugmentConfig, AUGMENT),
        (TeacherConfig, TEACHER),
        (StepConfig, STEP),
        (DataConfig, DATA),
        (OptimConfig, OPTIM),
    ],
)
def test_tables_cover_every_field(cls, table):
  assert set(table) == field_names(cls)


@pytest.mark.parametrize(
    'section,field',
    [(name, field) for name, _, table in CASES for field in table],
)
def test_each_field_is_set_by_its_config_flag(section, field):
  _, typed, table = next(c for c in CASES if c[0] == section)
  overrides, expected = table[field]
  before = get(typed(parse()), field)
  assert before != expected, f'{field}: pick a value unlike {before!r}'
  after = get(typed(parse(*overrides)), field)
  assert (
      after == pytest.approx(expected)
      if isinstance(expected, float)
      else after == expected
  )


def test_defaults_come_from_the_dataclasses():
  config = base.drpl_vit('variant=s')
  # Not set by any run setting: the ml_collections value is the default.
  assert config.model.attention_impl == ModelConfig().attention_impl
  assert config.model.stem_channels == ModelConfig().stem_channels
  assert config.teacher.dtype == 'float32'
  assert config.data.augment.interpolation == AugmentConfig().interpolation
  assert config.data.eval_crop_ratio == DataConfig().eval_crop_ratio
  assert config.optim.b2 == OptimConfig().b2
  assert (
      config.distill.tau
      == StepConfig.__dataclass_fields__['distill_tau'].default
  )
  assert config.loss.class_weights == ''  # StepConfig's None, as stored
  # Variant fields are unset until a flag sets them: the variant decides.
  assert config.model.width is None
  assert typed_model(config).width == 384


def test_advertised_overrides_parse():
  # The docs' examples: both reach the ConfigDict and the typed config.
  config = parse(
      'model.attention_impl=cudnn',
      'model.dtype=bfloat16',
      'teacher.arch=resnet18',
      'teacher.dtype=bfloat16',
  )
  assert typed_model(config).attention_impl == 'cudnn'
  assert base.teacher_config(config).dtype == 'bfloat16'
  # cudnn alone parses; the typed config then names what it needs.
  alone = parse('model.attention_impl=cudnn')
  assert alone.model.attention_impl == 'cudnn'
  with pytest.raises(ValueError, match='needs dtype'):
    typed_model(alone)


def test_every_section_key_is_a_typed_field():
  """No key of a generated section lives outside its dataclass (the
  reverse direction of test_tables_cover_every_field)."""
  config = parse()
  assert DataConfig.from_config(config.data).augment == AugmentConfig(
      **config.data.augment.to_dict()
  )
  assert set(config.optim) == {f.name for f in dataclasses.fields(OptimConfig)}
  step_keys = {f.metadata['key'] for f in dataclasses.fields(StepConfig)}
  for section in ('loss', 'distill', 'mixup'):
    assert {f'{section}.{k}' for k in config[section]} <= step_keys
  assert set(config.data) == {f.name for f in dataclasses.fields(DataConfig)}


def test_step_keys_owned_elsewhere_must_exist():
  config = ml_collections.ConfigDict()
  with pytest.raises(ValueError, match='model.num_classes'):
    contract.place(config, StepConfig)
  with pytest.raises(ValueError, match=r'model\.distilled is missing'):
    contract.read_bound(StepConfig, {'model': {'num_classes': 2}})


def test_unknown_keys_are_named():
  with pytest.raises(ValueError, match=r'teacher\.bogus'):
    contract.build(
        TeacherConfig,
        {'arch': 'resnet18', 'bogus': 1},
        'teacher',
        num_classes=2,
    )
  config = base.drpl_vit('variant=micro')
  config.teacher.unlisted = 1  # e.g. an old meta.json's key
  with pytest.raises(ValueError, match=r'teacher\.unlisted'):
    base.teacher_config(config)
  with pytest.raises(ValueError, match='no_such_key'):
    ModelConfig.from_config({**parse().model.to_dict(), 'no_such_key': 1})
  with pytest.raises(ValueError, match=r'optim\.lr_typo'):
    OptimConfig.from_config({'lr_typo': 1.0})
  with pytest.raises(ValueError, match=r'data\.augment\.bogus'):
    DataConfig.from_config({'augment': {'bogus': 1}})


def test_section_round_trips_a_dataclass():
  section = contract.section(RPEConfig)
  assert contract.build(RPEConfig, section, 'rpe') == RPEConfig()
  with pytest.raises(ValueError, match='no default'):
    contract.section(TeacherConfig)


def test_no_config_file_or_test_edits_sys_path():
  needle = 'sys.path' + '.insert'
  offenders = [
      os.path.relpath(os.path.join(folder, name), ROOT)
      for folder in (os.path.join(ROOT, 'configs'), os.path.join(ROOT, 'tests'))
      for name in sorted(os.listdir(folder))
      if name.endswith('.py')
      and needle in open(os.path.join(folder, name)).read()
  ]
  assert offenders == []
