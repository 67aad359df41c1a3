r"""Choose a recipe's values by measurement on the validation split.

  # Candidates one factor at a time around the config (or --grid: all
  # combinations), each trained for a fixed budget, then evaluated on the
  # VALIDATION split with the shortcut probes:
  python -m drpl_jax.sweep run --config=configs/small_data.py \
      --workdir /tmp/sweep --steps 600 [--seeds 1] [--grid] \
      --sweep 'optim.base_lr=4e-3|8e-3|1.6e-2' \
      --sweep 'distill.alpha=0.3|0.5|0.7' \
      --sweep 'teacher_recipe.epochs=10|20' \
      [--config.data.image_size=96 ...]
  # The recipe's teacher alone (train_teacher with config.teacher_recipe):
  python -m drpl_jax.sweep teacher --config=configs/small_data.py \
      --out /tmp/teacher.safetensors [--config.KEY=VALUE ...]

`--sweep KEY=V1|V2|...` lists candidate values (Python literals, else
strings) of a config key; `--config.KEY=V` changes the base for all. Keys under
`teacher_recipe.` (the `train_teacher` flags) give candidates with their own
teacher: every distinct teacher recipe is trained once under
WORKDIR/teachers/ and shared by the candidates that use it (skipped when
`teacher.checkpoint` is given). The base config is always candidate 0.

Under WORKDIR: `candidates/<i>/seed<k>/` (a drpl_jax.main workdir each; its
validation report in `eval/validation/report.json`), `sweep.json` (every
candidate: overrides, per-seed validation figures, means, teacher validation
accuracy, minutes) and `sweep.md` (one table), rewritten after each
candidate. A rerun skips the finished ones (with more --seeds it adds the
missing seeds); a candidate directory that holds another candidate's runs
(other --sweep or --config flags) is refused. WORKDIR may be local or gs://
(every file goes through etils.epath). The test split is never read:
a config whose evaluation split is the test split is refused.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from etils import epath

from drpl_jax import cli
from drpl_jax.utils import files

FIGURES = (
    'accuracy',
    'balanced_accuracy',
    'auc',
    'lungs_hidden_accuracy',
    'lungs_only_accuracy',
    'attention_lung_share',
)


def parse_value(text: str) -> Any:
  """A Python literal ('4e-3', '(0.3, 1.0)', 'True'), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_assignment(text: str, many: bool) -> tuple[str, Any]:
  """'key=v' -> (key, value); with `many`, 'key=a|b' -> (key, [a, b])."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ValueError(f'{text!r}: expected KEY=VALUE')
  if many:
    return key, [parse_value(v) for v in value.split('|')]
  return key, parse_value(value)


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets dotted `key`; an unknown key is an error naming it."""
  node = config
  *parents, leaf = key.split('.')
  for p in parents:
    if p not in node:
      raise ValueError(f'unknown config key {key!r}')
    node = node[p]
  if leaf not in node:
    raise ValueError(f'unknown config key {key!r}')
  current = node[leaf]
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f'config key {key!r} cannot take {value!r}: {e}') from e


def candidates(
    sweeps: Sequence[tuple[str, list[Any]]], grid: bool
) -> list[dict[str, Any]]:
  """The base ({}) first, then one factor at a time or the full grid."""
  out: list[dict[str, Any]] = [{}]
  if grid and sweeps:
    keys = [k for k, _ in sweeps]
    for values in itertools.product(*(v for _, v in sweeps)):
      out.append(dict(zip(keys, values)))
  else:
    for key, values in sweeps:
      out += [{key: v} for v in values]
  unique, seen = [], set()
  for c in out:
    token = json.dumps(c, sort_keys=True, default=str)
    if token not in seen:
      seen.add(token)
      unique.append(c)
  return unique


def candidate_config(
    base: ml_collections.ConfigDict,
    overrides: dict[str, Any],
    steps: int | None = None,
) -> ml_collections.ConfigDict:
  """`base` with a candidate's overrides (and `steps`), `base` untouched.

  A deep copy keeps the base's linked keys linked: `data.image_size=96`
  also sets `model.image_size` (one FieldReference), as `--config.` does.
  """
  config = copy.deepcopy(base)
  for key, value in overrides.items():
    set_key(config, key, value)
  if steps:
    config.total_steps = steps
    config.eval_every_steps = config.checkpoint_every_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
  return config


