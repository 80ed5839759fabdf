"""The command-line tools, one module each, run as `python -m markovian_jax.<name>` or the
`markovian-<name>` console scripts:

  train      train a policy (docs/configuration.md: every --config key)
  evaluate   the two-stage evaluation of a run's checkpoints
  sample     CoTs and answers from a checkpoint for given prompts
  plan       the memory plan and sharding of a config, before anything loads
  report     a run's (or a parent of runs') report, results and methods tables
  export     a checkpoint as a PEFT adapter or merged Hugging Face weights
  analyze    the paper's analyses (fragility, cross-model, table 3)

Each is thin: flags, then the library (markovian_jax.training, .reporting, .analysis, ...).
The shared start-up and error policy is markovian_jax.runtime.cli. `markovian_jax/<name>.py` is
a four-line alias so that `python -m markovian_jax.<name>` keeps working.

May import: everything in markovian_jax; nothing imports it but those aliases.
"""
