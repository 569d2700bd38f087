"""PPO (and the critic-free GRPO / RLOO) with every role on one frozen base.

    policy     = base + adapter "policy"                 (trained)
    reference  = base with adapters off                  (SharedBase.reference())
    critic     = base + adapter "critic" + ValueHead     (trained; PPO only)
    reward     = base + adapter "reward" + score head    (frozen; optional) and/or reward functions
    sampler    = align.rollout engine; vLLM keeps its own copy and receives only the policy adapter

Lifecycle: setup (__init__) -> train() [step() per step, eval, checkpoint] -> close().
`PPOTrainer.step` is the algorithm and reads top to bottom; the equations are in
align/ppo/algorithms.py.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from align.errors import TrainingDiverged, UserError
from align.logprobs import completion_logprobs
from align.optim import adamw
from align.ppo import algorithms as A
from align.ppo.config import PPOConfig
from align.ppo.heads import ValueHead


@dataclass
class Rollout:
    """One step's sampled batch, packed for the trainer. B = prompts x generations, T = completion width.

    input_ids, attention_mask: (B, P + T), prompts left-padded to P, completions right-padded to T.
    mask: (B, T) 1 on real completion tokens. sampler_logprobs: (B, T) from the engine.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    prompt_width: int
    rows: list[dict]          # the prompt row of each sequence (repeated per generation)
    texts: list[str]          # decoded completions
    stopped: torch.Tensor     # (B,) 1 where the completion ended with EOS

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.mask[idx], self.sampler_logprobs[idx],
                       self.prompt_width, [self.rows[i] for i in idx.tolist()],
                       [self.texts[i] for i in idx.tolist()], self.stopped[idx])