def check_no_test(config: ml_collections.ConfigDict) -> None:
  """Refuses a config that would evaluate (and so select on) the test split."""
  if config.data.eval_split == config.data.test_split:
    raise ValueError(
        f'config.data.eval_split={config.data.eval_split!r} is '
        'the test split: a sweep selects on validation only'
    )


# ------------------------------------------------------------------ teacher


def teacher_argv(
    spec: str,
    config: ml_collections.ConfigDict,
    base_sets: Sequence[tuple[str, Any]],
    out: str,
) -> list[str]:
  """`python -m drpl_jax.train_teacher` arguments for the config's recipe."""
  recipe = config.get('teacher_recipe')
  if recipe is None:
    raise ValueError(
        f'{spec}: the config has no teacher_recipe; pass '
        'teacher.checkpoint instead'
    )
  argv = [sys.executable, '-m', 'drpl_jax.train_teacher', f'--config={spec}']
  argv += [
      f'--config.{k}={v}'
      for k, v in base_sets
      if not k.startswith('teacher_recipe.')
  ]
  argv += ['--out', out]
  for key, value in recipe.items():
    argv += [f'--{key}', str(value)]
  return argv


def _teacher_key(config: ml_collections.ConfigDict) -> str:
  what = {
      'recipe': config.teacher_recipe.to_dict(),
      'data': {
          k: config.data[k]
          for k in ('name', 'manual_dir', 'classes', 'split_seed')
      },
  }
  return _digest(what)[:10]


def _digest(what: Any) -> str:
  """The sha1 of `what` as canonical JSON (sorted keys)."""
  token = json.dumps(what, sort_keys=True, default=str)
  return hashlib.sha1(token.encode()).hexdigest()


def ensure_teacher(
    spec: str,
    config: ml_collections.ConfigDict,
    base_sets: Sequence[tuple[str, Any]],
    workdir: str,
) -> float | None:
  """Trains (once) the teacher a distilled candidate needs; sets it in the
  config. Returns its validation accuracy (from train_teacher's JSON)."""
  if not config.model.distilled or config.distill.kind == 'none':
    return None
  if not config.teacher.checkpoint:
    out = (
        epath.Path(workdir)
        / 'teachers'
        / (f'{_teacher_key(config)}.safetensors')
    )
    if not out.exists():
      argv = teacher_argv(spec, config, base_sets, os.fspath(out))
      out.parent.mkdir(parents=True, exist_ok=True)
      subprocess.run(argv, check=True)
    config.teacher.checkpoint = os.fspath(out)
    config.teacher.arch = config.teacher_recipe.arch
    config.teacher.image_size = config.teacher_recipe.image_size
  meta = epath.Path(config.teacher.checkpoint).with_suffix('.json')
  if meta.exists():
    return json.loads(meta.read_text()).get('validation', {}).get('accuracy')
  return None


# ------------------------------------------------------------------ the run


def validation_figures(report: dict[str, Any]) -> dict[str, Any]:
  """The sweep's figures from a validation report.json (with probes)."""
  probes = report.get('probes') or {}
  attention = report.get('attention') or {}
  get = lambda name: (probes.get(name) or {}).get('accuracy')
  return {
      'accuracy': report['accuracy'],
      'balanced_accuracy': report['balanced_accuracy'],
      'auc': report.get('macro', {}).get('auc'),
      'lungs_hidden_accuracy': get('lungs_hidden'),
      'lungs_only_accuracy': get('lungs_only'),
      'attention_lung_share': attention.get('lung_share_mean'),
      'shortcut_flag': probes.get('shortcut_flag'),
  }


