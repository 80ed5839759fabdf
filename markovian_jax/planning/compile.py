"""The step's three programs compiled ahead of time on abstract inputs, to check the memory plan
against the compiler (`compiled.memory_analysis()`), for any model size: nothing is allocated.

    compile_phases(spec, model, mesh, workload) -> {"sample" | "score" | "update": Compiled}
    compiler_bytes(compiled) -> per-device {"arguments", "temporaries", "outputs", "aliased"}
    cpu_upcast_bytes(compiled) -> bytes of the fp32 copies XLA:CPU makes of bf16 arguments

The programs are the ones a run executes (`sampler._generate` with the run's mode,
`train_step.Programs.score` / `.update`), lowered with the shardings a run gives their inputs.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from markovian_jax import objectives as obj
from markovian_jax import sampling
from markovian_jax.models import lora as lora_lib
from markovian_jax.models.config import DecoderConfig
from markovian_jax.planning.memory import Workload, lora_shapes, param_shapes
from markovian_jax.runtime import sharding
from markovian_jax.sampling import sampler
from markovian_jax.training import optimizer, train_step


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _rows(mesh, shape, dtype, rules=sharding.DEFAULT_RULES):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape, rules))


def _scalar(mesh, dtype, shape=()):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def abstract_state(spec, c: DecoderConfig, mesh, w: Workload):
  """(params, LoRA adapter, optimizer state, tx) as sharded ShapeDtypeStructs."""
  params = param_shapes(c)
  params = _abstract(params, sharding.param_shardings(params, mesh))
  lora = lora_shapes(c, w.lora_rank, w.lora_targets)
  lora = lora.replace(params=_abstract(lora.params, train_step.tree_shardings(lora.params, mesh)))
  lora = lora_lib.LoraAdapter(
    lora.params, rank=spec.lora.rank, alpha=spec.lora.alpha, dropout=spec.lora.dropout
  )
  tx = optimizer.make_optimizer(spec.optim)
  opt = jax.eval_shape(tx.init, lora)
  opt = _abstract(opt, train_step.tree_shardings(opt, mesh))
  return params, lora, opt, tx


def compile_phases(
  spec, c: DecoderConfig, mesh, w: Workload, phases=("sample", "score", "update"), eos_ids=(2,)
) -> dict:
  """{phase: jax.stages.Compiled} of the step's programs for workload `w` on `mesh`."""
  params, lora, opt, tx = abstract_state(spec, c, mesh, w)
  q, n, k = w.questions, w.rows, w.cot
  out = {}
  if "sample" in phases:
    mode = sampler._Mode(  # noqa: SLF001 - the run's own sampler program
      config=c,
      max_new_tokens=k,
      num_samples=w.group,
      greedy=False,
      top_k=0,
      use_top_p=False,
      top_p_window=sampling.TOP_P_WINDOW,
      eos_ids=tuple(eos_ids),
      mesh=mesh,
      reference_rows=w.reference_rows,
    )
    dec = sharding.DECODE_RULES
    out["sample"] = sampler._generate.lower(  # noqa: SLF001
      params,
      lora.replace(dropout=0.0),
      _rows(mesh, (q, w.prompt), jnp.int32, dec),
      _rows(mesh, (q, w.prompt), jnp.bool_, dec),
      _scalar(mesh, jnp.uint32, (2,)),
      _scalar(mesh, jnp.float32),
      _scalar(mesh, jnp.float32),
      _scalar(mesh, jnp.int32),
      mode=mode,
    ).compile()
  settings = train_step.StepSettings(
    model=c,
    objective=spec.objective.loss,
    temperature=float(spec.sampling.temperature),
    reward_scorer=spec.objective.reward_scorer,
    logprob_chunk=w.chunk,
  )
  programs = train_step.Programs(
    settings, tx, mesh, train_step.tree_shardings(lora, mesh), train_step.tree_shardings(opt, mesh)
  )
  a = w.answer
  answers = [_rows(mesh, (n, a), t) for t in (jnp.int32, jnp.bool_, jnp.bool_)]
  base = (
    [_rows(mesh, (q, a), t) for t in (jnp.int32, jnp.bool_, jnp.bool_)]
    if w.base_rows
    else [None] * 3
  )
  # NOVER's reference (scorer, KL) is its EMA adapter copy, of the adapter's layout.
  ref = lora if w.ema_adapter else None
  if "score" in phases:
    out["score"] = programs.score.lower(
      params, lora, ref, *answers, *base, last_n=w.window
    ).compile()
  if "update" in phases:
    batch = train_step.PolicyBatch(
      prompt_tokens=_rows(mesh, (q, w.prompt), jnp.int32),
      prompt_mask=_rows(mesh, (q, w.prompt), jnp.bool_),
      cot_tokens=_rows(mesh, (n, k), jnp.int32),
      cot_mask=_rows(mesh, (n, k), jnp.bool_),
      behaviour_logprobs=_rows(mesh, (n, k), jnp.float32),
      answer_tokens=answers[0],
      answer_mask=answers[1],
      answer_span=answers[2],
      answer_logprobs=_rows(mesh, (n, a), jnp.float32),
      baseline_scores=_rows(mesh, (n,), jnp.float32),
    )
    if obj.method_of(spec.objective.loss) is not None:
      # An answer-likelihood method's update reads its own per-row constants (advantages, the
      # filter's mask, the answer term's weights), not the paper's objective's.
      targets = obj.MethodTargets(
        *(jax.ShapeDtypeStruct((n,), t) for t in (jnp.float32, jnp.bool_, jnp.float32))
      )
    else:
      targets = jax.eval_shape(
        lambda r, b: obj.advantage_targets(r, b, spec.objective.loss, obj.BaselineState.init())[0],
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
      )
    targets = jax.tree.map(lambda x: _rows(mesh, x.shape, x.dtype), targets)
    rng = _scalar(mesh, jnp.uint32, (2,)) if spec.objective.kind != "ppo" else None
    out["update"] = programs.update.lower(
      params,
      lora,
      opt,
      batch,
      targets,
      rng,
      ref,
      np.float32(spec.optim.lr),
      answer_last_n=w.window,
    ).compile()
  return out


def compiler_bytes(compiled) -> dict:
  """Per-device bytes the compiler assigns a program: arguments, temporaries, outputs and the
  outputs that alias (donated) arguments."""
  m = compiled.memory_analysis()
  return {
    "arguments": m.argument_size_in_bytes,
    "temporaries": m.temp_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,
  }


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def cpu_upcast_bytes(compiled) -> int:
  """Bytes of the float32 copies that XLA:CPU makes of half-precision program arguments.

  The CPU backend has no bf16 dot: it converts bf16 weights to f32 up front (each entry parameter
  converted whole, hoisted out of the layer loop), which GPUs and TPUs, running bf16 dots
  natively, do not. Counted from the entry computation of the compiled HLO: f32 instructions
  whose one operand is a bf16/f16 entry parameter of as many elements.
  """
  text = compiled.as_text()
  entry = text[text.index("\nENTRY") :]
  entry = entry[: entry.index("\n}")]
  numel = lambda dims: math.prod(int(d) for d in dims.split(",") if d)  # noqa: E731
  halves = {
    name: numel(dims)
    for name, dims in re.findall(r"%([\w.-]+) = (?:bf16|f16)\[([0-9,]*)\]\S* parameter\(", entry)
  }
  total = 0
  for dims, operand in re.findall(r"= f32\[([0-9,]*)\]\S* [\w-]+\(%([\w.-]+)\)", entry):
    if halves.get(operand) == numel(dims):
      total += 4 * numel(dims)
  return total
