"""A new user's mistakes and the documented commands' edge cases (issue 17):
each gets one clear line or the right fallback, never a traceback."""

import csv
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from drpl_jax import cli
from drpl_jax.evaluation import evaluate
from drpl_jax.evaluation import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def _cli(*args, env=None, cwd=ROOT, timeout=300):
  """Runs a command from the repo root; returns the CompletedProcess."""
  full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  return subprocess.run(
      list(args),
      cwd=cwd,
      env=full_env,
      text=True,
      capture_output=True,
      timeout=timeout,
      check=False,
  )


def _one_line_error(proc, *needles):
  """A failed command whose stderr ends in one line naming `needles`."""
  assert proc.returncode != 0, proc.stdout
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  for needle in needles:
    assert needle in last, last
  return last


def _copy_run(tiny_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run[0], workdir)
  return workdir


# 1 ------------------------------------------------------------------------


def test_distilled_preset_without_teacher_says_what_to_add(tmp_path):
  workdir = tmp_path / 'w'
  proc = _cli(
      PYTHON,
      '-m',
      'drpl_jax.main',
      '--config=configs/drpl_vit.py:variant=s,preset=drpl',
      f'--workdir={workdir}',
  )
  _one_line_error(
      proc,
      '--config.teacher.arch',
      '--config.teacher.checkpoint',
      'distill.kind=none',
  )
  assert not workdir.exists()  # before any work


# 2 ------------------------------------------------------------------------


def _break_latest(workdir):
  """What an interrupted save leaves: step 2 without its array data."""
  state = os.path.join(workdir, 'checkpoints', '2', 'state')
  for path in glob.glob(os.path.join(state, '*')):
    if os.path.isdir(path):
      shutil.rmtree(path)


def test_readers_fall_back_from_an_incomplete_checkpoint(
    tiny_run, tmp_path, caplog, capsys
):
  workdir = _copy_run(tiny_run, tmp_path)
  _break_latest(workdir)
  caplog.set_level(logging.WARNING)
  restored = predict.restore_model(workdir)  # predict and export use it
  assert restored.step == 1
  assert 'Skipping incomplete checkpoint' in caplog.text
  evaluator = evaluate.Evaluator(evaluate.config_from_workdir(workdir), workdir)
  assert evaluator.step == 1
  image = str(tmp_path / 'x.png')
  PIL.Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
  with pytest.raises(cli.UserError, match='is incomplete') as error:
    predict.predict_command(workdir, [image], step=2)
  assert len(str(error.value).splitlines()) == 1
  assert '--step' in str(error.value)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))  # kept


# 3 ------------------------------------------------------------------------


def test_runlocal_keeps_an_explicit_variant():
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  drpl_vit = config_module('drpl_vit')
  ti = drpl_vit.get_config('variant=ti,runlocal')
  assert ti.model.variant == 'ti' and ti.model.patch_size == 16
  assert ti.data.image_size == 64 and ti.total_steps == 200
  micro = drpl_vit.get_config('runlocal')
  assert micro.model.variant == 'micro' and micro.model.patch_size == 8
  assert drpl_vit.get_config('').model.variant == 's'


# 4 ------------------------------------------------------------------------


def test_evaluate_config_defaults_to_the_run_and_names_differences(tiny_run):
  workdir, _ = tiny_run
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  demo = config_module('demo')
  run = evaluate.config_from_workdir(workdir)
  assert evaluate.run_config(workdir, None).model.depth == 1
  given = demo.get_config()  # the file alone: the training override is lost
  with pytest.raises(ValueError) as e:
    evaluate.run_config(workdir, given, ['--config=configs/demo.py'])
  message = str(e.value)
  assert 'model.depth' in message and 'leave out --config' in message
  assert '\n' not in message
  # Explicit overrides are merged over the run's own config.
  given = demo.get_config()
  given.model.depth = 1
  given.eval_batch_size = 7
  merged = evaluate.run_config(
      workdir,
      given,
      [
          '--config=configs/demo.py',
          '--config.model.depth=1',
          '--config.eval_batch_size=7',
      ],
  )
  assert merged.eval_batch_size == 7
  assert merged.data.data_dir == run.data.data_dir  # from the run


# 5 ------------------------------------------------------------------------


