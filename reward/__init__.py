"""Reward models (LoRA adapters + scalar heads on the shared base) and programmatic rewards."""
