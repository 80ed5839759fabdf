"""One Markovian training step and what runs around it, as pure parts over pytrees.

  specs, config_validation   a run config read once into typed, validated sections (RunSpec);
                             config_session: validate, then the CLI session
  config_reference           docs/configuration.md, written from the config and the specs
  run_context                what train and evaluate share: examples, mesh, base model, tokenizer
  train_step                 the jitted programs: score, update (and their shardings)
  pipeline                   the step's stages: rollout -> score -> targets -> update -> scalars
  optimizer                  clip -> AdamW with a schedule, for the LoRA pytree
  metrics                    host-side sample diagnostics and throughput accounting
  hooks, guards              work between steps; non-finite and collapse guards
  evaluation                 two-stage evaluation (CoT, then the answer read after it)
  export                     a run's checkpoints: choose a step (latest, --step, best by
                             validation), restore its adapter, write PEFT or merged weights

May import: runtime, models, sampling, data, objectives, reporting (reading a run's scalars).
The loop that owns a run's state is `markovian_jax.trainer.Trainer`.
"""
