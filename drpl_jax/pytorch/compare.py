r"""JAX vs PyTorch on the same DRPL-ViT, weights and batch, in one process.

  python -m drpl_jax.bench compare --config=configs/drpl_vit.py:variant=micro \
      [--batch_size 16] [--image_size 224] [--steps 10] [--warmup 2] \
      [--rounds 5] \
      [--no_compile] [--markdown OUT.md] [--config.model.dtype=bfloat16 ...]

Frameworks: `jax` (the project's jitted train step and a jitted forward),
`torch_eager` and `torch_compile` (the PyTorch twin, `drpl_jax.pytorch.twin`,
holding the Flax initialisation converted to PyTorch). For each: training
images/s (forward + backward + clipping + AdamW), inference images/s (eval
forward), the warm-up time to the first result (tracing and compilation
included), peak memory (host RSS growth on CPU; device peak on GPU) and the
achieved fraction of the device's peak.

Timing: after the first call and `--warmup` more, `--steps` synchronised
calls of every (framework, mode) are timed, interleaved in `--rounds`
round-robin rounds so that a change in host load hits all frameworks alike;
the median is reported. Mixup/CutMix and the EMA are off (the twin has
neither); distillation uses fixed teacher logits. Torch runs with as many
threads as JAX's CPU client (the cores this process may use). On a shared,
oversubscribed CPU set OMP_WAIT_POLICY=PASSIVE: torch's spinning OpenMP
threads otherwise lose whole scheduler slices at every barrier.

FLOPs per image are counted, not estimated: `torch.utils.flop_counter`
(matmuls, convolutions, attention: the usual "model FLOPs") and XLA's
`cost_analysis()` of the compiled JAX programs (also counts elementwise
work). The fraction of peak uses the torch count, against the faster of
JAX's and torch's n^3 fp32 matmul, timed in the same rounds as the models
(CPU), or the datasheet bf16 dense peak (GPU). Prints one JSON object per measurement; imports no TensorFlow/TFDS/clu.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import statistics
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import flags
from flax import nnx

from drpl_jax import cli
from drpl_jax.bench import emit, tensorflow_imported
from drpl_jax.models import ModelConfig, create_model
from drpl_jax.pytorch import twin as torch_ref
from drpl_jax.pytorch.twin import bench as torch_bench
from drpl_jax.train import optim
from drpl_jax.train.state import TrainState
from drpl_jax.train import step as train_step
from drpl_jax.utils import files

# Datasheet dense bf16 tensor-core peaks (TFLOP/s): H100/H200 SXM, A100.
GPU_PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0}


def _define_flags() -> None:
  """The command's flags (defined only when it runs, not on import)."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      'config',
      None,
      'e.g. configs/drpl_vit.py:variant=micro; '
      '--config.KEY=VALUE overrides a key.',
  )
  cli.define_batch_size(16)
  flags.DEFINE_integer(
      'image_size', 0, "Input resolution (0: the config's).", lower_bound=0
  )
  flags.DEFINE_integer('steps', 10, 'Timed steps.', lower_bound=1)
  flags.DEFINE_integer(
      'warmup',
      2,
      'Untimed steps after the first (compiling) one.',
      lower_bound=0,
  )
  flags.DEFINE_integer(
      'rounds',
      5,
      'Round-robin rounds the timed steps are split in.',
      lower_bound=1,
  )
  flags.DEFINE_bool('no_compile', False, 'Skip torch.compile.')
  flags.DEFINE_string('markdown', '', 'Write a table here.')
  flags.DEFINE_integer(
      'matmul_size',
      2048,
      'n of the n^3 reference matmul (CPU peak).',
      lower_bound=1,
  )
  flags.mark_flags_as_required(['config'])


