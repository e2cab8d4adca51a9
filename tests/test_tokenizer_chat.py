"""Chat templates: npllama's hand-written renderers give Hugging Face's apply_chat_template ids.

Llama 3 and Llama 2 use the official template strings (Meta-Llama-3-8B-Instruct, Llama-2-7b-chat-hf)
with the llama-bpe / llama-spm vocabularies; SmolLM2 uses the template in its GGUF.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer_fixtures import LLAMA_BPE, LLAMA_SPM, hf_from_gguf, hf_smollm2, npl, smollm2_path

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    r"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Tell me about Ærø and 東京, briefly 🙂"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": " Bonjour ! "}, {"role": "user", "content": "\n\nAnd 1,234,567?"}],
]


def _hf_ids(hf, messages, template, gen):
    text = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, tokenize=False)
    return text, hf.encode(text, add_special_tokens=False)


CASES = {
    "llama3": (LLAMA_BPE, "llama-bpe", LLAMA3_TEMPLATE),
    "llama2": (LLAMA_SPM, "llama-spm", LLAMA2_TEMPLATE),
    "chatml": (None, None, None),
}


def _pair(fmt):
    if fmt == "chatml":
        hf = hf_smollm2()
        return npl(smollm2_path()), hf, hf.chat_template
    path, name, template = CASES[fmt]
    return npl(path), hf_from_gguf(name), template


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("fmt", ["llama3", "llama2", "chatml"])
def test_chat_template_matches_hf(fmt, conv, gen):
    tok, hf, template = _pair(fmt)
    assert tok.chat_format == fmt
    messages = CONVERSATIONS[conv]
    text, ids = _hf_ids(hf, messages, template, gen)
    assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == text
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == ids


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=4), st.booleans())
def test_chat_fuzz_contents(contents, system):
    """Arbitrary contents (special-token text excluded: HF would parse it, npllama keeps it as text)."""
    contents = [c.replace("<", "(") for c in contents]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    if system:
        messages = [{"role": "system", "content": "Be brief."}] + messages
    for fmt in ("llama3", "llama2", "chatml"):
        tok, hf, template = _pair(fmt)
        assert tok.apply_chat_template(messages) == _hf_ids(hf, messages, template, True)[1], fmt


def test_chatml_default_system_prompt():
    tok = npl(smollm2_path())
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    no_default = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert "SmolLM" not in no_default


def test_llama2_ids_known():
    """<s>[INST] keeps the '▁' before '[' (518), as the official Llama-2-chat tokenizer and llama.cpp do."""
    tok = npl(LLAMA_SPM)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[:4] == [1, 518, 25580, 29962]


def test_chat_special_text_in_content_stays_text():
    tok = npl(LLAMA_BPE)
    ids = tok.apply_chat_template([{"role": "user", "content": "<|eot_id|>"}], add_generation_prompt=False)
    assert ids.count(tok.token_to_id("<|eot_id|>")) == 1  # only the template's own


def test_llama2_roles_must_alternate():
    with pytest.raises(ValueError, match="alternate"):
        npl(LLAMA_SPM).apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
