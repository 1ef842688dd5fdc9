"""The benchmark's workloads: seeded request sets every contender receives identically.

W1 offline mixed    all at once; prompts uniform 16-512 tokens, max_tokens log-uniform 16-256, EOS ignored.
W3 chat-like        all at once; prompts log-uniform 8-384, max_tokens 8 + exp(mean 50) capped at 256, EOS honoured.
W4 shared prefix    all at once; one 384-token system prompt + a 16-64-token user turn each; outputs as W3.
W2 online           W1's first requests, arriving as a Poisson process; EOS ignored.

Prompt ids are drawn from [FIRST_PLAIN_ID, vocab): the tiny tokenizers keep their special tokens (pad, bos,
eos, chat markers) below it, so no prompt contains an EOS.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

FIRST_PLAIN_ID = 5


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0  # offset from the workload start (0 for offline)
    ignore_eos: bool = True

    @property
    def key(self) -> tuple:
        """What determines a greedy output: the same key means the same reference tokens."""
        return (tuple(self.prompt_ids), self.max_tokens, self.ignore_eos)


@dataclass
class RequestResult:
    request_id: str
    output_ids: list[int]
    first_token_s: float | None  # seconds from workload start when the first output token existed (None if unknown)
    finish_s: float  # seconds from workload start when the request finished


@dataclass
class Workload:
    name: str  # "w1" ...
    title: str
    requests: list[BenchRequest]
    shared_prefix_len: int = 0  # tokens every prompt shares (W4), for prefix caching in the roofline
    is_online: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def honours_eos(self) -> bool:
        return any(not r.ignore_eos for r in self.requests)


def normalize(output_ids: list[int], request: BenchRequest, eos_ids: frozenset[int]) -> list[int]:
    """The comparable part of an output: at most max_tokens, and nothing after the first EOS when EOS is honoured.

    Contenders differ in what they return around a stop (padding after EOS in a static batch, a surplus token);
    what a user receives is the same for all of them once cut like this.
    """
    out = list(output_ids[: request.max_tokens])
    if not request.ignore_eos:
        for i, token in enumerate(out):
            if token in eos_ids:
                return out[: i + 1]
    return out


def _prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(FIRST_PLAIN_ID, vocab) for _ in range(length)]


def _chat_max_tokens(rng: random.Random) -> int:
    return min(256, 8 + int(rng.expovariate(1 / 50)))


def _cap(max_tokens: int, cap: int | None) -> int:
    return max_tokens if cap is None else max(1, min(cap, max_tokens))


def w1(vocab: int, n: int, seed: int, max_tokens_cap: int | None = None) -> Workload:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = _prompt(rng, vocab, rng.randint(16, 512))
        max_tokens = int(round(16 * 2 ** (4 * rng.random())))  # log-uniform in [16, 256]: a long tail
        requests.append(BenchRequest(f"w1-{i}", prompt, _cap(max_tokens, max_tokens_cap)))
    return Workload("w1", "W1 offline mixed (prompts 16-512, max_tokens 16-256 log-uniform, EOS ignored)", requests)


def w3(vocab: int, n: int, seed: int, max_tokens_cap: int | None = None) -> Workload:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        length = int(round(math.exp(rng.uniform(math.log(8), math.log(384)))))
        prompt = _prompt(rng, vocab, length)
        requests.append(BenchRequest(f"w3-{i}", prompt, _cap(_chat_max_tokens(rng), max_tokens_cap), ignore_eos=False))
    return Workload("w3", "W3 chat-like (prompts 8-384 log-uniform, max_tokens 8+exp(50) <= 256, EOS honoured)", requests)


def w4(vocab: int, n: int, seed: int, prefix_len: int = 384, max_tokens_cap: int | None = None) -> Workload:
    rng = random.Random(seed)
    system = _prompt(rng, vocab, prefix_len)
    requests = []
    for i in range(n):
        turn = _prompt(rng, vocab, rng.randint(16, 64))
        requests.append(BenchRequest(f"w4-{i}", system + turn, _cap(_chat_max_tokens(rng), max_tokens_cap),
                                     ignore_eos=False))
    title = f"W4 shared prefix ({prefix_len}-token system prompt + 16-64-token turns, outputs as W3, prefix reuse on)"
    return Workload("w4", title, requests, shared_prefix_len=prefix_len)


def w2(base: Workload, n: int, rate_per_s: float, seed: int) -> Workload:
    """The first n requests of `base` (W1), arriving as a Poisson process of rate_per_s requests per second."""
    rng = random.Random(seed)
    arrival = 0.0
    requests = []
    for r in base.requests[:n]:
        arrival += rng.expovariate(rate_per_s)
        requests.append(replace(r, request_id=r.request_id.replace("w1", "w2"), arrival_s=arrival))
    title = f"W2 online (W1 requests, Poisson arrivals at {rate_per_s:.2f} req/s, EOS ignored)"
    return Workload("w2", title, requests, is_online=True)


def calibration_subset(workload: Workload, n: int) -> Workload:
    """The first n requests: what a peer's configuration sweep runs when the whole workload would take too long."""
    if n >= len(workload.requests):
        return workload
    return replace(workload, requests=workload.requests[:n])
