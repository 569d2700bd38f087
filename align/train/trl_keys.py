"""TRL's YAML keys that are not fields of an align config, and what each one becomes here.

A YAML written for `trl dpo|sft|reward --config` (or for TRL's ORPOConfig/CPOConfig) mixes TRL's
ScriptArguments, ModelConfig, transformers' TrainingArguments and the trainer's own config. Keys that mean the same here
are already fields (model_name_or_path, lora_r, learning_rate, beta, ...). Every other key
TRL's CLI takes that this project has decided on is in `TRL_KEYS`, with one of three actions:

    "note"     accepted; one printed line says it has no effect here and why. With `ok`,
               only those values are accepted (TRL's default or what align does anyway);
               any other value is refused with the same reason.
    "refuse"   an error giving the reason (and what to write instead).
    a function (value, data) -> (updates, note): MAPPED onto align fields; the note says what
               it became. It raises ValueError (the reason) for a value it cannot map. A recipe
               without the field refuses the key, unless the value is in `ok` (noted).

A key in neither the recipe's fields nor this table is an unknown key.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

ANY = object()  # `ok` when every value is accepted


class Key(NamedTuple):
    action: Any  # "note", "refuse" or a mapping function
    reason: str
    ok: tuple = ANY


def _eval_strategy(value, data: dict):
    """TRL evaluates on eval_strategy's schedule; align every eval_steps steps (0: only at the end)."""
    if value == "steps":
        # TRL: eval_steps defaults to logging_steps (TRL's default: 10).
        every = data.get("eval_steps", data.get("logging_steps", 10))
        return {"eval_steps": every}, f"read as eval_steps: {every}"
    if value in ("no", False):  # YAML 1.1 reads a bare `no` as false
        return {"eval_steps": 0}, "read as eval_steps: 0 (held-out rows, if any, are evaluated once, at the end)"
    raise ValueError("expected steps or no (align evaluates every eval_steps optimizer steps; no per-epoch "
                     "schedule): use eval_strategy: steps with eval_steps")


def _save_strategy(value, data: dict):
    if value == "steps":
        return {}, "checkpoints every save_steps steps, as align does"
    if value in ("no", False):  # YAML 1.1 reads a bare `no` as false
        return {"save_steps": 0}, "read as save_steps: 0 (no checkpoints on the way; the final adapter is saved)"
    raise ValueError("expected steps or no (align keeps the last save_total_limit checkpoints and the final "
                     "adapter; no per-epoch or best-metric schedule): use save_strategy: steps with save_steps")


def _logging_strategy(value, data: dict):
    if value == "steps":
        return {}, "metrics every logging_steps steps, as align does"
    raise ValueError("expected steps: align writes metrics every logging_steps optimizer steps")


def _use_cpu(value, data: dict):
    if value is True:
        return {"device": "cpu"}, "read as device: cpu"
    return {}, "the device field decides (auto: this process's GPU if any)"


def _rename(field: str):
    """A TRL key whose value is an align field's under another name."""
    def carry(value, data: dict):
        if field in data:
            raise ValueError(f"{field} is set too; keep one")
        return {field: value}, f"read as {field}"
    carry.__name__ = f"as_{field}"
    return carry


_LAUNCH = ("align starts no processes itself: launch N with `accelerate launch --config_file "
           "configs/accelerate/ddp.yaml --num_processes N -m align <recipe> --config ...` (docs/scaling.md), "
           "and drop this key")
_OWN_LOOP = "align's own training loop has no such setting"

