"""markovian-jax: Markovian chain-of-thought training (Viteri et al.) in JAX/Flax.

Packages, each importing only those listed before it:

  runtime      process and device plumbing: CLI start-up, jax.distributed, sharding rules,
               checkpoints, compilation cache, allocator, TensorBoard writer, errors
  models       the model in Flax, HF/GGUF loading and export, LoRA, teacher-forced log-probs
  sampling     the KV-cache sampler and its padding buckets
  data         tasks, prompts, answer extraction, the selection split
  objectives   rewards, baselines, PG / PPO / KL terms (registered variants)
  reporting    a run directory read, judged and written up (report.md, figures)
  training     a run config read, the step's jitted programs and stages, hooks, guards,
               evaluation, checkpoint export
  planning     the memory and layout plan before anything loads
  analysis     the paper's analyses: fragility, cross-model reading
  trainer      the Trainer: one run's state (training.state.TrainState), its step loop and hooks
  cli          the commands: train, evaluate, sample, plan, report, export, analyze (thin: flags,
               then the library; `markovian-<name>` console scripts)

`markovian_jax/<name>.py` for each command is an alias of `markovian_jax.cli.<name>`, so that
`python -m markovian_jax.<name>` runs it.
"""
