"""The PyTorch peer's rows: transformers' `generate` on the peft model, and the reference's
Markovian step in transformers + peft (`TorchStep`), on the same weights as ours.

One worker process runs every peer row (the weights are made and copied once), fed one row id
at a time by the driver (ours' rows run in between, in their own processes), each row's peak
memory reset before it, and the side's JSON rewritten after it (`results.RowFile`)."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.accelerator import results
from benchmarks.accelerator import workload as wl
from benchmarks.accelerator.peer_model import reset_peak, sync, torch_model, torch_peak


def now() -> float:
  return time.perf_counter()


def _torch_generate(model, tokens, n: int, w: wl.Workload, seed: int, sample: bool):
  import torch

  torch.manual_seed(seed)
  eos = list(w.config.eos_token_ids)
  kw = (
    dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
  )
  with torch.no_grad():  # not inference_mode: the update differentiates through these tokens
    out = model.generate(
      input_ids=tokens,
      attention_mask=torch.ones_like(tokens),
      max_new_tokens=n,
      min_new_tokens=n,
      eos_token_id=eos,
      pad_token_id=eos[0],
      **kw,
    )
  sync(tokens.device)
  assert out.shape[1] == tokens.shape[1] + n, out.shape
  return out


def _checkpointing(model, on: bool):
  """Non-reentrant activation checkpointing of every decoder layer on / off (transformers 5
  renamed gradient_checkpointing_* to activation_checkpointing_*)."""
  if hasattr(model, "activation_checkpointing_enable"):
    if on:
      model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
      )
    else:
      model.activation_checkpointing_disable()
  elif on:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  else:
    model.gradient_checkpointing_disable()


class TorchStep:
  """The reference's Markovian step in transformers + peft, on token ids (no tokenizer):

    sample   the policy (train mode: LoRA dropout on) `generate`s G CoTs per question (T = 1,
             exactly K tokens); the base model (adapter disabled) greedily generates one CoT'
    score    answer rows [answer prompt, CoT, answer] through the policy without gradient, the
             CoT' rows through the base; r, b = mean answer-token log-probs; R = r - b;
             advantages standardised within each question's group
    update   teacher-forced [prompt; CoT] through the policy (with gradient) and the base
             (without); log-probs / T and the exact full-vocabulary KL on the CoT positions;
             loss = mean(-lp * A + kl_penalty * KL); backward, clip_grad_norm(1.0), AdamW.

  Logits are computed only where they are used (`logits_to_keep`), which spares torch the
  prompt positions' vocabulary projection (ours skips them too). With our remat on (8B), the
  update runs with gradient checkpointing (non-reentrant), switched off again for `generate`,
  where it would disable the KV cache."""

  def __init__(self, model, w: wl.Workload, dev):
    import torch

    self.torch, self.model, self.w, self.dev = torch, model, w, dev
    self.trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(
      self.trainable, lr=w.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
    )
    self.checkpointing = w.config.remat != "none"

  def _answer_logprob(self, rows):
    torch, k = self.torch, self.w.answer_span
    tokens = torch.as_tensor(rows, device=self.dev)
    logits = self.model(input_ids=tokens, logits_to_keep=k + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens[:, -k:, None])[..., 0].mean(-1)

  def run(self, p_tokens: np.ndarray, seed: int) -> dict:
    torch, w, model = self.torch, self.w, self.model
    g, k = w.group, w.cot
    torch.manual_seed(seed)
    model.train()
    prompt = torch.as_tensor(p_tokens, device=self.dev)
    t0 = now()
    with torch.no_grad():
      seqs = _torch_generate(model, prompt.repeat_interleave(g, 0), k, w, seed, sample=True)
      with model.disable_adapter():
        base = _torch_generate(model, prompt, k, w, seed, sample=False)
    t1 = now()
    p = prompt.shape[1]
    ans, _, _ = wl.answer_rows(w, seqs[:, p:].cpu().numpy())
    base_ans, _, _ = wl.answer_rows(w, base[:, p:].cpu().numpy())
    with torch.no_grad():
      r = self._answer_logprob(ans)
      with model.disable_adapter():
        b = self._answer_logprob(base_ans)
    big_r = (r - b.repeat_interleave(g)).view(-1, g)
    adv = ((big_r - big_r.mean(-1, keepdim=True)) / (big_r.std(-1, keepdim=True) + 1e-8)).view(-1)
    sync(self.dev)
    t2 = now()
    _checkpointing(model.base_model.model, self.checkpointing)
    try:
      kw = dict(logits_to_keep=k + 1, use_cache=False)
      logits = model(input_ids=seqs, **kw).logits[:, :-1]
      with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=seqs, **kw).logits[:, :-1]
      logp = torch.log_softmax(logits.float(), dim=-1)
      ref = torch.log_softmax(ref_logits.float(), dim=-1)
      lp = logp.gather(-1, seqs[:, -k:, None])[..., 0].mean(-1)
      kl = (logp.exp() * (logp - ref)).sum(-1).mean(-1)
      loss = (-lp * adv.detach() + w.kl_penalty * kl).mean()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      sync(self.dev)
    finally:
      _checkpointing(model.base_model.model, False)
    t3 = now()
    return {
      "sample_s": t1 - t0,
      "score_s": t2 - t1,
      "update_s": t3 - t2,
      "step_s": t3 - t0,
      "reward": float(r.mean()),
      "loss": float(loss),
    }


def _decode_row(model, w: wl.Workload, b: int, dev) -> dict:
  import torch

  tokens = torch.as_tensor(wl.prompts(w, b, w.sampler_prompt, seed=b), device=dev)
  row = {}
  for n, key in ((w.sampler_new, "full"), (1, "prefill")):
    t = now()
    _torch_generate(model, tokens, n, w, seed=0, sample=True)
    row[key + "_first_call_s"] = now() - t
    times = []
    for i in range(w.repeats):
      t = now()
      _torch_generate(model, tokens, n, w, seed=1 + i, sample=True)
      times.append(now() - t)
    row[key + "_s"], row[key + "_times"] = float(np.mean(times)), times
  row.update(wl.sampler_figures(w, b, row["full_s"], row["prefill_s"]))
  return row


def device_memory(dev) -> dict:
  """Free and total bytes of the CUDA device after returning torch's cached blocks (what our
  rows' processes can take while this worker holds the weights); {} on the CPU."""
  import torch

  if dev.type != "cuda":
    return {}
  torch.cuda.empty_cache()
  free, total = torch.cuda.mem_get_info(dev)
  return {"device_free_bytes": int(free), "device_total_bytes": int(total)}