TRL_KEYS: dict[str, Key] = {
    # -- TRL's CLI (launcher) and ScriptArguments --------------------------------------------------
    "env": Key("note", "environment variables must be set before the process starts: `VAR=value align ...`"),
    "num_processes": Key("refuse", _LAUNCH),
    "accelerate_config": Key("refuse", _LAUNCH),
    "dataset_train_split": Key(_rename("dataset_split"), "a recipe without dataset_split (SFT) reads 'train'",
                               ok=("train",)),
    "dataset_test_split": Key("note", "held-out rows of a dataset name come from its 'test' split", ok=("test",)),
    "dataset_streaming": Key("note", "rows are read and tokenised once, before training", ok=(False,)),
    "ignore_bias_buffers": Key("note", "no DDP wrapper: processes share gradients by align's own all-reduce"),
    "datasets": Key("refuse", "one dataset per run: use dataset_name or train_file (mix the rows into one file)"),
    "streaming": Key("note", "rows are read and tokenised once, before training", ok=(False,)),
    "test_split_size": Key(_rename("eval_fraction"), "align's name for the held-out fraction"),
    # -- ModelConfig -------------------------------------------------------------------------------
    "model_revision": Key("note", "the model loads as named; for another revision give its local folder",
                          ok=("main",)),
    "attn_implementation": Key("note", "the base loads with transformers' default attention (sdpa where the "
                                       "model supports it)"),
    "lora_task_type": Key("note", "adapters attach to the decoder; the reward recipe adds its own scalar head"),
    "lora_target_parameters": Key("note", "LoRA targets modules only (lora_target_modules)", ok=(None, [])),
    "lora_modules_to_save": Key("note", "only adapters (and a reward head) train; the base stays frozen",
                                ok=(None, [])),
    "use_rslora": Key("note", "updates are scaled by lora_alpha/lora_r", ok=(False,)),
    "use_dora": Key("note", "plain LoRA only", ok=(False,)),
    "load_in_8bit": Key("note", "4-bit only: load_in_4bit: true", ok=(False,)),
    "use_bnb_nested_quant": Key(_rename("bnb_4bit_use_double_quant"), "align's name for nested quantisation"),
    "bnb_4bit_quant_storage": Key("note", "4-bit weights are stored as bitsandbytes packs them", ok=(None,)),
    # -- TrainingArguments: schedules --------------------------------------------------------------
    "eval_strategy": Key(_eval_strategy, "align evaluates every eval_steps steps"),
    "save_strategy": Key(_save_strategy, "align checkpoints every save_steps steps"),
    "logging_strategy": Key(_logging_strategy, "align logs every logging_steps steps"),
    "logging_first_step": Key("note", "metrics are written every logging_steps steps and at the last "
                                      "(logging_steps: 1 includes the first)"),
    "eval_on_start": Key("note", "evaluation runs every eval_steps steps and at the end", ok=(False,)),
    "eval_delay": Key("note", "evaluation runs every eval_steps steps and at the end", ok=(0, 0.0)),
    "load_best_model_at_end": Key("note", "the final adapter is the last step's; checkpoints/ keeps the last "
                                          "save_total_limit", ok=(False,)),
    "metric_for_best_model": Key("note", "no best-model selection", ok=(None,)),
    "greater_is_better": Key("note", "no best-model selection", ok=(None,)),
    "resume_from_checkpoint": Key("refuse", "resume on the command line: --resume [step-000020]"),
    "overwrite_output_dir": Key("note", "a finished run in output_dir is refused; pass --overwrite to replace it",
                                ok=(False,)),
    "do_train": Key("note", "a recipe always trains"),
    "do_eval": Key("note", "evaluation runs when there are held-out rows (eval_file or eval_fraction)"),
    "do_predict": Key("note", "no prediction pass", ok=(False,)),
    # -- TrainingArguments: optimiser and precision ------------------------------------------------
    "optim": Key("note", "the optimiser is torch AdamW (fused where it applies)",
                 ok=("adamw_torch", "adamw_torch_fused")),
    "adam_beta1": Key("note", "AdamW runs with torch's betas (0.9, 0.999)", ok=(0.9,)),
    "adam_beta2": Key("note", "AdamW runs with torch's betas (0.9, 0.999)", ok=(0.999,)),
    "adam_epsilon": Key("note", "AdamW runs with torch's eps 1e-8", ok=(1e-8,)),
    "lr_scheduler_kwargs": Key("note", "schedulers run with transformers' defaults", ok=(None, {})),
    "fp16": Key("note", "no autocast: dtype: float16 stores the base in float16 (adapters stay float32)",
                ok=(False,)),
    "tf32": Key("note", "torch's TF32 setting is left as it is"),
    "bf16_full_eval": Key("note", "evaluation runs in the training dtype", ok=(False,)),
    "fp16_full_eval": Key("note", "evaluation runs in the training dtype", ok=(False,)),
    "use_cpu": Key(_use_cpu, "align's name is device"),
    "gradient_checkpointing_kwargs": Key("note", "checkpointing is always non-reentrant ({use_reentrant: false}); "
                                                 "checkpoint_keep_last trades memory for speed"),
    "torch_compile": Key("note", _OWN_LOOP, ok=(False,)),
    "use_liger_kernel": Key("note", "completion log-probs are computed without full-vocabulary logits already",
                            ok=(False,)),
    "auto_find_batch_size": Key("note", "batch sizes are as given", ok=(False,)),
    "label_smoothing_factor": Key("note", "for DPO use label_smoothing", ok=(0, 0.0)),
    "neftune_noise_alpha": Key("note", _OWN_LOOP, ok=(None,)),
    "average_tokens_across_devices": Key("note", "losses are averaged over the global batch already"),
    "activation_offloading": Key("note", "use gradient_checkpointing to save activation memory", ok=(False,)),
    "torch_empty_cache_steps": Key("note", _OWN_LOOP),
    "data_seed": Key("note", "one seed (seed) orders the data", ok=(None,)),
    "full_determinism": Key("note", "seed fixes adapters and data order; deterministic kernels are not forced"),
    # -- TrainingArguments: data loading, logging, hub, distributed --------------------------------
    "remove_unused_columns": Key("note", "rows are read by their fields (prompt, chosen, rejected, ...); other "
                                         "columns never reach the model"),
    "label_names": Key("note", _OWN_LOOP),
    "dataloader_num_workers": Key("note", "rows are tokenised once, before training; no DataLoader"),
    "dataloader_pin_memory": Key("note", "rows are tokenised once, before training; no DataLoader"),
    "dataloader_drop_last": Key("note", "the last partial batch of an epoch is trained"),
    "dataset_num_proc": Key("note", "rows are tokenised in this process"),
    "group_by_length": Key("note", "batches are drawn by seed", ok=(False,)),
    "logging_dir": Key("note", "TensorBoard logs go to output_dir/tb"),
    "log_level": Key("note", "align prints its own progress"),
    "disable_tqdm": Key("note", "align prints its own progress"),
    "run_name": Key("note", "runs are named by output_dir"),
    "project": Key("note", "runs are named by output_dir"),
    "include_num_input_tokens_seen": Key("note", "metrics.jsonl has a tokens count per step"),
    "push_to_hub": Key("note", "nothing is uploaded: the adapter is saved under output_dir; upload it with "
                               "huggingface-cli upload"),
    "hub_model_id": Key("note", "nothing is uploaded"),
    "hub_strategy": Key("note", "nothing is uploaded"),
    "hub_private_repo": Key("note", "nothing is uploaded"),
    "save_safetensors": Key("note", "checkpoints are always safetensors", ok=(True,)),
    "save_only_model": Key("note", "checkpoints hold adapters, optimizer and scheduler, so a run resumes exactly"),
    "local_rank": Key("note", "the launcher sets each process's rank"),
    "ddp_backend": Key("note", "processes use torch.distributed's default backend for their device"),
    "ddp_timeout": Key("note", "torch.distributed's default timeout"),
    "ddp_find_unused_parameters": Key("note", "no DDP wrapper: align all-reduces adapter gradients itself"),
    "fsdp": Key("refuse", "FSDP is chosen by the launch: accelerate launch --config_file "
                          "configs/accelerate/fsdp.yaml (docs/scaling.md)"),
    "fsdp_config": Key("refuse", "FSDP is chosen by the launch (docs/scaling.md)"),
    "deepspeed": Key("refuse", "no DeepSpeed: adapters are small; large bases shard with FSDP (docs/scaling.md)"),
    "accelerator_config": Key("note", "the launch decides (accelerate launch --config_file ...)"),
    "parallelism_config": Key("note", "the launch decides (accelerate launch --config_file ...)", ok=(None,)),
    "ddp_broadcast_buffers": Key("note", "no DDP wrapper: align all-reduces adapter gradients itself"),
    "ddp_bucket_cap_mb": Key("note", "no DDP wrapper: align all-reduces adapter gradients itself"),
    "ddp_static_graph": Key("note", "no DDP wrapper: align all-reduces adapter gradients itself"),
    "dataloader_in_order": Key("note", "rows are tokenised once, before training; no DataLoader"),
    "dataloader_multiprocessing_context": Key("note", "rows are tokenised once, before training; no DataLoader"),
    "dataloader_persistent_workers": Key("note", "rows are tokenised once, before training; no DataLoader"),
    "dataloader_prefetch_factor": Key("note", "rows are tokenised once, before training; no DataLoader"),
    "train_sampling_strategy": Key("note", "each step draws its batch by seed", ok=("random",)),
    "length_column_name": Key("note", "batches are drawn by seed, not grouped by length"),
    "ignore_data_skip": Key("note", "a resumed run replays the exact batches of its steps by seed; nothing is skipped"),
    "restore_callback_states_from_checkpoint": Key("note", "no callbacks: a checkpoint holds all a run resumes from"),
    "enable_jit_checkpoint": Key("note", "checkpoints every save_steps steps; a killed run resumes from the last"),
    "save_on_each_node": Key("note", "the first process writes checkpoints"),
    "log_level_replica": Key("note", "only the first process prints"),
    "log_on_each_node": Key("note", "only the first process prints"),
    "logging_nan_inf_filter": Key("note", "losses are logged as computed"),
    "skip_memory_metrics": Key("note", "align logs its own step metrics"),
    "debug": Key("note", _OWN_LOOP, ok=("", [], None)),
    "eval_accumulation_steps": Key("note", "held-out metrics are summed batch by batch"),
    "eval_do_concat_batches": Key("note", "align computes its own held-out metrics"),
    "eval_use_gather_object": Key("note", "align computes its own held-out metrics"),
    "prediction_loss_only": Key("note", "align computes its own held-out metrics"),
    "include_for_metrics": Key("note", "align computes its own held-out metrics", ok=(None, [])),
    "batch_eval_metrics": Key("note", "align computes its own held-out metrics", ok=(False,)),
    "optim_args": Key("note", "AdamW runs with torch's defaults besides lr and weight_decay", ok=(None, "")),
    "optim_target_modules": Key("note", "the optimiser updates adapters (and heads) only", ok=(None, [])),
    "torch_compile_backend": Key("note", _OWN_LOOP, ok=(None,)),
    "torch_compile_mode": Key("note", _OWN_LOOP, ok=(None,)),
    "liger_kernel_config": Key("note", _OWN_LOOP, ok=(None,)),
    "use_cache": Key("note", "training runs without the KV cache", ok=(False,)),
    "hub_always_push": Key("note", "nothing is uploaded"),
    "hub_revision": Key("note", "nothing is uploaded"),
    "hub_token": Key("note", "nothing is uploaded"),
    "trackio_space_id": Key("note", "trackio runs with its own defaults (report_to: [trackio])"),
    "trackio_bucket_id": Key("note", "trackio runs with its own defaults (report_to: [trackio])"),
    "trackio_static_space_id": Key("note", "trackio runs with its own defaults (report_to: [trackio])"),
    # -- the trainers' own configs (DPOConfig, SFTConfig, RewardConfig) ----------------------------
    "model_init_kwargs": Key("refuse", "give the settings as fields: dtype, trust_remote_code, load_in_4bit"),
    "disable_dropout": Key("note", "only adapters train, with lora_dropout (0 unless set)"),
    "router_aux_loss_coef": Key("note", "MoE bases train adapters only; no router loss"),
    # A field of sft, dpo, reward and ppo/grpo/rloo (align/core/packing.py); other recipes pad each batch.
    "padding_free": Key("note", "this recipe pads each batch (padding_free is a field of sft, dpo, reward, ppo, grpo "
                                "and rloo)", ok=(False,)),
    "pad_to_multiple_of": Key("note", "batches are padded to their longest row"),
    "pad_token": Key("note", "the tokenizer's pad token (or its eos token) pads", ok=(None,)),
    "eos_token": Key("note", "the tokenizer's eos_token ends plain-text rows; chat rows end as the chat template "
                             "ends them"),
    "chat_template_path": Key("note", "the tokenizer's own chat template is used", ok=(None,)),
    "truncation_mode": Key("note", "align keeps the start (TRL's keep_start)", ok=("keep_start",)),
    "precompute_ref_batch_size": Key("note", "the reference pass uses per_device_eval_batch_size"),
    "ref_model_mixup_alpha": Key("note", "only read with sync_ref_model: true"),
    "ref_model_sync_steps": Key("note", "only read with sync_ref_model: true"),
    "dataset_config": Key("note", "SFT reads a dataset name's default configuration", ok=(None,)),
    "sync_ref_model": Key("note", "the reference stays fixed (TR-DPO is not implemented)", ok=(False,)),
    "shuffle_dataset": Key("note", "each step draws its batch by seed"),
    "packing_strategy": Key("note", "packing is best-fit decreasing (TRL's bfd)", ok=("bfd",)),
    "eval_packing": Key("note", "held-out rows are not packed"),
    "dataset_kwargs": Key("note", "rows are read as align.data.sources reads them", ok=(None, {})),
    # TRL's SFT loss_type (nll | dft); DPOConfig has its own loss_type field, so this is never read for DPO.
    "loss_type": Key("note", "SFT's loss is the token NLL", ok=("nll",)),
    # -- ORPOConfig's and CPOConfig's (trl.experimental) own keys -------------------------------------
    "generate_during_eval": Key("note", "held-out pairs are scored; nothing is sampled", ok=(False,)),
    "is_encoder_decoder": Key("note", "decoder-only (causal LM) bases only", ok=(None, False)),
    "max_completion_length": Key("note", "TRL reads it for encoder-decoder models only; answers are cut to the "
                                         "room max_length leaves", ok=(None,)),
    "padding_value": Key("note", "the tokenizer's pad token pads; padding is never scored", ok=(None,)),
    # -- GRPOConfig's (TRL 1.16) keys that are not PPOConfig fields ---------------------------------
    "num_generations_eval": Key("note", "held-out prompts are scored greedily, one completion each", ok=(None,)),
    "chat_template_kwargs": Key("note", "the tokenizer's chat template runs with its defaults", ok=(None, {})),
    "cache_implementation": Key("note", "the rollout engine manages its own KV cache", ok=(None,)),
    "vllm_model_impl": Key("note", "vLLM picks its own model implementation", ok=("vllm",)),
    "vllm_structured_outputs_regex": Key("note", "no constrained decoding", ok=(None,)),
    "vllm_server_host": Key("refuse", "give the servers' URLs as vllm_server_base_url (one or a list)"),
    "vllm_server_port": Key("refuse", "give the servers' URLs as vllm_server_base_url (one or a list)"),
    "vllm_server_timeout": Key("note", "a server is waited for with backoff (engine_options: {reconnect_timeout: S})"),
    "vllm_group_port": Key("note", "adapters reach servers as files, not through a NCCL weight group"),
    "vllm_max_model_length": Key("note", "the in-process engine's length is max_prompt_length + "
                                         "max_completion_length", ok=(None,)),
    "vllm_tensor_parallel_size": Key("note", "the in-process engine runs on this process's device; for tensor "
                                             "parallel rollouts start `align serve` servers", ok=(1,)),
    "vllm_importance_sampling_cap": Key(_rename("vllm_importance_sampling_clip_max"), "TRL's deprecated name"),
    "delta": Key("note", "no two-sided clipping (TRL's delta)", ok=(None,)),
    "multi_objective_aggregation": Key("note", "rewards are summed with reward_weights, then normalised "
                                               "(TRL's default)", ok=("sum_then_normalize",)),
    "top_entropy_quantile": Key("note", "every completion token is trained", ok=(1.0, 1)),
    "use_adaptive_entropy": Key("note", "entropy_coef is fixed", ok=(False,)),
    "max_tool_calling_iterations": Key("note", "no tool calling", ok=(None,)),
    "off_policy_mask_threshold": Key("note", "no off-policy masking", ok=(None,)),
    "log_multimodal": Key("note", "text rollouts only"),
    "log_unique_prompts": Key("note", "log_completions writes every completion with its prompt"),
    "log_completions_hub_repo": Key("note", "nothing is uploaded", ok=(None,)),
    "use_transformers_continuous_batching": Key("note", "use_vllm: false samples with transformers' generate",
                                                ok=(False,)),
    "transformers_continuous_batching_config": Key("note", "no continuous batching", ok=(None, {})),
    "use_transformers_paged": Key("note", "use_vllm: false samples with transformers' generate", ok=(False,)),
    "cast_lm_head_to_fp32": Key("note", "the LM head runs in the base's dtype", ok=(False,)),
    "ds3_gather_for_generation": Key("note", "no DeepSpeed; the engine gets the adapter only"),
    "sapo_temperature_neg": Key("note", "only read with loss_type: sapo (not implemented)"),
    "sapo_temperature_pos": Key("note", "only read with loss_type: sapo (not implemented)"),
    "vespo_k_pos": Key("note", "only read with loss_type: vespo (not implemented)"),
    "vespo_lambda_pos": Key("note", "only read with loss_type: vespo (not implemented)"),
    "vespo_k_neg": Key("note", "only read with loss_type: vespo (not implemented)"),
    "vespo_lambda_neg": Key("note", "only read with loss_type: vespo (not implemented)"),
    "entropy_coef_min": Key("note", "only read with use_adaptive_entropy: true (not implemented)"),
    "entropy_coef_max": Key("note", "only read with use_adaptive_entropy: true (not implemented)"),
    "entropy_coef_delta": Key("note", "only read with use_adaptive_entropy: true (not implemented)"),
    "entropy_target": Key("note", "only read with use_adaptive_entropy: true (not implemented)"),
    "wandb_log_unique_prompts": Key("note", "log_completions writes every completion with its prompt"),
    # A recipe without dataset_name (SFT) reads the name or file as its train_file.
    "dataset_name": Key(_rename("train_file"), "a dataset name or file"),
}


