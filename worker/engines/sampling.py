"""Batched sampling with per-request parameters and per-request seeded generators.

Everything vocab-sized is done for the whole batch at once; the only per-request
Python work is drawing one uniform number from the request's own generator, which
keeps a seeded request's output independent of its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from producer.protocol import GenerateConfig


@dataclass
class SamplingBatch:
    """Per-row parameters of one sampling call, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long; 0 = off
    repetition_penalty: torch.Tensor | None  # [B] float, or None when every row has 1.0
    generators: list[torch.Generator | None]  # per row; None for greedy rows
    is_all_greedy: bool

    @classmethod
    def build(cls, params: list[GenerateConfig], generators: list[torch.Generator | None], device) -> "SamplingBatch":
        penalties = [p.repetition_penalty for p in params]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            repetition_penalty=(None if all(x == 1.0 for x in penalties)
                                else torch.tensor(penalties, dtype=torch.float32, device=device)),
            generators=generators,
            is_all_greedy=all(p.is_greedy for p in params),
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    # logits: [B, V]; seen: [B, V] bool (token in prompt or output); penalty: [B]
    # HF semantics: a seen token's logit is divided by the penalty if positive, multiplied if negative.
    p = penalty[:, None]
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def sample(logits: torch.Tensor, batch: SamplingBatch, seen: torch.Tensor | None = None,
           need_processed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row. Returns (tokens [B], the processed logits [B, V] when asked, for logprobs)."""
    logits = logits.float()
    if batch.repetition_penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, batch.repetition_penalty)
    greedy = logits.argmax(dim=-1)  # [B]
    if batch.is_all_greedy:
        return greedy, logits
    is_greedy = batch.temperature == 0
    temperature = torch.where(is_greedy, torch.ones_like(batch.temperature), batch.temperature)
    scaled = logits / temperature[:, None]
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)  # [B, V]
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    beyond_k = (batch.top_k[:, None] > 0) & (ranks >= batch.top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(beyond_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # top-p keeps the smallest prefix whose mass reaches top_p (the first token always stays)
    beyond_p = (probs.cumsum(dim=-1) - probs) > batch.top_p[:, None]
    probs = probs.masked_fill(beyond_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # [B, V], unnormalized
    u = _uniforms(batch.generators).to(logits.device) * cdf[:, -1]  # [B]
    choice = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=vocab - 1)  # [B, 1]
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    tokens = torch.where(is_greedy, greedy, sampled)
    if not need_processed:
        return tokens, None
    dropped = torch.zeros_like(beyond_k).scatter(1, sorted_ids, beyond_k | beyond_p)  # back to vocab order
    processed = scaled.masked_fill(dropped, float("-inf"))
    return tokens, torch.where(is_greedy[:, None], logits, processed)


def _uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    # one draw per row from that row's own generator; greedy rows draw nothing
    values = [0.0 if g is None else torch.rand((), generator=g).item() for g in generators]
    return torch.tensor(values, dtype=torch.float32)


def token_logprobs(processed: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob of each chosen token [B], and the top_n alternatives ([B, n] logprobs, [B, n] ids)."""
    logp = processed.log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    top = logp.topk(max(top_n, 1), dim=-1)
    return chosen, top.values[:, :top_n], top.indices[:, :top_n]


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
