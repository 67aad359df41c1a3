"""The package's shape: its import graph, its layers and its commands.

The graph is read statically: every `drpl_jax/**/*.py` is parsed with `ast`
and every `import` / `from ... import` in it, at module level or inside a
function, absolute or relative, is resolved to the module it loads
(`from P import name` is an edge to `P.name` when that is a module, else to
`P`). The implicit import of a package's `__init__` when one of its
submodules is loaded is not an edge. The rules:

- No cycle, counting in-function imports too: a lazy import hides a cycle
  from Python, not from a reader. Lazy imports exist for heavy third-party
  libraries (TensorFlow, TFDS, clu, torch), which are not in the graph.
- `drpl_jax.models` imports nothing of drpl_jax outside `models/`.
- Nothing outside `drpl_jax/pytorch/` imports torch, torchvision, timm or
  safetensors.torch, not even inside a function.
- Importing the model, the train step, the teacher modules and the
  benchmarks loads neither TensorFlow, TFDS, clu nor torch (checked in a
  fresh interpreter: the accelerator machines lack them).

The checks run on a package given by its folder, so one test can show that
each of them fails on a small package that breaks its rule. The commands:
every console script of setup.cfg resolves to a callable that prints its
help when called as the installed script calls it (no arguments), every
`python -m drpl_jax.<command>` the docs use runs the same function as its
script, and the top-level entry modules stay a few lines.
"""

from __future__ import annotations

import ast
import configparser
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = 'drpl_jax'
TORCH_LIBRARIES = ('torch', 'torchvision', 'timm', 'safetensors.torch')
# What `import` of the light modules must leave out of sys.modules.
HEAVY_LIBRARIES = (
    'tensorflow',
    'tensorflow_datasets',
    'clu',
    'torch',
    'torchvision',
    'timm',
)
LIGHT_MODULES = (
    'drpl_jax',
    'drpl_jax.models',
    'drpl_jax.train.step',
    'drpl_jax.train.losses',
    'drpl_jax.train.mixup',
    'drpl_jax.train.optim',
    'drpl_jax.teacher',
    'drpl_jax.teacher.load',
    'drpl_jax.pretrained',
    'drpl_jax.parallel.sharding',
    'drpl_jax.bench',
    'drpl_jax.bench.train',
    'drpl_jax.bench.eval',
    'drpl_jax.bench.teacher',
)
# `python -m drpl_jax.<name>` commands -> the console script doing the same.
COMMANDS = {
    'main': 'drpl-train',
    'evaluate': 'drpl-evaluate',
    'predict': 'drpl-predict',
    'export': 'drpl-export',
    'data': 'drpl-data',
    'bench': 'drpl-bench',
    'train_teacher': 'drpl-teacher',
    'soft_labels': 'drpl-soft-labels',
    'convert': 'drpl-convert',
    'reproduce': 'drpl-reproduce',
    'sweep': 'drpl-sweep',
}


def modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every .py under root/package."""
  found = {}
  for path in sorted((root / package).rglob('*.py')):
    parts = list(path.relative_to(root).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    found['.'.join(parts)] = path
  return found


def imports(
    name: str, path: pathlib.Path, known: set[str]
) -> Iterator[tuple[str, bool, int]]:
  """(imported module, inside a function, line) for each import in path."""
  tree = ast.parse(path.read_text(), str(path))
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  is_package = path.name == '__init__.py'
  for node in ast.walk(tree):
    lazy = id(node) in in_function
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, lazy, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the importing module's package
        package = name.split('.') if is_package else name.split('.')[:-1]
        package = package[: len(package) - node.level + 1]
        base = '.'.join(package + ([base] if base else []))
      for alias in node.names:
        full = f'{base}.{alias.name}'
        yield (full if full in known else base), lazy, node.lineno


def graph(
    root: pathlib.Path, package: str
) -> dict[str, list[tuple[str, bool, int]]]:
  """{module: [(imported module, lazy, line)]} for every module."""
  found = modules(root, package)
  return {
      name: list(imports(name, path, set(found)))
      for name, path in found.items()
  }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the directed graph as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for succ in sorted(edges.get(node, ())):
      if state.get(succ) == 1:
        return path[path.index(succ) :] + [succ]
      if succ not in state:
        found = visit(succ)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for start in sorted(edges):
    if start not in state:
      found = visit(start)
      if found:
        return found
  return None


def cycle_in(
    g: dict[str, list[tuple[str, bool, int]]], package: str
) -> list[str] | None:
  """A cycle among the package's own modules (lazy imports included)."""
  edges = {
      name: {t for t, _, _ in targets if t in g and t != name}
      for name, targets in g.items()
  }
  return find_cycle(edges)