def test_predict_and_export_without_meta_do_not_suggest_config(
    tmp_path, capsys
):
  from drpl_jax.evaluation import export  # pylint: disable=g-import-not-at-top

  for command in (
      lambda: predict.predict_command(str(tmp_path), ['x.png']),
      lambda: export.export_command(str(tmp_path), str(tmp_path / 'o')),
  ):
    with pytest.raises(cli.UserError, match='meta.json not found') as error:
      command()
    assert '--config' not in str(error.value)


# 7 ------------------------------------------------------------------------


def test_input_bench_reports_null_not_an_absurd_rate(capsys):
  from drpl_jax.bench import input as bench_input  # pylint: disable=g-import-not-at-top

  def make_iter():
    while True:
      yield {'image': np.zeros((4, 2, 2, 3), np.uint8)}

  result = bench_input.measure(make_iter, steps=2, warmup=0)
  assert result['images_per_s_per_core'] is None
  assert 'raise --steps' in capsys.readouterr().err
  assert bench_input.per_core_rate(1000, 2.0) == 500.0


# 8 ------------------------------------------------------------------------


def test_soft_labels_of_another_data_set_refused_before_training(
    demo_data_dir, tmp_path
):
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  demo = config_module('demo')
  from drpl_jax import data  # pylint: disable=g-import-not-at-top
  from drpl_jax.input import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  from drpl_jax.pytorch import soft_labels  # pylint: disable=g-import-not-at-top

  config = demo.get_config('steps=2')
  config.data.data_dir = demo_data_dir
  info = data.ensure_prepared(config.data)
  ids = data.get_source(config.data, 'train').ids
  path = str(tmp_path / 'soft.npz')
  meta = {
      'class_names': list(info.class_names),
      'dataset': {'name': 'covid19_radiography', 'version': '1.0.0'},
  }
  soft_labels.save_soft_labels(
      path,
      ids,
      np.zeros((len(ids), len(info.class_names))),
      ['train'] * len(ids),
      meta,
  )
  config.teacher.soft_labels = path
  with pytest.raises(
      ValueError,
      match='made for data set '
      'covid19_radiography 1.0.0, this run trains on demo',
  ):
    input_pipeline.create_train_iterator(
        input_pipeline.DataConfig.from_config(config.data),
        batch_size=8,
        seed=0,
        soft_labels=config.teacher.soft_labels,
    )
  # Right data set but missing ids: refused too, before any batch.
  meta['dataset'] = {'name': info.name, 'version': info.version}
  soft_labels.save_soft_labels(
      path,
      ids[1:],
      np.zeros((len(ids) - 1, len(info.class_names))),
      ['train'] * (len(ids) - 1),
      meta,
  )
  with pytest.raises(ValueError, match='have no soft label'):
    input_pipeline.create_train_iterator(
        input_pipeline.DataConfig.from_config(config.data),
        batch_size=8,
        seed=0,
        soft_labels=config.teacher.soft_labels,
    )


# 9, 14, 15 -----------------------------------------------------------------


def _manifest_folder(config, root, n=6):
  """An external site as a manifest.csv with patient ids (demo images)."""
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  source = data.get_source(config.data, 'test')
  names = data.ensure_prepared(config.data).class_names
  os.makedirs(root)
  rows = []
  for i in range(n):
    example = source[i]
    PIL.Image.fromarray(example['image']).save(os.path.join(root, f'{i}.png'))
    rows.append((f'{i}.png', names[example['label']], f'P{i // 2}'))
  with open(os.path.join(root, 'manifest.csv'), 'w', newline='') as f:
    csv.writer(f).writerows([('path', 'label', 'patient_id')] + rows)
  return rows


def test_external_manifest_evaluation_and_its_report_title(tiny_run, tmp_path):
  workdir = _copy_run(tiny_run, tmp_path)
  config = evaluate.config_from_workdir(workdir)
  site = str(tmp_path / 'site_b')
  rows = _manifest_folder(config, site)
  report = evaluate.evaluate(
      config, workdir, data=f'cxr_folder:{site}', n_bootstrap=20
  )
  assert report['num_examples'] == len(rows)
  assert report['data']['name'] == f'cxr_folder:{site}'
  with open(os.path.join(workdir, 'eval', 'site_b', 'report.md')) as f:
    title = f.readline()
  assert f'cxr_folder:{site}' in title and 'demo' not in title.split('/')[0]


