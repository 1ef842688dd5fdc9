"""Continuous-batching engine over a Hugging Face causal LM's forward.

step(): schedule (blocks, prefix cache, preemption) → pack every scheduled token into one
row with its position and cache slot (one host→device copy) → one forward, attention over
the paged cache → sample the whole batch on the device → one device→host transfer →
stop checks → text deltas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from producer.protocol import ChatBody, ErrorCode, Request, TaskKind
from worker.engines import attention, flex, placement
from worker.engines.base import RequestRejected
from worker.engines.batch import Staging, StepInputs, build_step
from worker.engines.blocks import BlockManager
from worker.engines.grammar import StepGrammars
from worker.engines.kv_cache import KVShape, PagedKVCache, num_blocks_for_budget
from worker.engines.outputs import OutputState, logprob_row
from worker.engines.prompts import check_lengths, prompt_ids
from worker.engines.sampler import HostSample, SamplingTensors, request_seed, sample
from worker.engines.tensor_parallel import RanksDiverged, StepChannel, check_heads
from worker.engines.text import IncrementalDetokenizer, StopStringMatcher
from worker.engines.vision import VisionModel
from worker.models.tool_parsers import ToolCalling
from worker.request import Resume, Sequence, StepOutput
from worker.scheduler import ScheduledChunk, Scheduler

log = logging.getLogger("redbatch.engine")
MAX_OOM_RETRIES = 2  # an OOM in a step preempts half the running sequences and retries with half the tokens


@dataclass(frozen=True)
class LLMEngineConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    max_tokens_limit: int = 32768
    max_cached_tokens: int | None = None  # KV budget in tokens; None: max_num_seqs x max_model_len (CUDA: memory)
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"  # sdpa | flex | auto (flex on CUDA when it compiles, else sdpa)
    tool_parser: str = "auto"  # tool-call format: auto (from the chat template), none, or a name in tool_parsers.FORMATS
    max_cached_grammars: int = 128
    max_json_whitespace: int = 8  # whitespace chars allowed between elements of constrained JSON


class LLMEngine:
    tasks = (TaskKind.GENERATE, TaskKind.CHAT)

    def __init__(self, model, tokenizer, config: LLMEngineConfig = LLMEngineConfig(),
                 peers: StepChannel | None = None, vision: VisionModel | None = None):
        """`peers`: under tensor parallelism, the channel to the other ranks (every rank builds this engine;
        rank 0 drives it with step(), the others with forward_only()). `vision`: the model is a VLM and chat
        requests may carry images (worker/engines/vision.py); not under tensor parallelism (the image features
        exist on rank 0 only)."""
        if vision is not None and peers is not None:
            raise ValueError("vision models are not served under tensor parallelism (--tp-size)")
        self.model = model.eval()
        self.vision = vision
        self._features: dict[Sequence, list[torch.Tensor]] = {}  # per image [n_i, H], for requests with images
        self.model.set_attn_implementation(attention.register())
        self.tokenizer = tokenizer
        self.config = config
        self.peers = peers
        self.max_num_seqs = config.max_num_seqs
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if peers is not None:
            check_heads(mc, peers.world_size)
        self.placement = placement.probe(model, mc.num_hidden_layers)  # where each layer, the head, the logits are
        self.device = self.placement.output_device  # sampling, grammar masks, penalty rows
        self.dtype = self.placement.dtype
        self.max_model_len = min(config.max_model_len or 8192, getattr(mc, "max_position_embeddings", 8192) or 8192)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_ids = _eos_ids(model, tokenizer)
        self.tool_calling = ToolCalling(tokenizer, config.tool_parser, model.config)
        self.sliding_window = _sliding_window(mc, self.max_model_len)
        # the probed key shape: under tensor parallelism this rank's share of the KV heads
        shape = KVShape(num_layers=mc.num_hidden_layers, num_kv_heads=self.placement.num_kv_heads,
                        head_dim=self.placement.head_dim, dtype=self.dtype)
        layer_devices = self.placement.layer_devices
        needs_profile = any(d.type == "cuda" for d in layer_devices) and config.max_cached_tokens is None
        num_blocks = num_blocks_for_budget(shape, config.block_size, self.max_model_len, config.max_cached_tokens,
                                           config.gpu_memory_utilization, layer_devices,
                                           default_tokens=config.max_num_seqs * self.max_model_len,
                                           activation_bytes=self._profile_activations() if needs_profile else 0)
        if peers is not None:  # every rank must hold every block id rank 0 hands out
            num_blocks = peers.min_across(num_blocks)
        self.kv = PagedKVCache(shape, num_blocks, config.block_size, layer_devices)
        log.info("%sKV cache of %d blocks, %d KV heads per layer, layers on %s", "" if peers is None else
                 f"rank {peers.rank}: ", num_blocks, shape.num_kv_heads, ",".join(map(str, self.kv.devices)))
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.max_num_seqs, max(config.max_num_batched_tokens, config.max_num_seqs),
                                   self.blocks)
        self.attention_backend = self._pick_backend(config.attention_backend)
        self._flex_blocks = flex.block_sizes(self.device) if self.attention_backend == "flex" else None
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.placement.input_device)  # no HF mask
        self._state: dict[Sequence, OutputState] = {}
        self._seen: torch.Tensor | None = None  # [rows + 1, V] bool repetition-penalty masks; the last row is a sink
        self._free_seen_rows: list[int] = []
        self.grammars = StepGrammars(tokenizer, self.vocab_size, self.eos_ids, self.device, self.tool_calling.format,
                                     config.max_cached_grammars, config.max_json_whitespace)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.profile = {"build_s": 0.0, "device_s": 0.0, "post_s": 0.0}  # cumulative time per phase of a step

    def _pick_backend(self, wanted: str) -> str:
        if wanted not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention backend must be auto, sdpa or flex, not {wanted!r}")
        if wanted == "sdpa" or (wanted == "auto" and self.device.type != "cuda"):
            return "sdpa"
        if not flex.is_available():
            if wanted == "flex":
                raise ValueError("--attention-backend flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
            return "sdpa"
        if self.device.type != "cuda":
            log.warning("flex attention off CUDA runs torch's eager reference implementation: correct, slow")
            return "flex"
        try:  # compile once now, so that a toolchain that cannot build the kernel fails here and not in a step
            flex.warm_up(self.device, self.dtype)
        except Exception as exc:
            if wanted == "flex":
                raise
            log.warning("flex attention does not compile here (%s: %s); using the SDPA path",
                        type(exc).__name__, exc)
            return "sdpa"
        return "flex"

    @torch.inference_mode()
    def _profile_activations(self) -> dict[torch.device, int]:
        """CUDA: peak bytes a full step's forward adds over the weights on each device (what the KV budget must
        leave free there). Under tensor parallelism every rank runs this forward together."""
        devices = [d for d in self.placement.devices if d.type == "cuda"]
        torch.cuda.empty_cache()
        before = {}
        for device in devices:
            torch.cuda.reset_peak_memory_stats(device)
            before[device] = torch.cuda.memory_allocated(device)
        num_tokens = max(self.config.max_num_batched_tokens, self.max_num_seqs)
        ids = torch.zeros((1, num_tokens), dtype=torch.long, device=self.placement.input_device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=self.max_num_seqs).logits
        peak = {d: int(torch.cuda.max_memory_allocated(d) - before[d]) for d in devices}
        del logits
        torch.cuda.empty_cache()
        if self.device in peak:
            peak[self.device] += 6 * self.max_num_seqs * self.vocab_size * 4  # fp32 [S, V] sort + softmax temporaries
        return peak

    # ------------------------------------------------------------ requests in and out

    @property
    def num_active(self) -> int:
        return self.scheduler.num_active

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_free(self) -> int:
        return self.max_num_seqs - self.num_active

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def sequences(self) -> list[Sequence]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    def add(self, request: Request, resume: Resume | None = None) -> Sequence:
        ids = prompt_ids(request, self.tokenizer, self.tasks, self.vocab_size, accepts_images=self.vision is not None)
        vision = self._vision_prompt(request, ids)
        if vision is not None:
            ids = vision.prompt_ids
        cfg = request.generate_config
        max_tokens = check_lengths(len(ids), cfg.max_tokens, self.max_model_len, self.config.max_tokens_limit)
        seq = Sequence(request_id=request.id, prompt_ids=ids, params=cfg, max_tokens=max_tokens,
                       priority=request.priority)
        if vision is not None:
            seq.image_spans, seq.mrope, seq.rope_delta = vision.spans, vision.mrope, vision.rope_delta
            self._features[seq] = vision.features
        tools = self.tool_calling.parser_for(request)
        keep_ids = self.tool_calling.keep_ids if tools is not None else frozenset()
        state = OutputState(detok=IncrementalDetokenizer(self.tokenizer, keep_special_ids=keep_ids),
                            stops=StopStringMatcher(cfg.stop_strings), seed=request_seed(cfg.seed),
                            stop_token_ids=frozenset(cfg.stop_token_ids or ()), eos_ids=self.eos_ids, tools=tools)
        self.grammars.admit(seq, request, resume.output_ids if resume is not None else [])
        if resume is not None:
            state.resume(seq, resume)
        self._state[seq] = state
        self.scheduler.add(seq)
        return seq

    def _vision_prompt(self, request: Request, text_ids: list[int]):
        body = request.body
        if self.vision is None or not isinstance(body, ChatBody) or not any(m.has_images for m in body.messages):
            return None
        vision = self.vision.prepare(body, text_ids)
        largest = max(last - first for first, last, _ in vision.spans)
        limit = self.scheduler.max_num_batched_tokens - self.max_num_seqs + 1  # an image is prefilled in one chunk
        if largest > limit:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"an image of {largest} tokens is over this worker's "
                                  f"limit of {limit} (max_num_batched_tokens - max_num_seqs + 1)")
        return vision

    def finish_if_complete(self, seq: Sequence) -> StepOutput | None:
        out = self._state[seq].finish_resumed(seq)
        if out is not None:
            self._release(seq)
        return out

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.scheduler.find(request_id)
        if seq is not None:
            self._release(seq)
        return seq

    def fail_running(self) -> list[Sequence]:
        seqs = list(self.scheduler.running)
        for seq in seqs:
            self._release(seq)
        return seqs

    def metrics(self) -> dict[str, int | float]:
        return {
            "kv_blocks": self.blocks.num_blocks, "kv_blocks_free": self.blocks.num_free_blocks,
            "kv_blocks_cached": self.blocks.num_cached_blocks, "prefix_hit_tokens": self.blocks.num_hit_tokens,
            "preemptions": self.num_preemptions, **self.grammars.metrics(),
        }

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        state = self._state.pop(seq, None)
        self._features.pop(seq, None)
        self.grammars.release(seq)
        if state is not None and state.seen_row is not None:
            self._free_seen_rows.append(state.seen_row)

    # ------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        if self.peers is None:
            return self._step()
        try:
            return self._step()
        except Exception as exc:
            self.peers.is_diverged = True
            raise RanksDiverged(f"a tensor-parallel step failed on rank 0 ({type(exc).__name__}: {exc}); "
                                f"the other ranks cannot follow") from exc

    def _step(self) -> list[StepOutput]:
        max_num_tokens = None
        for attempt in range(MAX_OOM_RETRIES + 1):
            schedule = self.scheduler.schedule(max_num_tokens)
            if schedule.is_empty:
                return []
            try:
                return self._run(schedule.chunks)
            except torch.OutOfMemoryError:
                if attempt == MAX_OOM_RETRIES or self.peers is not None:  # the other ranks ran this step already
                    raise
                victims = self.scheduler.preempt_newest(len(self.scheduler.running) // 2)
                max_num_tokens = max(1, schedule.num_tokens // 2)
                log.warning("out of memory in a step of %d tokens; preempted %d sequences, retrying with %d tokens",
                            schedule.num_tokens, len(victims), max_num_tokens)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return []

    def _run(self, chunks: list[ScheduledChunk]) -> list[StepOutput]:
        """One forward over every scheduled token. Sequences change only after the device work succeeded."""
        started = time.perf_counter()
        staging = Staging()
        if self.peers is not None:
            self.peers.send(chunks)
        inputs = build_step(chunks, self.kv, self.sliding_window, staging, self._stage_sampling, self._flex_blocks,
                            self.placement, mrope=self.vision is not None and self.vision.uses_mrope)
        built = time.perf_counter()
        host = self._forward_and_sample(inputs)
        synced = time.perf_counter()
        for chunk in inputs.chunks:
            self.scheduler.computed(chunk.seq, chunk.num_tokens)
        self.num_steps += 1
        outputs = self._advance(inputs.sampled, host) if host is not None else []
        self.profile["build_s"] += built - started
        self.profile["device_s"] += synced - built
        self.profile["post_s"] += time.perf_counter() - synced
        return outputs

    @torch.inference_mode()
    def forward_only(self, chunks: list[ScheduledChunk]) -> None:
        """A tensor-parallel follower's step: rank 0's chunks, packed the same way, through the same forward."""
        self._forward(build_step(chunks, self.kv, self.sliding_window, flex_blocks=self._flex_blocks,
                                 placement=self.placement))

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.image_pieces is None:
            tokens = {"input_ids": inputs.input_ids}
        else:
            tokens = {"inputs_embeds": self._embeds(inputs)}
        return self.model(**tokens, position_ids=inputs.position_ids, attention_mask=self._no_mask,
                          use_cache=False, logits_to_keep=inputs.logits_rows,
                          **{attention.STEP_KWARG: inputs.attention}).logits

    def _forward_and_sample(self, inputs: StepInputs) -> HostSample | None:
        logits = self._forward(inputs)
        if not inputs.sampled:
            return None
        logits = logits[0]  # [S, V]
        params = [c.seq.params for c in inputs.sampled]
        x = inputs.extra
        tensors = SamplingTensors(
            temperature=x["temperature"], top_p=x["top_p"], top_k=x["top_k"], seed=x["seed"], counter=x["counter"],
            repetition_penalty=x["penalty"] if "penalty" in x else None, **SamplingTensors.host_fields(params))
        seen = self._seen[x["seen_rows"]] if "penalty" in x else None  # [S, V]
        self.grammars.mask(logits, [c.seq for c in inputs.sampled])  # -inf outside each constrained row's grammar
        result = sample(logits, tensors, seen)
        if "penalty" in x:  # the sampled tokens count as seen from the next step on (the sink row absorbs the rest)
            self._seen[x["seen_rows"], result.tokens] = True
            self._seen[-1] = False
        return result.to_host()

    def _embeds(self, inputs: StepInputs) -> torch.Tensor:
        """[1, N, H] token embeddings with each image token's row replaced by its image feature row."""
        embeds = self.model.get_input_embeddings()(inputs.input_ids)
        rows = [self._features[chunk.seq][image][first:end] for chunk, image, first, end in inputs.image_pieces]
        return embeds.index_copy(1, inputs.image_rows, torch.cat(rows)[None].to(embeds.device, embeds.dtype))

    def _stage_sampling(self, staging: Staging, sampled: list[ScheduledChunk]) -> None:
        if not sampled:
            return
        params = [c.seq.params for c in sampled]
        staging.add_floats("temperature", [p.temperature for p in params])
        staging.add_floats("top_p", [p.top_p for p in params])
        staging.add("top_k", [p.top_k for p in params])
        staging.add("seed", [self._state[c.seq].seed for c in sampled])
        staging.add("counter", [c.seq.num_output_tokens for c in sampled])
        if any(p.repetition_penalty != 1.0 for p in params):
            staging.add_floats("penalty", [p.repetition_penalty for p in params])
            staging.add("seen_rows", [self._seen_row(c.seq) for c in sampled])

    def _seen_row(self, seq: Sequence) -> int:
        """The sequence's repetition-penalty row (prompt + output tokens), made on first use; -1 (the sink)
        for sequences without a penalty."""
        state = self._state[seq]
        if seq.params.repetition_penalty == 1.0:
            return -1
        if state.seen_row is None:
            if not self._free_seen_rows:
                self._grow_seen()
            state.seen_row = self._free_seen_rows.pop()
            row = self._seen[state.seen_row]
            row.zero_()
            row[torch.tensor(seq.all_ids, device=self.device)] = True
        return state.seen_row

    def _grow_seen(self) -> None:
        old = 0 if self._seen is None else self._seen.shape[0] - 1
        new = max(self.max_num_seqs, 2 * old)
        seen = torch.zeros((new + 1, self.vocab_size), dtype=torch.bool, device=self.device)
        if self._seen is not None:
            seen[:old] = self._seen[:old]
        self._seen = seen
        self._free_seen_rows += range(new - 1, old - 1, -1)

    def _advance(self, sampled: list[ScheduledChunk], host: HostSample) -> list[StepOutput]:
        outputs = []
        for i, chunk in enumerate(sampled):
            seq = chunk.seq
            state = self._state[seq]
            logprob = None
            if seq.params.logprobs is not None:
                logprob = logprob_row(self.tokenizer, host.tokens[i], host.logprob[i],
                                      host.top_ids[i] if host.top_ids else [],
                                      host.top_logprobs[i] if host.top_logprobs else [], seq.params.logprobs)
            if seq.first_token_s is None:
                seq.first_token_s = time.monotonic()
            error = self.grammars.accept(seq, host.tokens[i])
            if error is not None:
                outputs.append(StepOutput(seq=seq, token_ids=[], text="", error=error))
                continue
            outputs.append(state.advance(seq, host.tokens[i], logprob))
        for out in outputs:  # only once every row has advanced
            if out.is_finished or out.error is not None:
                self._release(out.seq)
        self.num_generated_tokens += len(outputs)
        return outputs


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
    window = getattr(text_config, "sliding_window", None)
    if not window or window >= max_model_len:
        return None
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(text_config, "use_sliding_window", True) is False:
        return None
    return int(window)
