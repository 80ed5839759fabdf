"""Every knob of a Markovian training run, with the reference defaults (docs/method.md).

Task files call `base.task_config(task, arg)` and override what differs. Any key can be overridden on
the command line: `--config.objective.kl_penalty=0.05`. Unknown keys fail (ConfigDict is locked).

Named variants (the columns of the paper's results table) are chosen after the file name:
`--config=configs/gsm8k.py:ei` (VARIANTS below; `python -m markovian_jax.report` groups runs by
them). A task file's own options join with commas: `configs/wiki_continuation.py:markovian,t1.5`.
"""

import ml_collections

from markovian_jax.runtime import compilation_cache
from markovian_jax.runtime.errors import InvalidConfig
from markovian_jax.runtime.sharding import MESH_PRESETS  # noqa: F401 (names for config.mesh.preset)

# The reference's per-task CoT lengths and eval answer lengths (docs/method.md#tasks).
COT_LENGTH = {"gsm8k": 100, "mmlu": 150, "mathqa": 150, "arithmetic": 150}
ANSWER_MAX_TOKENS = {"svamp": 16, "arithmetic": 16}
# The paper's final-evaluation sizes: GSM8K test, ARC-Challenge validation (294 with A-D labels),
# MMLU validation, SVAMP test, 200 arithmetic problems, 1,024 wiki articles.
FINAL_NUM_EXAMPLES = {"gsm8k": 1319, "arc": 294, "mmlu": 1531, "svamp": 300, "arithmetic": 200,
                      "wiki_continuation": 1024}


