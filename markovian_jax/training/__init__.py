"""One Markovian training step and what runs around it, as pure parts over pytrees.

  specs, config_validation   a run config read once into typed, validated sections (RunSpec);
                             config_session: validate, then the CLI session
  config_reference           docs/configuration.md, written from the config schema and the specs
  state                      TrainState: a run's state as one pytree, its checkpoint save/restore
  run_context                what train and evaluate share: examples, mesh, base model, tokenizer
  train_step                 the jitted programs: score, update (and their shardings)
  pipeline                   the step's stages: rollout -> score -> targets -> update -> scalars
  optimizer                  clip -> AdamW with a schedule, for the LoRA pytree
  metrics                    host-side sample diagnostics and throughput accounting
  hooks, guards              work between steps (StepInfo); non-finite and collapse guards
  resume                     continue from the newest complete checkpoint
  checkpoint_choice          choose a run's checkpoint step (latest, --step, best by selection)
                             and restore its adapter with the settings the checkpoint recorded
  evaluation                 two-stage evaluation (CoT, then the answer read after it)
  export                     write PEFT or merged weights of a chosen checkpoint

May import: runtime, models, sampling, data, objectives, reporting (reading a run's scalars).
The loop that owns a run's state is `markovian_jax.trainer.Trainer`.
"""
