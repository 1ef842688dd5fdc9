"""Batch sampling on the device: the counter-based RNG, HF semantics, logprobs, and no host sync."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from producer.protocol import GenerateConfig
from worker.engines.sampler import SampleResult, SamplingTensors, request_seed, sample, uniforms

torch.set_num_threads(1)
CPU = torch.device("cpu")
MASK32 = 0xFFFF_FFFF


def tensors_of(configs: list[GenerateConfig], seeds: list[int] | None = None, counters: list[int] | None = None,
               device=CPU, num_top_logprobs: int | None = None) -> SamplingTensors:
    seeds = seeds if seeds is not None else list(range(len(configs)))
    counters = counters if counters is not None else [0] * len(configs)
    t = SamplingTensors.build(configs, seeds, counters, device)
    return t if num_top_logprobs is None else dataclasses.replace(t, num_top_logprobs=num_top_logprobs)


def random_logits(num_rows: int, vocab: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn((num_rows, vocab), generator=torch.Generator().manual_seed(seed)) * 3


def chi2_bound(num_bins: int, z: float = 4.0) -> float:
    # Wilson-Hilferty: the chi-square quantile (num_bins - 1 degrees of freedom) at normal score z
    df = num_bins - 1
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed.double() - expected.double()) ** 2 / expected.double()).sum())


def hf_processed(logits: torch.Tensor, cfg: GenerateConfig, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scores HF's generate samples from for cfg, built from transformers' own processors."""
    ids = input_ids if input_ids is not None else torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = logits.clone()
    if cfg.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, scores)
    if cfg.is_greedy:
        return scores
    scores = TemperatureLogitsWarper(cfg.temperature)(ids, scores)
    if cfg.top_k > 0:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    return scores


def full_logprobs(result: SampleResult, vocab: int) -> torch.Tensor:
    """[B, V] logprobs in vocab order, rebuilt from a result whose top-n covers the whole vocabulary."""
    assert result.top_ids.shape[1] == vocab
    return torch.empty_like(result.top_logprobs).scatter(1, result.top_ids, result.top_logprobs)


# ---------------------------------------------------------------- the counter-based RNG


def reference_uniform(seed: int, counter: int) -> float:
    # the same hash in Python integers, with plain multiplication mod 2^32: no int64 in sight
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & MASK32
        return x ^ (x >> 16)

    key = mix(((counter >> 32) & MASK32) ^ 0x9E3779B9)
    key = mix(((seed >> 32) & MASK32) ^ key)
    key = mix((seed & MASK32) ^ key)
    x = mix((counter & MASK32) ^ key)
    x = mix((x + key) & MASK32)
    return (x >> 8) / 2**24


def test_uniforms_equal_a_python_integer_reference_over_the_whole_seed_range():
    rng = random.Random(7)
    seeds = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1] + [rng.randrange(2**63) for _ in range(200)]
    counters = [0, 1, 2**31, 2**32 - 1, 2**32 + 5, 2**40] + [rng.randrange(2**20) for _ in range(201)]
    got = uniforms(torch.tensor(seeds), torch.tensor(counters)).tolist()
    assert got == [reference_uniform(s, c) for s, c in zip(seeds, counters)]


@pytest.mark.parametrize("along", ["counter", "seed"])
def test_uniforms_are_in_the_unit_interval_and_uniform(along: str):
    n = 1 << 17
    steps = torch.arange(n)
    fixed = torch.full((n,), 12345)
    u = uniforms(fixed, steps) if along == "counter" else uniforms(steps, fixed)
    assert u.dtype == torch.float32
    assert 0.0 <= u.min() and u.max() < 1.0
    num_bins = 256
    counts = torch.bincount((u * num_bins).long(), minlength=num_bins)
    assert chi2(counts, torch.full((num_bins,), n / num_bins)) < chi2_bound(num_bins)
    ks = (u.sort().values - (torch.arange(n) + 0.5) / n).abs().max()  # Kolmogorov-Smirnov distance
    assert ks < 1.95 / math.sqrt(n)  # p ~ 0.001
    bits = ((u * 2**24).long()[:, None] >> torch.arange(24)) & 1  # [n, 24]
    assert (bits.double().mean(0) - 0.5).abs().max() < 4 * 0.5 / math.sqrt(n)
    neighbours = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(neighbours) < 4 / math.sqrt(n)