def get_config(task: str = "gsm8k") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task  # a data.tasks.TASKS name; set by the task file
  c.workdir = f"runs/{task}"  # the run directory (checkpoints, events, samples); gs:// works
  # The named variant this config is (VARIANTS; set by `task_config`), recorded in the run's
  # config.json so that reports can lay runs out as the paper's table. "" = not a named variant.
  c.variant = ""
  # JAX's persistent compilation cache (train and evaluate): restarts and repeated runs load
  # their compiled programs instead of compiling again. "" = off.
  c.compilation_cache_dir = compilation_cache.DEFAULT_DIR
  # The process's malloc (train and evaluate): "tcmalloc" restarts the command once with tcmalloc
  # preloaded when it is installed (on CPU, glibc page-faults XLA's per-call temporaries in again
  # on every call: update 5.1 -> 3.8 s on SmolLM2), "system" keeps the C library's.
  c.host_allocator = "tcmalloc"

  c.model = ml_collections.ConfigDict()
  c.model.path = "meta-llama/Llama-3.1-8B-Instruct"  # hub id, HF directory, or .gguf file
  c.model.dtype = "bfloat16"  # weights and matmuls; softmax/log-probs are always fp32
  c.model.remat = "full"  # none | full | dots
  # Self-attention kernel: auto | cudnn | xla (models/attention_choice.py): auto runs a cuDNN
  # preflight on GPU and falls back to XLA's attention with the reason logged.
  c.model.attention = "auto"

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8  # r of every adapter pair A [in, r], B [r, out]
  c.lora.alpha = 16.0  # the adapter output is scaled by alpha / rank
  # LoRA dropout of the update's policy pass; the G CoTs of a question share their prompt's masks
  # (llama.forward_with_prefix). Sampling and scoring run without it (the reference keeps it on).
  c.lora.dropout = 0.1
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # all linear layers but the head
  c.lora.init_from = ""  # a PEFT adapter directory to start from
  # KL reference: "base" (LoRA off; exact when the adapter starts at zero) or "initial_adapter"
  # (a frozen copy of the starting adapter; use with init_from).
  c.lora.reference = "base"

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # local files (dir laid out like shared/data/<task>/, or one file); "" = hub
  c.data.train_split = "train"  # the split training draws questions from
  c.data.eval_split = "test"  # the split evaluation reports on
  c.data.arithmetic_terms = 15  # arithmetic: integers per sum
  c.data.arithmetic_max = 99  # arithmetic: each integer drawn from [1, arithmetic_max]
  c.data.arc_subset = "ARC-Challenge"  # arc: ARC-Challenge | ARC-Easy
  c.data.question_length = 50  # wiki_continuation context tokens
  c.data.target_length = 50  # wiki_continuation target tokens
  c.data.mmlu_subject = ""  # one MMLU subject (e.g. "anatomy"); "" = all 57
  # What MMLU's train split is made of; add "auxiliary_train" (hub only) for 100k more questions.
  c.data.mmlu_train_splits = ("dev", "validation")

  c.prompt = ml_collections.ConfigDict()
  # auto (the model family's, as the reference picks it from config.json's model_type; the run's
  # config.json records the resolved one) | plain (text + BOS; Llama, GPT-2, Phi) |
  # chatml (Qwen2/3) | mistral ([INST]) | chat (the tokenizer's chat template)
  c.prompt.format = "auto"
  c.prompt.markovian = True  # hide the question (<Redacted>) when scoring the answer

  c.sampling = ml_collections.ConfigDict()
  c.sampling.cot_length = COT_LENGTH.get(task, 50)  # K: CoT tokens sampled (EOS blocked before)
  c.sampling.temperature = 1.0  # T of the CoT draw and of the policy log-probs and KL
  c.sampling.top_k = 0  # 0 = off
  c.sampling.top_p = 1.0  # 1.0 = off
  c.sampling.prompt_bucket = 64  # prompts are left-padded to a multiple of this (one compile each)

  c.objective = ml_collections.ConfigDict()
  c.objective.kind = "pg"  # pg | ppo
  c.objective.kl_penalty = 0.1  # beta of KL(pi || reference) on the CoT tokens; 0 = off
  c.objective.kl_estimator = "full"  # full | k1 | k2 | k3
  c.objective.entropy_bonus = 0.0  # coefficient of -entropy in the loss; 0 = off
  c.objective.logprob_reduction = "mean"  # mean (reference code) | sum (paper)
  c.objective.normalize_reward = True  # subtract the base model's score of its greedy CoT'
  # logprob: log P(answer | CoT) reduced by logprob_reduction | prob: exp(mean log-prob)
  # (VeriFree-style) | mean_token_prob: mean of the answer tokens' probabilities (RLPR-style)
  c.objective.reward_kind = "logprob"
  c.objective.reward_scorer = "actor"  # actor | base
  c.objective.reward_grad = "none"  # none (reference code) | paper
  c.objective.actor_reward_weight = 1.0  # w of the reward_grad=paper term (1.0 under none)
  c.objective.baseline = "group"  # group | rloo | ema | ema_batch | none
  c.objective.ema_decay = 0.9  # per example for ema (the reference), per step for ema_batch
  c.objective.ei_std = -1.0  # expert iteration: keep R > mean + k*std of past rewards; <0 = off
  c.objective.ei_skip_initial = 25  # expert iteration: steps that train on nothing first
  c.objective.ppo_eps = 0.2  # PPO clip range: ratios outside [1 - eps, 1 + eps]
  c.objective.ppo_epochs = 1  # PPO only: passes over the step's samples
  c.objective.ppo_minibatches = 1  # PPO only: updates per pass
  c.objective.ppo_log_ratio_clamp = 20.0  # |log ratio| bound before exp (overflow guard)
  c.objective.ppo_ratio_reference = "behaviour"  # behaviour | base (reference's collapsing variant)
  c.objective.loss_aggregation = "sequence_mean"  # sequence_mean | token_mean
  c.objective.kl_clamp = 20.0  # |log-ratio| bound inside the k1/k2/k3 estimators
  c.objective.reward_sigma_floor = 1e-2  # floor of sigma in the paper's reward-gradient term

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4  # AdamW peak learning rate
  c.optim.b1 = 0.9  # AdamW first-moment decay
  c.optim.b2 = 0.999  # AdamW second-moment decay
  c.optim.eps = 1e-8  # AdamW denominator epsilon
  c.optim.weight_decay = 0.01  # AdamW decoupled weight decay on the LoRA params
  c.optim.grad_clip = 1.0  # global-norm gradient clip before AdamW
  c.optim.schedule = "constant"  # constant | warmup_cosine, over training steps
  c.optim.warmup_steps = 0  # warmup_cosine: linear warmup steps
  c.optim.accumulation_steps = 1  # gradients of this many updates averaged (optax.MultiSteps)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 100000  # training steps (one sampled batch each)
  c.train.questions_per_step = 1  # Q
  c.train.group_size = 16 if task == "wiki_continuation" else 12  # G
  c.train.seed = 0  # data order, LoRA init, sampling and dropout draws
  c.train.checkpoint_every = 1000  # steps between checkpoints
  c.train.eval_every = 1000  # steps between periodic evaluations (step 0 included)
  c.train.max_to_keep = 3  # latest checkpoints kept
  c.train.keep_best = True  # also keep the best checkpoint by validation metric
  # Continue from <workdir>/checkpoints. A workdir that already holds a run is refused unless
  # resume is on: two runs never mix in one checkpoint directory and one event log.
  c.train.resume = False
  c.train.text_every = 10  # log sampled CoTs as TensorBoard text every N steps
  c.train.nan_patience = 5  # act after this many consecutive non-finite updates
  c.train.nonfinite_action = "stop"  # stop (state saved) | rollback (to the last checkpoint)
  c.train.collapse_action = "warn"  # warn | stop | rollback
  c.train.collapse_repetition = 0.8  # repetition rate of sampled CoTs above which to act
  # Applies to the largest per-sequence geometric-mean PPO ratio (policy/ppo_seq_ratio_max; the
  # reference's collapsed ARC run reached 21.75 against the base), not to single tokens' ratios.
  c.train.collapse_ppo_ratio = 10.0
  c.train.collapse_kl = 5.0  # nats per CoT token (policy/kl / K under logprob_reduction=sum)
  c.train.max_rollbacks = 3  # consecutive rollbacks before stopping

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 200  # the test questions of training's periodic evaluation
  # Checkpoint selection's set (keep_best, evaluate --best/--all_steps), fixed for the run and
  # recorded in <workdir>/selection.json. 0 = auto: 200 from the task's validation split, or a
  # carve-out of at most 10% of the train split where there is none (removed from training).
  c.eval.selection_size = 0
  # evaluate's default number of test questions (its --num_examples): the paper's n for the
  # final number. 0 = the whole eval split. On ARC and MMLU the paper reported its validation
  # split, which is the selection split here: a seeded subset of the test split of that size.
  c.eval.final_num_examples = FINAL_NUM_EXAMPLES.get(task, 0)
  c.eval.num_samples = 1  # CoT samples per question (mean +- sd, majority vote)
  c.eval.temperature = -1.0  # CoT temperature; <0 = training temperature, 0 = greedy
  c.eval.answer_max_tokens = ANSWER_MAX_TOKENS.get(task, 10)  # greedy answer tokens read
  c.eval.reader = "actor"  # actor | base: who generates the answer after the CoT
  # Extract from the reader's first non-empty line only. The reference reads all
  # answer_max_tokens, where a reader that goes on with the calculation after "Answer: 12" can
  # be scored on a later number; off by default to keep the reference's protocol.
  c.eval.answer_first_line = False
  c.eval.batch_size = 32  # questions per evaluation batch
  c.eval.seed = 1234  # evaluation subsets and CoT samples
  # Every N steps (0 = off): how much the answer log-prob drops when the step's CoTs are
  # perturbed (delete, truncate, digit/char replace at 40% and 100%), logged as fragility/.
  c.eval.fragility_every = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills with the available devices
  # A MESH_PRESETS name (markovian_jax/presets.py) overrides shape; configs/presets/<name>.py also
  # sets the questions_per_step it implies.
  c.mesh.preset = ""
  # The Q x G rows must split over data x fsdp and the weights over fsdp x tensor as the rules
  # intend, or the run is refused before loading. True replicates instead (tiny test models).
  c.mesh.allow_replication = False
  # Usable GiB per device for the start-up memory plan; 0 = what the device reports, else the
  # preset's chip (`python -m markovian_jax.plan` prints the plan without running).
  c.mesh.device_memory_gib = 0.0
  return c