def worker(
  w: wl.Workload, rows, path, deadline: float, ours_sums=None, allow_cpu: bool = False
) -> None:
  """Run the peer's rows (torch/step/Q, torch/decode/B) into the JSON at `path`, in the order
  `rows` yields them: the driver feeds one id at a time on stdin once the row before it is in
  the file, so that ours and torch alternate while this process keeps the weights. The driver
  decides what fits the budget; this worker runs what it is given."""
  import peft
  import torch
  import transformers

  del deadline  # the driver's; the alarm set in `run_worker` is this process's backstop
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if dev.type == "cpu" and not allow_cpu:  # the driver stops before this; a direct call too
    raise SystemExit("error: torch sees no GPU; the peer runs on the CPU only with --tiny")
  if dev.type == "cpu":
    # --tiny checks code paths, not speed: on a busy CPU torch's intra-op threads spin-wait for
    # each other (measured: a tiny step 4.2 s against 0.7 s with one thread, twice the CPU time).
    torch.set_num_threads(1)
  rf = results.RowFile(path)
  t = now()
  model, check = torch_model(w, dev, ours_sums)
  rf.meta(
    torch=torch.__version__,
    transformers=transformers.__version__,
    peft=peft.__version__,
    device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    load_s=now() - t,
    weights_check=check,
    attn_implementation=model.config._attn_implementation,
    **device_memory(dev),
  )
  step = TorchStep(model, w, dev)
  for rid in rows:
    rid = rid.strip()
    if not rid:
      continue
    kind, size = rid.split("/")[1], int(rid.split("/")[2])
    reset_peak(dev)
    t = now()
    try:
      if kind == "step":
        p_tokens = wl.prompts(w, size, w.step_prompt, seed=100 + size)
        row = wl.summarise_step(w, size, [step.run(p_tokens, seed=i) for i in range(1 + w.repeats)])
        row["gradient_checkpointing"] = step.checkpointing
      else:
        model.eval()
        row = _decode_row(model, w, size, dev)
    except torch.OutOfMemoryError as e:  # recorded, and the other rows still run
      torch.cuda.empty_cache()
      rf.meta(**device_memory(dev))
      rf.fail(rid, f"out of memory: {str(e)[:200]}")
      continue
    row["peak_device_bytes"] = torch_peak(dev)
    row["row_s"] = now() - t
    rf.meta(**device_memory(dev))  # before the row: the driver reads it once the row is there
    rf.row(rid, row)
    print(
      f"[torch] {rid}: "
      + (
        f"{row['step_s']:.3f} s/step"
        if kind == "step"
        else f"decode {row['decode_tok_s']:.1f} tok/s"
      ),
      flush=True,
    )
