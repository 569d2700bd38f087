"""PPO (and the critic-free GRPO / RLOO) with every role on one frozen base.

    policy     = base + adapter "policy"                 (trained)
    reference  = base with adapters off                  (SharedBase.reference())
                 or, with init_adapter, a frozen copy of it (adapter "reference"; align/core/policy_init.py)
    critic     = base + adapter "critic" + ValueHead     (trained; PPO only)
    reward     = reward functions (TRL's call) and/or a reward model: base + adapter "reward" + score head,
                 or a separate classifier (align/recipes/ppo/scoring.py)
    sampler    = an align.engines engine; vLLM keeps its own copy and receives only the policy adapter

What a run holds and the lifecycle's hooks are align/recipes/ppo/run.py's; the lifecycle itself
(checkpoints, resume, metrics) is align.train.lifecycle's. `PPOTrainer.ppo_step` is the algorithm
and reads top to bottom, one small method per phase; it takes several optimizer steps per rollout,
each through the lifecycle's GradientStep (align/train/gradient_step.py). The equations are in
align/recipes/ppo/algorithms.py (GAE, RLOO, KL) and align/recipes/ppo/grpo_losses.py (TRL's loss
family); what a step logs is align/recipes/ppo/metrics.py.

On N processes each takes prompts_per_step / N of a step's prompts (all their generations, so
GRPO/RLOO groups stay whole) and samples them with its own engine; advantages are whitened per
process; the KL that stops a run or drives the adaptive coefficient is the global mean, so every
process decides the same (docs/scaling.md).
"""

from __future__ import annotations

import torch

from align.recipes.ppo import algorithms as A
from align.recipes.ppo import grpo_losses as G
from align.recipes.ppo.batch import Rollout, pack, prompt_indices
from align.recipes.ppo.completions_log import completion_rows
from align.recipes.ppo.metrics import Laps, advantages_per_sequence, step_metrics
from align.recipes.ppo.run import RLRun
from align.recipes.ppo.scoring import RewardState
from align.train.full_finetune import FullFinetuneHooks


