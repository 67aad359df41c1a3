"""Every ```bash block of README.md and docs/*.md runs as written (issue 17).

How a block runs (README.md, "Tests", says the same for readers):
* in a sandbox clone: a temporary folder holding links to every top-level
  entry of this checkout, with `../shared` linked beside it as it is beside
  this checkout (when it exists);
* with HOME set to a temporary folder (so `~/...` paths land in the
  sandbox), and every `/tmp/` and `/data/` path in the block moved into the
  sandbox, where `/tmp/drpl_demo` is a tiny trained demo run,
  `/data/hospital_a` and `/data/other_hospital` a few demo images in class
  folders, and `x1.png`, `x2.dcm` two demo images;
* with the environment a marker line right above the fence asks for:
  `<!-- docs-test: env DRPL_DRY_RUN=1 -->` (the launchers' documented dry
  run, for blocks that would start a cluster job), or not at all with
  `<!-- docs-test: skip REASON -->` (the test lists those with their
  reasons).

A new block needs nothing here: it runs, or gets a marker in the doc.
"""

import dataclasses
import glob
import os
import re
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest

from conftest import write_dicom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
DOCS = ['README.md'] + sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))
)
FENCE = re.compile(r'^(\s*)```(\w*)\s*$')
MARKER = re.compile(r'<!--\s*docs-test:\s*(skip|env)\b\s*(.*?)\s*-->')
BLOCK_TIMEOUT_S = 240


@dataclasses.dataclass
class Block:
  """One ```bash block: where it is, its text and its marker."""

  doc: str
  line: int
  text: str
  action: str = 'run'  # 'run', 'env' or 'skip'
  argument: str = ''  # the env assignments or the reason to skip

  @property
  def name(self) -> str:
    return f'{self.doc}:{self.line}'


def collect_blocks(doc: str) -> list[Block]:
  """The bash blocks of `doc` (indented ones too) with their markers."""
  with open(os.path.join(ROOT, doc)) as f:
    lines = f.read().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if not match or match.group(2) != 'bash':
      i += 1
      continue
    indent, start = match.group(1), i
    body = []
    i += 1
    while i < len(lines) and not FENCE.match(lines[i]):
      body.append(
          lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i]
      )
      i += 1
    block = Block(doc, start + 1, '\n'.join(body) + '\n')
    previous = next(
        (lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), ''
    )
    marker = MARKER.search(previous)
    if marker:
      block.action, block.argument = marker.group(1), marker.group(2)
    blocks.append(block)
    i += 1
  return blocks


ALL_BLOCKS = [b for doc in DOCS for b in collect_blocks(doc)]


def test_every_block_is_collected_and_skips_give_reasons():
  assert len(ALL_BLOCKS) >= 10  # README and docs/ both have blocks
  skipped = [b for b in ALL_BLOCKS if b.action == 'skip']
  for block in skipped:
    assert len(block.argument) > 15, f'{block.name}: skip needs a reason'
  # The list of blocks not run here, with why (shown with pytest -rA).
  print('\n'.join(f'not run: {b.name}: {b.argument}' for b in skipped))
  assert {b.action for b in ALL_BLOCKS} >= {'run', 'env'}


def _demo_images(config, n):
  """(image, class name) of the first `n` demo test examples."""
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  names = data.ensure_prepared(config.data).class_names
  source = data.get_source(config.data, 'test')
  return [(source[i]['image'], names[source[i]['label']]) for i in range(n)]


@pytest.fixture(scope='module')
def sandbox(tiny_run, tmp_path_factory):
  """The sandbox clone (see the module doc); returns its paths."""
  workdir, config = tiny_run
  top = tmp_path_factory.mktemp('docs')
  clone = top / 'clone'
  clone.mkdir()
  for name in os.listdir(ROOT):
    if name not in ('.git',):
      os.symlink(os.path.join(ROOT, name), clone / name)
  if os.path.isdir(SHARED):
    os.symlink(SHARED, top / 'shared')
  for sub in ('home', 'tmp', 'data'):
    (top / sub).mkdir()
  shutil.copytree(workdir, top / 'tmp' / 'drpl_demo')
  images = _demo_images(config, 8)
  for site in ('hospital_a', 'other_hospital'):
    for i, (image, label) in enumerate(images):
      folder = top / 'data' / site / label
      folder.mkdir(parents=True, exist_ok=True)
      PIL.Image.fromarray(image).save(folder / f'{i}.png')
  PIL.Image.fromarray(images[0][0]).save(clone / 'x1.png')
  write_dicom(str(clone / 'x2.dcm'), images[1][0][..., 0].astype(np.uint8))
  return top


def _sandboxed(text: str, top) -> str:
  """The block's text with /tmp/ and /data/ moved into the sandbox."""
  return re.sub(
      r'(?<![\w./~])/(tmp|data)/', lambda m: f'{top}/{m.group(1)}/', text
  )


@pytest.mark.parametrize(
    'block', [b for b in ALL_BLOCKS if b.action != 'skip'], ids=lambda b: b.name
)
def test_block_runs_as_written(block, sandbox):
  # Blocks marked skip are not test cases: the collection test above checks
  # each gives a reason and prints them.
  env = dict(
      os.environ, HOME=str(sandbox / 'home'), PYTHONPATH='', OMP_NUM_THREADS='1'
  )
  env.pop('DRPL_DRY_RUN', None)
  if block.action == 'env':
    for item in block.argument.split():
      key, _, value = item.partition('=')
      env[key] = value
  script = 'set -euo pipefail\n' + _sandboxed(block.text, sandbox)
  proc = subprocess.run(
      ['bash', '-c', script],
      cwd=sandbox / 'clone',
      env=env,
      text=True,
      capture_output=True,
      timeout=BLOCK_TIMEOUT_S,
      check=False,
  )
  assert proc.returncode == 0, (
      f'{block.name} failed (exit {proc.returncode}):\n{script}\n'
      f'--- stderr (tail):\n{proc.stderr[-3000:]}'
  )
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