def _inside(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + '.')


def layer_violations(
    g: dict[str, list[tuple[str, bool, int]]], package: str
) -> list[str]:
  """Imports by `package.models` of the package outside models/."""
  models = f'{package}.models'
  return [
      f'{name}:{line} imports {target}'
      for name, targets in g.items()
      if _inside(name, models)
      for target, _, line in targets
      if _inside(target, package) and not _inside(target, models)
  ]


def torch_outside_pytorch(
    g: dict[str, list[tuple[str, bool, int]]], package: str
) -> list[str]:
  """Imports of torch-like libraries by modules outside package.pytorch."""
  return [
      f'{name}:{line} imports {target}'
      for name, targets in g.items()
      if not _inside(name, f'{package}.pytorch')
      for target, _, line in targets
      if any(_inside(target, lib) for lib in TORCH_LIBRARIES)
  ]


def heavy_imported(root: pathlib.Path, light: tuple[str, ...]) -> list[str]:
  """The heavy libraries in sys.modules after importing `light` (fresh)."""
  code = (
      f'import sys\nfor m in {light!r}:\n  __import__(m)\n'
      f'print(sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))'
  )
  env = dict(os.environ, PYTHONPATH=str(root))
  proc = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      env=env,
      cwd=root,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def package_graph():
  return graph(ROOT, PACKAGE)


def test_graph_resolves_every_import(package_graph):
  # A sanity check of the reader, on edges the rules below rely on.
  step = dict(
      ((t, lazy) for t, lazy, _ in package_graph['drpl_jax.train.step'])
  )
  assert step['drpl_jax.train.losses'] is False
  assert step['drpl_jax.train.mixup'] is False
  loop = {t for t, _, _ in package_graph['drpl_jax.train.loop']}
  assert {'drpl_jax.train.student_init', 'tensorflow', 'clu'} <= loop
  assert len(package_graph) > 90


def test_no_import_cycles(package_graph):
  assert cycle_in(package_graph, PACKAGE) is None


def test_models_import_nothing_above_them(package_graph):
  assert layer_violations(package_graph, PACKAGE) == []


def test_only_the_pytorch_package_imports_torch(package_graph):
  assert torch_outside_pytorch(package_graph, PACKAGE) == []


def test_model_step_teacher_and_bench_import_without_heavy_libraries():
  assert heavy_imported(ROOT, LIGHT_MODULES) == []


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_each_check_fails_on_a_package_that_breaks_it(tmp_path):
  _write(
      tmp_path,
      {
          'pkg/__init__.py': '',
          'pkg/models/__init__.py': '',
          'pkg/models/vit.py': 'from pkg.train import step\n',
          'pkg/train/__init__.py': '',
          'pkg/train/step.py': 'def f():\n  from ..models import vit\n',
          'pkg/evaluation/__init__.py': '',
          'pkg/evaluation/export.py': 'def f():\n  import torchvision.models\n',
          'pkg/pytorch/__init__.py': '',
          'pkg/pytorch/io.py': 'import torch\n',
          'pkg/light.py': 'import json\n',
          'pkg/heavy.py': 'import pkg.light\nimport clu\n',
          'clu/__init__.py': '',  # a stand-in, so that the import works
      },
  )
  g = graph(tmp_path, 'pkg')
  assert g['pkg.train.step'] == [('pkg.models.vit', True, 2)]
  cycle = cycle_in(g, 'pkg')
  assert cycle is not None and set(cycle) == {
      'pkg.models.vit',
      'pkg.train.step',
  }
  assert layer_violations(g, 'pkg') == [
      'pkg.models.vit:1 imports pkg.train.step'
  ]
  assert torch_outside_pytorch(g, 'pkg') == [
      'pkg.evaluation.export:2 imports torchvision.models'
  ]
  assert heavy_imported(tmp_path, ('pkg.light',)) == []
  assert heavy_imported(tmp_path, ('pkg.heavy',)) == ['clu']