def test_uniforms_differ_across_seeds_and_counters():
    seeds, counters = torch.meshgrid(torch.arange(1000), torch.arange(20), indexing="ij")
    u = uniforms(seeds.flatten(), counters.flatten())  # 20,000 draws from 24 bits
    # birthday bound: ~12 equal pairs expected by chance; a hash that ignored the seed or counter gives far more
    assert u.unique().numel() > u.numel() - 40
    streams = {tuple(row) for row in u.view(1000, 20).tolist()}
    assert len(streams) == 1000


def test_uniforms_depend_only_on_their_own_seed_and_counter():
    alone = uniforms(torch.tensor([99]), torch.tensor([7]))
    gen = torch.Generator().manual_seed(0)
    for position in (0, 3, 15):
        seeds = torch.randint(0, 2**62, (16,), generator=gen)
        counters = torch.randint(0, 500, (16,), generator=gen)
        seeds[position], counters[position] = 99, 7
        assert uniforms(seeds, counters)[position] == alone


def test_request_seed_keeps_a_given_seed_and_draws_a_62_bit_one_otherwise():
    assert request_seed(0) == 0 and request_seed(2**63 - 1) == 2**63 - 1
    drawn = {request_seed(None) for _ in range(8)}
    assert len(drawn) == 8 and all(0 <= s < 2**62 for s in drawn)


# ---------------------------------------------------------------- building the tensors


def test_build_packs_per_row_parameters_and_host_fields():
    configs = [GenerateConfig(temperature=0.0, top_k=3, top_p=0.5, logprobs=2),
               GenerateConfig(temperature=0.7, top_p=0.9, top_k=5),
               GenerateConfig(temperature=1.5, top_k=40, repetition_penalty=1.3, logprobs=5)]
    t = tensors_of(configs, seeds=[2**63 - 1, 5, 6], counters=[0, 9, 2**40])
    assert t.temperature.tolist() == pytest.approx([0.0, 0.7, 1.5])
    assert t.top_p.tolist() == pytest.approx([0.5, 0.9, 1.0])
    assert t.top_k.tolist() == [3, 5, 40]
    assert t.repetition_penalty.tolist() == pytest.approx([1.0, 1.0, 1.3])
    assert t.seed.tolist() == [2**63 - 1, 5, 6] and t.counter.tolist() == [0, 9, 2**40]
    assert (t.is_all_greedy, t.num_top_logprobs, t.num_candidates) == (False, 5, 40)  # greedy rows' k/p don't count


def test_host_fields_choose_the_cheapest_filter():
    fields = SamplingTensors.host_fields
    assert fields([GenerateConfig(temperature=0.0)] * 2) == {
        "is_all_greedy": True, "num_top_logprobs": -1, "num_candidates": 0}
    assert fields([GenerateConfig(), GenerateConfig(logprobs=0)])["num_candidates"] == 0
    assert fields([GenerateConfig(), GenerateConfig(logprobs=0)])["num_top_logprobs"] == 0
    assert fields([GenerateConfig(top_k=7), GenerateConfig(top_k=3, top_p=0.5)])["num_candidates"] == 7
    assert fields([GenerateConfig(top_k=7), GenerateConfig(top_p=0.5)])["num_candidates"] >= 2**62  # whole vocab
    assert SamplingTensors.build([GenerateConfig()], [1], [0], CPU).repetition_penalty is None


def test_build_makes_one_host_to_device_copy(monkeypatch):
    calls = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    SamplingTensors.build([GenerateConfig(top_k=2), GenerateConfig(temperature=0.0)], [1, 2], [3, 4], "meta")
    assert len(calls) == 1


# ---------------------------------------------------------------- distributions


def test_sampled_frequencies_match_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    n, temperature = 40_000, 0.7
    cfg = GenerateConfig(temperature=temperature, seed=3)
    t = tensors_of([cfg] * n, seeds=[3] * n, counters=list(range(n)))  # one request's first n tokens
    tokens = sample(logits.expand(n, -1), t).tokens
    counts = torch.bincount(tokens, minlength=8)
    expected = n * (logits / temperature).softmax(-1)
    assert chi2(counts, expected) < chi2_bound(8)
    assert chi2(counts, n * logits.softmax(-1)) > 10 * chi2_bound(8)  # the test tells T=0.7 from T=1