def with_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """`c` on hardware preset `preset`, with the smallest questions_per_step whose Q x G rows split
  over its data x fsdp devices (G stays the task's; presets.py lists the batches)."""
  from markovian_jax.runtime import presets
  if preset not in presets.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets.PRESETS)}")
  c.mesh.preset = preset
  p = presets.PRESETS[preset]
  if p.devices:
    c.train.questions_per_step = presets.questions_for(p.mesh, c.train.group_size)
  return c


# ----------------------------------------------------------------------------- named variants
# The columns of the paper's results table, as changes to a task's defaults. The defaults are the
# "Markovian" column (the reference code's algorithm). Each entry: (what the
# column is, the keys it sets). A value may be a function of the task's config.

def _non_parallel(c):
  # The reference's non-parallel mode: a batch of G different questions, one CoT each.
  return {"train.questions_per_step": c.train.group_size * c.train.questions_per_step,
          "train.group_size": 1}


VARIANTS = {
    "markovian": ("the defaults: the question hidden from the reader (<Redacted>), group "
                  "baseline, reward scored by the actor", {}),
    "non_markovian": ("the reader sees the question as well as the CoT",
                      {"prompt.markovian": False}),
    "no_reward_grad": ("the reference's actor_reward_weight=0 run: the frozen base model scores "
                       "the reward and reads the answer in evaluation (the reference's reward "
                       "gradient was zero either way)",
                       {"objective.reward_scorer": "base", "eval.reader": "base"}),
    "unnormalised": ("no CoT' baseline subtracted from the reward (gradient-identical to "
                     "markovian under the group baseline: a measure of seed noise)",
                     {"objective.normalize_reward": False}),
    "ema": ("the reference's non-parallel mode: G different questions a step, one CoT each, "
            "advantage = R - exponentially weighted mean of past rewards (decay 0.9 per example)",
            {"objective.baseline": "ema", "_": _non_parallel}),
    "ei": ("expert iteration: only CoTs whose R exceeds the mean + 1 std of past rewards are "
           "trained on, nothing in the first 25 steps", {"objective.ei_std": 1.0}),
    "paper_reward_grad": ("the paper's objective: the reward's gradient through the actor's "
                          "answer log-prob, weight 1", {"objective.reward_grad": "paper",
                                                        "objective.actor_reward_weight": 1.0}),
    "ppo_base": ("the reference's PPO, for reproduction: a per-sequence ratio to the frozen base "
                 "model, clipped at 1 +- 0.2, replacing the KL term (it collapsed there)",
                 {"objective.kind": "ppo", "objective.ppo_ratio_reference": "base"}),
}
# The paper's results-table columns in its order (after the base model's column).
TABLE_VARIANTS = ("ei", "no_reward_grad", "unnormalised", "ema", "markovian", "non_markovian")


