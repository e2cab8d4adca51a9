"""encode_chat against transformers' apply_chat_template, computed in the same run, for ChatML (SmolLM2, from
its GGUF, from the tokenizer.gguf beside a converted model (the embedded model's folder) and from an HF folder
that keeps the template in chat_template.jinja), Llama 3 and Llama 2.

The expected labels come from transformers too: assistant turn i adds the ids between
apply_chat_template(messages[:i], add_generation_prompt=True) and the end of the last end-of-turn token of
apply_chat_template(messages[:i + 1]).
"""
from __future__ import annotations

import functools

import pytest

from test_tokenizer_chat import LLAMA2_TEMPLATE, LLAMA3_TEMPLATE
from tokenizer_fixtures import LLAMA_BPE, LLAMA_SPM, hf_from_gguf, hf_smollm2, npl, smollm2_path

from npllama.train import ChatDataError, encode_chat

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "The answer is 42."}],
    "multi-turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Name a colour, and 東京 🙂"},
                   {"role": "assistant", "content": "Blue. Tokyo is 東京."},
                   {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}],
    "system": [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Good morning"},
               {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And 1,234?"},
               {"role": "assistant", "content": "Mille deux cent trente-quatre."}],
    "ends with user": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B."},
                       {"role": "user", "content": "C"}],
}
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "llama2": "</s>"}


@functools.lru_cache(None)
def _smollm2_hf_folder(tmp_root):
    """SmolLM2's tokenizer as transformers saves it: tokenizer.json + chat_template.jinja."""
    import os
    d = os.path.join(tmp_root, "smollm2-hf")
    hf_smollm2().save_pretrained(d)
    assert os.path.isfile(os.path.join(d, "chat_template.jinja"))
    return d


@functools.lru_cache(None)
def _smollm2_tokenizer_gguf(tmp_root):
    """The vocabulary-only tokenizer.gguf that `convert` and the embedded model's cached float copy carry."""
    import os
    from npllama.io.gguf import write_tokenizer_gguf
    d = os.path.join(tmp_root, "smollm2-converted")
    os.makedirs(d)
    write_tokenizer_gguf(smollm2_path(), os.path.join(d, "tokenizer.gguf"))
    return d


def _pair(fmt, tmp_root=None):
    if fmt == "chatml-gguf":
        return npl(smollm2_path()), hf_smollm2(), None, "chatml"
    if fmt == "chatml-converted":
        return npl(_smollm2_tokenizer_gguf(tmp_root)), hf_smollm2(), None, "chatml"
    if fmt == "chatml-hf-folder":
        from transformers import AutoTokenizer
        d = _smollm2_hf_folder(tmp_root)
        return npl(d), AutoTokenizer.from_pretrained(d), None, "chatml"
    if fmt == "llama3":
        return npl(LLAMA_BPE), hf_from_gguf("llama-bpe"), LLAMA3_TEMPLATE, "llama3"
    return npl(LLAMA_SPM), hf_from_gguf("llama-spm"), LLAMA2_TEMPLATE, "llama2"


def _hf(hf, template, messages, gen=False):
    out = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chat"))


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("fmt", ["chatml-gguf", "chatml-converted", "chatml-hf-folder", "llama3", "llama2"])
def test_encode_chat_matches_transformers(fmt, conv, tmp_root):
    tok, hf, template, family = _pair(fmt, tmp_root)
    assert tok.chat_format == family
    messages = CONVERSATIONS[conv]
    ids, labels = encode_chat(tok, messages)
    full = _hf(hf, template, messages)
    assert ids == full
    assert len(labels) == len(ids)
    eot = hf.convert_tokens_to_ids(EOT[family])
    want = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _hf(hf, template, messages[:i], gen=True)
        upto = _hf(hf, template, messages[:i + 1])
        assert full[:len(prompt)] == prompt and full[:len(upto)] == upto     # the reference's own premise
        end = max(j for j, t in enumerate(upto) if t == eot) + 1
        assert end > len(prompt)
        want[len(prompt):end] = full[len(prompt):end]
    assert labels == want
    if family == "chatml" and messages[0]["role"] != "system":      # SmolLM2's default system prompt is there
        assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)


def test_labels_cover_the_turn_not_the_newline_after_it():
    tok = npl(smollm2_path())
    ids, labels = encode_chat(tok, CONVERSATIONS["one turn"])
    text = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert text == "The answer is 42.<|im_end|>"
    assert tok.decode(ids[-1:]) == "\n" and labels[-1] == -100


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "no assistant turn"),
    ([], "non-empty"),
    ([{"role": "user"}], "no 'content'"),
    ([{"content": "x"}], "no 'role'"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    (["hello"], "message 0 is str"),
])
def test_bad_conversations_are_named(messages, match):
    with pytest.raises(ChatDataError, match=match):
        encode_chat(npl(smollm2_path()), messages)


@pytest.mark.parametrize("fmt", ["chatml-gguf", "llama3"])
def test_an_assistant_turn_first_is_refused_not_mislabelled(fmt):
    """With no prompt before it, the template's output for the turn is not a continuation of a generation prompt
    (ChatML puts its default system prompt first, Llama 3 its BOS): an error, never the system prompt labelled."""
    tok = _pair(fmt)[0]
    with pytest.raises(ChatDataError, match="assistant turn before any user turn"):
        encode_chat(tok, [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hello"}])


def test_llama2_roles_must_alternate_is_a_data_error():
    with pytest.raises(ChatDataError, match="alternate"):
        encode_chat(npl(LLAMA_SPM), [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