def test_filtered_frequencies_match_hf_processed_distribution():
    logits = random_logits(1, vocab=12, seed=4)[0]
    n = 30_000
    cfg = GenerateConfig(temperature=1.3, top_k=6, top_p=0.8)
    t = tensors_of([cfg] * n, seeds=[11] * n, counters=list(range(n)))
    counts = torch.bincount(sample(logits.expand(n, -1), t).tokens, minlength=12)
    probs = hf_processed(logits[None], cfg).softmax(-1)[0]
    kept = probs > 0
    assert torch.equal(counts > 0, kept)  # every kept token is drawn, no other
    assert chi2(counts[kept], n * probs[kept]) < chi2_bound(int(kept.sum()))


CONFIGS = [
    GenerateConfig(temperature=1.0, top_k=1),
    GenerateConfig(temperature=0.5, top_k=5),
    GenerateConfig(temperature=2.0, top_k=50),
    GenerateConfig(temperature=1.0, top_k=1000),  # larger than the vocabulary
    GenerateConfig(temperature=1.0, top_p=0.05),
    GenerateConfig(temperature=0.7, top_p=0.5),
    GenerateConfig(temperature=1.5, top_p=0.95),
    GenerateConfig(temperature=1.0, top_k=20, top_p=0.7),
    GenerateConfig(temperature=3.0, top_k=100, top_p=0.999),
    GenerateConfig(temperature=0.9),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}")
def test_kept_tokens_and_logprobs_match_hf_warpers(cfg: GenerateConfig):
    logits = random_logits(16, vocab=200, seed=1)
    result = sample(logits, tensors_of([cfg] * 16, num_top_logprobs=200))
    expected = hf_processed(logits, cfg)
    got = full_logprobs(result, 200)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))  # the set of tokens that can be drawn
    torch.testing.assert_close(got, expected.log_softmax(-1))
    assert torch.isfinite(expected.gather(1, result.tokens[:, None])).all()


def mixed_batch_cases() -> list[list[GenerateConfig]]:
    return [
        # top-k rows and unfiltered rows: the n largest candidates, no full sort
        [GenerateConfig(temperature=0.8, top_k=5), GenerateConfig(temperature=1.2),
         GenerateConfig(temperature=1.0, top_k=20, top_p=0.7), GenerateConfig(temperature=0.0, top_k=3, top_p=0.2),
         GenerateConfig(temperature=2.0, top_k=1)],
        # a top-p row without top-k: the whole vocabulary sorted
        [GenerateConfig(temperature=1.0, top_p=0.6), GenerateConfig(temperature=0.5, top_k=5),
         GenerateConfig(temperature=1.1), GenerateConfig(temperature=0.0),
         GenerateConfig(temperature=1.0, top_k=30, top_p=0.9)],
    ]


@pytest.mark.parametrize("configs", mixed_batch_cases(), ids=["candidates", "full-sort"])
def test_mixed_batch_matches_hf_row_by_row(configs: list[GenerateConfig]):
    logits = random_logits(len(configs), vocab=150, seed=2)
    result = sample(logits, tensors_of(configs, num_top_logprobs=150))
    got = full_logprobs(result, 150)
    for row, cfg in enumerate(configs):
        expected = hf_processed(logits[row:row + 1], cfg)[0]
        assert torch.equal(torch.isfinite(got[row]), torch.isfinite(expected)), cfg
        torch.testing.assert_close(got[row], expected.log_softmax(-1))
        if cfg.is_greedy:
            assert result.tokens[row] == logits[row].argmax()
        else:
            assert torch.isfinite(expected[result.tokens[row]])


def test_drawn_tokens_stay_in_hf_kept_set_over_many_counters():
    logits = random_logits(1, vocab=300, seed=5)
    configs = [GenerateConfig(temperature=1.0, top_k=8), GenerateConfig(temperature=0.8, top_p=0.3),
               GenerateConfig(temperature=2.0, top_k=40, top_p=0.5)]
    for cfg in configs:
        n = 4000
        tokens = sample(logits.expand(n, -1), tensors_of([cfg] * n, seeds=[8] * n, counters=list(range(n)))).tokens
        kept = torch.isfinite(hf_processed(logits, cfg)[0]).nonzero().flatten()
        assert set(tokens.tolist()) == set(kept.tolist()), cfg


