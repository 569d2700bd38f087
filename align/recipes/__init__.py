"""The recipes: each fills in the lifecycle's hooks (align.train.lifecycle) and nothing else.

`dpo` (+ its pure losses in `dpo_losses`, LD-DPO/WPO scoring in `dpo_scoring`), `kto` (+ `kto_losses`),
`orpo` and `cpo` (no reference: `reference_free` + `reference_free_losses`), `sft`, `ppo/` (PPO, GRPO,
RLOO) and `demo` (the offline end-to-end run). Reward-model training lives in the top-level `reward` package.
"""
