"""Chat prompts from a model's own chat template, without a template engine.

Instruct models ship a Jinja chat template (GGUF metadata ``tokenizer.chat_template``, kept as
``Tokenizer.chat_template``). The project has no Jinja dependency, so :func:`render_chat` renders
the family of templates it meets -- **ChatML** (``<|im_start|>{role}\\n{content}<|im_end|>\\n``
per message, then ``<|im_start|>assistant\\n`` as the generation prompt), which SmolLM2,
Qwen and many others use -- for the plain case of system / user / assistant messages. A
template's *default system message* (SmolLM2 inserts "You are a helpful AI assistant named
SmolLM, trained by Hugging Face" when the conversation does not start with one) is read from the
template text. Any other template raises ``NotImplementedError`` rather than being guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["CHATML", "template_family", "default_system_message", "render_chat", "chat_prompt"]

CHATML = "chatml"
_ROLES = ("system", "user", "assistant")
_CHATML_MESSAGE = re.compile(r"'<\|im_start\|>'\s*\+\s*message\[['\"]role['\"]\]")
_DEFAULT_SYSTEM = re.compile(
  r"messages\[0\]\[['\"]role['\"]\]\s*!=\s*['\"]system['\"]\s*%\}\s*\{\{\s*'<\|im_start\|>system"
  r"(?:\\n|\n)(?P<text>(?:[^'\\]|\\.)*?)<\|im_end\|>"
)


def template_family(template: str | None) -> str:
  """``"chatml"`` for a ChatML template; raises for anything else (or no template)."""
  if not template:
    raise NotImplementedError("the tokenizer has no chat template")
  if _CHATML_MESSAGE.search(template):
    return CHATML
  raise NotImplementedError(
    "only ChatML chat templates (<|im_start|>role ... <|im_end|>) can be rendered without Jinja; "
    f"got a template starting {template[:80]!r}"
  )


def default_system_message(template: str) -> str | None:
  """The system message a ChatML template inserts when the conversation has none, or None."""
  m = _DEFAULT_SYSTEM.search(template)
  if m is None:
    return None
  return m.group("text").encode("latin-1", "backslashreplace").decode("unicode_escape")


def render_chat(
  template: str | None,
  messages: Sequence[Mapping[str, str]],
  *,
  add_generation_prompt: bool = False,
) -> str:
  """The text the template renders for ``messages`` (``{"role", "content"}`` dicts).

  Matches Jinja's rendering of the template for roles system / user / assistant: the default
  system message first when the conversation does not start with a system message, one
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` block per message, and
  ``<|im_start|>assistant\\n`` when ``add_generation_prompt``.
  """
  template_family(template)
  assert template is not None  # template_family raised otherwise
  if not messages:
    raise ValueError("messages must not be empty")
  for i, msg in enumerate(messages):
    if msg.get("role") not in _ROLES or not isinstance(msg.get("content"), str):
      raise ValueError(
        f"message {i} must have a role in {_ROLES} and a string content, got {dict(msg)!r:.80}"
      )
  parts = []
  system = default_system_message(template)
  if system is not None and messages[0]["role"] != "system":
    parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
  parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)


def chat_prompt(template: str | None, instruction: str, system: str | None = None) -> str:
  """The generation prompt of a single-turn instruction (optionally with a system message)."""
  messages = ([{"role": "system", "content": system}] if system is not None else []) + [
    {"role": "user", "content": instruction}
  ]
  return render_chat(template, messages, add_generation_prompt=True)
