"""Rows in, token ids out: TRL's dataset formats for every recipe.

`sources` reads files, saved datasets, dataset names and Python objects; `preference` validates
and tokenises preference pairs; `sft` does the same for SFT rows; `prompt_extraction` splits a
shared prompt out of whole conversations; `token_cache` caches tokenised rows on disk;
`prompts` encodes rollout prompts; `cli` is `align data check`. Imports only `align.core`.
"""
