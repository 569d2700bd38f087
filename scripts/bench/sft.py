"""SFT speed and memory: align's train_sft vs TRL's SFTTrainer + PEFT, at two precisions on two data shapes.

    python scripts/bench/sft.py            # SmolLM2-135M-Instruct (offline), 8 processes
    python scripts/bench/sft.py --quick    # tiny model, a smoke run of every cell

Every contender runs in its own process (peak RSS is per process) on the same prompt-completion rows
(plain strings: ours with chat_template: false, as TRL leaves string rows), batch, max_length, LoRA
(configs/sft_smollm2.yaml's: rank 8, alpha 32, every linear layer, no dropout), learning rate,
completion-only loss (both sides' default for prompt-completion rows) and gradient checkpointing
(TRL's SFT default, on; ours keeps no layer's activations). Padding: each side pads a batch to its
longest row. The matrix (scripts/bench/matrix.py): float32 vs TRL bf16=False, ours `bf16: true` vs TRL
bf16=True autocast; arithmetic rows (--batch 8, --max-length 128: configs/sft_smollm2.yaml) and realistic
rows (--realistic-batch 2, --realistic-max-length 256: TRL's 1024 takes minutes a step on 2 shared cores).
Steps/s is 1 / the median step time after a warm-up step: ours from metrics.jsonl `step_s`, TRL's from
step-end times. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json

from matrix import add_arguments, bench_main
from measure import run_rates, trl_clock, trl_rates

LR = 2e-4  # configs/sft_smollm2.yaml


def worker_ours(args) -> dict:
    from align.recipes.sft import SFTConfig, train_sft

    precision = {"bf16": True} if args.precision == "bf16" else {"dtype": "float32"}
    config = SFTConfig(model_name_or_path=args.model, train_file=args.data, output_dir=args.out, report_to=["none"],
                       per_device_train_batch_size=args.batch, max_length=args.max_length, max_steps=args.steps + 1,
                       save_steps=0, learning_rate=LR, eval_fraction=0.0, lora_r=8, lora_alpha=32, logging_steps=1,
                       gradient_checkpointing=True, chat_template=False, seed=0, **precision)
    train_sft(config)
    return run_rates(args.out)


def worker_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("json", data_files=str(args.data), split="train")
    clock, times = trl_clock()
    config = SFTConfig(output_dir=args.out, per_device_train_batch_size=args.batch, max_length=args.max_length,
                       max_steps=args.steps + 1, learning_rate=LR, logging_steps=1, save_strategy="no",
                       report_to="none", use_cpu=True, gradient_checkpointing=True, bf16=args.precision == "bf16",
                       completion_only_loss=True, dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[clock])
    trainer.train()
    return trl_rates(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p, batch=8, max_length=128)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker_ours(args) if args.worker == "ours" else worker_trl(args)))
        return
    print(json.dumps(bench_main("sft", __file__, args, shape="sft")))


if __name__ == "__main__":
    main()
