"""A run directory, read and judged: what `python -m markovian_jax.report` writes.

  runs        TensorBoard scalars, config.json, samples.jsonl and eval rows as a `Run`
  diagnoses   smoothing, milestones, results and automatic diagnoses of failure modes
  figures     the PNG figures (matplotlib, Agg)
  results_table  the paper's table: (task, model) x variants, full-size cells by selection
  methods_table  one row per variant (method and its _markovian twin adjacent), seeds pooled:
                 accuracy by selection, answer log-prob, CoT length, steps
  markdown    report.md: summary, hyperparameters, results, dynamics, diagnoses, example CoTs

Reads files only; never loads a model. May import: runtime, configs, data.
"""
