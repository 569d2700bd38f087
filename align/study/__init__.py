"""`align study NAME`: the LoRA-versus-full-fine-tuning findings this toolkit's defaults rest on, checked on the
user's machine within a time budget (docs/study.md). `cli.py` is the command, `runner.py` and `plan.py` the
calibration and the runs, one module per study family, `verdict.py` the rules that turn per-seed results into
CONFIRM / REFUTE / INCONCLUSIVE, `report.py` and `plots.py` what the output folder holds."""