def test_repetition_penalty_matches_hf_processor():
    logits = random_logits(4, vocab=60, seed=6)
    input_ids = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(6))
    input_ids[:, 0] = logits.argmax(-1)  # every row has seen its favourite
    seen = torch.zeros((4, 60), dtype=torch.bool).scatter(1, input_ids, True)
    configs = [GenerateConfig(temperature=0.0, repetition_penalty=3.0),
               GenerateConfig(temperature=0.0, repetition_penalty=0.7),
               GenerateConfig(temperature=0.9, repetition_penalty=2.0, top_k=10),
               GenerateConfig(temperature=1.0)]  # no penalty in a penalized batch
    result = sample(logits, tensors_of(configs, num_top_logprobs=60), seen)
    got = full_logprobs(result, 60)
    for row, cfg in enumerate(configs):
        expected = hf_processed(logits[row:row + 1], cfg, input_ids[row:row + 1])[0]
        torch.testing.assert_close(got[row], expected.log_softmax(-1))
        if cfg.is_greedy:
            assert result.tokens[row] == expected.argmax()
    assert result.tokens[0] != logits[0].argmax() and result.tokens[1] == logits[1].argmax()  # 3.0 pushes, 0.7 pulls


def test_all_greedy_is_argmax_of_penalized_logits_and_skips_logprobs_unless_asked():
    logits = random_logits(6, vocab=40, seed=7)
    seen = torch.zeros((6, 40), dtype=torch.bool)
    seen[torch.arange(6), logits.argmax(-1)] = True  # penalize every row's favourite
    configs = [GenerateConfig(temperature=0.0, repetition_penalty=3.0)] * 6
    result = sample(logits, tensors_of(configs), seen)
    expected = hf_processed(logits, configs[0], logits.argmax(-1)[:, None])
    assert torch.equal(result.tokens, expected.argmax(-1))
    assert result.logprob is None and result.top_ids is None
    plain = sample(logits, tensors_of([GenerateConfig(temperature=0.0, logprobs=0)] * 6))
    assert torch.equal(plain.tokens, logits.argmax(-1)) and plain.top_ids is None
    torch.testing.assert_close(plain.logprob, logits.log_softmax(-1).max(-1).values)


def test_greedy_rows_inside_a_sampled_batch_are_argmax():
    logits = random_logits(8, vocab=100, seed=8)
    configs = [GenerateConfig(temperature=0.0 if row % 2 else 5.0) for row in range(8)]
    tokens = sample(logits, tensors_of(configs)).tokens
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(-1))  # hot rows do sample


def test_logprobs_are_log_softmax_of_processed_logits_and_top_n_sorted():
    logits = random_logits(4, vocab=80, seed=9)
    configs = [GenerateConfig(temperature=0.5, top_k=3, logprobs=4), GenerateConfig(temperature=0.0, logprobs=2),
               GenerateConfig(temperature=1.0, top_p=0.9, logprobs=0), GenerateConfig(temperature=1.0)]
    result = sample(logits, tensors_of(configs))
    assert result.top_ids.shape == (4, 4) and result.top_logprobs.shape == (4, 4)
    for row, cfg in enumerate(configs):
        logp = hf_processed(logits[row:row + 1], cfg)[0].log_softmax(-1)
        torch.testing.assert_close(result.logprob[row], logp[result.tokens[row]])
        torch.testing.assert_close(result.top_logprobs[row], logp[result.top_ids[row]])
        torch.testing.assert_close(result.top_logprobs[row], logp.topk(4).values)
    top = result.top_logprobs
    assert (top[:, :-1] >= top[:, 1:]).all()
    assert torch.isinf(top[0, 3]) and torch.isfinite(top[0, :3]).all()  # top-k=3 keeps three


def test_no_logprobs_are_computed_when_no_row_wants_them():
    result = sample(random_logits(3), tensors_of([GenerateConfig(top_k=4)] * 3))
    assert (result.logprob, result.top_ids, result.top_logprobs) == (None, None, None)


# ---------------------------------------------------------------- seeded reproducibility


