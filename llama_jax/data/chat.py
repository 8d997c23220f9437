"""Chat formats: dialogs to token ids, with per-token masks of what a fine-tune learns and what is format.

Llama 3 ("The Llama 3 Herd of Models" §4.1; Meta's llama-models `models/llama3/chat_format.py`):
  `<|begin_of_text|>` then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` (content stripped, as Meta does),
  optionally ending with an open assistant header for the model to complete. Roles: system, user, assistant,
  ipython (a tool's output). An assistant message that calls a tool ends with `<|eom_id|>` (end of message:
  the turn goes on after the tool's answer) instead of `<|eot_id|>`; a built-in tool call (code interpreter,
  search) opens with `<|python_tag|>`, as Meta's `encode_message` writes it.
ChatML (SmolLM2, Qwen): `<|im_start|>{role}\\n{content}<|im_end|>\\n`, no BOS, content as given.

A message is a dict: `role`, `content` (non-empty string), and optionally `eom: true` (Llama 3 assistant:
end with <|eom_id|>) and `python_tag: true` (Llama 3 assistant: open with <|python_tag|>); nothing else.

Per token, `render` gives two masks (the data side of issue 10's post-training):
  trained  1 on assistant content (with its <|python_tag|>) and its terminator (<|eot_id|>/<|eom_id|>/
           <|im_end|>): what SFT learns;
  format   1 on BOS, the header (start id, role name, end id, "\\n\\n" / ChatML's "\\n"), the terminators and
           ChatML's "\\n" after <|im_end|>: what DPO masks out of its term [P §4.1.4].
The same masks come out of both formats; `ChatFormat` is the small value that tells them apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from llama_jax.data.tokenizers import DIALOG_ROLES, Tokenizer
from llama_jax.errors import ConfigError

ROLES = DIALOG_ROLES  # system, user, assistant, ipython
MESSAGE_KEYS = ("role", "content", "eom", "python_tag")
Kind = Literal["llama3", "chatml"]


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """The special ids of one chat format; text pieces (role names, newlines) come from the tokenizer."""

  kind: Kind
  start_id: int  # <|start_header_id|> / <|im_start|>
  end_id: int  # <|eot_id|> / <|im_end|>
  header_end_id: int | None = None  # <|end_header_id|> (Llama 3 only)
  eom_id: int | None = None  # Llama 3 only
  python_tag_id: int | None = None  # Llama 3 only
  bos_id: int | None = None  # Llama 3 opens a dialog with <|begin_of_text|>; ChatML with nothing

  def __post_init__(self):
    if self.kind not in ("llama3", "chatml"):
      raise ConfigError(f"ChatFormat.kind={self.kind!r}: use 'llama3' or 'chatml'.")
    if self.kind == "llama3" and None in (self.header_end_id, self.eom_id, self.python_tag_id, self.bos_id):
      raise ConfigError("ChatFormat(kind='llama3') needs header_end_id, eom_id, python_tag_id and bos_id; "
                        "build it with ChatFormat.llama3(tokenizer).")

  @classmethod
  def llama3(cls, tok: Tokenizer) -> "ChatFormat":
    st = _special_tokens(tok)
    need = ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
    missing = [n for n in need if n not in st]
    if missing:
      raise ConfigError(f"--tokenizer: has no Llama 3 chat tokens {missing}; use Meta's tokenizer file or "
                        "our SentencePiece model's tokenizer.with_chat_tokens().")
    return cls("llama3", start_id=st["<|start_header_id|>"], end_id=st["<|eot_id|>"],
               header_end_id=st["<|end_header_id|>"], eom_id=st["<|eom_id|>"],
               python_tag_id=st["<|python_tag|>"], bos_id=tok.bos_id)

  @classmethod
  def chatml(cls, tok: Tokenizer) -> "ChatFormat":
    st = _special_tokens(tok)
    if "<|im_start|>" not in st or "<|im_end|>" not in st:
      raise ConfigError("--tokenizer: has no <|im_start|>/<|im_end|> in its special_tokens; ChatML needs a "
                        "tokenizer that defines them (e.g. SmolLM2's).")
    return cls("chatml", start_id=st["<|im_start|>"], end_id=st["<|im_end|>"])

  @classmethod
  def for_tokenizer(cls, tok: Tokenizer) -> "ChatFormat":
    """Llama 3 where the tokenizer has <|start_header_id|>, else ChatML where it has <|im_start|>."""
    st = _special_tokens(tok)
    if "<|start_header_id|>" in st:
      return cls.llama3(tok)
    if "<|im_start|>" in st:
      return cls.chatml(tok)
    raise ConfigError("--tokenizer: has neither Llama 3 (<|start_header_id|>) nor ChatML (<|im_start|>) "
                      "chat tokens; for our SentencePiece models use tokenizer.with_chat_tokens().")


def _special_tokens(tok: Tokenizer) -> Mapping[str, int]:
  """Name -> id of the tokenizer's special tokens (`special_tokens` attribute; empty if none)."""
  return getattr(tok, "special_tokens", None) or {}


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A rendered dialog: token ids and per-token 0/1 masks (see the module docstring), all int32 [T]."""

  ids: np.ndarray
  trained: np.ndarray
  format: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


def check_message(m: Any, fmt: ChatFormat) -> None:
  """ConfigError (one line: what is wrong; the fix) unless `m` is a message this format can render."""
  if not isinstance(m, dict):
    raise ConfigError(f"a message is a {type(m).__name__}, not an object; write "
                      '{"role": ..., "content": ...}.')
  unknown = sorted(set(m) - set(MESSAGE_KEYS))
  if unknown:
    raise ConfigError(f"message has unknown keys {unknown}; a message holds only {list(MESSAGE_KEYS)}.")
  role = m.get("role")
  if role not in ROLES:
    raise ConfigError(f"message role {role!r} is not one of {ROLES}; use one of those.")
  content = m.get("content")
  if not isinstance(content, str):
    raise ConfigError(f"{role} message content is {type(content).__name__}, not a string; write the text "
                      "as a JSON string.")
  if not content.strip():
    raise ConfigError(f"{role} message content is empty; drop the message or give it text.")
  for flag in ("eom", "python_tag"):
    if flag not in m:
      continue
    if not isinstance(m[flag], bool):
      raise ConfigError(f"message {flag!r} is {m[flag]!r}, not true/false; write a JSON boolean.")
    if m[flag] and role != "assistant":
      raise ConfigError(f"{role} message has {flag}=true; only assistant messages (tool calls) carry it.")
    if m[flag] and fmt.kind != "llama3":
      raise ConfigError(f"message has {flag}=true but the {fmt.kind} format has no such token; drop it.")


def check_dialog(messages: Any, fmt: ChatFormat, what: str = "messages") -> None:
  if not isinstance(messages, list):
    raise ConfigError(f"{what} is a {type(messages).__name__}, not a list of messages; write a JSON list.")
  if not messages:
    raise ConfigError(f"{what} is empty; give at least one message.")
  for m in messages:
    check_message(m, fmt)


def _header(tok: Tokenizer, fmt: ChatFormat, role: str) -> list[int]:
  if role not in ROLES:
    raise ConfigError(f"message role {role!r} is not one of {ROLES}; use one of those.")
  if fmt.kind == "llama3":
    # Meta encodes the role and "\n\n" as separate texts.
    return [fmt.start_id, *tok.encode(role), fmt.header_end_id, *tok.encode("\n\n")]
  # ChatML: "{role}\n" as one text, as a Hugging Face template's string tokenizes.
  return [fmt.start_id, *tok.encode(role + "\n")]


def _message_parts(tok: Tokenizer, fmt: ChatFormat, m: dict) -> tuple[list[int], list[int], list[int],
                                                                       list[int]]:
  """(header, body, terminator, trailer) ids of one message."""
  header = _header(tok, fmt, m["role"])
  if fmt.kind == "llama3":
    body = [fmt.python_tag_id] if m.get("python_tag") else []
    body += tok.encode(m["content"].strip())
    return header, body, [fmt.eom_id if m.get("eom") else fmt.end_id], []
  return header, tok.encode(m["content"]), [fmt.end_id], tok.encode("\n")


def render(tok: Tokenizer, fmt: ChatFormat, messages: Sequence[dict], add_generation_prompt: bool = False,
           bos: bool = True) -> Rendered:
  """Token ids and masks of a dialog (`bos=False` leaves out the format's BOS: a continuation)."""
  ids, trained, form = [], [], []

  def put(part: list[int], is_trained: int, is_format: int) -> None:
    ids.extend(part)
    trained.extend([is_trained] * len(part))
    form.extend([is_format] * len(part))

  if bos and fmt.bos_id is not None:
    put([fmt.bos_id], 0, 1)
  for m in messages:
    header, body, term, trailer = _message_parts(tok, fmt, m)
    learn = int(m["role"] == "assistant")
    put(header, 0, 1)
    put(body, learn, 0)
    put(term, learn, 1)
    put(trailer, 0, 1)
  if add_generation_prompt:
    put(_header(tok, fmt, "assistant"), 0, 1)
  return Rendered(np.asarray(ids, np.int32), np.asarray(trained, np.int32), np.asarray(form, np.int32))


# --- The Llama 3 functions of the first version (a Llama 3 tokenizer, <|eot_id|> only) -----------------

def encode_header(tok: Tokenizer, role: str) -> list[int]:
  return _header(tok, ChatFormat.llama3(tok), role)


def encode_message(tok: Tokenizer, message: dict) -> list[int]:
  """`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, content stripped (Meta)."""
  fmt = ChatFormat.llama3(tok)
  return sum(_message_parts(tok, fmt, message), [])


def encode_dialog(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
  """BOS, each message, then (by default) an open assistant header for the model to complete."""
  return render(tok, ChatFormat.for_tokenizer(tok), messages, add_generation_prompt).ids.tolist()


def encode_dialog_with_mask(tok: Tokenizer, messages: Sequence[dict],
                            add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """Ids and a 0/1 mask that is 1 on assistant content and its terminator (what SFT learns)."""
  r = render(tok, ChatFormat.for_tokenizer(tok), messages, add_generation_prompt)
  return r.ids.tolist(), r.trained.tolist()
