"""The paper's protocol: settings, the runs' command lines, the table, sweeps.

`protocol` decides every setting and path of a reproduction; `table`
collects the runs' reports into the Markdown table; `sweep` runs a small
hyper-parameter search; `cli` is `python -m drpl_jax.reproduce`.
"""