def test_external_manifest_classes_and_label_map(tmp_path):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'manifest.csv').write_text(
      'path,label,patient_id\na.png,normal,P1\nb.png,COVID,P2\n'
  )
  config, name, label_map = evaluate.external_data(
      f'cxr_folder:{site}', ['COVID', 'Lung_Opacity', 'Normal']
  )
  assert name == 'site' and config['classes'] == 'COVID,normal'
  assert list(label_map) == [0, 2]
  (site / 'manifest.csv').write_text('path,label\na.png,Tumour\n')
  with pytest.raises(ValueError, match=r"\['Tumour'\] are not training"):
    evaluate.external_data(f'cxr_folder:{site}', ['COVID', 'Normal'])


def test_only_process_zero_says_it_wrote_the_report(
    tiny_run, tmp_path, monkeypatch, caplog
):
  workdir = _copy_run(tiny_run, tmp_path)
  config = evaluate.config_from_workdir(workdir)
  real_jax = evaluate.jax

  class OtherProcess:  # evaluate's view of jax, as on process 1 of 2
    process_index = staticmethod(lambda: 1)

    def __getattr__(self, name):
      return getattr(real_jax, name)

  monkeypatch.setattr(evaluate, 'jax', OtherProcess())
  caplog.set_level(logging.INFO)
  evaluate.evaluate(config, workdir, n_bootstrap=10)
  assert not os.path.exists(os.path.join(workdir, 'eval'))
  assert 'Wrote' not in caplog.text


# 10, 11, 13 ------------------------------------------------------------------


def test_bench_help_lists_the_subcommands(capsys):
  from drpl_jax.bench import __main__ as bench_main  # pylint: disable=g-import-not-at-top

  assert bench_main.main(['--help']) == 0
  out = capsys.readouterr().out
  for name in bench_main.SUBCOMMANDS:
    assert re.search(rf'^  {name} ', out, re.M), out


def test_documents_cited_by_the_code_exist():
  cited = set()
  for path in glob.glob(
      os.path.join(ROOT, 'drpl_jax', '**', '*.py'), recursive=True
  ):
    with open(path) as f:
      cited |= {
          (path, m) for m in re.findall(r'\b([A-Za-z_/]+\.md)\b', f.read())
      }
  generated = {
      'report.md',
      'results.md',
      'sweep.md',
      'FILE.md',
      'OUT.md',
  }  # outputs
  missing = [
      (os.path.relpath(p, ROOT), m)
      for p, m in sorted(cited)
      if os.path.basename(m) not in generated
      and not os.path.exists(os.path.join(ROOT, m))
      and not os.path.exists(os.path.join(ROOT, 'docs', m))
  ]
  assert not missing


def test_bench_records_name_their_config_overrides(capsys, monkeypatch):
  from drpl_jax import bench  # pylint: disable=g-import-not-at-top
  from drpl_jax.bench import train as bench_train  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(bench, '_APPLIED_OVERRIDES', {})
  args = bench_train.parse_args(
      [
          '--config=configs/drpl_vit.py:variant=micro',
          '--config.model.materialize=off',
      ]
  )
  assert args.config.model.materialize == 'off'
  bench.emit({'benchmark': 'x'})
  record = json.loads(capsys.readouterr().out)
  assert record['config_overrides'] == {'model.materialize': 'off'}


# 12 ------------------------------------------------------------------------


def test_class_count_follows_the_data_unless_contradicted():
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  drpl_vit = config_module('drpl_vit')
  config = drpl_vit.get_config('variant=micro')
  config.data.classes = 'COVID,Normal'
  preflight.infer_num_classes(config, ('COVID', 'Normal'), set())
  assert config.model.num_classes == 2
  config.model.num_classes = 3
  with pytest.raises(
      ValueError,
      match=r'--config.model.num_classes=3 contradicts .* 2 classes',
  ):
    preflight.infer_num_classes(
        config, ('COVID', 'Normal'), {'model.num_classes'}
    )


# 16 ------------------------------------------------------------------------


def test_export_removes_a_stale_savedmodel(tiny_run, tmp_path):
  from drpl_jax.evaluation import export  # pylint: disable=g-import-not-at-top

  out = tmp_path / 'export'
  (out / export.SAVEDMODEL_DIR).mkdir(parents=True)
  (out / export.SAVEDMODEL_DIR / 'saved_model.pb').write_bytes(b'old')
  meta = export.export_model(
      tiny_run[0], str(out), formats='stablehlo', platforms=('cpu',)
  )
  assert 'savedmodel' not in meta['files']
  assert not (out / export.SAVEDMODEL_DIR).exists()


