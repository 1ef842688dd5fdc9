"""Batched sampling: greedy rows, seeded rows independent of batch mates, top-k/top-p, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from producer.protocol import GenerateConfig
from worker.engines.sampling import (
    SamplingBatch,
    apply_repetition_penalty,
    new_generator,
    sample,
    token_logprobs,
)

torch.set_num_threads(1)
CPU = torch.device("cpu")


def batch_of(configs: list[GenerateConfig], seeds: list[int | None] | None = None) -> SamplingBatch:
    seeds = seeds if seeds is not None else [0] * len(configs)
    generators = [None if c.is_greedy else new_generator(s) for c, s in zip(configs, seeds)]
    return SamplingBatch.build(configs, generators, CPU)


def random_logits(num_rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn((num_rows, vocab), generator=torch.Generator().manual_seed(seed)) * 3


def shared_generator_batch(config: GenerateConfig, num_rows: int, seed: int = 0) -> SamplingBatch:
    # many draws in one call: every row draws in turn from the same generator
    generator = new_generator(seed)
    return SamplingBatch.build([config] * num_rows, [generator] * num_rows, CPU)


def test_build_packs_per_row_parameters():
    configs = [GenerateConfig(temperature=0.0), GenerateConfig(temperature=0.7, top_p=0.9, top_k=5)]
    batch = batch_of(configs)
    assert batch.temperature.tolist() == pytest.approx([0.0, 0.7])
    assert batch.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert batch.top_k.tolist() == [0, 5]
    assert batch.repetition_penalty is None
    assert not batch.is_all_greedy
    assert batch_of([GenerateConfig(temperature=0.0)] * 2).is_all_greedy
    penalized = batch_of([GenerateConfig(), GenerateConfig(repetition_penalty=1.3)])
    assert penalized.repetition_penalty.tolist() == pytest.approx([1.0, 1.3])


def test_all_greedy_is_argmax():
    logits = random_logits(6)
    tokens, _ = sample(logits, batch_of([GenerateConfig(temperature=0.0)] * 6))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_rows_inside_a_mixed_batch_are_argmax():
    logits = random_logits(4, vocab=100)
    configs = [GenerateConfig(temperature=0.0), GenerateConfig(temperature=5.0),
               GenerateConfig(temperature=0.0), GenerateConfig(temperature=5.0)]
    greedy = logits.argmax(dim=-1)
    sampled_rows = []
    batch = batch_of(configs, seeds=[None, 1, None, 2])
    for _ in range(20):
        tokens, _ = sample(logits, batch)
        assert tokens[0] == greedy[0] and tokens[2] == greedy[2]
        sampled_rows.append(tokens[[1, 3]].tolist())
    assert len({tuple(r) for r in sampled_rows}) > 1  # the hot rows really sampled


def test_temperature_zero_is_greedy_even_with_a_generator():
    logits = random_logits(300, vocab=30, seed=2)
    config = GenerateConfig(temperature=0.0, seed=5)
    mixed = SamplingBatch.build([config] * 299 + [GenerateConfig(temperature=1.0)], [new_generator(5)] * 300, CPU)
    tokens, _ = sample(logits, mixed)
    assert torch.equal(tokens[:-1], logits[:-1].argmax(dim=-1))


def test_same_seed_same_tokens_whatever_the_batch_mates_and_row():
    vocab = 40
    target = random_logits(1, vocab, seed=5)[0]
    config = GenerateConfig(temperature=1.5, top_p=0.95, top_k=30, seed=1234)

    alone = batch_of([config], seeds=[1234])
    mates = [GenerateConfig(temperature=0.0), GenerateConfig(temperature=0.8, top_k=3),
             GenerateConfig(temperature=2.0, top_p=0.5)]
    crowded = batch_of([*mates, config], seeds=[None, 7, 8, 1234])
    mates_logits = random_logits(3, vocab, seed=6)

    first, second = [], []
    for _ in range(30):
        first.append(sample(target[None], alone)[0].item())
        second.append(sample(torch.cat([mates_logits, target[None]]), crowded)[0][3].item())

    assert first == second
    assert len(set(first)) > 3  # the sequence genuinely depends on the draws


def test_different_seeds_give_different_tokens():
    logits = torch.zeros((1, 1000))
    config = GenerateConfig(temperature=1.0)
    a, b = batch_of([config], seeds=[1]), batch_of([config], seeds=[2])
    draws_a = [sample(logits, a)[0].item() for _ in range(10)]
    draws_b = [sample(logits, b)[0].item() for _ in range(10)]
    assert draws_a != draws_b


def test_top_k_1_is_argmax_even_when_hot():
    logits = random_logits(200, vocab=30, seed=3)
    tokens, _ = sample(logits, shared_generator_batch(GenerateConfig(temperature=100.0, top_k=1), 200))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_tiny_top_p_keeps_only_the_top_token():
    logits = random_logits(200, vocab=30, seed=4)
    tokens, _ = sample(logits, shared_generator_batch(GenerateConfig(temperature=100.0, top_p=1e-6), 200))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_restricts_to_the_k_best():
    logits = random_logits(1, vocab=30, seed=8).expand(3000, -1)
    k = 4
    tokens, _ = sample(logits, shared_generator_batch(GenerateConfig(temperature=10.0, top_k=k), 3000))
    allowed = set(logits[0].topk(k).indices.tolist())
    assert set(tokens.tolist()) == allowed  # all samples in the top k, and each of them drawn


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, top_p 0.85 the first three
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, -1)
    for top_p, expected in [(0.7, {0, 1}), (0.85, {0, 1, 2})]:
        tokens, _ = sample(logits, shared_generator_batch(GenerateConfig(temperature=1.0, top_p=top_p), 2000))
        assert set(tokens.tolist()) == expected


def test_sampled_frequencies_follow_the_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, -1)
    tokens, _ = sample(logits, shared_generator_batch(GenerateConfig(temperature=1.0), 4000, seed=11))
    assert tokens.float().mean().item() == pytest.approx(0.75, abs=0.04)


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, -1)
    # temperature 2: p(1) = sqrt(3) / (1 + sqrt(3)) ~ 0.634
    tokens, _ = sample(logits, shared_generator_batch(GenerateConfig(temperature=2.0), 4000, seed=12))
    assert tokens.float().mean().item() == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=0.04)


# ---------------------------------------------------------------- repetition penalty


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    vocab = 12
    logits = random_logits(3, vocab, seed=9)
    seen_ids = [[0, 3, 5, 7], [1, 2, 3, 11], [4, 4, 6]]
    penalties = [1.5, 0.7, 2.0]
    seen = torch.zeros((3, vocab), dtype=torch.bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any()

    expected = torch.cat([
        RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[row : row + 1].clone())
        for row, (ids, penalty) in enumerate(zip(seen_ids, penalties))
    ])
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))

    torch.testing.assert_close(ours, expected)
    assert torch.equal(ours[~seen], logits[~seen])  # unseen tokens untouched


def test_sample_applies_the_repetition_penalty():
    logits = torch.tensor([[4.0, 3.0, -1.0], [4.0, 3.0, -1.0]])
    seen = torch.tensor([[True, False, False], [False, False, False]])
    batch = batch_of([GenerateConfig(temperature=0.0, repetition_penalty=2.0)] * 2)

    tokens, processed = sample(logits, batch, seen)

    assert tokens.tolist() == [1, 0]  # row 0's 4.0 becomes 2.0 and loses to 3.0
    assert processed[0].tolist() == [2.0, 3.0, -1.0]
    assert processed[1].tolist() == [4.0, 3.0, -1.0]


# ---------------------------------------------------------------- logprobs


def test_token_logprobs_are_log_softmax_of_chosen_and_sorted_top_n():
    processed = random_logits(3, vocab=20, seed=10)
    tokens = torch.tensor([5, 0, 19])
    chosen, top_values, top_ids = token_logprobs(processed, tokens, top_n=3)

    logp = processed.log_softmax(dim=-1)
    torch.testing.assert_close(chosen, logp[torch.arange(3), tokens])
    assert top_values.shape == top_ids.shape == (3, 3)
    for row in range(3):
        order = logp[row].argsort(descending=True)[:3]
        assert top_ids[row].tolist() == order.tolist()
        torch.testing.assert_close(top_values[row], logp[row, order])
    assert (top_values[:, :-1] >= top_values[:, 1:]).all()


def test_token_logprobs_with_zero_alternatives():
    chosen, top_values, top_ids = token_logprobs(random_logits(2, 8), torch.tensor([1, 2]), top_n=0)
    assert chosen.shape == (2,)
    assert top_values.shape == top_ids.shape == (2, 0)


def test_processed_logits_reflect_filters_and_greedy_rows():
    logits = random_logits(3, vocab=10, seed=13)
    batch = batch_of([GenerateConfig(temperature=0.5, top_k=3), GenerateConfig(temperature=0.0),
                      GenerateConfig(temperature=2.0, top_p=1e-6)], seeds=[3, None, 4])

    tokens, processed = sample(logits, batch, need_processed=True)

    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(torch.isfinite(processed[0]).nonzero().flatten().tolist()) == top3
    torch.testing.assert_close(processed[0, list(top3)], logits[0, list(top3)] / 0.5)
    torch.testing.assert_close(processed[1], logits[1])  # greedy rows: raw logits
    assert tokens[0].item() in top3 and tokens[1] == logits[1].argmax()
    assert torch.isfinite(processed[2]).nonzero().flatten().tolist() == [logits[2].argmax().item()]
    assert tokens[2] == logits[2].argmax()
    chosen, _, _ = token_logprobs(processed, tokens, top_n=2)
    assert torch.isfinite(chosen).all()


def test_processed_not_returned_unless_asked():
    batch = batch_of([GenerateConfig(temperature=1.0)], seeds=[0])
    _, processed = sample(random_logits(1), batch)
    assert processed is None


def test_new_generator_seeded_is_reproducible():
    a, b = new_generator(42), new_generator(42)
    assert torch.rand(5, generator=a).tolist() == torch.rand(5, generator=b).tolist()
    assert new_generator(None).device.type == "cpu"