def console_scripts() -> dict[str, str]:
  """{script name: 'module:function'} from setup.cfg."""
  parser = configparser.ConfigParser()
  parser.read(ROOT / 'setup.cfg')
  lines = parser['options.entry_points']['console_scripts'].strip()
  return dict(
      tuple(p.strip() for p in line.split('=')) for line in lines.splitlines()
  )


def test_every_console_script_resolves_to_a_callable():
  scripts = console_scripts()
  assert set(COMMANDS.values()) <= set(scripts)
  # In a fresh interpreter: some targets import torch, which should not
  # meet a TensorFlow other tests loaded into this one.
  code = (
      'import importlib, sys\n'
      'for arg in sys.argv[1:]:\n'
      '  script, module, function = arg.split(" ")\n'
      '  target = getattr(importlib.import_module(module), function, None)\n'
      '  print(script, callable(target))\n'
  )
  args = [f'{s} {t.replace(":", " ")}' for s, t in scripts.items()]
  proc = subprocess.run(
      [sys.executable, '-c', code, *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT)),
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  resolved = dict(line.split() for line in proc.stdout.splitlines())
  assert resolved == {s: 'True' for s in scripts}


def test_every_console_script_prints_its_help():
  """Each target called as the installed script calls it: no arguments."""
  code = (
      'import importlib, sys\n'
      'module, function = sys.argv[1].split(":")\n'
      'sys.argv = [sys.argv[0], "--help"]\n'
      'sys.exit(getattr(importlib.import_module(module), function)())\n'
  )
  for script, target in console_scripts().items():
    proc = subprocess.run(
        [sys.executable, '-c', code, target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300,
        check=False,
    )
    text = proc.stdout + proc.stderr
    # argparse exits 0 after --help, absl 1; neither prints a traceback.
    assert proc.returncode in (0, 1) and 'usage' in text.lower(), (
        script,
        text[-2000:],
    )
    assert 'Traceback' not in text, (script, text[-2000:])


def _entry_module(command: str) -> pathlib.Path:
  package = ROOT / PACKAGE / command
  if package.is_dir():
    return package / '__main__.py'
  return ROOT / PACKAGE / f'{command}.py'


def test_documented_commands_exist_and_match_their_scripts():
  texts = [(ROOT / 'README.md').read_text()] + [
      p.read_text()
      for d in ('docs', 'launch')
      for p in (ROOT / d).iterdir()
      if p.is_file()
  ]
  documented = set(re.findall(r'-m drpl_jax\.(\w+)', '\n'.join(texts)))
  assert documented and documented <= set(COMMANDS)
  scripts = console_scripts()
  for command, script in COMMANDS.items():
    path = _entry_module(command)
    tree = ast.parse(path.read_text())
    module, _, function = scripts[script].partition(':')
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    imported = {
        (n.module, a.name)
        for n in tree.body
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    here = str(path.relative_to(ROOT).with_suffix('')).replace(os.sep, '.')
    assert (module, function) in imported or (
        module == here and function in defined
    ), (command, script)


THIN_EXEMPT = {
    'main',  # The training command itself (flags and setup).
    'cli',
}  # Not a command: the flags and exit policy they share.


def test_top_level_entry_modules_are_thin():
  for path in (ROOT / PACKAGE).glob('*.py'):
    if path.stem in THIN_EXEMPT or path.stem == '__init__':
      continue
    body = ast.parse(path.read_text()).body
    kinds = {type(n).__name__ for n in body}
    assert kinds <= {'Expr', 'Import', 'ImportFrom', 'If'}, path
    assert len(path.read_text().splitlines()) <= 15, path


def test_design_section_7_import_paths_still_resolve():
  """Modules moved; the import paths DESIGN.md promises keep working."""
  from drpl_jax import convert  # pylint: disable=g-import-not-at-top
  from drpl_jax.models import create_model  # pylint: disable=g-import-not-at-top
  from drpl_jax.teacher import load  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import student_init  # pylint: disable=g-import-not-at-top

  assert callable(create_model)
  assert convert.torch_teacher is load.torch_teacher
  assert convert.student_from_timm is student_init.student_from_timm
