"""Does torch's FSDP2 (`fully_shard`) train a PEFT LoRA adapter on a frozen transformers Llama here?

Standalone (no align): a tiny random Llama, LoRA on every linear layer, each decoder layer and the
root as FSDP units (frozen base tensors and trainable LoRA tensors in one unit), two
forward+backward+AdamW steps. Prints each process's share of the parameter bytes, the losses, and a
LoRA tensor's norm, which must be the same on every process (FSDP averaged the gradients).

    torchrun --nproc_per_node 2 scripts/fsdp_probe.py     # gloo on CPUs, NCCL on GPUs
"""

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
if torch.cuda.is_available():
    torch.cuda.set_device(rank % torch.cuda.device_count())
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
full = sum(p.numel() * p.element_size() for p in model.parameters())
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
print(f"rank {rank}: holds {local} of {full} parameter bytes", flush=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
torch.manual_seed(1 + rank)  # each process its own batch
ids = torch.randint(0, 128, (2, 8), device=next(model.parameters()).device)
for step in range(2):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"rank {rank} step {step} loss {loss.item():.5f}", flush=True)
lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
print(f"rank {rank}: a lora_B's norm {lora_b.full_tensor().norm().item():.6f} (equal on every rank)", flush=True)
dist.destroy_process_group()
