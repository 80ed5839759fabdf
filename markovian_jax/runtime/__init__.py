"""Process and device plumbing that every command shares; knows nothing of models or training.

  errors             UserError (bad input: one line, exit 2) and its kinds
  cli                absl start-up, flag errors as one line, the session (logging, allocator,
                     jax.distributed, compilation cache) in the order it must happen
  distributed        jax.distributed start-up, barriers, the stop every process agrees on
  host_allocator     the process's malloc (tcmalloc restart on CPU)
  compilation_cache  JAX's persistent compilation cache
  sharding           logical axes -> mesh axes (the parallelism policy as tables), meshes
  presets            hardware presets: mesh, device memory, implied batch
  checkpointing      orbax checkpoints of LoRA, optimizer state and the run's JSON state
  summary            TensorBoard writing from process 0 (local or gs://)
  progress           the progress bar of long loops (done/total, rate, time left)
  files              files written whole or not at all (records rewritten in place)

May import: nothing else in markovian_jax.
"""