def parse_flags() -> Any:
  """The parsed flags as one namespace (`args.steps`, ...); `args.config`
  is the ConfigDict, `args.config_spec` the FILE[:ARGS] it came from."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  f = flags.FLAGS
  if f.batch_size < 1:
    raise cli.UserError(f'--batch_size={f.batch_size} must be >= 1')
  args = types.SimpleNamespace(**{name: f[name].value for name in f})
  args.config_spec = config_flags.get_config_filename(f['config'])
  args.rounds = min(args.rounds, args.steps)
  return args


def host_threads() -> int:
  """The CPU cores this process may use (JAX's CPU client uses them all)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _host_rss(field: str) -> int | None:
  """VmRSS or VmHWM (peak RSS) of this process in bytes; None off Linux."""
  try:
    with open('/proc/self/status') as f:
      line = next(t for t in f if t.startswith(field + ':'))
  except (OSError, StopIteration):
    return None
  return int(line.split()[1]) * 1024


def _reset_host_peak() -> None:
  """Returns freed heap to the OS, then resets VmHWM to the current RSS.

  Without the trim, memory that an earlier phase freed but glibc kept would
  be reused unseen by the RSS.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except (OSError, AttributeError):
    pass


def _jax_memory(key: str) -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get(key, 0))


class MemoryMeter:
  """Peak memory of a phase, in MB (None where it cannot be measured).

  CPU: the kernel's peak RSS (VmHWM, reset at the start through
  /proc/self/clear_refs) minus the RSS at the start; exact, and no sampling
  thread competes for the GIL. GPU: torch's `max_memory_allocated` (reset at
  the start), or JAX's `peak_bytes_in_use` minus `bytes_in_use` at the start
  (a lifetime peak, so exact for the first JAX phase that reaches it).
  """

  def __init__(self, device: str, framework: str):
    self.device, self.framework = device, framework
    self.peak_mb: float | None = None

  def __enter__(self) -> 'MemoryMeter':
    if self.device == 'gpu' and self.framework == 'jax':
      self._base = _jax_memory('bytes_in_use')
    elif self.device == 'gpu':
      torch.cuda.reset_peak_memory_stats()
      self._base = torch.cuda.memory_allocated()
    else:
      _reset_host_peak()
      self._base = _host_rss('VmRSS')
    return self

  def __exit__(self, *exc) -> None:
    if self.device == 'gpu' and self.framework == 'jax':
      peak = _jax_memory('peak_bytes_in_use')
    elif self.device == 'gpu':
      peak = torch.cuda.max_memory_allocated()
    else:
      peak = _host_rss('VmHWM')
    if peak is not None and self._base is not None:
      self.peak_mb = (peak - self._base) / 2**20


@dataclasses.dataclass
class Runner:
  """One (framework, mode) under measurement: a step and its results."""

  framework: str
  mode: str
  call: Callable[[], Any]
  sync: Callable[[Any], Any]
  setup_s: float = 0.0  # ahead-of-time compilation, part of the warm-up
  xla_flops: float | None = None
  warmup_s: float = 0.0
  peak_memory_mb: float | None = None
  times: list[float] = dataclasses.field(default_factory=list)


def start(runner: Runner, device: str, warmup: int) -> Runner:
  """The first (compiling) call and `warmup` more, under a MemoryMeter."""
  with MemoryMeter(device, runner.framework) as mem:
    t0 = time.perf_counter()
    runner.sync(runner.call())
    runner.warmup_s = runner.setup_s + time.perf_counter() - t0
    for _ in range(warmup):
      runner.sync(runner.call())
  runner.peak_memory_mb = mem.peak_mb
  return runner


def time_rounds(runners: Sequence[Runner], steps: int, rounds: int) -> None:
  """Times `steps` calls of every runner, round-robin over `rounds`."""
  for r in range(rounds):
    n = steps // rounds + (1 if r < steps % rounds else 0)
    for runner in runners:
      for _ in range(n):
        t0 = time.perf_counter()
        runner.sync(runner.call())
        runner.times.append(time.perf_counter() - t0)


def matmul_runners(n: int, device: str) -> list[Runner]:
  """n^3 matmuls in JAX and torch (fp32 on CPU, bf16 on GPU), started.

  Timed in the same rounds as the models, so the reference rate sees the
  same host load.
  """
  jdtype, tdtype = (
      (jnp.bfloat16, torch.bfloat16)
      if device == 'gpu'
      else (jnp.float32, torch.float32)
  )
  a = jax.random.normal(jax.random.key(0), (n, n), jdtype)
  mm = jax.jit(jnp.matmul)
  b = torch.randn(
      n, n, dtype=tdtype, device='cuda' if device == 'gpu' else 'cpu'
  )
  runners = [
      Runner('jax', 'matmul', lambda: mm(a, a), jax.block_until_ready),
      Runner('torch', 'matmul', lambda: b @ b, torch_bench.sync),
  ]
  for runner in runners:
    runner.sync(runner.call())
  return runners


def matmul_rates(runners: Sequence[Runner], n: int) -> dict[str, float]:
  """GFLOP/s of each timed matmul runner (median step)."""
  return {
      r.framework: 2.0 * n**3 / statistics.median(r.times) / 1e9
      for r in runners
  }


def _xla_flops(compiled: Any) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None else None


def bench_config(args: Any):
  """The config with the benchmark's image size, mixup and EMA off."""
  config = args.config
  if args.image_size:
    config.model.image_size = args.image_size
    config.data.image_size = args.image_size
  config.mixup.mixup_alpha = 0.0
  config.mixup.cutmix_alpha = 0.0
  config.optim.ema_decay = 0.0
  config.batch_size = args.batch_size
  return config


