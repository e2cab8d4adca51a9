"""Tokenizers that match the references token for token: byte-level BPE and SentencePiece BPE.

    tok = Tokenizer.from_pretrained(path)   # .gguf, tokenizer.json, tokenizer.model, or a dir
    ids = tok.encode("Hello", bos=True)
    text = tok.decode(ids)
"""
from .errors import TokenizerError
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "TokenizerError"]
