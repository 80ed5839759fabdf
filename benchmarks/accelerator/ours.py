"""Our rows: the Markovian step (`sampling.generate_with_reference`, then `train_step.Programs`:
score, targets, update) and the sampler (`sampling.generate`) on random Llama weights.

The driver runs each row in its own process, so that the row's peak device memory is its own
(JAX's peak only grows within a process) and a row that crashes or overruns loses nothing else.
The worker rewrites the side's JSON after the row (`results.RowFile`)."""

from __future__ import annotations

import concurrent.futures
import math
import time

import numpy as np

from benchmarks.accelerator import probes, results, step_api
from benchmarks.accelerator import workload as wl


class CompileClock:
  """Seconds spent tracing, lowering and compiling (jax.monitoring), and backend compilations."""

  def __init__(self):
    import jax

    self.seconds, self.count = 0.0, 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    del kwargs
    if event.startswith("/jax/core/compile/"):
      self.seconds += duration
      self.count += event.endswith("backend_compile_duration")

  def read(self):
    return self.seconds, self.count


def now() -> float:
  return time.perf_counter()


def peak_device_bytes(device):
  """The process's peak device bytes (None where the backend reports none, as on CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def init_params_on_device(config, seed: int = 0):
  """Random weights built on the default device by one jitted program (never on the host)."""
  import jax

  from markovian_jax.models import init_params

  return jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(seed))


def init_adapter(config, w: wl.Workload):
  import jax

  from markovian_jax.models import init_lora

  return init_lora(
    config, jax.random.PRNGKey(1), rank=w.lora_rank, alpha=w.lora_alpha, dropout=w.lora_dropout
  )


def leaf_sums(params) -> dict:
  """{path: float64 sum of the leaf in fp32}: the weights' fingerprint, compared across workers."""
  import jax
  import jax.numpy as jnp

  from markovian_jax.runtime import sharding

  sums = jax.jit(lambda p: jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32)), p))(params)
  return {
    sharding.path_str(path): float(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)
  }


