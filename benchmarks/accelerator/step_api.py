"""The benchmark's one adapter onto `markovian_jax.training.train_step`, `objectives` and
`training.optimizer`: a change of those APIs is re-pointed here only."""

from __future__ import annotations

import types

import numpy as np

from benchmarks.accelerator.workload import Workload, answer_rows


def step_api(config, w: Workload, mesh, lora):
  """Every use of `markovian_jax.training.train_step`, `objectives` and `optimizer` in the
  benchmarks, so that a change of those APIs is re-pointed here only.

  Returns a namespace:
    programs   train_step.Programs (jitted score / targets / update; for AOT lowering)
    tx         the optimizer (clip -> AdamW, constant learning rate w.lr)
    score(params, lora, answer rows, base rows) -> (answer log-probs [N, A], r [N], b [Q])
    targets(r, b) -> objectives.Targets (group baseline of R = r - b)
    batch(prompt_tokens, prompt_mask, cot_tokens, behaviour, answer rows, answer_lp, b) ->
      train_step.PolicyBatch
    update(params, lora, opt_state, batch, targets, key) -> (lora, opt_state, metrics)
    update_args(params, lora, opt_state, batch, targets, key): the positional arguments of
      `programs.update` (and its static keyword arguments as `.static`)
    place(lora) -> (lora, opt_state) laid out as `update` returns them, so that no program is
      compiled twice (once for fresh arrays, once for the update's outputs)
    opt_shardings: the optimizer state's shardings
    abstract_batch(q) -> (PolicyBatch, Targets) of sharded ShapeDtypeStructs, for AOT lowering
    abstract_score(q) -> the arguments of `programs.score` for Q questions as sharded
      ShapeDtypeStructs (`.args`, `.static`), for AOT lowering
  Row arrays are placed batch-sharded on `mesh`.
  """
  import jax
  import jax.numpy as jnp

  from markovian_jax import objectives as obj
  from markovian_jax.runtime import sharding
  from markovian_jax.training import optimizer, train_step

  settings = train_step.StepSettings(
    model=config,
    objective=obj.ObjectiveConfig(group_size=w.group, kl_penalty=w.kl_penalty),
    temperature=1.0,
  )
  optim = types.SimpleNamespace(
    lr=w.lr,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.01,
    grad_clip=1.0,
    accumulation_steps=1,
    schedule="constant",
    warmup_steps=0,
  )
  tx = optimizer.make_optimizer(optim)
  lora_sh = train_step.tree_shardings(lora, mesh)
  opt_sh = train_step.tree_shardings(jax.eval_shape(tx.init, lora), mesh)
  programs = train_step.Programs(settings, tx, mesh, lora_sh, opt_sh)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, np.shape(x)))  # noqa: E731
  lr = np.float32(w.lr)

  def score(params, lora_, ans, base):
    window = train_step.answer_window(ans[2], base[2])
    return programs.score(params, lora_, None, *map(put, ans), *map(put, base), last_n=window)

  def targets(r, b):
    tg, _, _ = programs.targets(r, put(jnp.repeat(b, w.group)), obj.BaselineState.init())
    return tg

  def batch(p_tokens, p_mask, cot, behaviour, ans, ans_lp, b):
    return train_step.PolicyBatch(
      prompt_tokens=put(p_tokens),
      prompt_mask=put(p_mask),
      cot_tokens=put(cot),
      cot_mask=put(np.ones(cot.shape, bool)),
      behaviour_logprobs=put(behaviour),
      answer_tokens=put(ans[0]),
      answer_mask=put(ans[1]),
      answer_span=put(ans[2]),
      answer_logprobs=ans_lp,
      baseline_scores=put(jnp.repeat(b, w.group)),
    )

  def update_args(params, lora_, opt_state, batch_, tg, key):
    args = (params, lora_, opt_state, batch_, tg, key, None, lr)
    return types.SimpleNamespace(args=args, static=dict(answer_last_n=None))

  def update(params, lora_, opt_state, batch_, tg, key):
    a = update_args(params, lora_, opt_state, batch_, tg, key)
    return programs.update(*a.args, **a.static)

  def place(lora_):
    lora_ = jax.device_put(lora_, lora_sh)
    return lora_, jax.device_put(tx.init(lora_), opt_sh)

  def abstract_batch(q):
    n, k, a, p = q * w.group, w.cot, w.answer_len, w.step_prompt
    sds = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=sharding.batch_sharding(mesh, shape)
    )
    i32, f32, bool_ = jnp.int32, jnp.float32, jnp.bool_
    batch_ = train_step.PolicyBatch(
      prompt_tokens=sds((q, p), i32),
      prompt_mask=sds((q, p), bool_),
      cot_tokens=sds((n, k), i32),
      cot_mask=sds((n, k), bool_),
      behaviour_logprobs=sds((n, k), f32),
      answer_tokens=sds((n, a), i32),
      answer_mask=sds((n, a), bool_),
      answer_span=sds((n, a), bool_),
      answer_logprobs=sds((n, a), f32),
      baseline_scores=sds((n,), f32),
    )
    tg = jax.eval_shape(
      lambda r, b: programs.targets(r, b, obj.BaselineState.init())[0],
      sds((n,), f32),
      sds((n,), f32),
    )
    return batch_, jax.tree.map(lambda x: sds(x.shape, x.dtype), tg)

  def abstract_score(q, params_, lora_):
    n, a = q * w.group, w.answer_len
    sds = lambda shape, dt: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=sharding.batch_sharding(mesh, shape)
    )
    rows = lambda m: (
      sds((m, a), jnp.int32),
      sds((m, a), jnp.bool_),  # noqa: E731
      sds((m, a), jnp.bool_),
    )
    # The span's position is fixed by the row layout, so the window is known before sampling.
    span = answer_rows(w, np.zeros((1, w.cot), np.int32))[2]
    return types.SimpleNamespace(
      args=(params_, lora_, None, *rows(n), *rows(q)),
      static=dict(last_n=train_step.answer_window(span, span)),
    )

  return types.SimpleNamespace(
    programs=programs,
    tx=tx,
    score=score,
    targets=targets,
    batch=batch,
    update=update,
    update_args=update_args,
    place=place,
    opt_shardings=opt_sh,
    abstract_batch=abstract_batch,
    abstract_score=abstract_score,
  )
