"""Tokenizers that match the references token for token: byte-level BPE and SentencePiece BPE.

    tok = Tokenizer.from_pretrained(path)   # .gguf, tokenizer.json, tokenizer.model, or a dir
    ids = tok.encode("Hello", bos=True)
    text = tok.decode(ids)
    trained = train_bpe(text, vocab_size=2048, special_tokens=["<|endoftext|>"]); trained.save(dir)
"""
from .errors import TokenizerError
from .tokenizer import Tokenizer
from .trainer import TrainedBPE, train_bpe

__all__ = ["Tokenizer", "TokenizerError", "TrainedBPE", "train_bpe"]
