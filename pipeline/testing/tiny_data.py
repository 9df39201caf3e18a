"""Tiny texts and a BPE tokenizer trained on them (seconds, no network)."""

from __future__ import annotations

import torch

_PHRASES = (
    "def class return import yield lambda async await with open read write list dict tuple set",
    "the router sends every token to the experts that fit it best and the load should stay even",
    "prototype cluster balance expert layer hidden state gate softmax logits weights index",
)
WORDS = [word for phrase in _PHRASES for word in phrase.split()]


def make_texts(n_docs: int, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for d in range(n_docs):
        picks = torch.randint(0, len(WORDS), (words_per_doc,), generator=gen).tolist()
        texts.append(f"document {d}: " + " ".join(WORDS[i] for i in picks) + ".\n")
    return texts


def build_tiny_tokenizer(texts: list[str]):
    from pipeline.data.corpus import Document
    from pipeline.demo.model import train_tokenizer

    return train_tokenizer([Document(name=str(i), text=t) for i, t in enumerate(texts)], vocab_size=300)
