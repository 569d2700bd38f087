"""A reward model as a plain transformers sequence classifier (num_labels=1, the head as `score`).

Two writers use it: `align export --reward` (an adapter merged into its base first) and a full
fine-tuning reward run (`use_peft: false`), whose trained base is already the decoder. Either folder loads
with `AutoModelForSequenceClassification.from_pretrained` alone, as TRL's RewardTrainer output does.

Where the score is read must agree. RewardModel reads the last position whose attention mask is 1;
transformers reads the rightmost token that is not `pad_token_id`. Sequences end in EOS, and many
tokenizers pad with EOS, so with that pad id transformers would read the token before EOS. The
classifier therefore gets a pad token of its own when its tokenizer's could appear in a sequence (one
new embedding row, used by nothing else), and pads on the right, where positions count from 0 as
RewardModel's do.
"""

from __future__ import annotations

import torch

from align.core.errors import UserError

PAD_TOKEN = "<|align_pad|>"
# Scored by both the reward model and the written classifier: a written folder must agree on them.
CHECK_PAIRS = (
    ("What is 12+7?", "19"),
    ("What is 12+7?", "12 + 7 = 20"),
    ("Say hello.", "Hello! How can I help you today?"),
    ("The quick brown fox", "jumps over the lazy dog."),
)


def needs_own_pad(tokenizer) -> bool:
    """True when the pad token is missing or may occur inside a sequence (EOS, BOS, the chat template's)."""
    pad = tokenizer.pad_token_id
    if pad is None or pad in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        return True
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and tokenizer.pad_token in template


def classifier_from(causal, head_weight: torch.Tensor, tokenizer, dtype: torch.dtype):
    """A sequence classifier holding `causal`'s decoder and `head_weight` (1, H) as `score`, in memory.

    `tokenizer` is changed in place (its own pad token where needed, right padding): pass a copy when
    the caller keeps using it.
    """
    from transformers import AutoModelForSequenceClassification

    config = causal.config.__class__.from_dict(causal.config.to_dict())
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    decoder = getattr(model, model.base_model_prefix)
    decoder.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise UserError(f"{type(model).__name__}: no `score` layer to hold the reward head")
    with torch.no_grad():
        model.score.weight.copy_(head_weight.to(dtype))
    if needs_own_pad(tokenizer):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@torch.no_grad()
def classifier_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) logits of a classifier on (N, T) ids right-padded with its own pad id, and their mask."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()
