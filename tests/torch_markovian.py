"""A test-only PyTorch reference of one Markovian training step (transformers + peft + autograd).

Written from the method's formulas, not from markovian_jax: it builds its own prompts from the
template strings below, tokenizes them with `transformers.AutoTokenizer`, runs the
checkpoint's transformers class (`AutoModelForCausalLM`: Llama, Qwen3, GPT-2, ...) + a PEFT LoRA
(one unpadded row at a time, so no padding or position logic can hide a slip) and
differentiates with `torch.autograd` in float64. `tests/training/test_step_reference.py`
compares our JAX step against it.

One step for Q questions with G CoTs of K tokens each (N = Q * G rows, question-major):

  CoT prompt   "{base_prompt} {question}\\nReasoning:"  (+ the tokenizer's special tokens)
  answer row   "{base_prompt} <Redacted>\\nReasoning:{CoT text} Answer: {gold}"   (markovian)
               scored on the tokens after the last ("Answer", ":") token pair
  r_i    = mean_t log pi(answer_t | row prefix)           unscaled logits (T = 1), policy + LoRA
  b_q    = the same with the LoRA off on the row built from the base model's greedy CoT'_q
  R_i    = r_i - b_q;   A_i = (R_i - mean_g R) / (std_g R + 1e-8)    std unbiased (ddof 1)
  lp_it  = log softmax(logits / T)[cot_it] at the position before CoT token t
  KL_it  = sum_v p_v (log p_v - log q_v), p = softmax(pi logits / T), q = softmax(base / T)
  pg     l_it = -lp_it * A_i
  ppo    rho = exp(clip(lp - sg(behaviour), -20, 20)), l = max(-rho A, -clip(rho, 1-eps, 1+eps) A)
  loss   = mean_i mean_t l_it + kl_penalty * mean_i mean_t KL_it
           [- w * mean_i (r_i - sg(mu_g)) / sg(max(sigma_g, floor) + 1e-8)]   reward_grad="paper"
           (mu, sigma: group mean / unbiased std of r, not R; r then carries the policy's gradient)

The means over i run over the rows of the (mini)batch the loss is taken on; A, mu and sigma always
come from the whole step's batch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from tests import helpers

torch = helpers.require("torch")
transformers = helpers.require("transformers")
peft = helpers.require("peft")

# The task prompts, written out here from the method description (not imported from our code), so
# that a template or field-mapping slip in markovian_jax shows up as a mismatch.
BASE_PROMPTS = {
  "arithmetic": (
    "You will be given an arithmetic problem, which you have {K} tokens to work "
    "through step-by-step. Question:"
  ),
}
PROMPT_TYPE = "Reasoning:"
REDACTED = "<Redacted>"


def cot_prompt_text(task: str, question: str, cot_length: int) -> str:
  return f"{BASE_PROMPTS[task].format(K=cot_length)} {question}\n{PROMPT_TYPE}"


def answer_row_text(
  task: str, question: str, cot_text: str, answer: str, cot_length: int, markovian: bool = True
) -> str:
  shown = REDACTED if markovian else question
  return (
    f"{BASE_PROMPTS[task].format(K=cot_length)} {shown}\n{PROMPT_TYPE}{cot_text} Answer: {answer}"
  )


def peft_name(name: str) -> str:
  """PEFT parameter name -> the adapter-file key (drops the adapter name `.default`)."""
  return name.replace(".default.", ".")


@dataclasses.dataclass
class StepResult:
  """float64 numpy results of one reference step.

  loss: scalar; grads: {PEFT key (`...lora_A.weight`): array of the weight's shape};
  rewards r [N]; baseline_scores b [Q]; normalized R [N]; advantages A [N];
  cot_logprobs lp [N, K] (policy, temperature T); kl [N, K]; pg_loss / kl_loss / reward_loss:
  the loss's terms (kl_loss before the penalty factor).
  """

  loss: float
  grads: dict
  rewards: np.ndarray
  baseline_scores: np.ndarray
  normalized: np.ndarray
  advantages: np.ndarray
  cot_logprobs: np.ndarray
  kl: np.ndarray
  pg_loss: float
  kl_loss: float
  reward_loss: float


class TorchMarkovian:
  """A base model (HF directory of any family) + a PEFT LoRA adapter directory, in `dtype`
  (float64 default)."""

  def __init__(self, model_dir: str, adapter_dir: str, task: str = "arithmetic", dtype=None):
    self.dtype = dtype or torch.float64
    self.task = task
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    base = base.to(self.dtype)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    self.model = model.to(self.dtype).eval()  # eval: LoRA dropout off (the adapter has 0 anyway)
    self.lora = {peft_name(n): p for n, p in self.model.named_parameters() if "lora_" in n}
    assert self.lora and all(p.requires_grad for p in self.lora.values())
    assert all(not p.requires_grad for n, p in self.model.named_parameters() if "lora_" not in n)

  # ------------------------------------------------------------------ text and tokens
  def encode(self, text: str) -> list:
    """The plain format: the text plus whatever special tokens the tokenizer adds itself."""
    return list(self.tokenizer(text)["input_ids"])

  def decode(self, ids) -> list:
    return self.tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True)

  def answer_start(self, ids: Sequence[int]) -> int:
    """The index after the last ("Answer" | " Answer", ":") token pair, found by decoding."""
    pieces = [self.tokenizer.decode([i]) for i in ids]
    hits = [
      j for j in range(len(ids) - 1) if pieces[j] in ("Answer", " Answer") and pieces[j + 1] == ":"
    ]
    assert hits, f"no 'Answer:' token pair in {pieces[-20:]}"
    assert hits[-1] + 2 < len(ids), "empty answer span"
    return hits[-1] + 2

  def cot_prompt_ids(self, question: str, cot_length: int) -> list:
    return self.encode(cot_prompt_text(self.task, question, cot_length))

  def answer_row(
    self, question: str, cot_text: str, answer: str, cot_length: int, markovian: bool = True
  ) -> tuple[list, int]:
    ids = self.encode(answer_row_text(self.task, question, cot_text, answer, cot_length, markovian))
    return ids, self.answer_start(ids)

  # ------------------------------------------------------------------ model pieces
  def _logits(self, ids, adapter: bool):
    x = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    x = x[None] if x.ndim == 1 else x
    if adapter:
      return self.model(input_ids=x).logits
    with self.model.disable_adapter(), torch.no_grad():
      return self.model(input_ids=x).logits

  def answer_score(self, ids: list, start: int, adapter: bool):
    """mean over the answer span of log p(token | prefix), unscaled logits (T = 1). Scalar."""
    logp = torch.log_softmax(self._logits(ids, adapter)[0], dim=-1)
    targets = torch.as_tensor(ids[start:], dtype=torch.long)
    # Token j is predicted by position j - 1.
    lp = logp[start - 1 : len(ids) - 1].gather(-1, targets[:, None])[:, 0]
    return lp.mean()

  def cot_terms(self, prompt: list, cots: np.ndarray, temperature: float):
    """Policy log-probs [G, K] (with grad) and the exact KL(pi_T || base_T) [G, K] (with grad
    through pi) of the G CoTs `cots` [G, K] continuing `prompt`."""
    cots = np.asarray(cots)
    g, k = cots.shape
    p = len(prompt)
    ids = np.concatenate([np.tile(np.asarray(prompt)[None], (g, 1)), cots], axis=1)
    # Positions p-1 .. p+k-2 predict the CoT tokens at p .. p+k-1.
    logp = torch.log_softmax(self._logits(ids, True)[:, p - 1 : p + k - 1] / temperature, dim=-1)
    logq = torch.log_softmax(self._logits(ids, False)[:, p - 1 : p + k - 1] / temperature, dim=-1)
    lp = logp.gather(-1, torch.as_tensor(cots, dtype=torch.long)[..., None])[..., 0]
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return lp, kl

  # ------------------------------------------------------------------ one step
  def step(
    self,
    examples: Sequence[tuple],
    cot_tokens: np.ndarray,
    base_cot_tokens: np.ndarray,
    *,
    cot_length: int,
    temperature: float,
    kind: str = "pg",
    kl_penalty: float = 0.1,
    reward_grad: str = "none",
    reward_weight: float = 1.0,
    sigma_floor: float = 1e-2,
    adv_eps: float = 1e-8,
    ppo_eps: float = 0.2,
    ppo_clamp: float = 20.0,
    behaviour_logprobs: Optional[np.ndarray] = None,
    rows: Optional[Sequence[int]] = None,
    markovian: bool = True,
    with_grads: bool = True,
  ) -> StepResult:
    """One step's rewards, advantages, loss and LoRA gradient.

    Args:
      examples: Q (question, gold answer) string pairs.
      cot_tokens: int [Q * G, K] sampled CoTs, question-major; base_cot_tokens: int [Q, K] CoT'.
      behaviour_logprobs: float [Q * G, K] sampler log-probs (kind="ppo").
      rows: the rows of the (mini)batch the loss is taken on (default: all); the advantages and
        the reward standardisation use the whole batch.
    """
    cot_tokens, base_cot_tokens = np.asarray(cot_tokens), np.asarray(base_cot_tokens)
    q = len(examples)
    n = cot_tokens.shape[0]
    g = n // q
    assert g * q == n and base_cot_tokens.shape[0] == q
    rows = np.arange(n) if rows is None else np.asarray(rows)
    paper = reward_grad == "paper"

    # Rewards: the policy scores its CoTs' answer rows; the base scores its own greedy CoT'.
    cot_texts, base_texts = self.decode(cot_tokens), self.decode(base_cot_tokens)
    r = []
    for i in range(n):
      question, answer = examples[i // g]
      ids, start = self.answer_row(question, cot_texts[i], answer, cot_length, markovian)
      if paper and i in rows:
        r.append(self.answer_score(ids, start, adapter=True))
      else:
        with torch.no_grad():
          r.append(self.answer_score(ids, start, adapter=True))
    r = torch.stack(r)
    b = torch.stack(
      [
        self.answer_score(
          *self.answer_row(question, base_texts[j], answer, cot_length, markovian), adapter=False
        )
        for j, (question, answer) in enumerate(examples)
      ]
    ).detach()

    r_const = r.detach()
    big_r = r_const - b.repeat_interleave(g)
    groups = big_r.reshape(q, g)
    adv = (
      (groups - groups.mean(1, keepdim=True))
      / (groups.std(1, unbiased=True, keepdim=True) + adv_eps)
    ).reshape(n)

    # Policy terms, one question (shared prompt) at a time.
    lp, kl = [], []
    for j, (question, _) in enumerate(examples):
      lp_j, kl_j = self.cot_terms(
        self.cot_prompt_ids(question, cot_length), cot_tokens[j * g : (j + 1) * g], temperature
      )
      lp.append(lp_j)
      kl.append(kl_j)
    lp, kl = torch.cat(lp), torch.cat(kl)

    a = adv[:, None]
    if kind == "pg":
      per_token = -lp * a
    elif kind == "ppo":
      old = torch.as_tensor(np.asarray(behaviour_logprobs), dtype=lp.dtype)
      rho = torch.exp(torch.clamp(lp - old, -ppo_clamp, ppo_clamp))
      per_token = torch.maximum(-rho * a, -torch.clamp(rho, 1 - ppo_eps, 1 + ppo_eps) * a)
    else:
      raise ValueError(kind)
    idx = torch.as_tensor(rows, dtype=torch.long)
    pg_loss = per_token[idx].mean(1).mean()
    kl_loss = kl[idx].mean(1).mean()
    loss = pg_loss + kl_penalty * kl_loss
    reward_loss = torch.zeros((), dtype=lp.dtype)
    if paper:
      rg = r_const.reshape(q, g)
      mu = rg.mean(1).repeat_interleave(g)
      sigma = rg.std(1, unbiased=True).repeat_interleave(g)
      z = (r - mu) / (torch.clamp(sigma, min=sigma_floor) + adv_eps)
      reward_loss = -reward_weight * z[idx].mean()
      loss = loss + reward_loss

    grads = {}
    if with_grads:
      names = sorted(self.lora)
      values = torch.autograd.grad(loss, [self.lora[k] for k in names], allow_unused=False)
      grads = {k: v.detach().numpy().copy() for k, v in zip(names, values)}
    f = lambda x: x.detach().numpy().copy()  # noqa: E731
    return StepResult(
      loss=loss.item(),
      grads=grads,
      rewards=f(r),
      baseline_scores=f(b),
      normalized=f(big_r),
      advantages=f(adv),
      cot_logprobs=f(lp),
      kl=f(kl),
      pg_loss=pg_loss.item(),
      kl_loss=kl_loss.item(),
      reward_loss=reward_loss.item(),
    )

  # ------------------------------------------------------------------ optimizer
  def adamw_step(
    self,
    grads: dict,
    *,
    lr: float = 1e-3,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    max_norm: float = 1.0,
  ) -> dict:
    """The LoRA weights after one `clip_grad_norm_` + `torch.optim.AdamW` step on `grads`
    (PEFT-keyed); the model's own weights are left untouched."""
    names = sorted(grads)
    params = [torch.nn.Parameter(self.lora[k].detach().clone()) for k in names]
    for p, k in zip(params, names):
      p.grad = torch.as_tensor(grads[k], dtype=p.dtype).clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    opt.step()
    return {k: p.detach().numpy().copy() for k, p in zip(names, params)}

  def lora_weights(self) -> dict:
    return {k: v.detach().numpy().copy() for k, v in self.lora.items()}
