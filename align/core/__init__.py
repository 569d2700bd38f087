"""The ground floor: one frozen base and its LoRA adapters.

`base.SharedBase` (the only copy of the weights; the reference is the base with adapters off),
`lora` (where adapters go and their settings), `loading` (model paths, dtypes, tokenizers),
`logprobs`, `policy_init` (starting from a saved adapter), device and process setup
(`hardware`, `distributed`, `fsdp`), and safe files (`atomic`, `adapter_files`).
Nothing here imports any other wing.
"""
