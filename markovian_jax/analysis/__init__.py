"""The paper's analyses of trained runs.

  run_inputs     what an analysis needs from a run directory: its spec, a RunContext, the
                 adapter of a chosen checkpoint, the logged CoTs
  perturbations  CoT perturbations at character and token level
  fragility      the answer's log-prob (and accuracy) drop when the CoT is perturbed
  cross_model    another model re-scores the run's CoTs against CoT'

May import: runtime, models, sampling, data, objectives, reporting, training.
"""