class PPOTrainer(FullFinetuneHooks, RLRun):
    """PPO / GRPO / RLOO: `ppo_step` is one step of the algorithm, top to bottom."""

    # -- the algorithm ---------------------------------------------------------------------------
    def training_step(self) -> dict:
        return self.ppo_step(self.step + 1)

    def ppo_step(self, step: int) -> dict:
        """One step (1-based): rollout, score, forward passes, advantages, update, sync."""
        c, laps = self.config, Laps()
        # 1. Rollout: sample G completions for each of this step's prompts with the current policy.
        batch = self.rollout(step)
        laps.lap("rollout")
        # 2. Score: the reward model and/or functions, weighted (NaN where every reward returned None).
        scores, per_func = self.score(batch)
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
        # 5. Advantages: GAE with the critic (PPO), or against the prompt's group (GRPO, RLOO).
        advantages, returns, zero_std = self.advantages(scores, kl, old_values, batch.mask)
        # 6. TRL's correction for the sampler/trainer mismatch: pi_old / pi_sampler, truncated or masked.
        is_ratio = self.sampler_correction(batch, old_logp)
        # 7. num_iterations passes of micro-batch updates with the clipped surrogate (and value loss).
        updates, first = self.update(step, batch, old_logp, ref_logp, advantages, old_values, returns, is_ratio)
        laps.lap("update")
        # 8. Send the new policy adapter (use_peft: false: every weight) to the sampler, verified by probe log-probs.
        self.last_sync = self.engine.sync(self.base, adapter=self.policy)
        laps.lap("sync")
        # 9. Adaptive KL coefficient (Ziegler et al.), driven by the per-sequence KL of the global batch.
        if c.kl_target is not None:
            self.kl_coef = A.adaptive_kl_coef(self.kl_coef, kl_mean, c.kl_target, c.kl_horizon,
                                              batch.mask.shape[0] * self.processes.world)
        self.num_tokens += int(batch.attention_mask.sum().item()) * self.processes.world
        logged, extra = self.scorer.pop_logged()  # what reward functions logged (log_metric, log_extra)
        if self.completions_log is not None and step % c.logging_steps == 0:
            self.completions_log.write(completion_rows(step, batch.rows, batch.texts, scores, per_func,
                                                       self.scorer.names, advantages_per_sequence(advantages), extra))
        # The trainer's own pi_old log-probs and entropy: the forward above, or the first update's (before any step).
        trainer_view = (torch.arange(batch.mask.shape[0]), old_logp, entropy) if entropy is not None else first
        return {**step_metrics(batch, scores, per_func, self.scorer.names, kl if ref_logp is not None else None,
                               kl_mean, trainer_view, advantages, zero_std, updates, laps.times, old_values, returns,
                               self.kl_coef, self.last_sync, self.num_tokens), **logged}

    def rollout(self, step: int) -> Rollout:
        """G completions for each of this process's share of step `step`'s prompts, packed."""
        c = self.config
        prompts = c.prompts_per_rollout(self.processes.world)
        idx = self.processes.shard(prompt_indices(len(self.train_rows), prompts, c.seed, step))
        samples = self.engine.generate([self.train_ids[i] for i in idx], n=c.num_generations,
                                       max_new_tokens=c.max_completion_length, seed=self._seed(step) + self.processes.rank,
                                       adapter=self.policy, **c.sampling())
        batch = pack(samples, [self.train_rows[i] for i in idx], self.base.tokenizer.pad_token_id)
        batch.places = [self.train_rows.places[i] for i in idx for _ in range(c.num_generations)]
        return batch

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
        kl = (A.kl_penalty(old_logp, ref_logp, c.kl_kind) * mask if ref_logp is not None
              else torch.zeros_like(mask))
        kl_mean = self.processes.mean({"kl": kl.sum(1).mean().item()})["kl"]
        if ref_logp is not None:
            self._check_kl(step, kl_mean)
        return kl, kl_mean

    def advantages(self, scores, kl, old_values, mask) -> tuple:
        """Advantages ((B, T) with a critic, else (B,) per sequence), the critic's (B, T) returns (or None),
        and (B,) where the group's rewards did not differ. The KL is a reward term unless it is in the loss."""
        c = self.config
        beta_in_reward = 0.0 if c.kl_in_loss else self.kl_coef
        returns, zero_std = None, torch.zeros_like(scores, dtype=torch.bool)
        if self.critic:
            rewards = A.token_rewards(torch.nan_to_num(scores), kl, mask, beta_in_reward)
            advantages, returns = A.gae_advantages(rewards, old_values, mask, c.gamma, c.lam)
            return (A.masked_whiten(advantages, mask) if c.whiten else advantages), returns, zero_std
        seq_rewards = scores - beta_in_reward * kl.sum(1)
        if c.algorithm == "grpo":
            advantages, _, zero_std = G.group_advantages(seq_rewards, c.num_generations, c.scale_rewards)
        else:
            advantages = A.rloo_advantages(torch.nan_to_num(seq_rewards), c.num_generations)
            advantages = torch.where(torch.isnan(seq_rewards), 0.0, advantages)
        if c.whiten:
            advantages = A.masked_whiten(advantages, torch.ones_like(advantages))
        return advantages, returns, zero_std

    def sampler_correction(self, batch: Rollout, old_logp) -> torch.Tensor | None:
        """TRL's vLLM importance-sampling correction; None where pi_old is the sampler's own log-probs."""
        c = self.config
        if not c.vllm_importance_sampling_correction or self.old_from_sampler():
            return None
        return G.sampler_correction(old_logp, batch.sampler_logprobs, batch.mask, c.vllm_importance_sampling_mode,
                                    c.vllm_importance_sampling_clip_min, c.vllm_importance_sampling_clip_max)

    def update(self, step, batch: Rollout, old_logp, ref_logp, advantages, old_values, returns, is_ratio) -> tuple:
        """num_iterations passes over shuffled micro-batches, one gradient step per per_device_train_batch_size x
        gradient_accumulation_steps completions. Returns their statistics and (rows, log-probs, entropy) of
        the first step's forwards, where the policy still was pi_old."""
        c = self.config
        g = torch.Generator().manual_seed(self._seed(step))
        per_update = c.per_device_train_batch_size * c.gradient_accumulation_steps
        loss_mask = batch.mask * batch.stopped.unsqueeze(1) if c.mask_truncated_completions else batch.mask
        first = {"rows": [], "logp": [], "entropy": [], "open": self.old_from_sampler()}
        stats = []
        for _ in range(c.num_iterations):
            for mb in torch.randperm(batch.mask.shape[0], generator=g).split(per_update):
                micro = list(mb.split(c.per_device_train_batch_size))
                # dapo: the step's token sum over its token count, over every process (grpo_losses.py).
                tokens = self.processes.mean({"t": loss_mask[mb].sum().item()})["t"]
                normalizer = max(tokens, 1.0) / len(micro)

                def loss_fn(rows, normalizer=normalizer):
                    return self.micro_batch_loss(rows, batch, loss_mask, first, old_logp, ref_logp, advantages,
                                                 old_values, returns, is_ratio, normalizer)

                stats.append(self.gradient_step(micro, loss_fn, step))
                first["open"] = False
        view = (torch.cat(first["rows"]), torch.cat(first["logp"]), torch.cat(first["entropy"])) if first["rows"] \
            else None
        return stats, view

    def micro_batch_loss(self, mb, batch, loss_mask, first, old_logp, ref_logp, advantages, old_values, returns,
                         is_ratio, normalizer) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (rows `mb`): TRL's clipped surrogate of `loss_type`, + beta*KL in the
        loss (GRPO), - entropy bonus, + the critic's clipped value loss (PPO)."""
        c = self.config
        mb_batch, m = batch.select(mb), loss_mask[mb]
        want_entropy = c.entropy_coef > 0 or first["open"]
        out = self._logprobs(mb_batch, "policy", with_entropy=want_entropy)
        logp, ent = out if want_entropy else (out, None)
        if first["open"]:  # the first optimizer step's micro-batches: the policy is still pi_old
            first["rows"].append(mb)
            first["logp"].append(logp.detach())
            first["entropy"].append(ent.detach())
        beta = self.kl_coef if c.kl_in_loss and ref_logp is not None else 0.0
        loss, parts = G.grpo_loss(logp, old_logp[mb], advantages[mb], m, loss_type=c.loss_type,
                                  epsilon_low=c.epsilon, epsilon_high=c.epsilon_upper,
                                  importance_sampling_level=c.importance_sampling_level, beta=beta,
                                  ref_logp=None if ref_logp is None else ref_logp[mb],
                                  is_ratio=None if is_ratio is None else is_ratio[mb],
                                  max_completion_length=c.max_completion_length, tokens_normalizer=normalizer,
                                  use_bias_correction_kl=c.use_bias_correction_kl)
        logged = {"loss/policy": loss.item(), **{k: v.item() for k, v in parts.items()}}
        if c.entropy_coef > 0:
            loss = loss - c.entropy_coef * A.masked_mean(ent, m)
        if self.critic:
            values = self._values(mb_batch)
            vf_loss, vf_clipfrac = A.value_loss(values, old_values[mb], returns[mb], m, c.cliprange_value)
            loss = loss + c.vf_coef * vf_loss
            logged.update({"loss/value": vf_loss.item(), "value/clipfrac": vf_clipfrac.item()})
        return loss, logged

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
    def score(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) total reward (NaN where no reward scored the row) and (B, F) each reward's values."""
        state = RewardState(global_step=self.step, max_steps=self.total_steps, epoch=self.epoch())
        return self.scorer.score(batch.rows, batch.texts, batch.completion_ids(), batch.places, state)
