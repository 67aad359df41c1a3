"""Evaluation and inference on a trained run.

`evaluate` restores a checkpoint and scores a split (`metrics`: confusion,
bootstrap intervals; `probes`; `report`: JSON, Markdown and plots);
`predict` classifies image files (with `rollout` attention heatmaps);
`export` writes a jax2tf SavedModel.
"""
