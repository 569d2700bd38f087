"""The lifecycle side of PPO/GRPO/RLOO: setup on the shared base, the engine, forward passes, checkpoints.

`RLRun` adds the critic and the KL coefficient to what every sampling recipe holds (the policy adapter,
the rewards, the prompts, the rollout engine: align/recipes/rollout_run.py) and answers the lifecycle's
hooks (align/train/lifecycle.py); `PPOTrainer` (align/recipes/ppo/trainer.py) adds the algorithm on top.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from align.core.errors import TrainingDiverged, UserError
from align.core.logprobs import can_share_prompts, completion_logprobs, shared_prompt_logprobs
from align.core.policy_init import reference_model
from align.recipes.ppo.batch import Rollout
from align.recipes.ppo.completions_log import CompletionsLog
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.heads import ValueHead
from align.recipes.rollout_run import RolloutRun
from align.train.full_finetune import AdapterWeights, frozen_copy, full_parameters


class RLRun(RolloutRun):
    name = "ppo"

    def __init__(self, config: PPOConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.name = config.algorithm
        self.kl_coef = config.beta  # the adaptive controller moves it; a checkpoint restores it
        self.num_tokens = 0

    def build(self) -> list[dict]:
        c = self.config
        self.build_rollout()
        self.critic, self.kl_coef = c.critic, c.beta
        # use_peft: false: the reference is a frozen copy of the starting base, unless no step reads it (beta 0)
        # and there is no critic: PPO's critic (adapter + value head) then lives on that copy, so the base
        # being trained carries no adapter and travels to the engine as plain weights.
        full = self.policy is None
        self.ref_base = frozen_copy(self.base, self.processes.is_main) if full and (
            self.needs_reference() or self.critic) else None
        self.critic_base = self.ref_base if full else self.base
        if self.critic:
            self.critic_base.add_adapter("critic", c.lora)
            self.value_head = ValueHead(self.base.hidden_size, seed=c.seed).to(self.device)
        if self.policy is not None:
            self.base.set_active("policy")
        if c.padding_free:
            self.base.check_padding_free()  # before the first step: a model that mixes sequences is refused

        world = self.processes.world
        if c.prompts_per_rollout(world) % world:
            raise UserError(f"prompts_per_step: {c.prompts_per_rollout(world)} prompts cannot be shared evenly by "
                            f"{world} processes; use a multiple of {world}")
        if self.processes.is_main:
            print(f"[align] {c.describe_batches(self.processes.world, self.num_steps())}", flush=True)

        policy = full_parameters(self) if self.policy is None else self.base.adapter_parameters("policy").values()
        groups = [{"params": list(policy), "lr": c.learning_rate}]
        if self.critic:
            groups.append({"params": list(self.critic_base.adapter_parameters("critic").values())
                           + list(self.value_head.parameters()), "lr": c.critic_learning_rate or c.learning_rate})
        return groups

    def num_steps(self) -> int:
        return self.config.rollout_steps(len(self.train_rows), self.processes.world)

    def optimizer_steps(self) -> int:
        return self.num_steps() * self.config.optimizer_steps_per_rollout(self.processes.world)

    def trained_adapters(self) -> list[str]:
        return ["policy", "critic"] if self.critic else ["policy"]

    def heads(self) -> dict:
        if not self.critic:
            return {}
        # use_peft: false: the critic adapter sits on the frozen copy, outside what trained_adapters saves.
        return {"value": self.value_head, **({"critic": AdapterWeights(self.critic_base, "critic")}
                                             if self.critic_base is not self.base else {})}

    def state_extra(self) -> dict:
        return {"kl_coef": self.kl_coef, "algorithm": self.config.algorithm, "num_tokens": self.num_tokens}

    def load_extra(self, extra: dict) -> None:
        if extra.get("algorithm") != self.config.algorithm:
            raise UserError(f"{self.out}: the checkpoint was written by algorithm {extra.get('algorithm')!r}, "
                            f"the config says {self.config.algorithm!r}")
        self.kl_coef = extra["kl_coef"]
        self.num_tokens = extra.get("num_tokens", 0)

    def start(self) -> None:
        c = self.config
        self.completions_log = None
        if c.log_completions and self.processes.is_main:
            self.completions_log = CompletionsLog(self.out, self.logger.trackers, c.num_completions_to_print)
            self.completions_log.truncate_after(self.step)
        super().start()

    def rollout_sequences(self) -> int:
        c = self.config
        return c.prompts_per_rollout(self.processes.world) * c.num_generations

    def _logprobs(self, batch: Rollout, adapter: str | None, with_entropy: bool = False):
        """(B, T) per-token log-probs of the completions (and entropy) under `adapter` (None: reference)."""
        P, T, dev = batch.prompt_width, batch.mask.shape[1], self.device
        # Columns past these rows' longest completion are padding that nothing scores (a micro-batch's rows
        # are often shorter than the step's longest); the causal forward of the others does not see them.
        width = P + max(1, int(batch.mask.sum(1).max().item()))
        ids, attn, mask = batch.input_ids[:, :width].to(dev), batch.attention_mask[:, :width].to(dev), \
            batch.mask[:, :width - P].to(dev)
        if adapter is None:
            ctx = reference_model(self.base, self.ref_adapter, self.ref_base)
        else:  # use_peft: false: the policy is the base itself
            ctx = self.base.adapter(adapter) if self.policy is not None else nullcontext(self.base)
        with ctx as model:
            if self.config.num_generations > 1 and not self.config.padding_free and can_share_prompts(model):
                # A group's G rows share one pass over their prompt (align/core/logprobs.py): same values, less work.
                out = shared_prompt_logprobs(model, ids, attn, P, mask, with_entropy)
            else:
                cmask = torch.zeros_like(ids)
                cmask[:, P:] = mask.long()
                out = completion_logprobs(model, ids, attn, cmask, with_entropy, padding_free=self.config.padding_free)
                out = tuple(x[:, P - 1:] for x in out) if with_entropy else out[:, P - 1:]

        def back(x):  # (B, T) again, zero on the cut padding
            return torch.nn.functional.pad(x, (0, T - x.shape[1])).cpu()

        return tuple(back(x) for x in out) if with_entropy else back(out)

    def _values(self, batch: Rollout) -> torch.Tensor:
        """(B, T) V(s_t): the critic's value of the state in which completion token t is chosen."""
        P, T = batch.prompt_width, batch.mask.shape[1]
        dev = self.device
        with self.critic_base.adapter("critic"):
            hidden = self.critic_base.hidden(batch.input_ids.to(dev), batch.attention_mask.to(dev),
                                      self.config.padding_free)[:, P - 1:P - 1 + T]
        return self.value_head(hidden).cpu() * batch.mask

    # -- the lifecycle's hooks -------------------------------------------------------------------
    def progress(self, stats: dict) -> dict:
        shown = {"reward": f"{stats['reward']:.3f}"}
        if "kl" in stats:
            shown["kl"] = f"{stats['kl']:.3f}"
        if "eval/reward" in stats:
            shown["eval"] = f"{stats['eval/reward']:.3f}"
        return shown

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

    # -- helpers ---------------------------------------------------------------------------------
    def needs_reference(self) -> bool:
        """Whether a step runs the reference forward: for a KL penalty (kl_coef > 0; the adaptive
        controller only scales the coefficient, so 0 stays 0), or to log the KL (log_reference_kl)."""
        return self.kl_coef != 0 or self.config.log_reference_kl

    def _check_kl(self, step: int, kl: float) -> None:
        if not math.isfinite(kl) or kl > self.config.max_kl:
            raise TrainingDiverged(f"step {step}: KL to the reference is {kl:.4g} nats per sequence "
                                   f"(max_kl={self.config.max_kl}); stopping. {self.last_good()}")

