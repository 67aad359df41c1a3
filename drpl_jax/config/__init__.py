"""The ml_collections config and the typed configs, kept as one contract.

`contract` turns a typed config (a dataclass) into a ConfigDict section and
back; `base` builds the DRPL-ViT config (presets, runlocal) that the files
in configs/ start from.
"""