def make_batch(
    model_cfg: ModelConfig, batch: int, seed: int
) -> dict[str, np.ndarray]:
  """uint8 images, labels and teacher logits, the same for every framework."""
  rng = np.random.default_rng(seed)
  size = model_cfg.image_size
  out = {
      'image': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
      'label': rng.integers(0, model_cfg.num_classes, batch, np.int32),
  }
  if model_cfg.distilled:
    out['teacher_logits'] = rng.normal(
        size=(batch, model_cfg.num_classes)
    ).astype(np.float32)
  return out


def jax_runners(config, model, batch: dict[str, np.ndarray]) -> list[Runner]:
  """The jitted eval forward and the project's jitted train step.

  Compiled ahead of time (the time counts as warm-up); the train state,
  optimizer state included, is created by the first call.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step_cfg = train_step.StepConfig.from_config(config, model.config)
  data = jax.device_put(batch)
  mean, std = step_cfg.mean, step_cfg.std

  def forward(params, rest, images):
    m = nnx.merge(graphdef, params, rest)
    return m(train_step.normalize(images, mean, std), train=False)

  t0 = time.perf_counter()
  infer = jax.jit(forward).lower(params, rest, data['image']).compile()
  infer_s = time.perf_counter() - t0
  tx, schedule = optim.create_optimizer(
      optim.OptimConfig.from_config(config.optim),
      config.batch_size,
      config.total_steps,
      model.config.depth,
  )
  step = jax.jit(
      train_step.make_train_step(graphdef, tx, step_cfg, schedule),
      donate_argnums=0,
  )

  def new_state(params, rest):
    return TrainState.fresh(params, rest, tx, jax.random.key(config.seed))

  t0 = time.perf_counter()
  compiled = step.lower(
      jax.eval_shape(lambda: new_state(params, rest)), data
  ).compile()
  train_s = time.perf_counter() - t0
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the state is donated
  holder = {}

  def train():
    if not holder:
      holder['state'] = new_state(copy(params), copy(rest))
    holder['state'], metrics = compiled(holder['state'], data)
    return metrics

  return [
      Runner(
          'jax',
          'inference',
          lambda: infer(params, rest, data['image']),
          jax.block_until_ready,
          infer_s,
          _xla_flops(infer),
      ),
      Runner(
          'jax',
          'train',
          train,
          jax.block_until_ready,
          train_s,
          _xla_flops(compiled),
      ),
  ]


def peak_reference(
    device: str, matmul: dict[str, float]
) -> tuple[float | None, str]:
  """(peak FLOP/s, what it is) for the achieved fraction."""
  if device != 'gpu':
    best = max(matmul.values())
    return best * 1e9, f'measured fp32 matmul ({best:.1f} GFLOP/s)'
  name = torch.cuda.get_device_name()
  for card, tflops in GPU_PEAK_TFLOPS.items():
    if card in name and 'PCIe' not in name:
      return tflops * 1e12, f'{name} datasheet bf16 dense {tflops:g} TFLOP/s'
  return None, f'{name}: no datasheet peak known'


def device_name(device: str) -> str:
  """The accelerator's name, or the host CPU model and usable cores."""
  if device == 'gpu':
    return jax.devices()[0].device_kind
  try:
    with open('/proc/cpuinfo') as f:
      model = next(
          (
              line.split(':', 1)[1].strip()
              for line in f
              if line.startswith('model name')
          ),
          'cpu',
      )
  except OSError:
    model = 'cpu'
  return f'{model}, {host_threads()} cores'


