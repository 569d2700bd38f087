"""The lifecycle side of PPO/GRPO/RLOO: setup on the shared base, the engine, forward passes, checkpoints.

`RLRun` builds what a run holds (the policy adapter, the critic, the rewards, the prompts, the
rollout engine) and answers the lifecycle's hooks (align/train/lifecycle.py); `PPOTrainer`
(align/recipes/ppo/trainer.py) adds the algorithm on top.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from align.core.errors import TrainingDiverged, UserError
from align.core.logprobs import completion_logprobs
from align.core.policy_init import attach_policy, reference_context
from align.data.prompt_rows import DEMO_TASK, PromptRows, load_prompt_rows
from align.recipes.ppo.batch import Rollout
from align.recipes.ppo.completions_log import CompletionsLog
from align.recipes.ppo.config import PPOConfig
from align.recipes.ppo.heads import ValueHead
from align.recipes.ppo.scoring import build_scorers
from align.train.lifecycle import Trainer


class RLRun(Trainer):
    name = "ppo"

    def __init__(self, config: PPOConfig, resume: bool | str | None = None, overwrite: bool = False,
                 engine=None, base=None, train_dataset=None, eval_dataset=None, reward_funcs: list | None = None,
                 resume_changed: bool = False):
        """`engine`: a rollout engine already built (tests, benchmarks); default: config's.
        `train_dataset` / `eval_dataset` / `reward_funcs` (TRL's names): rows (a datasets.Dataset or a
        list of dicts) and reward functions (callables or dotted paths) given in Python instead of
        the config's train_file / eval_file / reward_funcs."""
        super().__init__(config, resume, overwrite, base, resume_changed)
        self.engine = engine
        self.name = config.algorithm
        self.kl_coef = config.beta  # the adaptive controller moves it; a checkpoint restores it
        self.train_dataset, self.eval_dataset, self.reward_funcs = train_dataset, eval_dataset, reward_funcs
        self.num_tokens = 0
        # Read before any model loads: bad rows or an unknown reward function cost no loading time.
        self.load_prompts()
        if not (reward_funcs or config.reward_funcs or config.reward_model_name_or_path):
            raise UserError("reward_funcs and reward_model_name_or_path: expected at least one source of reward")
        if reward_funcs is None:
            from reward.functions import load_reward_func

            for spec in config.reward_funcs:
                load_reward_func(spec)

    # -- setup -----------------------------------------------------------------------------------
    def load_prompts(self) -> None:
        """Training and held-out prompt rows, from the config's sources or the rows given in Python."""
        c = self.config
        python = self.train_dataset is not None
        train = self.train_dataset if python else c.train_source
        demo = not python and train == DEMO_TASK
        self.train_rows = load_prompt_rows(train, split=c.dataset_split, config=c.dataset_config,
                                           n=c.num_train_prompts if demo else None, seed=c.seed,
                                           label="train_dataset" if python else None)
        if self.eval_dataset is not None or c.eval_file is not None:
            held_out = self.eval_dataset if self.eval_dataset is not None else c.eval_file
            # A dataset name or saved DatasetDict gives its "test" split (TRL's dataset_test_split), as for DPO.
            self.eval_rows = load_prompt_rows(held_out, split="test", n=c.num_eval_prompts if held_out == DEMO_TASK
                                              else None, seed=c.seed + 1,
                                              label="eval_dataset" if self.eval_dataset is not None else None)
        elif demo:
            self.eval_rows = load_prompt_rows(DEMO_TASK, n=c.num_eval_prompts, seed=c.seed + 1,
                                              exclude={r["prompt"] for r in self.train_rows})
        else:
            self.eval_rows = PromptRows()

    def build(self) -> list[dict]:
        from align.data.prompts import encode_prompts

        c = self.config
        self.base.model.eval()  # dropout off: old and new log-probs must come from the same function
        self.ref_adapter = attach_policy(self.base, "policy", c.lora, c.init_adapter, c.reference)
        self.critic = c.critic
        if self.critic:
            self.base.add_adapter("critic", c.lora)
            self.value_head = ValueHead(self.base.hidden_size, seed=c.seed).to(self.device)
        self.scorer, self.task_scorer = build_scorers(c, self.base, self.device, self.dtype, self.reward_funcs)
        self.reward_model = self.scorer.model
        self.base.set_active("policy")
        self.kl_coef = c.beta

        world = self.processes.world
        if c.prompts_per_rollout(world) % world:
            raise UserError(f"prompts_per_step: {c.prompts_per_rollout(world)} prompts cannot be shared evenly by "
                            f"{world} processes; use a multiple of {world}")
        tok = self.base.tokenizer
        # The built-in task is written for a chat model's user turn; a user's string prompt is used as
        # TRL uses it (align/data/prompts.py).
        template_text = (self.train_dataset is None and c.train_source == DEMO_TASK)
        self.train_ids = encode_prompts(tok, self.train_rows, c.system_prompt, c.max_prompt_length,
                                        chat_template_for_text=template_text)
        self.eval_ids = encode_prompts(tok, self.eval_rows, c.system_prompt, c.max_prompt_length,
                                       chat_template_for_text=template_text)
        if self.processes.is_main:
            print(f"[align] {c.describe_batches(self.processes.world, self.num_steps())}", flush=True)

        groups = [{"params": list(self.base.adapter_parameters("policy").values()), "lr": c.learning_rate}]
        if self.critic:
            groups.append({"params": list(self.base.adapter_parameters("critic").values())
                           + list(self.value_head.parameters()), "lr": c.critic_learning_rate or c.learning_rate})
        return groups

    def num_steps(self) -> int:
        return self.config.rollout_steps(len(self.train_rows), self.processes.world)

    def optimizer_steps(self) -> int:
        return self.num_steps() * self.config.optimizer_steps_per_rollout(self.processes.world)

    def trained_adapters(self) -> list[str]:
        return ["policy", "critic"] if self.critic else ["policy"]

    def heads(self) -> dict[str, torch.nn.Module]:
        return {"value": self.value_head} if self.critic else {}

    def state_extra(self) -> dict:
        return {"kl_coef": self.kl_coef, "algorithm": self.config.algorithm, "num_tokens": self.num_tokens}

    def load_extra(self, extra: dict) -> None:
        if extra.get("algorithm") != self.config.algorithm:
            raise UserError(f"{self.out}: the checkpoint was written by algorithm {extra.get('algorithm')!r}, "
                            f"the config says {self.config.algorithm!r}")
        self.kl_coef = extra["kl_coef"]
        self.num_tokens = extra.get("num_tokens", 0)

    def start(self) -> None:
        """The engine comes last: it reads the (possibly restored) policy adapter at its first sync."""
        c = self.config
        self.completions_log = None
        if c.log_completions and self.processes.is_main:
            self.completions_log = CompletionsLog(self.out, self.logger.trackers, c.num_completions_to_print)
            self.completions_log.truncate_after(self.step)
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
            # The longest a sequence can be, but never past the model's own limit (vLLM refuses that).
            limit = getattr(self.base.model.config, "max_position_embeddings", None) or 1 << 30
            options.setdefault("max_model_len", min(c.max_prompt_length + c.max_completion_length, limit))
            options.setdefault("kv_cache_sequences", c.prompts_per_rollout(self.processes.world) * c.num_generations)
        return options

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
        shown = {"reward": f"{stats['reward']:.3f}"}
        if "kl" in stats:
            shown["kl"] = f"{stats['kl']:.3f}"
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
        scores, _ = self.task_scorer.score(self.eval_rows, [s[0].text for s in samples],
                                           [list(s[0].completion_ids) for s in samples], self.eval_rows.places)
        self.task_scorer.pop_logged()  # what reward functions log belongs to training steps
        return {"eval/reward": scores.nanmean().item()}

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

