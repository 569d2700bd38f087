"""Reward-model training speed and memory: align's RewardTrainer vs TRL's RewardTrainer + PEFT (SEQ_CLS).

    python scripts/bench/reward_vs_trl.py            # SmolLM2-135M-Instruct (offline), 8 processes
    python scripts/bench/reward_vs_trl.py --quick    # tiny model, a smoke run of every cell

A file of its own beside reward.py, which measures held-out accuracy of one config's run: this one
times steps against TRL over the matrix of scripts/bench/matrix.py (float32 vs TRL bf16=False, ours
`bf16: true` vs TRL bf16=True autocast; arithmetic rows and realistic rows). Every contender runs in its
own process on the same preference pairs (plain strings: ours with chat_template: false), batch (pairs
per step: --batch 4 on arithmetic rows, --realistic-batch 2 on realistic ones), max_length (128; 256), LoRA (rank 8, alpha 32, every linear layer, no dropout; TRL's score head trained
in full through PEFT's modules_to_save, ours beside the adapter), learning rate and gradient
checkpointing (on, TRL's default; ours keeps no layer's activations). Steps/s is 1 / the median step
time after a warm-up step: ours from metrics.jsonl `step_s`, TRL's from step-end times. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json

from matrix import add_arguments, bench_main
from measure import run_rates, trl_clock, trl_rates

LR = 5e-4  # configs/reward_demo.yaml


def worker_ours(args) -> dict:
    from reward.train import RewardConfig, RewardTrainer

    precision = {"bf16": True} if args.precision == "bf16" else {"dtype": "float32"}
    config = RewardConfig(model_name_or_path=args.model, train_file=args.data, output_dir=args.out,
                          report_to=["none"], per_device_train_batch_size=args.batch, max_length=args.max_length,
                          max_steps=args.steps + 1, save_steps=0, learning_rate=LR, eval_fraction=0.0, lora_r=8,
                          lora_alpha=32, logging_steps=1, gradient_checkpointing=True, chat_template=False, seed=0,
                          **precision)
    RewardTrainer(config).train()
    return run_rates(args.out)


def worker_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    data = load_dataset("json", data_files=str(args.data), split="train")
    clock, times = trl_clock()
    config = RewardConfig(output_dir=args.out, per_device_train_batch_size=args.batch, max_length=args.max_length,
                          max_steps=args.steps + 1, learning_rate=LR, logging_steps=1, save_strategy="no",
                          report_to="none", use_cpu=True, gradient_checkpointing=True,
                          bf16=args.precision == "bf16", dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                            callbacks=[clock])
    trainer.train()
    return trl_rates(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p, batch=4, max_length=128)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker_ours(args) if args.worker == "ours" else worker_trl(args)))
        return
    print(json.dumps(bench_main("reward", __file__, args)))


if __name__ == "__main__":
    main()
