"""Chat SFT data: JSONL reading (bad lines named by file:line), truncation and skip counts, padded batches whose
loss equals the conversations' own, and a seeded batcher that resumes exactly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import npllama
from npllama.config import LlamaConfig
from npllama.train import DataError, encode_chat
from npllama.train.sft import Example, SFTBatcher, SFTEval, load_sft, pad_batch, split
from tokenizer_fixtures import npl, smollm2_path


def _conv(q, a, system=None):
    return {"messages": ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _write(tmp_path, lines, name="chat.jsonl"):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def tok():
    return npl(smollm2_path())


# ---------------------------------------------------------------- reading
@pytest.mark.parametrize("line, match", [
    ("{not json", "not JSON"),
    ('{"text": "hi"}', 'without it'),
    ('[1, 2]', "got list"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "no 'content'"),
    ('{"messages": [{"content": "x"}]}', "no 'role'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": null}]}', "must be a string"),
])
def test_a_malformed_line_is_named_with_file_and_line(tmp_path, tok, line, match):
    path = _write(tmp_path, [_conv("a", "b"), "", line, _conv("c", "d")])
    with pytest.raises(DataError, match=match) as e:
        load_sft(path, tok, 64)
    assert str(e.value).startswith(f"{path}:3: ")


def test_not_utf8_and_missing_file_are_named(tmp_path, tok):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(json.dumps(_conv("a", "b")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=f"{p}:2: not UTF-8"):
        load_sft(str(p), tok, 64)
    with pytest.raises(DataError, match="no such file"):
        load_sft(str(tmp_path / "nope.jsonl"), tok, 64)


def test_a_conversation_the_template_refuses_is_named_with_file_and_line(tmp_path):
    from tokenizer_fixtures import LLAMA_SPM
    path = _write(tmp_path, [_conv("a", "b"), {"messages": [{"role": "user", "content": "a"},
                                                            {"role": "user", "content": "b"},
                                                            {"role": "assistant", "content": "c"}]}])
    with pytest.raises(DataError, match=f"^{path}:2: .*alternate"):
        load_sft(path, npl(LLAMA_SPM), 64)


def test_counts_truncation_and_skips(tmp_path, tok):
    long_answer = " ".join(f"word{i}" for i in range(80))
    lines = [_conv("What is 1 + 1?", "The answer is 2."),
             {"messages": [{"role": "user", "content": "no answer here"}]},
             _conv("Say many words.", long_answer),
             _conv(" ".join(["long question"] * 60), "short"),
             _conv("Hi", "Hello!", system="Be nice.")]
    path = _write(tmp_path, lines)
    seq_len = 48
    examples, st = load_sft(path, tok, seq_len)
    assert (st.conversations, st.used, st.truncated, st.no_assistant, st.no_label_in_window) == (5, 3, 1, 1, 1)
    assert "3 of 5 conversations used" in st.summary() and "1 truncated" in st.summary()
    full = [encode_chat(tok, lines[i]["messages"]) for i in (0, 2, 4)]
    for ex, (ids, labels) in zip(examples, full):
        assert ex.ids.tolist() == ids[:seq_len + 1] and ex.labels.tolist() == labels[:seq_len + 1]
    assert len(full[1][0]) > seq_len + 1 and len(examples[1].ids) == seq_len + 1


def test_no_usable_conversation_is_an_error(tmp_path, tok):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no usable conversations.*1 skipped: no assistant turn"):
        load_sft(path, tok, 64)


def test_split_keeps_the_last_for_validation():
    ex = [Example(np.arange(i + 3), np.arange(i + 3)) for i in range(10)]
    tr, va = split(ex, 0.2)
    assert tr == ex[:8] and va == ex[8:]
    tr, va = split(ex[:1], 0.5)
    assert tr == ex[:1] and va == []
    with pytest.raises(DataError, match="val-fraction"):
        split(ex, 1.0)


# ---------------------------------------------------------------- batches
def _examples(n=7, seed=0, vocab=53):
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(r.integers(4, 15))
        ids = r.integers(0, vocab, T)
        labels = np.where(r.random(T) < 0.5, ids, -100)
        labels[-1] = ids[-1]
        out.append(Example(ids, labels))
    return out


def test_padded_batch_loss_equals_the_conversations_own():
    """Right padding changes nothing before a row's end: the batch's mean over labelled targets is exactly the
    label-weighted mean of each conversation scored alone (float64)."""
    model = npllama.Llama.init(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=53,
                                           max_position_embeddings=32), seed=1, std=0.3, dtype="float64")
    ex = _examples()
    x, y = pad_batch(ex)
    assert x.shape == y.shape == (len(ex), max(len(e.ids) for e in ex) - 1)
    batch_loss, grads = model.loss_and_grads(x, y)
    total, n, gsum = 0.0, 0, None
    for e in ex:
        xi, yi = e.ids[None, :-1], e.labels[None, 1:]
        k = int((yi != -100).sum())
        li, gi = model.loss_and_grads(xi, yi)
        total, n = total + li * k, n + k
        gsum = {a: g * k for a, g in gi.items()} if gsum is None else {a: gsum[a] + g * k for a, g in gi.items()}
    assert abs(batch_loss - total / n) <= 1e-12 * abs(batch_loss)
    for a in grads:
        np.testing.assert_allclose(grads[a], gsum[a] / n, rtol=0, atol=1e-12 * np.abs(grads[a]).max())


def test_batcher_covers_each_epoch_once_and_resumes_exactly():
    ex = _examples(7)
    key = lambda row: tuple(row[row != 0])      # noqa: E731 - a row's ids without padding (ids 0 aside)

    def rows(b, n):
        return [key(r) for _ in range(n) for r in b.next()[0]]

    b = SFTBatcher(ex, 3, seed=5)
    first = rows(b, 7)                                   # 21 rows = 3 epochs of 7
    want = sorted(key(e.ids[:-1]) for e in ex)
    for ep in range(3):
        assert sorted(first[7 * ep:7 * ep + 7]) == want
    assert first[:7] != first[7:14]                      # each epoch has its own order
    assert first == rows(SFTBatcher(ex, 3, seed=5), 7)   # the seed fixes the order
    assert first != rows(SFTBatcher(ex, 3, seed=6), 7)

    a = SFTBatcher(ex, 3, seed=5)
    rows(a, 2)
    sd = json.loads(json.dumps(a.state_dict()))          # through JSON, as a checkpoint stores it
    after = [a.next() for _ in range(4)]
    c = SFTBatcher(ex, 3, seed=5)
    c.load_state_dict(sd)
    for (xa, ya), (xc, yc) in zip(after, (c.next() for _ in range(4))):
        assert np.array_equal(xa, xc) and np.array_equal(ya, yc)
    with pytest.raises(DataError, match="7 training conversations, the data has 6"):
        SFTBatcher(ex[:6], 3, seed=5).load_state_dict(sd)


def test_eval_batches_are_fixed():
    ev = SFTEval(_examples(5))
    a, b = list(ev.batches(2, 10)), list(ev.batches(2, 10))
    assert [x.shape[0] for x, _ in a] == [2, 2, 1]
    assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert len(list(ev.batches(2, 1))) == 1


# ---------------------------------------------------------------- the trainer on SFT batches
def _tiny(dtype="float64", seed=1):
    return npllama.Llama.init(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=53,
                                          max_position_embeddings=32), seed=seed, std=0.3, dtype=dtype)


def _cfg(**kw):
    from npllama.train import TrainConfig
    d = dict(steps=6, batch_size=2, seq_len=16, lr=1e-2, warmup=1, eval_every=0, save_every=3, log_every=0, seed=4)
    d.update(kw)
    return TrainConfig(**d)


def test_accumulated_sft_step_is_the_mean_over_all_labelled_targets(tmp_path):
    """accum micro-batches weigh by their labelled targets: the step's gradient is that of one batch of them all."""
    from npllama.train import Trainer
    ex = _examples(6, seed=2)
    model = _tiny()
    t = Trainer(model, SFTBatcher(ex, 2, seed=1), None, _cfg(accum=3, clip=0), str(tmp_path), log=open(os.devnull, "w"))
    order = [int(i) for i in SFTBatcher(ex, 2, seed=1)._order[:6]]   # the first epoch: the step's 3 x 2 rows
    seen = {}
    t.opt.step = lambda G: seen.update(G)
    rec = t.train_step()
    x, y = pad_batch([ex[i] for i in order])
    loss, grads = model.loss_and_grads(x, y)
    assert abs(rec["loss"] - loss) <= 1e-12 * loss
    for k in grads:
        np.testing.assert_allclose(seen[k], grads[k], rtol=0, atol=1e-12 * np.abs(grads[k]).max())


