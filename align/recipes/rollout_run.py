"""What every recipe that samples from its own policy holds: prompts, rewards, the engine, the held-out score.

`RolloutRun` is a lifecycle Trainer (align/train/lifecycle.py) for a RolloutConfig
(align/recipes/rollout_config.py). It reads the prompt rows and checks the reward functions before
any model loads, attaches the policy adapter (and the frozen init adapter a reference may be) on the
shared base, encodes the prompts, starts the rollout engine once the policy is restored, and syncs it
(adapter only, then the log-prob probe; with use_peft: false, the full weights). PPO/GRPO/RLOO (align/recipes/ppo/run.py) and online DPO
(align/recipes/online_dpo.py) add their steps on top.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.core.errors import UserError
from align.core.policy_init import attach_policy
from align.data.prompt_rows import DEMO_TASK, PromptRows, load_prompt_rows
from align.train.lifecycle import Trainer


class RolloutRun(Trainer):
    def __init__(self, config, resume: bool | str | None = None, overwrite: bool = False,
                 engine=None, base=None, train_dataset=None, eval_dataset=None, reward_funcs: list | None = None,
                 resume_changed: bool = False):
        """`engine`: a rollout engine already built (tests, benchmarks); default: config's.
        `train_dataset` / `eval_dataset` / `reward_funcs` (TRL's names): rows (a datasets.Dataset or a
        list of dicts) and reward functions (callables or dotted paths) given in Python instead of
        the config's train_file / eval_file / reward_funcs."""
        super().__init__(config, resume, overwrite, base, resume_changed)
        self.engine = engine
        # What the engine samples and syncs: the policy adapter, or (use_peft: false) the base's own weights.
        self.policy = "policy" if getattr(config, "use_peft", True) else None
        self.train_dataset, self.eval_dataset, self.reward_funcs = train_dataset, eval_dataset, reward_funcs
        # Read before any model loads: bad rows or an unknown reward function cost no loading time.
        self.load_prompts()
        if not (reward_funcs or config.reward_funcs or config.reward_model_name_or_path):
            raise UserError(f"reward_funcs and {config.REWARD_MODEL_FIELD}: expected at least one source of reward")
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

    def build_rollout(self) -> None:
        """On the loaded base: the policy adapter (and its reference), the rewards, the encoded prompts."""
        from align.data.prompts import encode_prompts
        from align.recipes.ppo.scoring import build_scorers  # here: the ppo package imports this module

        c = self.config
        self.base.model.eval()  # dropout off: sampled, old and new log-probs must come from the same function
        self.ref_adapter = None
        if self.policy is not None:
            self.ref_adapter = attach_policy(self.base, "policy", c.lora, c.init_adapter, c.reference)
        self.scorer, self.task_scorer = build_scorers(c, self.base, self.device, self.dtype, self.reward_funcs)
        self.reward_model = self.scorer.model
        if self.policy is not None:
            self.base.set_active("policy")
        tok = self.base.tokenizer
        # The built-in task is written for a chat model's user turn; a user's string prompt is used as
        # TRL uses it (align/data/prompts.py).
        template_text = (self.train_dataset is None and c.train_source == DEMO_TASK)
        self.train_ids = encode_prompts(tok, self.train_rows, c.system_prompt, c.max_prompt_length,
                                        chat_template_for_text=template_text)
        self.eval_ids = encode_prompts(tok, self.eval_rows, c.system_prompt, c.max_prompt_length,
                                       chat_template_for_text=template_text)

    def rollout_sequences(self) -> int:
        """Sequences one step samples on this machine (sizes an in-process vLLM engine's KV cache)."""
        raise NotImplementedError

    def start(self) -> None:
        """The engine comes last: it reads the (possibly restored) policy adapter at its first sync."""
        c = self.config
        if self.engine is None:
            from align.engines import make_engine

            self.engine = make_engine(c.rollout_engine, self.model_path, self.base, dtype=c.rollout_dtype or self.dtype,
                                      **self.engine_options())
        self.last_sync = self.engine.sync(self.base, adapter=self.policy)

    def engine_options(self) -> dict:
        """config's engine options, plus the rollout's shape for an in-process vLLM engine: its KV cache
        is then sized for one step's sequences (prompts x generations of max prompt + completion
        tokens) instead of vLLM-CPU's fixed GiB (docs/design.md, "What a PPO step spends")."""
        from align.engines import vllm_available

        c = self.config
        options = c.rollout_engine_options()
        if c.rollout_engine == "vllm" or (c.rollout_engine == "auto" and vllm_available()):
            # The longest a sequence can be, but never past the model's own limit (vLLM refuses that).
            limit = getattr(self.base.model.config, "max_position_embeddings", None) or 1 << 30
            options.setdefault("max_model_len", min(c.max_prompt_length + c.max_completion_length, limit))
            options.setdefault("kv_cache_sequences", self.rollout_sequences())
        return options

    # -- the lifecycle's hooks -------------------------------------------------------------------
    def before_train(self) -> None:
        # The main process alone: the others would score the same prompts again.
        if self.step == 0 and self.eval_rows and self.processes.is_main:
            self.reward_before = self.evaluate()["eval/reward"]
            self.logger.log(0, {"eval/reward": self.reward_before})

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward-function score of greedy completions on the held-out prompts."""
        if not self.eval_rows or self.task_scorer is None:
            return {}
        samples = self.engine.generate(self.eval_ids, n=1, max_new_tokens=self.config.max_completion_length,
                                       temperature=0.0, adapter=self.policy)
        scores, _ = self.task_scorer.score(self.eval_rows, [s[0].text for s in samples],
                                           [list(s[0].completion_ids) for s in samples], self.eval_rows.places)
        self.task_scorer.pop_logged()  # what reward functions log belongs to training steps
        return {"eval/reward": scores.nanmean().item()}

    def summary_extra(self) -> dict:
        before = getattr(self, "reward_before", None)
        return {} if before is None else {"eval/reward_before": before}

    def trained_adapters(self) -> list[str]:
        return ["policy"]

    def save_final(self, final: dict) -> Path:
        return self.base.save_adapter("policy", self.out / "policy")

    def final_path(self) -> Path:
        return self.out / "policy"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        super().close()

    def _seed(self, step: int) -> int:
        return (self.config.seed * 1_000_003 + step) % (2 ** 31)
