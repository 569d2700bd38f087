"""The lifecycle every recipe shares: config, run folder, steps, checkpoints, metrics.

`config` (the fields every recipe has) and `config_parser` (YAML and flags into those dataclasses),
`lifecycle.Trainer` (setup -> steps -> checkpoint -> save -> close, calling a recipe's hooks),
`preference` (the part DPO and reward models share), `run_folder`, `state` (checkpoints and
exact resume), `metrics` and `trackers`, `plot`, `advise`, and `cli` (the flags every recipe takes).
"""