def carry_over(data: dict, fields: set[str], where, lines: dict) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """(data with TRL's keys mapped or dropped, notes to print, (key, problem) pairs) for a config's top level.

    `where(key)` gives `file:line: key`; a mapped value's field takes its key's place in `lines`, so a
    bad value is reported at the line that set it. Keys that are fields, or not in TRL_KEYS, are left
    for the caller.
    """
    out = {k: v for k, v in data.items() if k in fields or k not in TRL_KEYS}
    notes, problems = [], []
    for key, value in data.items():
        if key in fields or key not in TRL_KEYS:
            continue
        action, reason, ok = TRL_KEYS[key]
        if action == "refuse":
            problems.append((key, f"{where(key)}: not supported here: {reason}"))
        elif action == "note":
            if ok is ANY or _same_as_any(value, ok):
                notes.append(f"{where(key)}: no effect here: {reason}")
            else:
                allowed = " or ".join(_text(v) for v in ok)
                problems.append((key, f"{where(key)}: {_text(value)} is not supported here (only {allowed}): {reason}"))
        else:
            try:
                updates, note = action(value, out)
            except ValueError as e:
                problems.append((key, f"{where(key)}: {_text(value)}: {e}"))
                continue
            missing = sorted(set(updates) - fields)
            if missing and ok is not ANY and _same_as_any(value, ok):  # what this recipe does anyway
                notes.append(f"{where(key)}: no effect here: {reason}")
                continue
            if missing:
                problems.append((key, f"{where(key)}: not supported by this recipe (it has no {', '.join(missing)})"))
                continue
            out.update(updates)
            for field in updates:
                if key in lines:
                    lines.setdefault(field, lines[key])
            notes.append(f"{where(key)}: {_text(value)}: {note}")
    return out, notes, problems


def _same_as_any(value, allowed: tuple) -> bool:
    if isinstance(value, str):
        try:  # PyYAML reads 1e-8 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    # True == 1 in Python; a bool stands only for a bool.
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in allowed)


def _text(value) -> str:
    """A value as YAML spells it (true, null, [1.0, 0.5]), so the message matches the file."""
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)
