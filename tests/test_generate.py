"""Generation: sampling processors vs Hugging Face's on crafted logits, seeds, batching, EOS, stop strings, streaming."""
from __future__ import annotations

import numpy as np
import pytest

from npllama.config import LlamaConfig
from npllama.generate import (Sampling, apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p, generate,
                              process_logits, sample, stream)
from npllama.model import Llama


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=40, eos_token_id=None)
    return Llama.init(cfg, seed=3, std=0.4)


class CharTokenizer:
    """id i <-> chr(ord('a') + i % 26); enough to test text handling without a real vocabulary."""
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def crafted(B=4, V=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, V)) * 3
    x[:, 5] = -2.5  # a negative logit that the penalty must push down, not up
    return x


def hf(processor, logits, input_ids=None):
    import torch
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else torch.tensor(input_ids)
    return processor(ids, torch.tensor(logits)).numpy()


# ---------------------------------------------------------------- processors vs transformers
def test_repetition_penalty_matches_hf():
    from transformers import RepetitionPenaltyLogitsProcessor
    x = crafted()
    history = np.array([[5, 1, 1, 7], [0, 2, 5, 9], [3, 3, 3, 3], [39, 5, 12, 20]])
    seen = np.zeros(x.shape, dtype=bool)
    for b, row in enumerate(history):
        seen[b, row] = True
    for penalty in (1.3, 0.7):
        ours = apply_repetition_penalty(x, seen, penalty)
        ref = hf(RepetitionPenaltyLogitsProcessor(penalty), x.astype(np.float32), history)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
        assert not np.allclose(ours, x)


@pytest.mark.parametrize("k", [1, 3, 17, 40])
def test_top_k_matches_hf(k):
    from transformers import TopKLogitsWarper
    x = crafted()
    ours = apply_top_k(x, k)
    ref = hf(TopKLogitsWarper(k), x)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    assert (np.isfinite(ours).sum(axis=-1) == k).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(p):
    from transformers import TopPLogitsWarper
    x = crafted()
    np.testing.assert_array_equal(np.isinf(apply_top_p(x, p)), np.isinf(hf(TopPLogitsWarper(p), x)))


def test_top_p_on_known_probs():
    x = np.log(np.array([[0.05, 0.3, 0.15, 0.5]]))
    assert np.isfinite(apply_top_p(x, 0.75)).tolist() == [[False, True, False, True]]
    assert np.isfinite(apply_top_p(x, 0.81)).tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("m", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_hf(m):
    from transformers import MinPLogitsWarper
    x = crafted()
    np.testing.assert_array_equal(np.isinf(apply_min_p(x, m)), np.isinf(hf(MinPLogitsWarper(m), x)))


def test_whole_chain_matches_hf():
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    x = crafted()
    history = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    seen = np.zeros(x.shape, dtype=bool)
    for b, row in enumerate(history):
        seen[b, row] = True
    s = Sampling(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)])
    ours, ref = process_logits(x, seen, s), hf(chain, x, history)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


# ---------------------------------------------------------------- sampling never leaves the kept set
@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=5, top_p=0.9, min_p=0.1)])
def test_samples_stay_in_kept_set(kw):
    s = Sampling(temperature=1.5, **kw)
    x = crafted(B=1, V=40, seed=1)
    kept = set(np.flatnonzero(np.isfinite(process_logits(x, None, s))[0]).tolist())
    assert 1 <= len(kept) < 40
    rng = np.random.default_rng(0)
    draws = {int(sample(x, s, [rng])[0]) for _ in range(600)}
    assert draws <= kept
    if len(kept) <= 5:  # every kept token is reachable (the filter keeps what it says it keeps)
        assert draws == kept