def _sig(x: float | None, digits: int = 4) -> float | None:
  return None if x is None else float(f'{x:.{digits}g}')


def records(
    runners: Sequence[Runner],
    errors: dict[str, str],
    flops: dict[str, int],
    meta: dict,
    peak: float | None,
    batch: int,
) -> list[dict[str, Any]]:
  """One JSON-ready record per (framework, mode), and one per error."""
  xla = {r.mode: r.xla_flops for r in runners if r.framework == 'jax'}
  out = []
  for r in runners:
    median = statistics.median(r.times)
    ips = batch / median
    per_image = flops[r.mode] / batch
    out.append(
        dict(
            meta,
            framework=r.framework,
            mode=r.mode,
            images_per_s=round(ips, 2),
            step_ms_median=round(median * 1e3, 2),
            step_ms_min=round(min(r.times) * 1e3, 2),
            warmup_s=round(r.warmup_s, 2),
            peak_memory_mb=_sig(r.peak_memory_mb),
            flops_per_image=per_image,
            xla_flops_per_image=(
                None if xla.get(r.mode) is None else xla[r.mode] / batch
            ),
            achieved_gflops=_sig(per_image * ips / 1e9),
            peak_fraction=None
            if peak is None
            else _sig(per_image * ips / peak),
        )
    )
  for framework, error in errors.items():
    out.append(dict(meta, framework=framework, error=error))
  return out


# Markdown columns: (header, mode, record key, scale, format).
_COLUMNS = (
    ('train img/s', 'train', 'images_per_s', 1, '.1f'),
    ('infer img/s', 'inference', 'images_per_s', 1, '.1f'),
    ('train step ms', 'train', 'step_ms_median', 1, '.1f'),
    ('warm-up train s', 'train', 'warmup_s', 1, '.1f'),
    ('warm-up infer s', 'inference', 'warmup_s', 1, '.1f'),
    ('peak mem train MB', 'train', 'peak_memory_mb', 1, '.0f'),
    ('peak mem infer MB', 'inference', 'peak_memory_mb', 1, '.0f'),
    ('GFLOP/img train', 'train', 'flops_per_image', 1e-9, '.3g'),
    ('train % of peak', 'train', 'peak_fraction', 100, '.1f'),
    ('infer % of peak', 'inference', 'peak_fraction', 100, '.1f'),
)


