"""T2's frequency analysis: a substitution cipher over a synthetic language is read back given enough text."""

from __future__ import annotations

import torch

from lambdasplit.audit.attacks.frequency import codebook, decipher, language_statistics
from lambdasplit.privacy.keys import make_key
from lambdasplit.split import load_split

VOCAB = 40


def markov_text(tokens: int, seed: int, *, chains: int = 20) -> list[torch.Tensor]:
    """``chains`` sequences from one fixed bigram language: skewed unigrams, 3 likely successors per token."""
    rule = torch.Generator().manual_seed(1234)  # the language itself: the same for every sample
    successors = torch.stack([torch.randperm(VOCAB, generator=rule)[:3] for _ in range(VOCAB)])
    weights = torch.tensor([0.6, 0.3, 0.1])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(chains):
        seq = [int(torch.randint(VOCAB, (1,), generator=gen))]
        for _ in range(tokens // chains - 1):
            if torch.rand(1, generator=gen) < 0.05:  # a little noise: any token may follow
                seq.append(int(torch.randint(VOCAB, (1,), generator=gen)))
            else:
                seq.append(int(successors[seq[-1], torch.multinomial(weights, 1, generator=gen)]))
        out.append(torch.tensor(seq))
    return out


def attack(traffic_tokens: int) -> tuple[float, float]:
    """(unigram-rank accuracy, bigram accuracy) on a permuted sample of ``traffic_tokens`` tokens."""
    stats = language_statistics(markov_text(40_000, seed=1))  # the attacker's public text
    plain = markov_text(traffic_tokens, seed=2)
    key = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(5))
    codes, count = codebook([key[s] for s in plain])  # integer indices: a downlink argmax stream
    found = decipher(codes, stats, codes=count)
    truth = torch.cat(plain)
    uni = torch.tensor([t for c in codes for t in found.decode(c, unigram_only=True)])
    bi = torch.tensor([t for c in codes for t in found.decode(c)])
    return float((uni == truth).double().mean()), float((bi == truth).double().mean())


def test_bigram_decipherment_reads_most_of_a_cipher_given_enough_text() -> None:
    unigram, bigram = attack(20_000)
    assert bigram > 0.9
    assert bigram > unigram + 0.2  # the bigrams, not the ranks, do the work


def test_little_text_reads_less() -> None:
    _, little = attack(60)
    _, much = attack(20_000)
    assert little < 0.5 < much


def test_codebook_numbers_distinct_rows_in_order_of_first_appearance() -> None:
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    codes, count = codebook([rows, torch.tensor([[3.0, 4.0], [5.0, 6.0]])])
    assert count == 3
    assert [c.tolist() for c in codes] == [[0, 1, 0], [1, 2]]
    indices, n = codebook([torch.tensor([7, 3, 7]), torch.tensor([9])])
    assert n == 3 and [c.tolist() for c in indices] == [[0, 1, 0], [2]]


def test_language_statistics_are_conditional_distributions() -> None:
    stats = language_statistics(markov_text(2_000, seed=3), candidates=10)
    assert stats.candidates == 10 and stats.log_next.shape == (11, 11)
    assert torch.allclose(stats.log_next.exp().sum(dim=1), torch.ones(11), atol=1e-5)
    # most frequent first: counts of the candidates are non-increasing
    assert bool((stats.unigram[:-1][:-1] >= stats.unigram[:-1][1:]).all())


def test_the_uplink_of_a_permuted_embedding_is_a_code_book(tiny_checkpoint) -> None:
    """At X = 0 each token id's permuted embedding repeats exactly: one code per distinct id."""
    path, _ = tiny_checkpoint("llama")
    split = load_split(str(path), "0:", device="cpu", dtype="float32", quiet=True)
    key = make_key(split.config, split.points, split.fingerprint, kind="permutation", seed=3)
    assert split.head is not None
    ids = torch.tensor([[5, 9, 5, 200, 9, 9, 31]])
    sent = key.encode(split.head(ids))[0].detach()
    codes, count = codebook([sent])
    assert count == 4
    assert codes[0].tolist() == [0, 1, 0, 2, 1, 1, 3]
