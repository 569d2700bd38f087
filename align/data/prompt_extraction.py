"""The prompt of a preference row that has none of its own, as TRL's `maybe_extract_prompt` finds it.

Three layouts carry the prompt inside `chosen` and `rejected`:

  implicit conversations  chosen/rejected are whole conversations sharing every message but the
                          last assistant turn: the shared messages are the prompt.
  H4 UltraFeedback        a string `prompt` next to conversational chosen/rejected that repeat it as
                          their user turn. As TRL does, the string is ignored (its type differs from
                          the answers') and the prompt is taken from the conversations.
  Anthropic HH            strings "\\n\\nHuman: ... \\n\\nAssistant: ..." with no prompt: the prompt is
                          the longest common prefix of chosen and rejected, cut back to end at its last
                          "\\n\\nAssistant:" (a common prefix can run into the answers when both begin
                          alike); each answer is the rest of its string, leading space included, so
                          prompt + answer gives back the original text.
"""

from __future__ import annotations

HH_ASSISTANT = "\n\nAssistant:"


def common_prefix_length(a, b) -> int:
    """Length of the longest common prefix of two strings (or two lists)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen answer, rejected answer) of an Anthropic HH-style pair, or None if not one."""
    shared = common_prefix_length(chosen, rejected)
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # the marker must lie wholly inside the shared part
    if cut < 0:
        return None
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def split_conversations(chosen: list, rejected: list) -> tuple[list, list, list] | None:
    """(prompt messages, [last chosen turn], [last rejected turn]) when all earlier messages are shared."""
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        return None
    return chosen[:-1], chosen[-1:], rejected[-1:]


def extract_prompt(chosen, rejected) -> tuple[tuple | None, str]:
    """((prompt, chosen, rejected), "") split out of a row without a usable prompt, or (None, why not)."""
    if isinstance(chosen, list):
        split = split_conversations(chosen, rejected)
        why = ("without a prompt of the answers' type, chosen and rejected must be conversations sharing every "
               "message but the last")
    else:
        split = split_hh(chosen, rejected)
        why = (f"missing; expected a non-empty string (or Anthropic HH-style text in chosen and rejected sharing "
               f"everything up to the last {HH_ASSISTANT.strip()!r})")
    return (split, "") if split else (None, why)
