"""Chat SFT data: a JSONL file of conversations -> encoded examples -> padded (inputs, targets) batches.

One conversation per line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}.
Blank lines are skipped; any other line that is not such an object is an error naming file and line.
Each conversation is encoded with `encode_chat` (labels on what the assistant turns add), then:
  - a conversation with no assistant turn is skipped and counted (nothing to learn from it);
  - one longer than seq_len + 1 tokens is truncated to its first seq_len + 1 tokens and counted; if no
    assistant token is left inside them, it is skipped and counted instead.
Batches are padded, not packed: row b holds one conversation, inputs ids[:-1] and targets labels[1:]
(already shifted), right-padded to the longest row of the batch with id 0 in the inputs and -100 in the
targets. Attention is causal, so padding after a row's end changes none of its logits: the loss, the mean
over labelled targets, is exactly that of the conversations alone.
The order is a seeded shuffle per epoch; `state_dict()` holds the position, so a resumed run draws the
same batches.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from npllama.train.chat import IGNORE, ChatDataError, check_messages, encode_chat
from npllama.train.data import DataError

PAD_ID = 0        # any valid id: padded inputs are never attended to by real positions and carry no label


@dataclass
class Example:
    """One encoded conversation: ids and labels (same length, labels -100 outside the assistant turns)."""
    ids: np.ndarray
    labels: np.ndarray

    @property
    def n_labels(self) -> int:
        """Labelled targets once shifted (the tokens this example trains on)."""
        return int((self.labels[1:] != IGNORE).sum())


@dataclass
class SFTStats:
    """What loading a JSONL file did with its conversations."""
    conversations: int = 0
    used: int = 0
    truncated: int = 0                 # longer than seq_len + 1 tokens: cut (and used)
    no_assistant: int = 0              # skipped: no assistant turn
    no_label_in_window: int = 0        # skipped: truncation left no assistant token

    def summary(self) -> str:
        """One line for the log."""
        s = f"{self.used} of {self.conversations} conversations used"
        more = [f"{n} {what}" for n, what in ((self.truncated, "truncated to --seq-len"),
                                               (self.no_assistant, "skipped: no assistant turn"),
                                               (self.no_label_in_window, "skipped: no assistant token within "
                                                                         "--seq-len"))
                if n]
        return s + (f" ({', '.join(more)})" if more else "")


def read_jsonl(path: str) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """(line number, checked messages) for each non-blank line; DataError naming file:line otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(doc, dict) or "messages" not in doc:
                raise DataError(f"{where}: expected an object with \"messages\", got "
                                f"{'an object without it' if isinstance(doc, dict) else type(doc).__name__}")
            try:
                yield n, check_messages(doc["messages"])
            except ChatDataError as e:
                raise DataError(f"{where}: {e}") from None


def load_sft(path: str, tokenizer: Any, seq_len: int) -> tuple[list[Example], SFTStats]:
    """Encode every conversation of a JSONL file for windows of seq_len tokens; the stats say what was dropped."""
    examples, st = [], SFTStats()
    for n, messages in read_jsonl(path):
        st.conversations += 1
        if not any(m["role"] == "assistant" for m in messages):
            st.no_assistant += 1
            continue
        try:
            ids, labels = encode_chat(tokenizer, messages)
        except ChatDataError as e:          # the template refuses it (Llama 2: roles must alternate)
            raise DataError(f"{path}:{n}: {e}") from None
        ex = Example(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64))
        if len(ids) > seq_len + 1:
            ex = Example(ex.ids[:seq_len + 1], ex.labels[:seq_len + 1])
            if ex.n_labels == 0:
                st.no_label_in_window += 1
                continue
            st.truncated += 1
        elif ex.n_labels == 0:             # an assistant turn that adds no token: impossible with a template
            st.no_label_in_window += 1
            continue
        examples.append(ex)
        st.used += 1
    if not examples:
        raise DataError(f"{path}: no usable conversations ({st.summary()}); each line needs an assistant turn")
    return examples, st


def split(examples: Sequence[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, val): the last round(n * val_fraction) conversations are held out (at least one stays for train)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = min(int(round(len(examples) * val_fraction)), len(examples) - 1)
    return list(examples[:len(examples) - n_val]), list(examples[len(examples) - n_val:])


def pad_batch(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int64 (B, L), L the longest row: ids[:-1] / labels[1:], right-padded (PAD_ID / -100)."""
    L = max(len(e.ids) - 1 for e in examples)
    x = np.full((len(examples), L), PAD_ID, dtype=np.int64)
    y = np.full((len(examples), L), IGNORE, dtype=np.int64)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        x[b, :n], y[b, :n] = e.ids[:-1], e.labels[1:]
    return x, y


class SFTBatcher:
    """Padded (inputs, targets) batches of conversations in a seeded shuffled order, epoch after epoch."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int = 0, name: str = "train") -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size={batch_size} must be positive")
        if not examples:
            raise DataError(f"the {name} split has no conversations")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.epoch, self.pos, self.batches = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch; one that crosses an epoch's end continues with the next epoch's order."""
        rows = []
        while len(rows) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            rows.append(self.examples[int(self._order[self.pos])])
            self.pos += 1
        self.batches += 1
        return pad_batch(rows)

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch, position in the epoch and batch count (JSON-serializable)."""
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "batches": self.batches,
                "examples": len(self.examples)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken (on the same data)."""
        if sd.get("examples", len(self.examples)) != len(self.examples):
            raise DataError(f"the saved data position is for {sd['examples']} training conversations, the data has "
                            f"{len(self.examples)}: not the same --data / --seq-len / --val-fraction")
        self.seed, self.epoch, self.pos, self.batches = sd["seed"], int(sd["epoch"]), int(sd["pos"]), int(sd["batches"])
        self._order = self._permutation(self.epoch)


class SFTEval:
    """The held-out conversations, scored in fixed batches (the same every evaluation)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Up to n padded batches, in file order."""
        rows = self.examples[:batch_size * n]
        for i in range(0, len(rows), batch_size):
            yield pad_batch(rows[i:i + batch_size])


def stats_dict(st: SFTStats) -> dict[str, int]:
    """The stats as a plain dict (for train_config.json)."""
    return asdict(st)


__all__ = ["Example", "SFTStats", "SFTBatcher", "SFTEval", "read_jsonl", "load_sft", "split", "pad_batch",
           "PAD_ID", "stats_dict"]