def test_seeded_tokens_ignore_batch_mates_position_and_resume():
    vocab, num_steps = 50, 12
    cfg = GenerateConfig(temperature=1.0, top_p=0.9, seed=2024)
    logits = [random_logits(1, vocab, seed=100 + step)[0] for step in range(num_steps)]
    alone = [int(sample(logits[s][None], tensors_of([cfg], [2024], [s])).tokens[0]) for s in range(num_steps)]
    gen = random.Random(1)
    mates = [GenerateConfig(temperature=0.0), GenerateConfig(top_k=5), GenerateConfig(temperature=2.0, top_p=0.5)]
    crowded = []
    for step in range(num_steps):  # the batch around the request changes every step
        configs = [gen.choice(mates) for _ in range(gen.randrange(0, 6))]
        position = gen.randrange(len(configs) + 1)
        configs.insert(position, cfg)
        seeds = [gen.randrange(2**62) for _ in configs]
        seeds[position] = 2024
        counters = [gen.randrange(100) for _ in configs]
        counters[position] = step
        batch_logits = random_logits(len(configs), vocab, seed=step)
        batch_logits[position] = logits[step]
        crowded.append(int(sample(batch_logits, tensors_of(configs, seeds, counters)).tokens[position]))
    assert crowded == alone
    resumed = [int(sample(logits[s][None], tensors_of([cfg], [2024], [s])).tokens[0]) for s in range(5, num_steps)]
    assert resumed == alone[5:]  # a worker resuming after 5 published tokens continues with counter 5
    other_seed = [int(sample(logits[s][None], tensors_of([cfg], [2025], [s])).tokens[0]) for s in range(num_steps)]
    assert other_seed != alone


# ---------------------------------------------------------------- host syncs


def host_sync_cases() -> list[tuple[list[GenerateConfig], bool]]:
    return [
        ([GenerateConfig(temperature=0.0), GenerateConfig(temperature=0.0, logprobs=3)], False),
        ([GenerateConfig(temperature=0.0, repetition_penalty=1.2), GenerateConfig(top_k=5, logprobs=2)], True),
        ([GenerateConfig(top_p=0.9), GenerateConfig(temperature=0.0), GenerateConfig(top_k=3, logprobs=0)], False),
        ([GenerateConfig(), GenerateConfig(temperature=0.3)], False),
    ]


@pytest.fixture
def forbid_host_reads(monkeypatch):
    def refuse(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} inside sample()")
        return raiser

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("configs,is_penalized", host_sync_cases())
def test_sample_reads_nothing_on_the_host(configs, is_penalized, forbid_host_reads):
    t = tensors_of(configs)
    logits = random_logits(len(configs), vocab=64)
    seen = torch.ones((len(configs), 64), dtype=torch.bool) if is_penalized else None
    result = sample(logits, t, seen)
    assert result.tokens.shape == (len(configs),)
    with pytest.raises(AssertionError, match="host sync"):  # the guard itself works
        result.tokens.tolist()


@pytest.mark.parametrize("configs,is_penalized", host_sync_cases())
def test_sample_runs_on_the_meta_device(configs, is_penalized):
    # meta tensors have no data: any value read on the host would raise
    t = tensors_of(configs, device="meta")
    seen = torch.ones((len(configs), 64), dtype=torch.bool, device="meta") if is_penalized else None
    result = sample(torch.empty((len(configs), 64), device="meta"), t, seen)
    assert result.tokens.device.type == "meta" and result.tokens.shape == (len(configs),)


def test_to_host_makes_exactly_one_transfer(monkeypatch):
    logits = random_logits(3, vocab=40, seed=10)
    configs = [GenerateConfig(top_k=4, logprobs=3), GenerateConfig(temperature=0.0), GenerateConfig(logprobs=1)]
    result = sample(logits, tensors_of(configs))
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or original(self))
    for name in ("item", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("a second transfer"))
    host = result.to_host()
    assert len(calls) == 1
    monkeypatch.undo()
    assert host.tokens == result.tokens.tolist()
    assert host.logprob == result.logprob.double().tolist()
    assert host.top_ids == result.top_ids.tolist()
    assert host.top_logprobs == result.top_logprobs.double().tolist()


def test_to_host_without_logprobs_returns_tokens_only():
    result = sample(random_logits(2), tensors_of([GenerateConfig(temperature=0.0)] * 2))
    host = result.to_host()
    assert host.tokens == result.tokens.tolist() and host.logprob is None and host.top_ids is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws_without_a_sync():
    seeds, counters = torch.randint(0, 2**62, (4096,)), torch.arange(4096)
    assert torch.equal(uniforms(seeds.cuda(), counters.cuda()).cpu(), uniforms(seeds, counters))
    configs = [cfg for cfg in CONFIGS for _ in range(2)] + [GenerateConfig(temperature=0.0, logprobs=3)]
    logits = random_logits(len(configs), vocab=500, seed=11)
    cuda_t = tensors_of(configs, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = sample(logits.cuda(), cuda_t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = sample(logits, tensors_of(configs)).to_host()
    # same uniforms; softmax/cumsum round differently per device, which moves a token only when a
    # uniform falls within rounding of a CDF boundary (~1e-6 per row)
    assert result.to_host().tokens == cpu.tokens