class Ours:
  """One process's model, adapter, optimizer state and step programs."""

  def __init__(self, w: wl.Workload):
    import jax

    from markovian_jax.runtime import sharding

    self.w, self.c = w, w.config
    self.clock = CompileClock()
    self.device = jax.devices()[0]
    t = now()
    self.params = jax.block_until_ready(init_params_on_device(self.c))
    self.init_s = now() - t
    lora = init_adapter(self.c, w)
    self.mesh = sharding.make_mesh((1, 1, 1), devices=[self.device])
    self.api = step_api.step_api(self.c, w, self.mesh, lora)
    self.lora, self.opt_state = self.api.place(lora)

  def meta(self) -> dict:
    import jax

    from markovian_jax.models import decoder

    return {
      "device_kind": self.device.device_kind,
      "platform": self.device.platform,
      "jax": jax.__version__,
      "init_s": self.init_s,
      "weight_sums": leaf_sums(self.params),
      "attention_impl": self.c.attention_impl,
      "self_attention_kernel": {
        str(t): decoder.attention_kernel(self.c, t)
        for t in sorted(
          {self.w.step_prompt, self.w.answer_len, self.w.cache_slots - self.w.sampler_new}
        )
      },
      "decode_and_prefix_kernel": "einsum",
    }

  def _aot(self, q: int) -> dict:
    """Compile the scorer and the update for Q questions ahead of time, in threads (XLA compiles
    outside the GIL) while the caller samples. Returns {name: future of Compiled}."""
    import jax

    api = self.api
    batch, targets = api.abstract_batch(q)
    ua = api.update_args(
      self.params, self.lora, self.opt_state, batch, targets, jax.random.PRNGKey(0)
    )
    sa = api.abstract_score(q, self.params, self.lora)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    futures = {
      "update": pool.submit(lambda: api.programs.update.lower(*ua.args, **ua.static).compile()),
      "score": pool.submit(lambda: api.programs.score.lower(*sa.args, **sa.static).compile()),
    }
    pool.shutdown(wait=False)
    return futures

  def step_row(self, q: int) -> dict:
    w = self.w
    p_tokens = wl.prompts(w, q, w.step_prompt, seed=100 + q)
    p_mask = np.ones(p_tokens.shape, bool)
    t = now()
    futures = self._aot(q)
    runs = []
    aot = {}

    def wait_aot():
      for name, f in futures.items():
        aot[name] = f.result()
      aot["wall_s"] = now() - t

    for i in range(1 + w.repeats):
      runs.append(self._step(p_tokens, p_mask, i, wait_aot if i == 0 else None))
    row = wl.summarise_step(w, q, runs)
    row["compile_s"] = {k: runs[0][k + "_compile_s"] for k in ("sample", "score", "update")}
    row["aot_compile_wall_s"] = aot["wall_s"]
    row["compiles_in_timed_steps"] = sum(r["compiles"] for r in runs[1:])
    row["hlo_cudnn_fmha_calls"] = {
      k: probes.cudnn_fmha_calls(aot[k].as_text()) for k in ("score", "update")
    }
    row["peak_device_bytes"] = peak_device_bytes(self.device)
    return row

  def _step(self, p_tokens, p_mask, seed, before_score=None):
    """One Markovian step; returns its timings (and updates the adapter and optimizer state)."""
    import jax

    from markovian_jax import sampling

    c, w, api = self.c, self.w, self.api
    marks = [(now(), self.clock.read())]
    out, ref = sampling.generate_with_reference(
      c,
      self.params,
      p_tokens,
      prompt_mask=p_mask,
      lora=self.lora,
      max_new_tokens=w.cot,
      min_new_tokens=w.cot,
      num_samples=w.group,
      temperature=1.0,
      rng=seed,
      eos_ids=c.eos_token_ids,
    )
    cot, behaviour = np.asarray(out.tokens), np.asarray(out.logprobs)
    base = np.asarray(ref.tokens)
    if before_score:
      before_score()
    marks.append((now(), self.clock.read()))
    ans, base_rows = wl.answer_rows(w, cot), wl.answer_rows(w, base)
    ans_lp, r, b = api.score(self.params, self.lora, ans, base_rows)
    tg = jax.block_until_ready(api.targets(r, b))
    marks.append((now(), self.clock.read()))
    batch = api.batch(p_tokens, p_mask, cot, behaviour, ans, ans_lp, b)
    self.lora, self.opt_state, metrics = api.update(
      self.params, self.lora, self.opt_state, batch, tg, jax.random.PRNGKey(seed)
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    marks.append((now(), self.clock.read()))
    res = {
      "reward": float(np.mean(np.asarray(r))),
      "loss": metrics.get("loss", math.nan),
      "compiles": marks[-1][1][1] - marks[0][1][1],
    }
    for name, (t0, c0), (t1, c1) in zip(("sample", "score", "update"), marks, marks[1:]):
      res[name + "_s"] = t1 - t0
      res[name + "_compile_s"] = c1[0] - c0[0]
    res["step_s"] = marks[-1][0] - marks[0][0]
    return res

  def decode_row(self, b: int) -> dict:
    from markovian_jax import sampling

    c, w = self.c, self.w
    tokens = wl.prompts(w, b, w.sampler_prompt, seed=b)
    mask = np.ones(tokens.shape, bool)

    def run(n, seed):
      o = sampling.generate(
        c,
        self.params,
        tokens,
        prompt_mask=mask,
        lora=self.lora,
        max_new_tokens=n,
        min_new_tokens=n,
        temperature=1.0,
        rng=seed,
        eos_ids=c.eos_token_ids,
      )
      return np.asarray(o.tokens)

    def first(n):
      t = now()
      assert run(n, 0).shape == (b, n)
      return now() - t

    # The two programs (N new tokens, 1 new token) are independent: their first calls, which
    # compile them, run in two threads (XLA compiles outside the GIL).
    row = {}
    c0, t = self.clock.read(), now()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      firsts = {key: pool.submit(first, n) for n, key in ((w.sampler_new, "full"), (1, "prefill"))}
      for key, future in firsts.items():
        row[key + "_first_call_s"] = future.result()
    row["first_calls_wall_s"] = now() - t
    row["compile_s"] = self.clock.read()[0] - c0[0]  # summed over both threads
    for n, key in ((w.sampler_new, "full"), (1, "prefill")):
      times = []
      for i in range(w.repeats):
        t = now()
        run(n, 1 + i)
        times.append(now() - t)
      row[key + "_s"], row[key + "_times"] = float(np.mean(times)), times
    row.update(wl.sampler_figures(w, b, row["full_s"], row["prefill_s"]))
    row["peak_device_bytes"] = peak_device_bytes(self.device)
    return row


def worker(w: wl.Workload, rows: list, path, deadline: float) -> None:
  """Run `rows` (ours/step/Q, ours/decode/B) in order into the side's JSON at `path`, each after
  the first checked against the budget; a row that raises is recorded as failed."""
  ours = Ours(w)
  rf = results.RowFile(path)
  if "weight_sums" not in rf.data["meta"]:
    rf.meta(**ours.meta())
  budget = results.Budget(deadline, w)
  for i, rid in enumerate(rows):
    why = i and budget.why_not(rid)  # the first row was admitted by the driver, which knows
    if why:  # how long the earlier rows' processes took
      rf.skip(rid, why)
      continue
    kind, size = rid.split("/")[1], int(rid.split("/")[2])
    t = now()
    try:
      row = ours.step_row(size) if kind == "step" else ours.decode_row(size)
    except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
      rf.fail(rid, f"{type(e).__name__}: {str(e)[:500]}")
      continue
    row["row_s"] = now() - t
    rf.row(rid, row)
    budget.finished(rid, row["row_s"])
    print(
      f"[ours] {rid}: "
      + (
        f"{row['step_s']:.3f} s/step"
        if kind == "step"
        else f"decode {row['decode_tok_s']:.1f} tok/s"
      ),
      flush=True,
    )
