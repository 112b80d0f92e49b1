"""Data that ships with Python or is generated: multi-query associative recall (MQAR, Zoology) and the
Python documentation text shipped with CPython (``pydoc_data.topics``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # cross_entropy's ignore_index: MQAR scores only the answers


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (Arora et al., Zoology, arXiv 2312.04927), laid out so that every
    answer lies beyond a short window.

    A sequence of ``seq_len`` tokens: ``num_pairs`` key-value pairs ``k1 v1 ... kn vn`` at the start, then
    filler (token 0); each key is queried once, in random order, at random positions of the second half
    of the sequence: the input holds the key and then its value, and the label of the key's position is
    that value (only answer positions are scored). Every query is at least ``seq_len/2 - 2 num_pairs``
    tokens after the pair it asks about. Keys are drawn from ``[1, num_keys]`` and values from
    ``[num_keys + 1, num_keys + num_values]`` without repetition inside a sequence."""

    seq_len: int = 128
    num_keys: int = 64
    num_values: int = 64

    @property
    def vocab(self) -> int:
        return 1 + self.num_keys + self.num_values

    def batch(self, batch_size: int, num_pairs: int, generator: torch.Generator):
        T, n = self.seq_len, num_pairs
        half = T // 2
        assert 2 * n <= half and n <= min(self.num_keys, self.num_values), "too many pairs for this length"
        x = torch.zeros(batch_size, T, dtype=torch.long)
        y = torch.full((batch_size, T), IGNORE, dtype=torch.long)
        for b in range(batch_size):
            keys = torch.randperm(self.num_keys, generator=generator)[:n] + 1
            vals = torch.randperm(self.num_values, generator=generator)[:n] + 1 + self.num_keys
            x[b, 0 : 2 * n : 2], x[b, 1 : 2 * n : 2] = keys, vals
            # n query slots of 2 tokens among the half // 2 slots of the second half
            slots = torch.randperm(half // 2, generator=generator)[:n]
            order = torch.randperm(n, generator=generator)
            pos = half + 2 * slots
            x[b, pos], x[b, pos + 1] = keys[order], vals[order]
            y[b, pos] = vals[order]
        return x, y


def pydoc_text() -> str:
    """The text of CPython's ``pydoc_data.topics`` (the help topics; ~465k characters on 3.11)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class CharCorpus:
    """Character-level tokens of ``text`` with a held-out tail (``eval_frac``) for evaluation."""

    def __init__(self, text: str, eval_frac: float = 0.1):
        chars = sorted(set(text))
        self.itos = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        cut = int(len(data) * (1 - eval_frac))
        self.train, self.eval = data[:cut], data[cut:]

    @property
    def vocab(self) -> int:
        return len(self.itos)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, t) -> str:
        return "".join(self.itos[int(i)] for i in t)

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        data = self.train if split == "train" else self.eval
        i = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        idx = i[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def eval_batches(self, n: int, batch_size: int, seq_len: int, seed: int = 1234):
        """A fixed set of ``n`` evaluation batches (the same for every model and seed)."""
        g = torch.Generator().manual_seed(seed)
        return [self.batch("eval", batch_size, seq_len, g) for _ in range(n)]