# -- prompts -----------------------------------------------------------------------------------------
def load_rows(spec: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Prompt rows {"prompt", "answer"}: the arithmetic task or a JSONL file (errors name file:line)."""
    if spec == "arithmetic":
        from align.tasks.arithmetic import make_prompts

        rows = [r for r in make_prompts(n + len(exclude), seed) if r["prompt"] not in exclude]
        return rows[:n]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"prompts: {spec!r} is neither 'arithmetic' nor an existing JSONL file")
    from align.data import DataError, DataIssue, read_jsonl

    rows = []
    for where, row in read_jsonl(path):  # BOM, CRLF, blank lines and bad UTF-8 handled as for preference data
        if isinstance(row, DataIssue):
            raise DataError([row])
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{where}: expected an object with a string \"prompt\" (and optional \"answer\")")
        rows.append({"prompt": row["prompt"], "answer": row.get("answer"), "row": where})
    if not rows:
        raise UserError(f"{path}: no prompt rows")
    return rows


def encode_prompts(tokenizer, rows: list[dict], system_prompt: str | None, max_tokens: int) -> list[list[int]]:
    """Chat-format and tokenize each row's prompt; a prompt over `max_tokens` is an error naming its row."""
    out = []
    for i, row in enumerate(rows):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": row["prompt"]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if len(ids) > max_tokens:
            where = row.get("row", f"row {i}")
            raise UserError(f"prompts {where}: {len(ids)} tokens with the chat template, over max_prompt_tokens="
                            f"{max_tokens}: {row['prompt'][:60]!r}")
        out.append(list(ids))
    return out


def pack(samples: list[list], rows: list[dict], pad_id: int) -> Rollout:
    """Flatten engine samples (prompts x generations) into padded tensors."""
    flat = [(s, row) for group, row in zip(samples, rows, strict=True) for s in group]
    P = max(len(s.prompt_ids) for s, _ in flat)
    T = max(1, max(len(s.completion_ids) for s, _ in flat))
    B = len(flat)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    mask = torch.zeros(B, T)
    old = torch.zeros(B, T)
    for i, (s, _) in enumerate(flat):
        p, c = s.prompt_ids, s.completion_ids
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
        mask[i, :len(c)] = 1
        old[i, :len(c)] = torch.tensor(s.logprobs, dtype=torch.float32)
    stopped = torch.tensor([float(s.finish_reason == "stop") for s, _ in flat])
    return Rollout(ids, attn, mask, old, P, [r for _, r in flat], [s.text for s, _ in flat], stopped)


# -- rewards -----------------------------------------------------------------------------------------
class Scorer:
    """Total reward = sum of weighted reward functions (+ weight * reward adapter score); parts kept apart."""

    def __init__(self, functions: dict[str, float], reward_model=None, reward_model_weight: float = 1.0):
        from reward.functions import get_reward_fn

        self.functions = [(spec, get_reward_fn(spec), float(w)) for spec, w in functions.items()]
        self.reward_model = reward_model
        self.reward_model_weight = reward_model_weight

    def __call__(self, prompts: list[str], completions: list[str], answers: list) -> tuple[torch.Tensor, dict]:
        from reward.functions import compute_rewards

        total = torch.zeros(len(completions))
        parts = {}
        for spec, fn, weight in self.functions:
            values = torch.tensor(compute_rewards(fn, prompts, completions, answers))
            parts[spec] = values
            total += weight * values
        if self.reward_model is not None:
            values = self.reward_model.score(prompts, completions).float()
            parts["reward_model"] = values
            total += self.reward_model_weight * values
        return total, parts


# -- trainer -----------------------------------------------------------------------------------------
class PPOTrainer:
    def __init__(self, config: PPOConfig, resume: bool = False, engine=None):
        from align.checkpoint import latest_checkpoint
        from align.metrics import MetricsLogger
        from align.model import SharedBase

        self.config = c = config
        self.run_dir = Path(c.output_dir)
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise UserError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run "
                            f"or choose another output_dir")
        random.seed(c.seed)
        torch.manual_seed(c.seed)
        self.model_path = resolve_model(c.model)

        # Build order matters: the base first, then adapters on it, then heads and the optimizer
        # over exactly the trained tensors, then the engine (vLLM reads the saved adapter).
        self.base = SharedBase.load(self.model_path, dtype=c.dtype)
        self.base.model.eval()  # dropout off: old and new log-probs must come from the same function
        self.base.add_adapter("policy", c.lora)
        self.critic = c.estimator == "ppo"
        if self.critic:
            self.base.add_adapter("critic", c.lora)
            self.value_head = ValueHead(self.base.hidden_size, seed=c.seed)
        self.reward_model = None
        if c.reward_model is not None:
            from reward.model import RewardModel

            self.reward_model = RewardModel.attach(self.base, c.reward_model, name="reward")
        self.base.set_active("policy")
        self.scorer = Scorer(c.reward_functions, self.reward_model, c.reward_model_weight)
        self.task_scorer = Scorer(c.reward_functions)  # held-out evaluation: reward functions only

        groups = [{"params": list(self.base.adapter_parameters("policy").values()), "lr": c.lr}]
        if self.critic:
            groups.append({"params": list(self.base.adapter_parameters("critic").values())
                           + list(self.value_head.parameters()), "lr": c.critic_lr or c.lr})
        self.optimizer = adamw(groups, weight_decay=c.weight_decay)
        self.kl_coef = c.kl_coef

        tok = self.base.tokenizer
        self.train_rows = load_rows(c.prompts, c.num_train_prompts, c.seed)
        if c.eval_prompts is not None:
            self.eval_rows = load_rows(c.eval_prompts, c.num_eval_prompts, c.seed + 1)
        elif c.prompts == "arithmetic":
            self.eval_rows = load_rows("arithmetic", c.num_eval_prompts, c.seed + 1,
                                       exclude={r["prompt"] for r in self.train_rows})
        else:
            self.eval_rows = []
        self.train_ids = encode_prompts(tok, self.train_rows, c.system_prompt, c.max_prompt_tokens)
        self.eval_ids = encode_prompts(tok, self.eval_rows, c.system_prompt, c.max_prompt_tokens)

        self.step_done = 0
        if resume:
            self._load_latest()
        self.metrics = MetricsLogger(self.run_dir, tensorboard=c.tensorboard)
        self.metrics.truncate_after(self.step_done)
        if engine is None:
            from align.rollout import make_engine

            engine = make_engine(c.engine, self.model_path, self.base, dtype=c.rollout_dtype or c.dtype,
                                 **c.engine_options)
        self.engine = engine
        self.last_sync = self.engine.sync(self.base, adapter="policy")

    # -- the algorithm ---------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        c, base = self.config, self.base
        times = {}
        t = time.perf_counter()

        # 1. Rollout: sample G completions for each of this step's prompts with the current policy.
        idx = self._prompt_indices(step)
        rows = [self.train_rows[i] for i in idx]
        samples = self.engine.generate([self.train_ids[i] for i in idx], n=c.generations_per_prompt,
                                       max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                       top_p=c.top_p, seed=self._seed(step), adapter="policy")
        batch = pack(samples, rows, base.tokenizer.pad_token_id)
        mask = batch.mask
        t = _lap(times, "rollout", t)

        # 2. Score: programmatic rewards and/or the reward adapter, per sequence.
        scores, parts = self.scorer([r["prompt"] for r in batch.rows], batch.texts,
                                    [r.get("answer") for r in batch.rows])
        t = _lap(times, "score", t)

        # 3. Training-side log-probs (policy), reference log-probs (adapters off), values (critic).
        with torch.no_grad():
            old_logp, entropy = self._logprobs(batch, "policy", with_entropy=True)
            ref_logp = self._logprobs(batch, None)
            old_values = self._values(batch) if self.critic else None
        t = _lap(times, "forward", t)

        # 4. Rewards and advantages.
        kl = A.kl_penalty(old_logp, ref_logp, c.kl_estimator) * mask           # (B, T)
        kl_seq = kl.sum(1)                                                       # (B,)
        self._check_kl(step, kl_seq)
        kl_coef_in_reward = self.kl_coef if c.kl_in_reward else 0.0
        if self.critic:
            rewards = A.token_rewards(scores, kl, mask, kl_coef_in_reward)
            advantages, returns = A.gae_advantages(rewards, old_values, mask, c.gamma, c.lam)
        else:
            seq_rewards = scores - kl_coef_in_reward * kl_seq
            if c.estimator == "grpo":
                seq_adv = A.grpo_advantages(seq_rewards, c.generations_per_prompt)
            else:
                seq_adv = A.rloo_advantages(seq_rewards, c.generations_per_prompt)
            advantages = seq_adv.unsqueeze(1) * mask
        if c.whiten_advantages:
            advantages = A.masked_whiten(advantages, mask)

        # 5. Several epochs of minibatch updates with the clipped surrogate (and clipped value loss).
        stats = []
        g = torch.Generator().manual_seed(self._seed(step))
        for _ in range(c.epochs):
            for mb in torch.randperm(mask.shape[0], generator=g).split(c.minibatch_size):
                mb_batch, m = batch.select(mb), mask[mb]
                if c.entropy_coef > 0:
                    logp, ent = self._logprobs(mb_batch, "policy", with_entropy=True)
                else:
                    logp = self._logprobs(mb_batch, "policy")
                pg_loss, clipfrac, approx_kl = A.policy_loss(logp, old_logp[mb], advantages[mb], m, c.clip_eps)
                loss = pg_loss
                if c.entropy_coef > 0:
                    loss = loss - c.entropy_coef * A.masked_mean(ent, m)
                if not c.kl_in_reward and self.kl_coef > 0:
                    loss = loss + self.kl_coef * A.masked_mean(A.kl_penalty(logp, ref_logp[mb], c.kl_estimator), m)
                vf_loss = vf_clipfrac = torch.zeros(())
                if self.critic:
                    values = self._values(mb_batch)
                    vf_loss, vf_clipfrac = A.value_loss(values, old_values[mb], returns[mb], m, c.value_clip)
                    loss = loss + c.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"step {step}: the loss is {loss.item()} (policy {pg_loss.item()}, value "
                                           f"{vf_loss.item()}); {self._last_good()}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self._trained(), c.max_grad_norm)
                if not torch.isfinite(grad_norm):  # stop before a NaN reaches the adapters
                    raise TrainingDiverged(f"step {step}: the gradient norm is {grad_norm.item()}; "
                                           f"{self._last_good()}")
                self.optimizer.step()
                stats.append([pg_loss.item(), vf_loss.item(), clipfrac.item(), approx_kl.item(),
                              vf_clipfrac.item(), grad_norm.item()])
        t = _lap(times, "update", t)

        # 6. Send the new policy adapter to the sampler (verified by probe log-probs).
        self.last_sync = self.engine.sync(base, adapter="policy")
        t = _lap(times, "sync", t)

        # 7. Adaptive KL coefficient (Ziegler et al.), driven by the per-sequence KL.
        kl_mean = kl_seq.mean().item()
        if c.kl_target is not None:
            self.kl_coef = A.adaptive_kl_coef(self.kl_coef, kl_mean, c.kl_target, c.kl_horizon, mask.shape[0])

        pg, vf, cf, akl, vcf, gn = torch.tensor(stats).mean(0).tolist()
        mismatch = (old_logp - batch.sampler_logprobs).abs() * mask
        n_tokens = mask.sum().item()
        out = {
            "reward/mean": scores.mean().item(),
            **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
            "kl/ref": kl_mean,
            "kl/ref_per_token": A.masked_mean(kl, mask).item(),
            "kl/coef": self.kl_coef,
            "policy/entropy": A.masked_mean(entropy, mask).item(),
            "policy/clipfrac": cf,
            "policy/approx_kl": akl,
            "policy/advantage_std": advantages[mask.bool()].std().item() if n_tokens > 1 else 0.0,
            "loss/policy": pg,
            "grad_norm": gn,
            "logprob/mismatch_mean": (mismatch.sum() / max(n_tokens, 1)).item(),
            "logprob/mismatch_max": mismatch.max().item(),
            "response/length": mask.sum(1).mean().item(),
            "response/stopped": batch.stopped.mean().item(),
            "sync/bytes": self.last_sync.bytes,
            "sync/max_abs_diff": self.last_sync.max_abs_diff if self.last_sync.max_abs_diff is not None else math.nan,
            **{f"time/{k}": v for k, v in times.items()},
            "tokens_per_s/rollout": n_tokens / max(times["rollout"], 1e-9),
            "tokens_per_s/step": n_tokens / max(sum(times.values()), 1e-9),
        }
        if self.critic:
            out.update({"loss/value": vf, "value/clipfrac": vcf,
                        "value/explained_variance": A.explained_variance(old_values, returns, mask),
                        "value/mean": A.masked_mean(old_values, mask).item()})
        return out

    # -- forward passes --------------------------------------------------------------------------
    def _logprobs(self, batch: Rollout, adapter: str | None, with_entropy: bool = False):
        """(B, T) per-token log-probs of the completions (and entropy) under `adapter` (None: reference)."""
        P = batch.prompt_width
        cmask = torch.zeros_like(batch.input_ids)
        cmask[:, P:] = batch.mask.long()
        ctx = self.base.reference() if adapter is None else self.base.adapter(adapter)
        with ctx:
            out = completion_logprobs(self.base, batch.input_ids, batch.attention_mask, cmask, with_entropy)
        if with_entropy:
            return out[0][:, P - 1:], out[1][:, P - 1:]
        return out[:, P - 1:]

    def _values(self, batch: Rollout) -> torch.Tensor:
        """(B, T) V(s_t): the critic's value of the state in which completion token t is chosen."""
        P, T = batch.prompt_width, batch.mask.shape[1]
        with self.base.adapter("critic"):
            hidden = self.base.hidden(batch.input_ids, batch.attention_mask)[:, P - 1:P - 1 + T]
        return self.value_head(hidden) * batch.mask

    def _trained(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the remaining steps; returns {"eval/reward_before", "eval/reward_after"} where measured."""
        c = self.config
        summary = {}
        if self.step_done == 0 and self.eval_rows:
            summary["eval/reward_before"] = self.evaluate()
            self.metrics.log(0, {"eval/reward": summary["eval/reward_before"]})
        bar = tqdm(range(self.step_done + 1, c.steps + 1), desc=c.estimator, initial=self.step_done,
                   total=c.steps, dynamic_ncols=True)
        for step in bar:
            m = self.step(step)
            if self.eval_rows and (step == c.steps or (c.eval_every and step % c.eval_every == 0)):
                m["eval/reward"] = summary["eval/reward_after"] = self.evaluate()
            self.metrics.log(step, m)
            self.step_done = step
            if step % c.save_every == 0 or step == c.steps:
                self.save_checkpoint(step)
            bar.set_postfix(reward=f"{m['reward/mean']:.3f}", kl=f"{m['kl/ref']:.3f}",
                            **({"eval": f"{m['eval/reward']:.3f}"} if "eval/reward" in m else {}))
        bar.close()
        self.save_final()
        return summary

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean reward-function score of greedy completions on the held-out prompts."""
        samples = self.engine.generate(self.eval_ids, n=1, max_new_tokens=self.config.max_new_tokens,
                                       temperature=0.0, adapter="policy")
        texts = [s[0].text for s in samples]
        scores, _ = self.task_scorer([r["prompt"] for r in self.eval_rows], texts,
                                                         [r.get("answer") for r in self.eval_rows])
        return scores.mean().item()

    # -- checkpoints -----------------------------------------------------------------------------
    def _adapters(self) -> list[str]:
        return ["policy", "critic"] if self.critic else ["policy"]

    def save_checkpoint(self, step: int) -> Path:
        from align.checkpoint import optimizer_tensors, rng_tensors, save_checkpoint

        tensors, opt_meta = optimizer_tensors(self.optimizer)
        rng, rng_meta = rng_tensors()
        tensors.update(rng)
        if self.critic:
            tensors.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        state = {"kl_coef": self.kl_coef, "optimizer": opt_meta, "rng": rng_meta, "estimator": self.config.estimator}
        return save_checkpoint(self.run_dir, step, self.base, self._adapters(), tensors, state,
                               keep=self.config.keep_checkpoints)

    def _load_latest(self) -> None:
        from align.checkpoint import (
            latest_checkpoint,
            load_adapter_weights,
            load_checkpoint,
            load_optimizer_tensors,
            restore_rng,
        )

        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise UserError(f"--resume: no checkpoint under {self.run_dir / 'checkpoints'}")
        tensors, state = load_checkpoint(path)
        if state.get("estimator") != self.config.estimator:
            raise UserError(f"{path}: written by estimator {state.get('estimator')!r}, config says "
                            f"{self.config.estimator!r}")
        for name in self._adapters():
            load_adapter_weights(self.base, name, path / "adapters" / name)
        if self.critic:
            self.value_head.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()
                                             if k.startswith("value_head.")})
        load_optimizer_tensors(self.optimizer, tensors, state["optimizer"])
        restore_rng(tensors, state["rng"])
        self.kl_coef = state["kl_coef"]
        self.step_done = state["step"]

    def _last_good(self) -> str:
        from align.checkpoint import latest_checkpoint

        path = latest_checkpoint(self.run_dir)
        return (f"the last good checkpoint {path} is intact (resume with --resume, perhaps with a lower lr "
                f"or a larger kl_coef)" if path else "no checkpoint was written yet")

    def _check_kl(self, step: int, kl_seq: torch.Tensor) -> None:
        kl = kl_seq.mean().item()
        if not math.isfinite(kl) or kl > self.config.max_kl:
            raise TrainingDiverged(f"step {step}: KL to the reference is {kl:.4g} nats per sequence "
                                   f"(max_kl={self.config.max_kl}); stopping. {self._last_good()}")

    def save_final(self) -> None:
        from safetensors.torch import save_file

        for name in self._adapters():
            self.base.save_adapter(name, self.run_dir / name)
        if self.critic:
            from align.atomic import atomic_dir

            with atomic_dir(self.run_dir / "value_head") as tmp:
                save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                          str(tmp / "value_head.safetensors"))

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()

    # -- helpers ---------------------------------------------------------------------------------
    def _seed(self, step: int) -> int:
        return (self.config.seed * 1_000_003 + step) % (2 ** 31)

    def _prompt_indices(self, step: int) -> list[int]:
        """This step's prompts: a fixed shuffle of the training rows per pass, so resume sees the same ones."""
        n, k = len(self.train_rows), self.config.prompts_per_step
        out = []
        for j in range((step - 1) * k, step * k):
            order = list(range(n))
            random.Random(self.config.seed * 7919 + j // n).shuffle(order)
            out.append(order[j % n])
        return out


def resolve_model(name: str) -> str:
    if name == "smollm2":
        from align.smollm import ensure_smollm2

        return str(ensure_smollm2())
    if not Path(name).is_dir():
        raise UserError(f"model: {name!r} is neither 'smollm2' nor a local model folder")
    return name


def _lap(times: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    times[key] = now - start
    return now
