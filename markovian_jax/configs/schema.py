"""Every key of a run config, typed: its default, a one-line description, and its task overrides.

Each section of a run config is a frozen dataclass below, and each key a field written once:

    rank: int = knob(8, "r of every adapter pair A [in, r], B [r, out]")

`build(task)` turns them into the ml-collections ConfigDict that `configs/base.get_config` returns
and `--config.lora.rank=4` overrides; `training/specs.py` subclasses each section with its
validation (which needs the choice lists of the packages above this one: models, data,
objectives), and `python -m markovian_jax.training.config_reference` prints every key with its
description (docs/configuration.md). A default that depends on the task is `by_task`: a
{task: value} table for the tasks that differ, or a function of the task.

To add a key: a field here; its check, if any, in the section's spec (training/specs.py). An
objective key is also a field of `objectives.ObjectiveConfig` with the same default (the loss reads
it from there; tests/configs/test_config_defaults.py holds the two equal).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Union

import ml_collections

from markovian_jax.runtime import compilation_cache

ByTask = Union[Mapping[str, Any], Callable[[str], Any], None]


def knob(default: Any, description: str, by_task: ByTask = None) -> Any:
  """A config key: a dataclass field with `default`, `description` and the per-task defaults."""
  return dataclasses.field(
    default=default, metadata={"description": description, "by_task": by_task}
  )


def same(section: type, name: str) -> Any:
  """A new field equal to `section`'s field `name` (default and description), for a spec that
  reads the key without inheriting the whole section."""
  f = {f.name: f for f in dataclasses.fields(section)}[name]
  return dataclasses.field(default=f.default, metadata=f.metadata)


def default(f: dataclasses.Field, task: str) -> Any:
  """The default of field `f` in the config of `task`."""
  by_task = f.metadata.get("by_task")
  if callable(by_task):
    return by_task(task)
  return (by_task or {}).get(task, f.default)


@dataclasses.dataclass(frozen=True)
class Run:
  """The top-level keys."""

  task: str = knob("gsm8k", "a data.tasks.TASKS name; set by the task file", by_task=lambda t: t)
  workdir: str = knob(
    "runs/gsm8k",
    "the run directory (checkpoints, events, samples); gs:// works",
    by_task=lambda t: f"runs/{t}",
  )
  variant: str = knob(
    "",
    "the named variant this config is (configs/base.py VARIANTS; set by `task_config`), "
    "recorded in the run's config.json so that reports can lay runs out as the paper's table; "
    "\"\" = not a named variant",
  )
  compilation_cache_dir: str = knob(
    compilation_cache.DEFAULT_DIR,
    "JAX's persistent compilation cache (train and evaluate): "
    "restarts and repeated runs load their compiled programs instead of compiling again; "
    "\"\" = off",
  )
  host_allocator: str = knob(
    "tcmalloc",
    "the process's malloc (train and evaluate): \"tcmalloc\" restarts the command "
    "once with tcmalloc preloaded when it is installed (on CPU, glibc page-faults XLA's per-call "
    "temporaries in again on every call: update 5.1 -> 3.8 s on SmolLM2), \"system\" keeps the "
    "C library's",
  )


@dataclasses.dataclass(frozen=True)
class Model:
  path: str = knob(
    "meta-llama/Llama-3.1-8B-Instruct",
    "hub id, HF directory, .gguf file, or random:<name> (a random test model)",
  )
  dtype: str = knob("bfloat16", "weights and matmuls; softmax/log-probs are always fp32")
  remat: str = knob(
    "full",
    "each decoder layer's rematerialisation in the backward pass: none "
    "(stores its activations) | full (recomputes the layer) | dots (keeps matmul "
    "outputs)",
  )
  attention: str = knob(
    "auto",
    "self-attention kernel (models/attention_choice.py): auto runs a cuDNN preflight on "
    "GPU and falls back to XLA's attention with the reason logged",
  )


@dataclasses.dataclass(frozen=True)
class Lora:
  rank: int = knob(8, "r of every adapter pair A [in, r], B [r, out]")
  alpha: float = knob(16.0, "the adapter output is scaled by alpha / rank")
  dropout: float = knob(
    0.1,
    "LoRA dropout of the update's policy pass; the G CoTs of a question share their "
    "prompt's masks (llama.forward_with_prefix). Sampling and scoring run without it (the "
    "reference keeps it on)",
  )
  targets: tuple = knob(
    ("q", "k", "v", "o", "gate", "up", "down"),
    "the linear layers that get an adapter; default all but the head",
  )
  init_from: str = knob("", "a PEFT adapter directory to start from; \"\" = a fresh adapter")
  reference: str = knob(
    "base",
    "the KL reference: \"base\" (LoRA off; exact when the adapter starts at zero) or "
    "\"initial_adapter\" (a frozen copy of the starting adapter; use with init_from)",
  )


@dataclasses.dataclass(frozen=True)
class Data:
  path: str = knob(
    "", "local files (a directory laid out like shared/data/<task>/, or one file); \"\" = hub"
  )
  train_split: str = knob("train", "the split training draws questions from")
  eval_split: str = knob("test", "the split evaluation reports on")
  arithmetic_terms: int = knob(15, "arithmetic: integers per sum")
  arithmetic_max: int = knob(99, "arithmetic: each integer drawn from [1, arithmetic_max]")
  arc_subset: str = knob("ARC-Challenge", "arc: ARC-Challenge | ARC-Easy")
  question_length: int = knob(50, "wiki_continuation: context tokens")
  target_length: int = knob(50, "wiki_continuation: target tokens")
  mmlu_subject: str = knob("", "one MMLU subject (e.g. \"anatomy\"); \"\" = all 57")
  mmlu_train_splits: tuple = knob(
    ("dev", "validation"),
    "what MMLU's train split is made of; add \"auxiliary_train\" (hub "
    "only) for 100k more questions",
  )


@dataclasses.dataclass(frozen=True)
class Prompt:
  format: str = knob(
    "auto",
    "auto (the model family's, as the reference picks it from config.json's "
    "model_type; the run's config.json records the resolved one) | plain (text + BOS; Llama, "
    "GPT-2, Phi) | chatml (Qwen2/3) | mistral ([INST]) | chat (the tokenizer's chat template)",
  )
  markovian: bool = knob(True, "hide the question (<Redacted>) when scoring the answer")


@dataclasses.dataclass(frozen=True)
class Sampling:
  # The reference's per-task CoT lengths (docs/method.md#tasks).
  cot_length: int = knob(
    50,
    "K: CoT tokens sampled (EOS blocked before)",
    by_task={"gsm8k": 100, "mmlu": 150, "mathqa": 150, "arithmetic": 150},
  )
  temperature: float = knob(1.0, "T of the CoT draw and of the policy log-probs and KL")
  top_k: int = knob(0, "sample from the k most likely tokens only; 0 = off")
  top_p: float = knob(
    1.0,
    "nucleus sampling: from the smallest set of tokens whose probability reaches top_p; 1.0 = off",
  )
  prompt_bucket: int = knob(64, "prompts are left-padded to a multiple of this (one compile each)")
  cot_stops_at_eos: bool = knob(
    False,
    "let EOS end a CoT before K tokens (free-length reasoning, as the answer-likelihood "
    "papers sample); False = exactly K tokens, as the reference",
  )


@dataclasses.dataclass(frozen=True)
class Objective:
  kind: str = knob("pg", "the loss: pg (REINFORCE) | ppo (clipped ratio per token)")
  kl_penalty: float = knob(0.1, "beta of KL(pi || reference) on the CoT tokens; 0 = off")
  kl_estimator: str = knob("full", "full (over the vocabulary) | k1 | k2 | k3 (sampled)")
  entropy_bonus: float = knob(0.0, "coefficient of -entropy in the loss; 0 = off")
  logprob_reduction: str = knob("mean", "over tokens: mean (reference code) | sum (paper)")
  normalize_reward: bool = knob(
    True, "subtract the base model's score of its greedy CoT' from the reward"
  )
  reward_kind: str = knob(
    "logprob",
    "logprob: log P(answer | CoT) reduced by logprob_reduction | prob: exp(mean "
    "log-prob) (VeriFree-style) | mean_token_prob: mean of the answer tokens' probabilities "
    "(RLPR-style)",
  )
  reward_scorer: str = knob(
    "actor",
    "who scores the answer for the reward: actor | base | ema (the EMA-lagged adapter copy "
    "that a method whose scorer it is keeps: nover; objective.scorer_ema_*)",
  )
  reward_grad: str = knob(
    "none",
    "none (reference code: the reward carries no gradient) | paper (through the "
    "actor's answer log-prob)",
  )
  actor_reward_weight: float = knob(
    1.0, "w of the reward_grad=paper term (must stay 1.0 under none)"
  )
  baseline: str = knob("group", "what the advantage subtracts from the reward")
  ema_decay: float = knob(0.9, "per example for ema (the reference), per step for ema_batch")
  ei_std: float = knob(-1.0, "expert iteration: keep R > mean + k*std of past rewards; <0 = off")
  ei_skip_initial: int = knob(25, "expert iteration: steps that train on nothing first")
  ppo_eps: float = knob(0.2, "PPO clip range: ratios outside [1 - eps, 1 + eps]")
  ppo_epochs: int = knob(1, "PPO only: passes over the step's samples")
  ppo_minibatches: int = knob(1, "PPO only: updates per pass")
  ppo_log_ratio_clamp: float = knob(20.0, "|log ratio| bound before exp (overflow guard)")
  ppo_ratio_reference: str = knob(
    "behaviour",
    "PPO's ratio to: behaviour (the sampling policy) | base (the reference's collapsing variant)",
  )
  loss_aggregation: str = knob(
    "sequence_mean", "sequence_mean (each CoT weighs the same) | token_mean (each token)"
  )
  kl_clamp: float = knob(20.0, "|log-ratio| bound inside the k1/k2/k3 estimators")
  reward_sigma_floor: float = knob(1e-2, "floor of sigma in the paper's reward-gradient term")
  method: str = knob(
    "",
    "an answer-likelihood method (docs/answer-likelihood.md): verifree | rlpr | jepo | "
    "latro | nover | vrcli | dro, or <method>_markovian (its scorer does not see the question); "
    "\"\" = the Markovian objective. Set by the config variants of the same names",
  )
  scorer_ema_decay: float = knob(
    0.6,
    "a method whose scorer is an EMA-lagged copy of the policy adapter (nover): at each sync "
    "the copy becomes d * copy + (1 - d) * policy, d this weight of the old copy (NOVER's "
    "released ref_model_mixup_alpha 0.6; its first release had 0.9). The copy scores the reward "
    "and is the KL reference; 1 = never moves from the starting adapter, 0 = the policy as of the "
    "last sync",
  )
  scorer_ema_every: int = knob(
    100,
    "a method whose scorer is an EMA-lagged copy (nover): optimizer steps between its syncs, "
    "after steps every, 2 x every, ... (NOVER's released code syncs at each checkpoint save, "
    "save_steps 100); 1 = after every step",
  )
  method_answer_weight: float = knob(
    -1.0,
    "an answer-likelihood method's answer-term weight: VeriFree's factor on sg(R) (1), JEPO's "
    "beta_sup (1), LaTRO's weight (0 as its released code, 1 as its paper); -1 = the method's own",
  )
  method_length_penalty: float = knob(
    -1.0,
    "DRO's length-penalty coefficient on K_i / K (0 in our METHODS table: its paper's value was "
    "not available; docs/answer-likelihood.md); -1 = the method's own",
  )


@dataclasses.dataclass(frozen=True)
class Optim:
  lr: float = knob(1e-4, "AdamW peak learning rate")
  b1: float = knob(0.9, "AdamW first-moment decay")
  b2: float = knob(0.999, "AdamW second-moment decay")
  eps: float = knob(1e-8, "AdamW denominator epsilon")
  weight_decay: float = knob(0.01, "AdamW decoupled weight decay on the LoRA params")
  grad_clip: float = knob(1.0, "global-norm gradient clip before AdamW")
  schedule: str = knob("constant", "the learning-rate schedule over training steps")
  warmup_steps: int = knob(0, "warmup_cosine: linear warmup steps")
  accumulation_steps: int = knob(1, "gradients of this many updates averaged (optax.MultiSteps)")


@dataclasses.dataclass(frozen=True)
class Train:
  num_steps: int = knob(100000, "training steps (one sampled batch each)")
  questions_per_step: int = knob(1, "Q: questions sampled per step")
  group_size: int = knob(12, "G: CoTs sampled per question", by_task={"wiki_continuation": 16})
  seed: int = knob(0, "data order, LoRA init, sampling and dropout draws")
  checkpoint_every: int = knob(1000, "steps between checkpoints")
  eval_every: int = knob(1000, "steps between periodic evaluations (step 0 included)")
  max_to_keep: int = knob(3, "latest checkpoints kept")
  keep_best: bool = knob(True, "also keep the best checkpoint by validation metric")
  resume: bool = knob(
    False,
    "continue from <workdir>/checkpoints. A workdir that already holds a run is refused "
    "unless resume is on: two runs never mix in one checkpoint directory and one event log",
  )
  text_every: int = knob(10, "log sampled CoTs as TensorBoard text every N steps")
  nan_patience: int = knob(5, "act after this many consecutive non-finite updates")
  nonfinite_action: str = knob("stop", "stop (state saved) | rollback (to the last checkpoint)")
  collapse_action: str = knob("warn", "what a collapse (any collapse_* threshold crossed) does")
  collapse_repetition: float = knob(0.8, "repetition rate of sampled CoTs above which to act")
  collapse_ppo_ratio: float = knob(
    10.0,
    "bound on the largest per-sequence geometric-mean PPO ratio "
    "(policy/ppo_seq_ratio_max; the reference's collapsed ARC run reached 21.75 against the "
    "base), not on single tokens' ratios",
  )
  collapse_kl: float = knob(5.0, "nats per CoT token (policy/kl / K under logprob_reduction=sum)")
  max_rollbacks: int = knob(3, "consecutive rollbacks before stopping")


@dataclasses.dataclass(frozen=True)
class Eval:
  num_examples: int = knob(200, "the test questions of training's periodic evaluation")
  selection_size: int = knob(
    0,
    "checkpoint selection's set (keep_best, evaluate --best/--all_steps), fixed for the run "
    "and recorded in <workdir>/selection.json. 0 = auto: 200 from the task's validation split, "
    "or a carve-out of at most 10% of the train split where there is none (removed from "
    "training)",
  )
  # The paper's final-evaluation sizes: GSM8K test, ARC-Challenge validation (294 with A-D
  # labels), MMLU validation, SVAMP test, 200 arithmetic problems, 1,024 wiki articles.
  final_num_examples: int = knob(
    0,
    "evaluate's default number of test questions (its --num_examples): the paper's n for the "
    "final number. 0 = the whole eval split. On ARC and MMLU the paper reported its validation "
    "split, which is the selection split here: a seeded subset of the test split of that size",
    by_task={
      "gsm8k": 1319,
      "arc": 294,
      "mmlu": 1531,
      "svamp": 300,
      "arithmetic": 200,
      "wiki_continuation": 1024,
    },
  )
  num_samples: int = knob(1, "CoT samples per question (mean +- sd, majority vote)")
  temperature: float = knob(-1.0, "CoT temperature; <0 = training temperature, 0 = greedy")
  # The reference's eval answer lengths (docs/method.md#tasks).
  answer_max_tokens: int = knob(
    10, "greedy answer tokens read", by_task={"svamp": 16, "arithmetic": 16}
  )
  reader: str = knob("actor", "who generates the answer after the CoT: actor | base")
  answer_first_line: bool = knob(
    False,
    "extract from the reader's first non-empty line only. The reference reads all "
    "answer_max_tokens, where a reader that goes on with the calculation after \"Answer: 12\" "
    "can be scored on a later number; off by default to keep the reference's protocol",
  )
  batch_size: int = knob(32, "questions per evaluation batch")
  seed: int = knob(1234, "evaluation subsets and CoT samples")
  fragility_every: int = knob(
    0,
    "every N steps (0 = off): how much the answer log-prob drops when the step's CoTs are "
    "perturbed (delete, truncate, digit/char replace at 40% and 100%), logged as fragility/",
  )


@dataclasses.dataclass(frozen=True)
class Mesh:
  shape: tuple = knob((-1, 1, 1), "(data, fsdp, tensor); one -1 fills with the available devices")
  preset: str = knob(
    "",
    "a hardware preset (runtime/presets.py) that overrides shape; "
    "configs/presets/<name>.py also sets the questions_per_step it implies",
  )
  allow_replication: bool = knob(
    False,
    "the Q x G rows must split over data x fsdp and the weights over fsdp x tensor as "
    "the rules intend, or the run is refused before loading. True replicates instead (tiny "
    "test models)",
  )
  device_memory_gib: float = knob(
    0.0,
    "usable GiB per device for the start-up memory plan; 0 = what the device reports, "
    "else the preset's chip (`python -m markovian_jax.plan` prints the plan without running)",
  )


# The sections in the order the ConfigDict holds them (after Run's top-level keys).
SECTIONS = {
  "model": Model,
  "lora": Lora,
  "data": Data,
  "prompt": Prompt,
  "sampling": Sampling,
  "objective": Objective,
  "optim": Optim,
  "train": Train,
  "eval": Eval,
  "mesh": Mesh,
}


def build(
  task: str, top: type = Run, sections: Mapping[str, type] | None = None
) -> ml_collections.ConfigDict:
  """The ConfigDict of `task`: `top`'s fields as top-level keys, then one sub-dict per section
  (default `SECTIONS`), each key at its default for `task`."""
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(top):
    c[f.name] = default(f, task)
  for name, section in (SECTIONS if sections is None else sections).items():
    c[name] = ml_collections.ConfigDict(
      {f.name: default(f, task) for f in dataclasses.fields(section)}
    )
  return c
