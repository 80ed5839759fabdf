"""One-command accelerator benchmark: our sampler and Markovian step against the PyTorch stack,
built so that a run cut off at any minute keeps every row it finished.

  python -m benchmarks.accelerator --out DIR                 # Llama-3.1-8B shapes on the GPU
  python -m benchmarks.accelerator --out DIR --budget_s 300  # stop starting rows after ~300 s
  python -m benchmarks.accelerator --out DIR --tiny          # a tiny model on CPU (CI)

Llama-3.1-8B shapes in bf16 with random weights made on the device (nothing is downloaded), a
LoRA of rank 8 on every linear layer but the head. Rows, in run order: ratios first, each of
ours followed by the same row of the PyTorch stack (transformers + peft on the same weights), so
that a run cut at any point still has ours/torch pairs:

  ours/step/8, torch/step/8, ours/step/1, torch/step/1
          the Markovian step (sample, score, update) at Q = 8 and Q = 1 questions of G = 12 CoTs
          of K = 100 tokens
  ours/decode/1, torch/decode/1, then B = 256, 64, 12
          the sampler: 256-token prompt, 100 new tokens, at batch B

The priors leave the first pair (with the peer's start) well inside the default budget. A rerun
into the same --out moves the earlier files to DIR/earlier-<time>/.

Modules, one job each:
  workload    the model, the rows and their inputs, FLOP / byte models, prior row estimates
  probes      versions, compilation cache, cuDNN attention preflight, measured copy bandwidth
              and bf16 matmul peak, the torch-on-CPU stop line
  results     atomic JSON files, the time budget, the merge into one JSON and one table
  step_api    the one adapter onto the library's step programs
  ours        our rows (one worker process per row: its peak memory is its own)
  peer, peer_model   the PyTorch peer (one worker process for its rows)
  driver      the order, the subprocesses with their timeouts (the peer's fed one row at a
              time), the merge after every row and in a `finally`

Only the device image's packages are needed: nothing here imports ml_collections,
tensorboardX or gguf (`forbidden_modules` in the JSON).
"""

from benchmarks.accelerator.ours import init_adapter, init_params_on_device  # noqa: F401
from benchmarks.accelerator.step_api import step_api  # noqa: F401
from benchmarks.accelerator.workload import (  # noqa: F401
  Workload,
  answer_rows,
  decode_step_bytes,
  forward_flops,
  kv_bytes_per_slot,
  llama31_8b,
  lora_layer_params,
  matmul_params,
  prompts,
  tiny,
  update_model_flops,
  weight_bytes_per_decode_step,
)
