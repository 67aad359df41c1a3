"""`covid19_radiography`: the Kaggle COVID-19 Radiography Database.

Chowdhury et al., IEEE Access 2020; Rahman et al., Computers in Biology and
Medicine 2021. 21,165 chest X-rays, 299x299 PNG, four classes in this fixed
order (label index = position):

  0 COVID            3616 images
  1 Lung_Opacity     6012
  2 Normal          10192
  3 Viral Pneumonia  1345   (note the space)

Layout: `COVID-19_Radiography_Dataset/<class>/images/*.png`; the `masks/`
folders and the metadata `.xlsx` files are ignored. There are no patient ids
(image-level split: a known leakage risk of this database) and no official
split: ours is seeded and stratified, 80/10/10 train/validation/test per class
(`drpl_jax.data.splits.stratified_split`), and part of builder version 1.0.0.

A subset of classes (e.g. `classes=('COVID', 'Normal')`, for samples that hold
only some class folders) is its own builder config; the label order is then
the order given.
"""

from drpl_jax.data import builder
from drpl_jax.data import files
from drpl_jax.data.files import DataError

CLASS_NAMES = ('COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia')
FULL_COUNTS = {
    'COVID': 3616,
    'Lung_Opacity': 6012,
    'Normal': 10192,
    'Viral Pneumonia': 1345,
}
DATASET_FOLDER = 'COVID-19_Radiography_Dataset'
_MAX_DEPTH = 3

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the COVID-19 Radiography Database from Kaggle
(https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database,
a free account is needed), e.g. `kaggle datasets download
tawsifurrahman/covid19-radiography-database`, which gives `archive.zip`.
Then point manual_dir (`--manual_dir`, `config.data.manual_dir`) at any of:
  * the folder holding the zip (the zip is read in place, not extracted), or
    the zip file itself;
  * the unpacked `{DATASET_FOLDER}` folder, or the folder that contains it
    (it may be nested twice, as in some versions of the zip).
The class folders must be `{DATASET_FOLDER}/<class>/images/*.png` with
classes {list(CLASS_NAMES)}; `masks/` and `.xlsx` files are ignored.
"""


def _find_roots(tree: files.Tree, classes: tuple[str, ...]) -> list[str]:
  """The shallowest folders (<= 3 deep) holding `<class>/images/` folders."""
  level = ['']
  for _ in range(_MAX_DEPTH + 1):
    roots = [
        r
        for r in level
        if any(tree.is_dir(files.join(r, c, 'images')) for c in classes)
    ]
    if roots:
      return roots
    level = [
        files.join(r, d) for r in level for d in files.visible_dirs(tree, r)
    ]
  return []


def locate(manual_dir: str, classes: tuple[str, ...]) -> tuple[files.Tree, str]:
  """Finds the data set root in `manual_dir` (folder, parent, or zip).

  Returns:
    (tree, root): the folder tree or zip member tree, and the root's path in
    it (the folder that holds the class folders).

  Raises:
    DataError: nothing found, or more than one candidate root.
  """
  tree = files.open_tree(manual_dir)
  candidates = [tree]
  if isinstance(tree, files.LocalTree):
    candidates += [files.ZipTree(z) for z in files.zips_in(manual_dir)]
  for candidate in candidates:
    roots = _find_roots(candidate, classes)
    if len(roots) > 1:
      raise DataError(
          f'{candidate.description}: found several data set '
          f'folders {roots}; point manual_dir at one of them'
      )
    if roots:
      return candidate, roots[0]
  raise DataError(
      f'manual_dir {manual_dir}: no `<class>/images/` folders for classes '
      f'{list(classes)} found (looked {_MAX_DEPTH} levels deep and in .zip '
      f'files).\n{MANUAL_DOWNLOAD_INSTRUCTIONS}'
  )


class Covid19Radiography(builder.CxrBuilder, skip_registration=True):
  """The Kaggle COVID-19 Radiography Database (see module docstring)."""

  name = 'covid19_radiography'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  HOMEPAGE = (
      'https://www.kaggle.com/datasets/tawsifurrahman/'
      'covid19-radiography-database'
  )
  CITATION = """\
@article{chowdhury2020can,
  title={Can AI help in screening viral and COVID-19 pneumonia?},
  author={Chowdhury, Muhammad E. H. and Rahman, Tawsifur and Khandakar,
          Amith and others},
  journal={IEEE Access}, volume={8}, pages={132665--132676}, year={2020}}
@article{rahman2021exploring,
  title={Exploring the effect of image enhancement techniques on COVID-19
         detection using chest X-ray images},
  author={Rahman, Tawsifur and Khandakar, Amith and Qiblawey, Yazan and
          others},
  journal={Computers in Biology and Medicine}, volume={132},
  pages={104319}, year={2021}}
"""

  def _list(self) -> builder.Listing:
    config = self.builder_config
    classes = config.classes or CLASS_NAMES
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown:
      raise DataError(
          f'covid19_radiography: unknown classes {unknown}; the '
          f'classes are {list(CLASS_NAMES)}'
      )
    tree, root = locate(config.manual_dir, classes)
    where = files.join(tree.description, root)

    def folder_of(name: str) -> str:
      folder = files.join(root, name, 'images')
      if not tree.is_dir(folder):
        present = [
            c for c in CLASS_NAMES if tree.is_dir(files.join(root, c, 'images'))
        ]
        raise DataError(
            f'covid19_radiography: class folder {name}/images not found in '
            f'{where} (present: {present}); to prepare a subset pass '
            f'classes={",".join(present)}'
        )
      return folder

    return builder.list_class_folders(
        self.name, tree, classes, folder_of, root=root, source=where
    )