# 17, 18 ----------------------------------------------------------------------


def test_tpu_pod_names_a_missing_config_file():
  proc = _cli(
      'bash',
      'launch/tpu_pod.sh',
      '--dry-run',
      'run',
      'configs/nope.py',
      'gs://b/w',
      env={'TPU_NAME': 't', 'ZONE': 'z'},
  )
  text = proc.stderr
  assert proc.returncode == 2
  assert "config file 'configs/nope.py' does not exist" in text
  assert 'relative to the repo root' not in text


def test_reproduce_plan_messages(tmp_path, monkeypatch):
  """The plan's messages (`_lines` is what the absl command prints; the
  default data folder is patched, so this runs in-process)."""
  import types  # pylint: disable=g-import-not-at-top
  from drpl_jax.reproduce import cli as reproduce_cli  # pylint: disable=g-import-not-at-top
  from drpl_jax.reproduce import protocol as reproduce  # pylint: disable=g-import-not-at-top

  monkeypatch.setitem(
      reproduce.DEFAULT_DATA, 'sample', str(tmp_path / 'no_sample')
  )

  def plan(**values):
    args = dict(
        cmd='plan',
        what=None,
        mode='sample',
        smoke=False,
        seeds=None,
        workdir=str(tmp_path / 'w'),
        manual_dir='',
        data_dir='',
        teacher='',
        teacher_init='',
        launcher='local',
        command='',
        dry_run=False,
    )
    return reproduce_cli._lines(types.SimpleNamespace(**dict(args, **values)))  # pylint: disable=protected-access

  with pytest.raises(ValueError) as error:
    plan(dry_run=True)
  assert 'sample data' in str(error.value)
  assert 'beside this checkout' in str(error.value)
  assert '--manual_dir ' + str(tmp_path) not in str(error.value)
  sample = tmp_path / 'sample'
  sample.mkdir()
  assert (
      'would be written (dry run)'
      in plan(manual_dir=str(sample), dry_run=True)[0]
  )
  assert not (tmp_path / 'w' / 'reproduce.json').exists()
  assert plan(manual_dir=str(sample))[0].startswith('wrote ')
  assert 'unchanged (dry run)' in plan(manual_dir=str(sample), dry_run=True)[0]


# 19 ------------------------------------------------------------------------


def test_manifest_progress_counts_skipped_rows_once(tmp_path, capsys):
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  manual = tmp_path / 'cxr'
  manual.mkdir()
  rows = []
  for i in range(4):
    PIL.Image.fromarray(np.full((40, 40), i * 40, np.uint8)).save(
        manual / f'{i}.png'
    )
    rows.append((f'{i}.png', 'ab'[i % 2]))
  rows.append(('gone.png', 'a'))
  with open(manual / 'manifest.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('path', 'label')] + rows)
  data.prepare(
      'cxr_folder', data_dir=str(tmp_path / 'd'), manual_dir=str(manual)
  )
  err = capsys.readouterr().err
  assert 'checked 4/4 images (0 skipped, plus 1 skipped before decoding)' in err


# 20, 21 ----------------------------------------------------------------------


def test_predict_warns_about_images_below_the_minimum_side(tiny_run, tmp_path):
  small = str(tmp_path / 'small.png')
  PIL.Image.fromarray(np.zeros((20, 24), np.uint8)).save(small)
  (record,) = predict.predict_images(tiny_run[0], [small])
  assert 'below the 32 px minimum side' in record['warning']
  assert predict.small_image_warning(np.zeros((32, 40, 3))) is None


def test_teacher_of_another_architecture_named_from_its_record(tmp_path):
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top

  ckpt = tmp_path / 'resnet18.safetensors'
  ckpt.write_bytes(b'')
  (tmp_path / 'resnet18.json').write_text(json.dumps({'arch': 'resnet18'}))
  with pytest.raises(
      ValueError,
      match=r'holds a resnet18 .* not resnet50: '
      r'set --config.teacher.arch=resnet18',
  ):
    preflight.check_teacher_arch('resnet50', str(ckpt))
  preflight.check_teacher_arch('resnet18', str(ckpt))  # matches: fine
  preflight.check_teacher_arch('resnet50', str(tmp_path / 'other.pth'))
