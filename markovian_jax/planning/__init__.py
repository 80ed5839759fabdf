"""The memory and layout plan of a run, before anything is loaded or compiled.

  shapes     a model's architecture without its weights (config.json or a GGUF header)
  memory     per-device bytes of one step, phase by phase, from shapes alone
  plan       the rows rule, the weights split, the fit verdict and the fixes it suggests
  describe   the plan as text
  compile    the step's programs compiled on abstract inputs, to check `memory` against XLA

May import: runtime, models, sampling, data, objectives, training.
"""