def markdown(
    recs: list[dict[str, Any]], meta: dict, matmul: dict[str, float]
) -> str:
  """A Markdown table with one row per framework."""
  lines = [
      f"Config `{meta['config']}`, image {meta['image_size']}, batch "
      f"{meta['batch']}, {meta['dtype']}, device: {meta['device']} "
      f"({meta['threads']} threads). Reference matmul "
      f"{meta['matmul_n']}^3: JAX {matmul['jax']:.1f}, torch "
      f"{matmul['torch']:.1f} GFLOP/s; peak used: {meta['peak_source']}.",
      '',
      '| framework | ' + ' | '.join(c[0] for c in _COLUMNS) + ' |',
      '|---' * (len(_COLUMNS) + 1) + '|',
  ]
  for fw in dict.fromkeys(r['framework'] for r in recs):
    mine = [r for r in recs if r['framework'] == fw]
    if 'error' in mine[0]:
      cells = [f"failed: {mine[0]['error'][:100]}"] + [''] * (len(_COLUMNS) - 1)
    else:
      by_mode = {r['mode']: r for r in mine}
      cells = []
      for _, mode, key, scale, fmt in _COLUMNS:
        value = by_mode.get(mode, {}).get(key)
        cells.append('n/a' if value is None else format(value * scale, fmt))
    lines.append(f'| {fw} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _setup_torch(device: str, threads: int) -> None:
  torch.set_num_threads(threads)
  if device == 'gpu':
    # XLA uses TF32 for float32 matmuls on GPUs by default; so does torch now.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def start_all(
    config, model_cfg, model, state, batch, args, device
) -> tuple[list[Runner], dict[str, str]]:
  """Starts JAX, then the torch twin eager and compiled (unless --no_compile).

  A torch.compile failure becomes an error entry instead of a runner.
  """
  runners = [
      start(r, device, args.warmup) for r in jax_runners(config, model, batch)
  ]
  errors = {}
  tdev = 'cuda' if device == 'gpu' else 'cpu'
  variants = [('torch_eager', False)]
  if not args.no_compile:
    variants.append(('torch_compile', True))
  for name, compile_model in variants:
    try:
      calls = torch_bench.step_calls(
          config, model_cfg, state, batch, tdev, compile_model
      )
      runners += [
          start(
              Runner(name, mode, calls[mode], torch_bench.sync),
              device,
              args.warmup,
          )
          for mode in ('train', 'inference')
      ]
    except Exception as e:  # pylint: disable=broad-except
      if not compile_model:
        raise
      runners = [r for r in runners if r.framework != name]
      errors[name] = f'{type(e).__name__}: {e}'
  return runners, errors


def main(argv: Sequence[str]) -> None:
  """`python -m drpl_jax.bench compare FLAGS` (argv: the FLAGS): defines
  the flags and runs the comparison under drpl_jax/cli.py's exit policy."""
  _define_flags()
  cli.run(
      _main,
      positional=False,
      tensorflow=False,
      argv=['python -m drpl_jax.bench compare', *argv],
  )


def _main(argv: Sequence[str]) -> None:
  """Runs the comparison; prints JSON lines, optionally a Markdown table."""
  del argv  # only flags
  args = parse_flags()
  # JAX would take 75% of a GPU up front and leave torch the rest.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  config = bench_config(args)
  model_cfg = ModelConfig.from_config(config.model)
  device = 'gpu' if jax.default_backend() == 'gpu' else 'cpu'
  threads = host_threads()
  _setup_torch(device, threads)
  model = create_model(model_cfg, rngs=nnx.Rngs(config.seed))
  state = torch_ref.state_dict_from_flax(model)  # before JAX donates it
  batch = make_batch(model_cfg, args.batch_size, config.seed)
  matmuls = matmul_runners(args.matmul_size, device)
  runners, errors = start_all(
      config, model_cfg, model, state, batch, args, device
  )
  time_rounds(matmuls + runners, args.steps, args.rounds)
  matmul = matmul_rates(matmuls, args.matmul_size)
  peak, peak_source = peak_reference(device, matmul)
  meta = dict(
      benchmark='compare',
      config=args.config_spec,
      image_size=model_cfg.image_size,
      batch=args.batch_size,
      steps=args.steps,
      warmup=args.warmup,
      rounds=args.rounds,
      dtype=model_cfg.dtype,
      device=device_name(device),
      threads=threads,
      matmul_n=args.matmul_size,
      peak_source=peak_source,
      peak_gflops=None if peak is None else round(peak / 1e9, 1),
      memory_kind=('device_peak' if device == 'gpu' else 'host_rss_delta'),
      omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', ''),
  )
  for fw, gflops in matmul.items():
    emit(
        dict(meta, measurement='matmul', framework=fw, gflops=round(gflops, 2))
    )
  # Counted last, so that its allocations precede no memory measurement.
  flops = torch_bench.count_flops(
      model_cfg, state, batch, torch_bench.loss_for(config, model_cfg)
  )
  meta['tensorflow_imported'] = tensorflow_imported()
  recs = records(
      runners,
      errors,
      flops,
      dict(meta, measurement='model'),
      peak,
      args.batch_size,
  )
  for rec in recs:
    emit(rec)
  if args.markdown:
    files.atomic_write(args.markdown, markdown(recs, meta, matmul))
