"""Continuous-batching engine over a Hugging Face causal LM's forward.

step(): schedule → build inputs (prefill chunks, one token per decode) → forward
→ sample (batched, per-request params) → one host sync → stop checks → text deltas.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from producer.protocol import ChatBody, ErrorCode, FinishReason, GenerateBody, Request, TaskKind
from worker.engines.base import RequestRejected
from worker.engines.batch import build_group
from worker.engines.kv_cache import SlotKVCache
from worker.engines.sampling import SamplingBatch, new_generator, sample, token_logprobs
from worker.engines.text import IncrementalDetokenizer, StopStringMatcher
from worker.request import Resume, Sequence, StepOutput
from worker.scheduler import ScheduledChunk, Scheduler


@dataclass(frozen=True)
class LLMEngineConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    max_tokens_limit: int = 32768
    max_cached_tokens: int | None = None  # KV budget in tokens; None: max_num_seqs x max_model_len


@dataclass
class _SeqText:
    """Per-request text state that lives only in the engine."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None
    stop_token_ids: frozenset[int]
    logprobs: list[dict] = field(default_factory=list)


class LLMEngine:
    tasks = (TaskKind.GENERATE, TaskKind.CHAT)

    def __init__(self, model, tokenizer, config: LLMEngineConfig = LLMEngineConfig()):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.max_num_seqs = config.max_num_seqs
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_model_len = min(config.max_model_len or 8192, getattr(mc, "max_position_embeddings", 8192) or 8192)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_ids = _eos_ids(model, tokenizer)
        self.sliding_window = _sliding_window(mc, self.max_model_len)
        self.scheduler = Scheduler(config.max_num_seqs, max(config.max_num_batched_tokens, config.max_num_seqs))
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.kv = SlotKVCache(
            num_layers=mc.num_hidden_layers, max_slots=config.max_num_seqs,
            num_kv_heads=getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads,
            head_dim=head_dim, max_len=self.max_model_len, dtype=self.dtype, device=self.device,
            max_cached_tokens=config.max_cached_tokens,
        )
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._text: dict[Sequence, _SeqText] = {}
        self._seen: torch.Tensor | None = None  # [slots, V] bool, only once a request uses repetition_penalty
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------ requests in and out

    @property
    def num_active(self) -> int:
        return self.scheduler.num_active

    def add(self, request: Request, resume: Resume | None = None) -> Sequence:
        prompt_ids = self._prompt_ids(request)
        cfg = request.generate_config
        max_tokens = self._check_lengths(prompt_ids, cfg.max_tokens)
        seq = Sequence(request_id=request.id, prompt_ids=prompt_ids, params=cfg, max_tokens=max_tokens)
        state = _SeqText(
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopStringMatcher(cfg.stop_strings),
            generator=None if cfg.is_greedy else new_generator(cfg.seed),
            stop_token_ids=frozenset(cfg.stop_token_ids or ()),
        )
        if resume is not None:
            self._resume(seq, state, resume)
        self._text[seq] = state
        self.scheduler.add(seq)
        return seq

    def _resume(self, seq: Sequence, state: _SeqText, resume: Resume) -> None:
        """Continue after tokens an earlier worker published: same text state, same random stream."""
        seq.output_ids = list(resume.output_ids)
        seq.num_resumed_tokens = len(resume.output_ids)
        state.stops.feed(state.detok.push(list(resume.output_ids)))
        state.stops.num_released = min(len(resume.text), len(state.stops.text))  # what the client has
        if state.generator is not None:
            for _ in resume.output_ids:  # one uniform per sampled token: skip those already drawn
                torch.rand((), generator=state.generator)

    def finish_if_complete(self, seq: Sequence) -> StepOutput | None:
        """A resumed request whose published tokens already end it (the old worker died before `done`)."""
        if not seq.output_ids:
            return None
        state = self._text[seq]
        last = seq.output_ids[-1]
        if (last in self.eos_ids and not seq.params.ignore_eos) or last in state.stop_token_ids or state.stops.is_stopped:
            finish = FinishReason.STOP
        elif seq.num_output_tokens >= seq.max_tokens:
            finish = FinishReason.LENGTH
        else:
            return None
        text = "" if state.stops.is_stopped else state.stops.feed(state.detok.flush()) + state.stops.finish()
        seq.finish_reason = finish
        seq.meta.update(text=state.stops.text, logprobs=None)
        self._release(seq)
        return StepOutput(seq=seq, token_ids=[], text=text, finish_reason=finish)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.scheduler.find(request_id)
        if seq is not None:
            self._release(seq)
        return seq

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def sequences(self) -> list[Sequence]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    def fail_running(self) -> list[Sequence]:
        seqs = list(self.scheduler.running)
        for seq in seqs:
            self._release(seq)
        return seqs

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        self._text.pop(seq, None)
        if self.scheduler.num_active == 0:
            self.kv.reset()

    def _prompt_ids(self, request: Request) -> list[int]:
        body = request.body
        if request.task not in self.tasks:
            raise RequestRejected(ErrorCode.UNSUPPORTED_TASK, f"this worker serves {[t.value for t in self.tasks]}, not {request.task.value!r}")
        if isinstance(body, GenerateBody):
            ids = body.prompt_token_ids if body.prompt_token_ids is not None else self.tokenizer(body.prompt).input_ids
        elif isinstance(body, ChatBody):
            ids = self._chat_ids(body)
        else:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "body does not match the task")
        if not ids:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        if max(ids) >= self.vocab_size:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"token id {max(ids)} is outside the vocabulary ({self.vocab_size})")
        return list(ids)

    def _chat_ids(self, body: ChatBody) -> list[int]:
        if any(m.has_images for m in body.messages):
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "this model does not accept image inputs")
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "this model's tokenizer has no chat template")
        messages = [m.as_template_dict() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=body.tools, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # template errors are the request's fault (e.g. roles it forbids)
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"chat template failed: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _check_lengths(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        room = self.kv.max_sequence_tokens - len(prompt_ids)
        if room < 1:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"the prompt has {len(prompt_ids)} tokens; this worker's context is {self.kv.max_sequence_tokens}")
        if max_tokens is None:
            return min(room, self.config.max_tokens_limit)
        if max_tokens > self.config.max_tokens_limit:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"max_tokens {max_tokens} is over this worker's limit {self.config.max_tokens_limit}")
        if max_tokens > room:
            raise RequestRejected(ErrorCode.INVALID_REQUEST,
                                  f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the context ({self.kv.max_sequence_tokens})")
        return max_tokens

    # ------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        schedule = self.scheduler.schedule(max_running=self.kv.num_rows)
        if schedule.is_empty:
            return []
        self._fit_cache(schedule)
        for chunk in schedule.chunks:
            self._ensure_slot(chunk.seq)
        decodes = [c for c in schedule.chunks if c.num_tokens == 1]
        prefills = [c for c in schedule.chunks if c.num_tokens > 1]
        logits, sampled = [], []
        for group, use_range in ((decodes, True), (prefills, False)):
            if group:
                group_logits = self._forward(group, use_range)  # [len(group), V]
                keep = [i for i, c in enumerate(group) if c.completes]
                if keep:
                    logits.append(group_logits[keep] if len(keep) < len(group) else group_logits)
                    sampled += [group[i] for i in keep]
        for chunk in schedule.chunks:
            chunk.seq.num_computed += chunk.num_tokens
        self.num_steps += 1
        if not sampled:
            return []
        return self._sample_and_finish([c.seq for c in sampled], torch.cat(logits))

    def _fit_cache(self, schedule) -> None:
        """Grow the cache rows for this step; under the KV budget, preempt the newest sequences first."""
        needed = max(c.seq.num_computed + c.num_tokens for c in schedule.chunks)
        if needed <= self.kv.capacity:
            return
        rows = self.kv.rows_for_capacity(self.kv.capacity_for(needed))
        victims = self.scheduler.preempt_newest(len(self.scheduler.running) - rows)
        if victims:
            self.num_preemptions += len(victims)
            for seq in victims:
                seq.slot = None
            schedule.chunks = [c for c in schedule.chunks if c.seq not in victims]
            needed = max(c.seq.num_computed + c.num_tokens for c in schedule.chunks)
        live = [s for s in self.scheduler.running if s.slot is not None]
        moves = self.kv.grow(needed, [s.slot for s in live])
        if self._seen is not None and live:  # the repetition-penalty rows follow their sequences
            self._seen = self._remap_seen([s.slot for s in live], [moves[s.slot] for s in live])
        for seq in live:
            seq.slot = moves[seq.slot]

    def _remap_seen(self, old: list[int], new: list[int]) -> torch.Tensor:
        seen = torch.zeros((self.max_num_seqs, self.vocab_size), dtype=torch.bool, device=self.device)
        seen[torch.tensor(new, device=self.device)] = self._seen[torch.tensor(old, device=self.device)]
        return seen

    def _ensure_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            return
        seq.slot = self.kv.allocate()
        seq.num_computed = 0
        if seq.params.repetition_penalty != 1.0:
            seen = self._seen_mask()
            seen[seq.slot].zero_()
            seen[seq.slot, torch.tensor(seq.all_ids, device=self.device)] = True

    def _seen_mask(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros((self.max_num_seqs, self.vocab_size), dtype=torch.bool, device=self.device)
        return self._seen

    def _forward(self, group: list[ScheduledChunk], use_range: bool) -> torch.Tensor:
        """Run the model on one group of chunks; returns each chunk's last-position logits [G, V]."""
        inputs = build_group(group, use_range, self.device, self.dtype, self.sliding_window)
        self.kv.begin_forward(inputs.layout)
        try:
            out = self.model(
                input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=inputs.attention_mask,
                use_cache=True, logits_to_keep=1, **{self._cache_kwarg: self.kv},
            )
        finally:
            self.kv.end_forward()
        logits = out.logits[:, -1, :]  # [R, V]
        return logits if inputs.member_rows is None else logits[inputs.member_rows]

    def _sample_and_finish(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        states = [self._text[s] for s in seqs]
        batch = SamplingBatch.build([s.params for s in seqs], [st.generator for st in states], self.device)
        seen = None
        if batch.repetition_penalty is not None:
            seen = self._seen_mask()[torch.tensor([s.slot for s in seqs], device=self.device)]
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        tokens, processed = sample(logits, batch, seen, need_processed=any(want_logprobs))
        if batch.repetition_penalty is not None:
            self._seen_mask()[torch.tensor([s.slot for s in seqs], device=self.device), tokens] = True
        token_list = tokens.tolist()  # the step's one host sync
        logprob_rows = self._logprobs(seqs, processed, tokens) if any(want_logprobs) else {}
        outputs = [self._advance(seq, state, tok, logprob_rows.get(i))
                   for i, (seq, state, tok) in enumerate(zip(seqs, states, token_list))]
        for out in outputs:  # only once every row has advanced: a failure above leaves all of them to fail_running
            if out.is_finished:
                self._release(out.seq)
        self.num_generated_tokens += len(token_list)
        return outputs

    def _logprobs(self, seqs: list[Sequence], processed: torch.Tensor, tokens: torch.Tensor) -> dict[int, dict]:
        top_n = max(s.params.logprobs or 0 for s in seqs)
        chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(processed, tokens, top_n))
        rows = {}
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is None:
                continue
            n = seq.params.logprobs
            tok = int(tokens[i])
            rows[i] = {
                "token_id": tok, "token": self.tokenizer.decode([tok]), "logprob": chosen[i],
                "top_logprobs": [{"token_id": t, "token": self.tokenizer.decode([t]), "logprob": v}
                                 for t, v in zip(top_ids[i][:n], top_values[i][:n]) if v != float("-inf")],
            }
        return rows

    def _advance(self, seq: Sequence, state: _SeqText, token: int, logprob: dict | None) -> StepOutput:
        """Append one sampled token; decide whether the request is done and what text it releases."""
        seq.output_ids.append(token)
        if logprob is not None:
            state.logprobs.append(logprob)
        finish = None
        text = ""
        if (token in self.eos_ids and not seq.params.ignore_eos) or token in state.stop_token_ids:
            finish = FinishReason.STOP
        else:
            text = state.stops.feed(state.detok.push([token]))
            if state.stops.is_stopped:
                finish = FinishReason.STOP
        if finish is None and seq.num_output_tokens >= seq.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None and not state.stops.is_stopped:
            text += state.stops.feed(state.detok.flush())
            text += state.stops.finish()
            if state.stops.is_stopped:
                finish = FinishReason.STOP
        out = StepOutput(seq=seq, token_ids=[token], text=text, finish_reason=finish,
                         logprobs=[logprob] if logprob is not None else None)
        if finish is not None:
            seq.finish_reason = finish
            seq.meta["text"] = state.stops.text
            seq.meta["logprobs"] = state.logprobs or None
        return out


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _sliding_window(text_config, max_model_len: int) -> int | None:
    layer_types = getattr(text_config, "layer_types", None) or []
    window = getattr(text_config, "sliding_window", None)
    if "sliding_attention" in layer_types and window and window < max_model_len:
        return int(window)
    return None
