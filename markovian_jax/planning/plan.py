"""The memory and layout plan of a run, before anything is loaded or compiled.

  python -m markovian_jax.plan --config=configs/presets/v5e-8.py [--config.key=value ...]
      [--device_memory_gib=16] [--devices=8] [--prompt_length=256]

prints, per device: the base weights, LoRA and AdamW state, the sampler's KV cache and stages,
the scorer's and the update's activations (every remat mode) and chunked logits, for the config's
mesh, rows, prompt bucket and CoT length; the device memory it assumes and where that came from;
a verdict; and, when the step does not fit, the knobs that would make it fit (remat, mesh
tensor / fsdp, questions_per_step, the log-prob chunk). Exit 0 when it fits, 2 (one `error:`
line) when it does not, when the rows or the weights do not split over the mesh, or when no
device memory is known. Nothing needs weights or a network (`plan_shapes`).

Training runs the same plan at start-up (`check`, before the model loads), logs it and refuses a
config that cannot fit. The verdict keeps HEADROOM of the device free for what the plan does not
model (the runtime, fragmentation, the compiler's own temporaries beyond the margins measured in
tests/planning/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

import jax

from markovian_jax import objectives as obj
from markovian_jax.models.config import DecoderConfig
from markovian_jax.planning.memory import (
  GIB,
  MemoryPlan,
  Workload,
  param_shapes,
)
from markovian_jax.planning.memory import (
  plan as memory_plan,
)
from markovian_jax.planning.shapes import model_config
from markovian_jax.runtime import presets, sharding
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.sampling import batching
from markovian_jax.training import config_validation, train_step
from markovian_jax.training.specs import RunSpec

log = logging.getLogger(__name__)

HEADROOM = 0.9  # the plan must fit in this fraction of the usable device memory
# The longest CoT prompt (tokens, Llama 3 tokenizer, template included) assumed per task when the
# examples are not at hand; `check` measures the real one from the training examples.
LONGEST_PROMPT = {
  "gsm8k": 230,
  "svamp": 90,
  "arithmetic": 80,
  "mmlu": 1000,
  "mathqa": 300,
  "arc": 180,
  "aqua": 300,
  "wiki_continuation": 90,
}
ANSWER_TEMPLATE = 32  # tokens of the answer prompt around the CoT (question hidden)
LOGPROB_CHUNK = train_step.StepSettings.__dataclass_fields__["logprob_chunk"].default


@dataclasses.dataclass
class Plan:
  spec: RunSpec
  model: DecoderConfig
  model_source: str
  mesh: tuple  # (data, fsdp, tensor)
  workload: Workload
  prompt_source: str
  memory: MemoryPlan
  usable_gib: Optional[float]  # per device; None = unknown
  memory_source: str
  fixes: list  # "key=value (peak GiB)" that would make it fit
  notes: list

  @property
  def budget_gib(self) -> Optional[float]:
    return None if self.usable_gib is None else HEADROOM * self.usable_gib

  @property
  def fits(self) -> Optional[bool]:
    budget = self.budget_gib
    return None if budget is None else self.memory.peak / GIB <= budget


def workload(spec: RunSpec, prompt_length: Optional[int] = None) -> tuple[Workload, str]:
  """(the step's shapes, where the prompt length came from) for run `spec`."""
  s, o = spec.sampling, spec.objective.loss
  source = "measured"
  if not prompt_length:
    prompt_length = LONGEST_PROMPT.get(spec.task, 256)
    source = f"assumed for {spec.task}; --prompt_length"
  prompt = batching.bucket(int(prompt_length), s.prompt_bucket)
  answer = ANSWER_TEMPLATE + s.cot_length + spec.eval.answer_max_tokens
  if not spec.prompt.markovian:
    answer += prompt
  normalise = o.normalize_reward
  together = normalise and spec.lora.reference == "base" and s.top_k == 0 and s.top_p >= 1.0
  method = obj.method_of(o)
  w = Workload(
    questions=spec.train.questions_per_step,
    group=spec.train.group_size,
    cot=s.cot_length,
    prompt=prompt,
    answer=batching.bucket(answer, 32),
    window=batching.bucket(spec.eval.answer_max_tokens + 2, 8),
    reference_rows=together,
    base_rows=normalise,
    # The paper's reward gradient and a method's answer term both back-propagate through the
    # answer rows (training.pipeline.update re-scores them for either).
    reward_grad=o.reward_grad == "paper" or (method is not None and method.has_answer_term),
    minibatches=spec.objective.ppo_minibatches if o.kind == "ppo" else 1,
    chunk=LOGPROB_CHUNK,
    remat=spec.model.remat,
    lora_rank=spec.lora.rank,
    lora_targets=tuple(spec.lora.targets),
    ref_adapter=spec.lora.reference == "initial_adapter",
    ema_adapter=spec.objective.reward_scorer == "ema",
    # Only the exact KL keeps the reference's logits for the backward; k1/k2/k3 (and PPO's
    # ratio to the base) gather its log-probs of the sampled tokens without gradient.
    kl_full=o.kl_estimator == "full",
  )
  return w, f"{prompt_length} tokens ({source}), bucket {prompt}"


def prompt_length(spec: RunSpec, tokenizer, examples: Sequence) -> int:
  """The longest CoT prompt of `examples` in tokens (as `RunContext.cot_prompt_ids` builds it)."""
  from markovian_jax import data as data_lib

  s = spec
  # The prompt depends on the question alone, and a generated task repeats its questions (the
  # demo's 100,000 sums have 400 distinct texts): each distinct one is tokenized once.
  questions = sorted({ex.question for ex in examples})
  texts = [
    data_lib.cot_prompt(
      s.task,
      q,
      s.sampling.cot_length,
      target_length=s.data.target_length,
      prompt_format=s.prompt.format,
      tokenizer=tokenizer,
    )
    for q in questions
  ]
  ids = tokenizer(texts, add_special_tokens=s.prompt.format != "chat")["input_ids"]
  return max(len(x) for x in ids)


def _device_memory(spec: RunSpec, explicit: Optional[float]) -> tuple[Optional[float], str]:
  """(usable GiB per device, where it came from): the flag, mesh.device_memory_gib, what an
  accelerator reports, the preset's chip."""
  if explicit:
    return float(explicit), "--device_memory_gib"
  if spec.mesh.device_memory_gib:
    return float(spec.mesh.device_memory_gib), "config.mesh.device_memory_gib"
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return stats["bytes_limit"] / GIB, f"{device.device_kind} reports bytes_limit"
  p = presets.get(spec.mesh.preset)
  if p and p.memory_gib:
    how = f"x {presets.gpu_fraction():g} XLA_PYTHON_CLIENT_MEM_FRACTION" if p.gpu else "all of it"
    return p.usable_gib(), f"mesh.preset={p.name}: {p.chip} {p.memory_gib:g} GiB, {how}"
  return None, "unknown: pass --device_memory_gib, or set mesh.preset / mesh.device_memory_gib"


def _resolve_mesh(spec: RunSpec, num_devices: Optional[int]) -> tuple:
  shape = tuple(spec.mesh.resolved)
  if -1 not in shape and not num_devices:
    return shape
  n = num_devices or jax.device_count()
  try:
    return sharding.resolve_mesh_shape(shape, n)
  except ValueError as e:
    key = "mesh.preset" if spec.mesh.preset else "mesh.shape"
    raise InvalidConfig(f"config.{key}: {e}") from None


def check_weights(spec: RunSpec, c: DecoderConfig, shape: Sequence[int]) -> None:
  """Raises InvalidConfig (warns with mesh.allow_replication) when a base weight does not split
  over fsdp / tensor as the mesh intends."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(c)):
    name = sharding.path_str(path)
    axes = sharding.param_logical_axes(name, leaf.ndim)
    for dim, logical, axis, size in sharding.unsplit(axes, leaf.shape, shape):
      n = leaf.shape[dim]
      msg = (
        f"config.mesh.shape: the base weights do not split over mesh {tuple(shape)}: "
        f"{name} {tuple(leaf.shape)}: its {logical} dim ({n}) does not split over "
        f"{axis}={size}; use a {axis} size that divides {n}"
      )
      if not spec.mesh.allow_replication:
        raise InvalidConfig(f"{msg} (or mesh.allow_replication=True for a test model)")
      log.warning("%s (mesh.allow_replication=True: replicated on %s)", msg, axis)
      return


def _fits(c, w, shape, budget) -> Optional[float]:
  """The peak GiB of `w` on `shape` when it fits `budget` GiB, else None."""
  peak = memory_plan(c, w, shape).peak / GIB
  return peak if peak <= budget else None


def _splits(c: DecoderConfig, w: Workload, shape: tuple) -> bool:
  """Whether `shape` splits the rows and the base weights as it intends."""
  if w.rows % presets.row_split(shape):
    return False
  return not any(
    sharding.unsplit(sharding.param_logical_axes(sharding.path_str(path), x.ndim), x.shape, shape)
    for path, x in jax.tree_util.tree_leaves_with_path(param_shapes(c))
  )


def _fixes(c: DecoderConfig, w: Workload, shape: tuple, budget: float) -> list:
  """The single knobs that make the step fit, in the order a user should try them: remat, the
  base split over more devices (a factor moved from data to tensor, or to fsdp), fewer
  questions per step, a smaller log-prob chunk."""
  out = []
  if w.remat != "full" and (p := _fits(c, dataclasses.replace(w, remat="full"), shape, budget)):
    out.append(f"model.remat=full ({p:.2f} GiB)")
  for knob, axis in (("tensor", 2), ("fsdp", 1)):
    for k in (2, 4, 8, 16):
      if shape[0] % k:
        break
      moved = list(shape)
      moved[0] //= k
      moved[axis] *= k
      moved = tuple(moved)
      if _splits(c, w, moved) and (p := _fits(c, w, moved, budget)):
        out.append(f"mesh.shape={moved} ({knob}={moved[axis]}: {p:.2f} GiB)")
        break
  q_min = presets.questions_for(shape, w.group, w.minibatches)
  if w.questions > q_min and (
    p := _fits(c, dataclasses.replace(w, questions=q_min), shape, budget)
  ):
    out.append(f"train.questions_per_step={q_min} ({p:.2f} GiB)")
  if w.chunk > 16 and (p := _fits(c, dataclasses.replace(w, chunk=16), shape, budget)):
    out.append(f"a log-prob chunk of 16 (train_step.StepSettings.logprob_chunk: {p:.2f} GiB)")
  return out


def make_plan(
  spec: RunSpec,
  num_devices: Optional[int] = None,
  device_memory_gib: Optional[float] = None,
  prompt_tokens: Optional[int] = None,
) -> Plan:
  """The plan of run `spec`; raises InvalidConfig when its rows or weights do not split over the
  mesh (not when it does not fit: see `check`)."""
  shape = _resolve_mesh(spec, num_devices)
  config_validation.check_rows(spec, shape)
  c, source = model_config(spec.model.path, spec.model.dtype)
  c = c.replace(remat=spec.model.remat)
  check_weights(spec, c, shape)
  w, prompt_source = workload(spec, prompt_tokens)
  mem = memory_plan(c, w, shape)
  usable, mem_source = _device_memory(spec, device_memory_gib)
  notes = []
  split = presets.row_split(shape)
  if split > 1 and w.questions % split:
    ways = math.gcd(w.questions, split)
    notes.append(
      f"the update's prompt prefix and the CoT' answer rows are Q={w.questions} rows: "
      f"split {ways} way{'s' if ways > 1 else ''} over data*fsdp={split}, each is "
      f"computed on {split // ways} devices ({w.questions * w.prompt} of the update's "
      f"{w.questions * w.prompt + w.rows * w.cot} tokens)"
    )
  plan_ = Plan(spec, c, source, shape, w, prompt_source, mem, usable, mem_source, [], notes)
  if plan_.fits is False:
    plan_.fixes = _fixes(c, w, shape, plan_.budget_gib)
  return plan_


def check(
  spec: RunSpec,
  *,
  tokenizer=None,
  examples: Optional[Sequence] = None,
  num_devices: Optional[int] = None,
  device_memory_gib: Optional[float] = None,
  log: bool = True,
) -> Plan:
  """The start-up plan of a training run: the rows rule on the real device count, the weights
  rule, the memory verdict. Logs the plan; raises InvalidConfig when the step cannot fit (an
  unknown device memory, e.g. on CPU, is logged, not refused). With `tokenizer` and the training
  `examples`, the prompt length is measured instead of assumed."""
  tokens = prompt_length(spec, tokenizer, examples) if tokenizer is not None and examples else None
  plan_ = make_plan(spec, num_devices, device_memory_gib, tokens)
  if log:
    from absl import logging

    logging.info("memory plan:\n%s", describe(plan_))
  if plan_.fits is False:
    raise InvalidConfig(refusal(plan_))
  return plan_


def refusal(p: Plan) -> str:
  """The one line of a plan that does not fit: the numbers, then the knobs."""
  m = p.memory
  key = p.fixes[0].split("=")[0] if p.fixes else "mesh.shape"
  top = sorted(m.items, key=lambda i: i.bytes, reverse=True)[:3]
  largest = ", ".join(f"{i.name} {i.bytes / GIB:.2f}" for i in top)
  fixes = (
    "; or ".join(p.fixes)
    if p.fixes
    else f"no single knob fits it (largest: {largest} GiB): shard the base over more devices "
    "(mesh tensor / fsdp) or shorten sampling.cot_length"
  )
  return (
    f"config.{key}: the step needs {m.peak / GIB:.2f} GiB per device ({m.peak_phase} "
    f"peak) but {HEADROOM:.0%} of {p.usable_gib:.2f} GiB = {p.budget_gib:.2f} GiB is "
    f"usable ({p.memory_source}): set {fixes}"
  )


def describe(p: Plan) -> str:
  """The plan as text (what the CLI prints and training logs)."""
  from markovian_jax.planning import describe as plan_report

  return plan_report.describe(p)
