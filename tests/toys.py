"""Hand-checkable stand-ins shared by tests: a 3-token bigram LM and its tokenizer."""
from types import SimpleNamespace

import torch


class Bigram(torch.nn.Module):
    """A 3-token causal LM whose next-token logits depend only on the current token."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float64))  # (3, 3)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


class CharTok:
    """Tokenizer for the 3-token vocabulary {a, b, c}; pad id 0; ``eos`` optional."""
    pad_token_id = 0
    vocab = "abc"

    def __init__(self, eos=None):
        self.eos_token_id = eos

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.index(ch) for ch in text]}

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


UNEVEN_TEXTS = [
    ("The movie was", " wonderful and I loved every minute.", " bad"),
    ("I hate", " waiting", " waiting in long lines at the bank on mondays"),
    ("TL;DR: my friend ignores me", " and I feel bad about it", " so what"),
    ("The capital of France", " is Paris.", " is cold and rainy"),
    ("We went to the beach", " and had a great time swimming", " the battery dies"),
]
"""Prompts and responses of unequal lengths (right padding inside a batch); pair 2's rejected is
shorter than its chosen, pair 1's chosen is a prefix of its rejected."""


def uneven_pairs(n: int = 3, id_prefix: str = "p") -> list[SimpleNamespace]:
    """The first ``n`` of `UNEVEN_TEXTS` as preference pairs with ids ``{id_prefix}{i}``."""
    return [SimpleNamespace(id=f"{id_prefix}{i}", prompt=p, chosen=c, rejected=r)
            for i, (p, c, r) in enumerate(UNEVEN_TEXTS[:n])]
