"""Log-probs of families whose forward changes lm_head's output: Gemma-2's final_logit_softcapping,
Cohere's logit_scale (multiplied) and Granite's logits_scaling (divided).

align.core.logprobs goes around `forward` (hidden states -> lm_head in chunks), so it has to apply the
same transform itself, once. The reference is log_softmax of transformers' own `forward` logits.
"""

from __future__ import annotations

import pytest
import torch

from align.core.base import SharedBase
from align.core.logprobs import completion_logprobs, logit_transform

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # A small cap (real Gemma-2: 30) so tanh bends the logits this tiny model makes.
    cfg = Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=50.0,
                       sliding_window=16)
    return Gemma2ForCausalLM(cfg)


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=3.5))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=0.25))


def _bigger_logits(model):
    # Random init gives logits near 0 where a cap or a scale hardly shows: widen lm_head.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("build,changes", [(_gemma2, "softcap"), (_cohere, "scale"), (_granite, "scale")])
def test_logprobs_equal_log_softmax_of_forward(build, changes):
    torch.manual_seed(0)
    model = _bigger_logits(build()).eval()
    base = SharedBase(model, tokenizer=None, name_or_path="tiny")
    scale, softcap = logit_transform(model.config)
    assert (softcap is not None) if changes == "softcap" else (scale != 1.0)
    ids = torch.randint(0, 97, (2, 12))
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    with torch.no_grad():
        ours = completion_logprobs(base, ids, attention, completion)
        ours_ent = completion_logprobs(base, ids, attention, completion, with_entropy=True)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1]
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]
    assert torch.allclose(ours, want, atol=1e-5), (ours - want).abs().max()
    # The transform must matter here, or the test proves nothing: the plain lm_head differs.
    plain = torch.log_softmax(model.get_output_embeddings()(model.model(input_ids=ids).last_hidden_state)
                              .float()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]
    assert (plain - want).abs().max() > 1e-2
    probs = torch.softmax(logits, -1)
    entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1) * completion[:, 1:]
    assert torch.allclose(ours_ent[0], want, atol=1e-5)
    assert torch.allclose(ours_ent[1], entropy, atol=1e-4)


def test_plain_llama_has_no_transform(tiny_llama):
    from transformers import AutoConfig

    assert logit_transform(AutoConfig.from_pretrained(tiny_llama)) == (1.0, None)


def test_unknown_family_with_a_scale_is_refused():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SMALL)
    cfg.logits_scaling = 8.0  # a family we have no entry for: guessing would give wrong log-probs
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        logit_transform(cfg)