def test_sample_frequencies_follow_softmax():
    x = np.log(np.array([[0.1, 0.2, 0.7]]))
    rng = np.random.default_rng(0)
    counts = np.bincount([int(sample(x, Sampling(temperature=1.0), [rng])[0]) for _ in range(4000)], minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.1, 0.2, 0.7], atol=0.03)


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(seed="x"), "seed"),
])
def test_invalid_parameters_are_clear_errors(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(model, [1, 2, 3], **kw)


# ---------------------------------------------------------------- decoding loop
def test_greedy_equals_argmax_of_full_forward(model):
    prompt = [4, 8, 15, 16, 23, 42]
    out = generate(model, prompt, max_new_tokens=12)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(np.argmax(model.forward(np.array([ids]))[0, -1])))
    assert out == ids[len(prompt):]


def test_seed_reproducible(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, seed=123)
    a, b = generate(model, [1, 2, 3], **kw), generate(model, [1, 2, 3], **kw)
    assert a == b and len(a) == 16
    assert generate(model, [1, 2, 3], **{**kw, "seed": 124}) != a


def test_batch_equals_one_at_a_time(model):
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    for kw in (dict(), dict(temperature=0.9, top_p=0.95, seed=7), dict(repetition_penalty=1.5)):
        batch = generate(model, prompts, max_new_tokens=10, **kw)
        assert batch == [generate(model, p, max_new_tokens=10, **kw) for p in prompts]


def test_batched_logits_equal_alone(model):
    # left padding must be invisible to the real tokens: compare the prefill logits themselves
    from npllama.backend import to_host
    short, long = [2, 7, 9], [3, 1, 4, 1, 5, 9]
    alone = to_host(model.forward(np.array([short])))[0, -1]
    pad = len(long) - len(short)
    ids = np.array([[0] * pad + short, long])
    pos = np.array([[0] * pad + list(range(len(short))), list(range(len(long)))])
    mask = np.array([[False] * pad + [True] * len(short), [True] * len(long)])
    both = to_host(model.forward(ids, positions=pos, attn_mask=mask))[0, -1]
    np.testing.assert_allclose(both, alone, atol=1e-5)


def test_eos_stops_and_is_not_returned(model):
    prompt = [5, 6, 7]
    free = generate(model, prompt, max_new_tokens=8)
    eos = free[3]
    first = free.index(eos)
    assert generate(model, prompt, max_new_tokens=8, eos_ids=[eos]) == free[:first]
    # in a batch, the row that stops does not stop the others
    other = generate(model, [9, 9], max_new_tokens=8, eos_ids=[eos])
    assert generate(model, [prompt, [9, 9]], max_new_tokens=8, eos_ids=[eos]) == [free[:first], other]


def test_context_limit(model):
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        generate(model, [1] * ctx, max_new_tokens=1)
    assert len(generate(model, [1] * (ctx - 3), max_new_tokens=10)) == 3
    assert generate(model, [1, 2], max_new_tokens=0) == []


def test_prompt_forms(model):
    ids = [4, 8, 15]
    want = generate(model, ids, max_new_tokens=3)
    assert generate(model, np.array(ids), max_new_tokens=3) == want
    assert generate(model, [np.int64(i) for i in ids], max_new_tokens=3) == want
    assert generate(model, np.array([ids, ids]), max_new_tokens=3) == [want, want]
    assert generate(model, [np.array(ids)], max_new_tokens=3) == [want]


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [1, 999])
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [])


def test_stop_strings_and_streaming(model):
    tok = CharTokenizer()
    prompt = [1, 2, 3]
    free = generate(model, prompt, max_new_tokens=20)
    text = tok.decode(free)
    pieces = list(stream(model, tok, prompt, max_new_tokens=20))
    assert "".join(pieces) == text and len(pieces) > 1
    stop = text[5:7]
    cut = text.find(stop)
    ids = generate(model, prompt, max_new_tokens=20, stop=[stop], tokenizer=tok)
    assert tok.decode(ids) == text[:cut + len(stop)]
    assert "".join(stream(model, tok, prompt, max_new_tokens=20, stop=[stop])) == text[:cut]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, stop=["x"])


def test_on_token_callback(model):
    seen = []
    out = generate(model, [[1, 2], [3]], max_new_tokens=4, on_token=lambda b, t: seen.append((b, t)))
    assert sorted(seen) == sorted([(b, t) for b, row in enumerate(out) for t in row])
