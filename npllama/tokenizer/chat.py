"""Chat templates, hand-written: Llama 3, Llama 2 ([INST] / <<SYS>>) and ChatML (SmolLM2).

No jinja at run time. The format is recognized from the template string a model ships (GGUF
`tokenizer.chat_template` or tokenizer_config.json), else from the vocabulary. A renderer returns
parts (text, is_special): the template's own special tokens are special, message content is
plain text, so special-token text typed by a user stays text.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

Part = tuple[str, bool]

LLAMA3, LLAMA2, CHATML = "llama3", "llama2", "chatml"


def detect_format(template: str | None, has_token, sentencepiece: bool) -> str | None:
    """Name the chat format from the template text, or from the vocabulary when there is none."""
    if template:
        if "<|start_header_id|>" in template:
            if "Cutting Knowledge Date" in template or "ipython" in template:
                return None  # Llama 3.1+ (tools, dates) is a different template
            return LLAMA3
        if "<|im_start|>" in template:
            return CHATML
        if "[INST]" in template:
            return LLAMA2
        return None
    if has_token("<|start_header_id|>"):
        return LLAMA3
    if has_token("<|im_start|>"):
        return CHATML
    if sentencepiece and has_token("<s>"):
        return LLAMA2
    return None


def chatml_default_system(template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when the first message is not a system one."""
    if not template or "messages[0]['role'] != 'system'" not in template:
        return None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
    return m.group(1).replace("\\n", "\n") if m else None


def render(fmt: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
           bos: str | None, eos: str | None, default_system: str | None = None) -> list[Part]:
    """Render `messages` in chat format `fmt` as (text, is_special) parts."""
    if fmt == LLAMA3:
        return _llama3(messages, add_generation_prompt, bos)
    if fmt == LLAMA2:
        return _llama2(messages, bos, eos)
    if fmt == CHATML:
        return _chatml(messages, add_generation_prompt, default_system)
    raise ValueError(f"unknown chat format {fmt!r}")


def _llama3(messages, add_generation_prompt, bos) -> list[Part]:
    # Meta-Llama-3-Instruct: bos once, then a header per message; content is trimmed
    parts: list[Part] = []
    for i, m in enumerate(messages):
        if i == 0 and bos:
            parts.append((bos, True))
        parts += [("<|start_header_id|>", True), (m["role"], False), ("<|end_header_id|>", True),
                  ("\n\n" + m["content"].strip(), False), ("<|eot_id|>", True)]
    if add_generation_prompt:
        parts += [("<|start_header_id|>", True), ("assistant", False), ("<|end_header_id|>", True), ("\n\n", False)]
    return parts


def _llama2(messages, bos, eos) -> list[Part]:
    # Llama-2-chat: the system prompt rides inside the first user turn; roles must alternate
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts: list[Part] = []
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        content = m["content"]
        if i == 0 and system is not None:
            content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
        if m["role"] == "user":
            if bos:
                parts.append((bos, True))
            parts.append(("[INST] " + content.strip() + " [/INST]", False))
        elif m["role"] == "assistant":
            parts.append((" " + content.strip() + " ", False))
            if eos:
                parts.append((eos, True))
    return parts


def _chatml(messages, add_generation_prompt, default_system) -> list[Part]:
    parts: list[Part] = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system" and default_system is not None:
            parts += [("<|im_start|>", True), ("system\n" + default_system, False), ("<|im_end|>", True), ("\n", False)]
        parts += [("<|im_start|>", True), (m["role"] + "\n" + m["content"], False), ("<|im_end|>", True), ("\n", False)]
    if add_generation_prompt:
        parts += [("<|im_start|>", True), ("assistant\n", False)]
    return parts