def test_lora_run_checkpoints_the_adapter_only_and_resumes_exactly(tmp_path):
    """With dropout (the masks' draw count is in the checkpoint) a run stopped at step 3 and resumed on a fresh
    model ends bit-identical to one that never stopped; the checkpoint and the optimizer hold only LoRA matrices."""
    from npllama import lora
    from npllama.train import Trainer, load_checkpoint
    ex, null = _examples(9, seed=3), open(os.devnull, "w")

    def run(out, stop=None):
        m = _tiny(dtype="float32")
        lora.add(m, r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"], dropout=0.2, seed=7)
        t = Trainer(m, SFTBatcher(ex[:7], 2, seed=1), SFTEval(ex[7:]), _cfg(eval_every=2), out, log=null)
        return m, t

    straight, t = run(str(tmp_path / "a"))
    t.fit()
    first, t1 = run(str(tmp_path / "b"))
    t1.fit(stop_at=3)
    again, t2 = run(str(tmp_path / "b"))
    t2.resume()
    assert t2.step == 3 and again._lora_draws == 3
    t2.fit()
    for k in lora.lora_params(straight):
        assert np.array_equal(straight.params[k], again.params[k]), k
    assert straight.params["model.layers.0.self_attn.q_proj.lora_B.weight"].any()     # it did train
    ck = load_checkpoint(str(tmp_path / "b" / "checkpoints"))
    assert set(ck["params"]) == straight.trainable == set(ck["optimizer"]["state"])
    assert ck["state"]["lora"]["r"] == 2 and ck["state"]["lora_draws"] == 6
    assert [h["val_loss"] for h in t.history if "val_loss" in h] == \
        [h["val_loss"] for h in t2.history if "val_loss" in h]


def test_resume_refuses_an_adapter_with_other_settings(tmp_path):
    from npllama import lora
    from npllama.train import CheckpointError, Trainer
    ex, null = _examples(5), open(os.devnull, "w")
    m = _tiny()
    lora.add(m, r=2, targets=["q_proj"])
    Trainer(m, SFTBatcher(ex, 2), None, _cfg(steps=1), str(tmp_path), log=null).fit()
    other = _tiny()
    lora.add(other, r=3, targets=["q_proj"])
    with pytest.raises(CheckpointError, match="r = 2"):
        Trainer(other, SFTBatcher(ex, 2), None, _cfg(steps=1), str(tmp_path), log=null).resume()
    with pytest.raises(CheckpointError, match="has none"):
        Trainer(_tiny(), SFTBatcher(ex, 2), None, _cfg(steps=1), str(tmp_path), log=null).resume()