def _set(c, key: str, value) -> None:
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value


def apply_variant(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`c` changed into variant `name` (VARIANTS) and recorded as `c.variant`; raises
  InvalidConfig naming the choices for an unknown name."""
  if name not in VARIANTS:
    raise InvalidConfig(f"config variant {name!r} is unknown; choose one of {list(VARIANTS)}")
  for key, value in VARIANTS[name][1].items():
    changes = value(c) if callable(value) else {key: value}
    for k, v in changes.items():
      _set(c, k, v)
  c.variant = name
  return c


def task_config(task: str, arg: str = "", options: dict | None = None
                ) -> ml_collections.ConfigDict:
  """The config of `task` with the `:arg` of `--config=FILE:arg` applied (`apply_arg`)."""
  return apply_arg(get_config(task), arg, options)


def apply_arg(c: ml_collections.ConfigDict, arg: str = "", options: dict | None = None
              ) -> ml_collections.ConfigDict:
  """`c` with the `:arg` of `--config=FILE:arg` applied: comma-separated names, each a VARIANTS
  name (at most one) or one of the config file's `options` ({name: fn(c)}, applied in place)."""
  task = c.task
  options = options or {}
  names = [n.strip() for n in (arg or "").split(",") if n.strip()]
  variants = [n for n in names if n in VARIANTS]
  if len(variants) > 1:
    raise InvalidConfig(f"config variants {variants}: choose one per run")
  for n in names:
    if n in VARIANTS:
      apply_variant(c, n)
    elif n in options:
      options[n](c)
    else:
      extra = f"; the {task} config's options: {', '.join(options)}" if options else ""
      raise InvalidConfig(f"{n!r} is not a known variant (variants: {', '.join(VARIANTS)}"
                          f"{extra})")
  return c