def _train_one(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  from drpl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  train.train_and_evaluate(config, workdir)
  report = evaluate.evaluate(
      config,
      workdir,
      split=config.data.eval_split,
      n_bootstrap=0,
      use_ema=False,
  )
  return validation_figures(report)


def _fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of everything a candidate's runs depend on but the seed."""
  what = config.to_dict()
  what.pop('seed', None)
  return _digest(what)[:12]


def _check_identity(
    cand_dir: epath.Path, held: dict[str, Any], identity: dict[str, Any]
) -> None:
  """Refuses a candidate directory that holds another candidate's runs
  (`held`: its candidate.json, or its result.json written before that
  file existed, which has the overrides only)."""
  same = (
      held['overrides'] == identity['overrides']
      and held.get('fingerprint', identity['fingerprint'])
      == identity['fingerprint']
  )
  if not same:
    raise ValueError(
        f'{cand_dir} holds the runs of candidate {held["overrides"] or "base"}'
        f' (config {held.get("fingerprint", "?")}), not of '
        f'{identity["overrides"] or "base"} (config '
        f'{identity["fingerprint"]}): the --sweep or --config flags changed; '
        'use a new --workdir, or remove that directory to retrain it'
    )


def _mean(values: Sequence[Any]) -> float | None:
  got = [v for v in values if v is not None]
  return sum(got) / len(got) if got else None


def run_candidate(
    spec: str,
    base: ml_collections.ConfigDict,
    base_sets: Sequence[tuple[str, Any]],
    overrides: dict[str, Any],
    index: int,
    workdir: str,
    steps: int | None,
    seeds: int,
) -> dict[str, Any]:
  """Trains and evaluates one candidate (every seed); cached on disk.

  The candidate's directory records what it trains (`candidate.json`: its
  overrides and a fingerprint of its config). A rerun reuses the finished
  result only for the same candidate and number of seeds; with another
  number of seeds it resumes each seed's run (finished ones are only
  re-evaluated). A directory that holds another candidate (the same
  WORKDIR with other --sweep or --config flags) is refused, naming it,
  rather than resumed from the other candidate's checkpoints.
  """
  cand_dir = epath.Path(workdir) / 'candidates' / str(index)
  config = candidate_config(base, overrides, steps)
  check_no_test(config)
  identity = json.loads(  # as it reads back from disk (tuples as lists)
      json.dumps(
          {'overrides': overrides, 'fingerprint': _fingerprint(config)},
          default=str,
      )
  )
  marker, done = cand_dir / 'candidate.json', cand_dir / 'result.json'
  cached = json.loads(done.read_text()) if done.exists() else None
  held = json.loads(marker.read_text()) if marker.exists() else cached
  if held is not None:
    _check_identity(cand_dir, held, identity)
  if cached is not None and len(cached['seeds']) == seeds:
    return cached
  cand_dir.mkdir(parents=True, exist_ok=True)
  files.atomic_write(cand_dir / 'candidate.json', json.dumps(identity))
  tic = time.time()
  teacher_acc = ensure_teacher(spec, config, base_sets, workdir)
  per_seed = []
  for seed in range(seeds):
    config.seed = seed
    per_seed.append(_train_one(config, os.fspath(cand_dir / f'seed{seed}')))
  result = {
      'index': index,
      'overrides': overrides,
      'teacher_val_accuracy': teacher_acc,
      'teacher': config.teacher.checkpoint or None,
      'seeds': per_seed,
      'mean': {k: _mean([s[k] for s in per_seed]) for k in FIGURES},
      'shortcut_flags': sum(bool(s['shortcut_flag']) for s in per_seed),
      'minutes': round((time.time() - tic) / 60, 2),
  }
  cand_dir.mkdir(parents=True, exist_ok=True)
  files.atomic_write(done, json.dumps(result, indent=1, default=str))
  return result


def markdown(
    results: Sequence[dict[str, Any]], command: str, split: str
) -> str:
  """The sweep table: one row per candidate, means over seeds."""
  pct = lambda x: '—' if x is None else f'{100 * x:.1f}'
  head = [
      '#',
      'Overrides',
      'Val acc',
      'Bal acc',
      'AUC',
      'Lungs hidden',
      'Lungs only',
      'Attn in box',
      'Flags',
      'Teacher val',
      'Min',
  ]
  lines = [
      f'# Validation sweep ({split} split; never test)',
      '',
      f'Command: `{command}`',
      '',
      '| ' + ' | '.join(head) + ' |',
      '|' + '---|' * len(head),
  ]
  for r in results:
    m = r['mean']
    over = ', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or 'base'
    auc = '—' if m['auc'] is None else f'{m["auc"]:.3f}'
    cells = [
        str(r['index']),
        over,
        pct(m['accuracy']),
        pct(m['balanced_accuracy']),
        auc,
        pct(m['lungs_hidden_accuracy']),
        pct(m['lungs_only_accuracy']),
        pct(m['attention_lung_share']),
        f'{r["shortcut_flags"]}/{len(r["seeds"])}',
        pct(r['teacher_val_accuracy']),
        str(r['minutes']),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
      '',
      'Means over seeds, in %. Lungs hidden / only: validation '
      'accuracy with the central lung box masked / kept alone; a '
      'high "lungs hidden" is a shortcut '
      '(drpl_jax/evaluation/probes.py). Choose '
      'border-related settings by these columns, not by accuracy '
      'alone.',
      '',
  ]
  return '\n'.join(lines)


def run_sweep(
    spec: str,
    base: ml_collections.ConfigDict,
    base_sets: Sequence[tuple[str, Any]],
    sweeps: Sequence[str],
    *,
    workdir: str,
    grid: bool,
    steps: int | None,
    seeds: int,
    command: str,
) -> str:
  """Trains and evaluates every candidate; returns the path of sweep.md.

  `base` is the config of `spec` with the `base_sets` overrides applied;
  `sweeps` are the `KEY=V1|V2|...` strings of `--sweep`.
  """
  check_no_test(base)
  if seeds < 1:
    raise ValueError(f'--seeds={seeds} must be >= 1')
  parsed = [parse_assignment(s, many=True) for s in sweeps]
  for key, values in parsed:  # fail on a typo before hours of training
    for value in values:
      candidate_config(base, {key: value})
  results = []
  for i, overrides in enumerate(candidates(parsed, grid)):
    results.append(
        run_candidate(
            spec, base, base_sets, overrides, i, workdir, steps, seeds
        )
    )
    _write(workdir, results, command, base.data.eval_split)
  return os.fspath(epath.Path(workdir) / 'sweep.md')


def _write(workdir: str, results, command: str, split: str) -> None:
  """Rewrites WORKDIR/sweep.json and sweep.md (each atomically)."""
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  files.atomic_write(
      out / 'sweep.json',
      json.dumps(
          {'command': command, 'split': split, 'candidates': results},
          indent=1,
          default=str,
      ),
  )
  files.atomic_write(out / 'sweep.md', markdown(results, command, split))


# ------------------------------------------------------------ command line

SUBCOMMANDS = ('run', 'teacher')


def _define_flags() -> None:
  """The command's flags (defined only when it runs, not on import)."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config',
      None,
      'FILE[:ARGS]; --config.KEY=VALUE changes the base of every candidate.',
  )
  cli.define_workdir("The sweep's directory (run).", required=False)
  flags.DEFINE_multi_string('sweep', [], 'KEY=V1|V2|... (run; repeatable).')
  flags.DEFINE_bool(
      'grid', False, 'All combinations (run; default: one factor at a time).'
  )
  flags.DEFINE_integer(
      'steps',
      None,
      "Training steps of every candidate (run; default: the config's).",
  )
  flags.DEFINE_integer('seeds', 1, 'Seeds per candidate (run).')
  flags.DEFINE_string('out', None, "The teacher's output file (teacher).")
  flags.mark_flags_as_required(['config'])


def main(argv: Sequence[str]) -> int:
  """`run` or `teacher` (argv[1]) with the parsed flags."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise cli.UserError(
        f'expected one subcommand of {SUBCOMMANDS}, got {list(argv[1:])}'
    )
  spec = config_flags.get_config_filename(f['config'])
  base_sets = list(config_flags.get_override_values(f['config']).items())
  if argv[1] == 'teacher':
    if not f.out:
      raise cli.UserError('teacher needs --out FILE.safetensors')
    return subprocess.run(
        teacher_argv(spec, f.config, base_sets, f.out)
    ).returncode
  if not f.workdir:
    raise cli.UserError('run needs --workdir DIR')
  command = 'python -m drpl_jax.sweep ' + ' '.join(sys.argv[1:])
  path = run_sweep(
      spec,
      f.config,
      base_sets,
      f.sweep,
      workdir=f.workdir,
      grid=f.grid,
      steps=f.steps,
      seeds=f.seeds,
      command=command,
  )
  print(f'wrote {path}')
  return 0


def run() -> None:
  """The command line (`python -m drpl_jax.sweep`, `drpl-sweep`): defines
  the flags, then runs `main` under the exit policy of drpl_jax/cli.py."""
  _define_flags()
  cli.run(main, user_errors=(ValueError, FileNotFoundError))
