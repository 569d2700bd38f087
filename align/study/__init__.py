"""`align study`: the LoRA-versus-full-fine-tuning findings this toolkit's defaults rest on, checked on the
user's machine. `verdict.py` holds the rules that turn per-seed results into CONFIRM / REFUTE / INCONCLUSIVE."""
