"""The Llama 3 chat format: dialogs to token ids, and the mask of what a fine-tune learns.

`<|begin_of_text|>` then, per message, `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`
(content stripped, as Meta's `ChatFormat` does), optionally ending with an open assistant header for the
model to complete ("The Llama 3 Herd of Models" §4.1; Meta's llama-models `chat_format.py`).
The tokenizer must have the chat special tokens (`start_header_id`, `end_header_id`, `eot_id`), as Meta's
Llama 3 tokenizer file does.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_jax.data.tokenizers import DIALOG_ROLES, Llama3Tokenizer
from llama_jax.errors import ConfigError


def encode_header(tok: Llama3Tokenizer, role: str) -> list[int]:
  if role not in DIALOG_ROLES:
    raise ConfigError(f"message role {role!r} is not one of {DIALOG_ROLES}.")
  return [tok.start_header_id, *tok.encode(role), tok.end_header_id, *tok.encode("\n\n")]


def encode_message(tok: Llama3Tokenizer, message: dict) -> list[int]:
  """`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, content stripped (Meta)."""
  return [*encode_header(tok, message["role"]), *tok.encode(message["content"].strip()), tok.eot_id]


def encode_dialog(tok: Llama3Tokenizer, messages: Sequence[dict],
                  add_generation_prompt: bool = True) -> list[int]:
  """BOS, each message, then (by default) an open assistant header for the model to complete."""
  return encode_dialog_with_mask(tok, messages, add_generation_prompt)[0]


def encode_dialog_with_mask(tok: Llama3Tokenizer, messages: Sequence[dict],
                            add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """Ids and a 0/1 mask that is 1 on assistant content and its `<|eot_id|>` (what SFT learns)."""
  ids, mask = [tok.bos_id], [0]
  for m in messages:
    header = encode_header(tok, m["role"])
    body = [*tok.encode(m["content"].strip()), tok.eot_id]
    ids += header + body
    mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
  if add_generation_prompt:
    header = encode_header(tok, "assistant")
    ids += header
    mask += [0] * len(header)
  return ids, mask
