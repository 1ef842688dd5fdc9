"""One request at a time through the model's own `generate`, for a model the paged engine cannot drive.

A `trust_remote_code` model whose forward does not attend through transformers' attention
interface (its own attention, its own image handling: CogVLM2, MiniCPM-V-2.6 and the like) cannot
run in the packed step. This engine runs `model.generate` (the model's own code, its own cache) for
one request at a time on a thread of its own; the loop thread keeps turning meanwhile: reading,
abort checks, heartbeats, lease renewal and publishing go on while a generate runs. step() waits at
most STEP_WAIT_S for tokens, then returns what arrived: the same StepOutputs (text deltas, stop
strings, EOS, max_tokens, tool calls) as the batched engine, through the same OutputState.

Abort, a stop string, or the loop's end set the request's stop flag, which a StoppingCriteria reads
after every token: generate ends within one forward, and whatever it produced after the flag is
dropped. The next request starts once that generate has returned (never two at a time). A request
whose deadline passes while it waits here is answered `expired`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from producer.protocol import ChatBody, ErrorCode, Request, TaskKind, now_ms
from worker.engines.base import RequestRejected
from worker.engines.grammar import request_grammar
from worker.engines.outputs import OutputState
from worker.engines.prompts import check_lengths, prompt_ids
from worker.engines.sampler import request_seed
from worker.engines.text import IncrementalDetokenizer, StopStringMatcher
from worker.engines.vlm_adapters import FamilyInputs, adapter_for, chat_turns
from worker.models.images import ImageError, ImagePolicy
from worker.models.tool_parsers import ToolCalling
from worker.request import Resume, SeqStatus, Sequence, StepOutput

log = logging.getLogger("redbatch.engine")
STEP_WAIT_S = 0.05  # step() waits this long for a token before it lets the loop turn
_END = object()  # the generate thread's last item when generate returned


@dataclass(frozen=True)
class SequentialEngineConfig:
    max_num_seqs: int = 4  # requests held (one runs, the others wait their turn)
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped at 8192
    max_tokens_limit: int = 32768
    tool_parser: str = "auto"


@dataclass(eq=False)
class _Job:
    seq: Sequence
    state: OutputState
    inputs: dict[str, torch.Tensor]  # generate's inputs: input_ids [1, P + resumed], attention_mask, pixel_values…
    deadline_ms: int | None
    cleanup: Callable[[], None] | None = None  # the input adapter's (temporary image files), once done
    stop: threading.Event = field(default_factory=threading.Event)
    items: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # token id lists, then _END or an exception
    thread: threading.Thread | None = None


class _Tokens:
    """A generate streamer: every new token (not the prompt) into the job's queue."""

    def __init__(self, items: queue.SimpleQueue):
        self.items = items
        self.is_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.is_prompt:  # generate's first put is the prompt
            self.is_prompt = False
            return
        self.items.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _StopFlag:
    """A StoppingCriteria: stop at the next token once the flag is set (abort, stop string, shutdown)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


class SequentialEngine:
    tasks = (TaskKind.GENERATE, TaskKind.CHAT)

    def __init__(self, model, tokenizer, image_processor=None,
                 config: SequentialEngineConfig = SequentialEngineConfig(), policy: ImagePolicy | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.policy = policy if policy is not None else ImagePolicy()
        self.config = config
        self.max_num_seqs = config.max_num_seqs
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_model_len = min(config.max_model_len or 8192, getattr(mc, "max_position_embeddings", 8192) or 8192)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        from worker.engines.llm import _eos_ids

        self.adapter = adapter_for(model, tokenizer)  # the seed's remote-code VLM families: their own input code
        self.eos_ids = _eos_ids(model, tokenizer) | (self.adapter.extra_eos_ids() if self.adapter else set())
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.tool_calling = ToolCalling(tokenizer, config.tool_parser, model.config)
        self.device = next(model.parameters()).device
        self.waiting: list[_Job] = []
        self.current: _Job | None = None
        self._stopping: _Job | None = None  # aborted or finished; its generate has not returned yet
        self.num_steps = 0
        self.num_generated_tokens = 0

    # ------------------------------------------------------------ requests in and out

    @property
    def num_active(self) -> int:
        return len(self.waiting) + (self.current is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free(self) -> int:
        return self.max_num_seqs - self.num_active

    def sequences(self) -> list[Sequence]:
        return ([self.current.seq] if self.current is not None else []) + [j.seq for j in self.waiting]

    def add(self, request: Request, resume: Resume | None = None) -> Sequence:
        self._check_supported(request)
        family = self._family_inputs(request) if self.adapter is not None else None
        try:
            return self._add(request, resume, family)
        except BaseException:
            if family is not None and family.cleanup is not None:
                family.cleanup()
            raise

    def _add(self, request: Request, resume: Resume | None, family: FamilyInputs | None) -> Sequence:
        if family is not None:
            ids = family.prompt_ids
            if not ids or max(ids) >= self.vocab_size:  # add() removes the family's files on the way out
                raise RequestRejected(ErrorCode.INVALID_REQUEST, "the prompt is empty or outside the vocabulary")
        else:
            ids = prompt_ids(request, self.tokenizer, self.tasks, self.vocab_size,
                             accepts_images=self.image_processor is not None)
        cfg = request.generate_config
        max_tokens = check_lengths(len(ids), cfg.max_tokens, self.max_model_len, self.config.max_tokens_limit)
        images = self._images(request, ids) if family is None else {}
        seq = Sequence(request_id=request.id, prompt_ids=ids, params=cfg, max_tokens=max_tokens,
                       priority=request.priority)
        tools = self.tool_calling.parser_for(request)
        keep_ids = self.tool_calling.keep_ids if tools is not None else frozenset()
        state = OutputState(detok=IncrementalDetokenizer(self.tokenizer, keep_special_ids=keep_ids),
                            stops=StopStringMatcher(cfg.stop_strings), seed=request_seed(cfg.seed),
                            stop_token_ids=frozenset(cfg.stop_token_ids or ()), eos_ids=self.eos_ids, tools=tools)
        if resume is not None:
            state.resume(seq, resume)
        if family is not None:
            inputs = self.adapter.extend(family.inputs, seq.output_ids)
        else:
            x = torch.tensor([seq.all_ids], device=self.device)  # [1, P + resumed]: generate goes on from there
            inputs = {"input_ids": x, "attention_mask": torch.ones_like(x), **images}
        self.waiting.append(_Job(seq, state, inputs, request.deadline_ms, family.cleanup if family else None))
        return seq

    def _family_inputs(self, request: Request) -> FamilyInputs:
        """A chat through the family's own input code (its adapter); any other prompt as ids, text only."""
        body = request.body
        if request.task is not TaskKind.CHAT or not isinstance(body, ChatBody):
            ids = prompt_ids(request, self.tokenizer, self.tasks, self.vocab_size)
            return FamilyInputs(ids, self.adapter.plain(ids))
        self.adapter.check(body)
        try:
            family = self.adapter.build(chat_turns(body, self._open_image))
        except ImageError as exc:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, str(exc)) from None
        except (ValueError, TypeError, KeyError, AssertionError) as exc:
            raise RequestRejected(ErrorCode.INVALID_REQUEST,
                                  f"{self.adapter.family}'s input code refused the request: {exc}") from None
        return family

    def _open_image(self, url: str):
        return self.policy.open(self.policy.read(url))

    def _check_supported(self, request: Request) -> None:
        cfg = request.generate_config
        why = None
        if cfg.logprobs is not None:
            why = "logprobs"
        elif request_grammar(request, self.tool_calling.format) is not None:
            why = "response_format and enforced tool_choice (grammars)"
        if why is not None:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"{why}: not available for this model (served one request "
                                  f"at a time through its own generate; see docs/engine.md)")

    def _images(self, request: Request, ids: list[int]) -> dict[str, torch.Tensor]:
        """The image processor's tensors for the request's images (all of them, in prompt order), at admission."""
        body = request.body
        if not isinstance(body, ChatBody) or not any(m.has_images for m in body.messages):
            return {}
        urls = [p.image_url.url for m in body.messages if isinstance(m.content, list)
                for p in m.content if p.type == "image_url"]
        num_slots = ids.count(self.image_token_id) if self.image_token_id is not None else len(urls)
        if num_slots != len(urls):
            raise RequestRejected(ErrorCode.INVALID_REQUEST,
                                  f"the chat template wrote {num_slots} image placeholders for {len(urls)} images")
        try:
            images = [self._open_image(url) for url in urls]
        except ImageError as exc:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, str(exc)) from None
        try:
            processed = self.image_processor(images=images, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as exc:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"the image processor refused the image: {exc}") from None
        dtype = self.model.get_input_embeddings().weight.dtype
        return {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in processed.items() if torch.is_tensor(v)}

    def finish_if_complete(self, seq: Sequence) -> StepOutput | None:
        job = next(j for j in self.waiting if j.seq is seq)
        out = job.state.finish_resumed(seq)
        if out is not None:
            self.waiting.remove(job)
            _cleanup(job)
        return out

    def abort(self, request_id: str) -> Sequence | None:
        if self.current is not None and self.current.seq.request_id == request_id:
            job = self.current
            self._retire()
            return job.seq
        for job in self.waiting:
            if job.seq.request_id == request_id:
                self.waiting.remove(job)
                _cleanup(job)
                return job.seq
        return None

    def fail_running(self) -> list[Sequence]:
        if self.current is None:
            return []
        job = self.current
        self._retire()
        return [job.seq]

    def metrics(self) -> dict[str, int | float]:
        return {}

    def close(self) -> None:
        """Stop the running generate (the worker is exiting); its request is handed back unfinished."""
        if self.current is not None:
            self.current.stop.set()
        for job in self.waiting:
            _cleanup(job)
        if self.adapter is not None:
            self.adapter.close()

    def _retire(self) -> None:
        """The current request is done here (finished, failed or aborted): stop its generate, drop what comes."""
        job, self.current = self.current, None
        job.stop.set()
        job.seq.status = SeqStatus.FINISHED
        if job.thread is not None and job.thread.is_alive():
            self._stopping = job

    # ------------------------------------------------------------ the step

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        if self.current is None:
            outputs += self._start_next()
        if self.current is None:
            if self.waiting or self._stopping is not None:
                time.sleep(STEP_WAIT_S / 5)  # the last generate is winding down: let the loop turn
            return outputs
        out = self._collect(self.current)
        if out is not None:
            outputs.append(out)
        self.num_steps += 1
        return outputs

    def _start_next(self) -> list[StepOutput]:
        """Start the first waiting request once the previous generate has returned; expire the overdue."""
        if self._stopping is not None:
            if self._stopping.thread.is_alive():
                return []
            self._stopping = None
        expired = []
        while self.waiting and self.current is None:
            job = self.waiting.pop(0)
            if job.deadline_ms is not None and not job.seq.output_ids and now_ms() > job.deadline_ms:
                job.seq.status = SeqStatus.FINISHED
                _cleanup(job)
                expired.append(StepOutput(seq=job.seq, token_ids=[], text="", error_code=ErrorCode.EXPIRED,
                                          error="the request's deadline passed before it started"))
                continue
            job.seq.status = SeqStatus.RUNNING
            job.thread = threading.Thread(target=self._generate, args=(job,), daemon=True,
                                          name=f"generate-{job.seq.request_id}")
            self.current = job
            job.thread.start()
        return expired

    def _generate(self, job: _Job) -> None:
        """On the job's thread: the model's own generate, its tokens streamed into the job's queue."""
        from transformers import StoppingCriteriaList

        cfg = job.seq.params
        try:
            if cfg.seed is not None:
                torch.manual_seed(job.state.seed)  # one generate at a time: the global generator is this request's
            kwargs = {**self._generate_kwargs(job), "streamer": _Tokens(job.items),
                      "stopping_criteria": StoppingCriteriaList([_StopFlag(job.stop)])}
            with torch.inference_mode():
                if self.adapter is not None:
                    self.adapter.generate(job.inputs, **kwargs)
                else:
                    self.model.generate(**job.inputs, **kwargs)
            job.items.put(_END)
        except Exception as exc:  # noqa: BLE001 - a model error fails this request alone (step() reports it)
            job.items.put(exc)
        finally:
            _cleanup(job)

    def _generate_kwargs(self, job: _Job) -> dict:
        cfg = job.seq.params
        kwargs = {"max_new_tokens": job.seq.max_tokens - job.seq.num_output_tokens, "do_sample": not cfg.is_greedy,
                  "repetition_penalty": cfg.repetition_penalty, "pad_token_id": self.tokenizer.pad_token_id,
                  "eos_token_id": None if cfg.ignore_eos else sorted(self.eos_ids) or None}
        if not cfg.is_greedy:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _collect(self, job: _Job) -> StepOutput | None:
        """The tokens the running generate produced since the last step, as one StepOutput (None: nothing yet)."""
        try:
            first = job.items.get(timeout=STEP_WAIT_S)
        except queue.Empty:
            return None
        items = [first]
        while not job.items.empty():
            items.append(job.items.get_nowait())
        out = None
        for item in items:
            if item is _END:
                out = _merge(out, job.state.end(job.seq))
            elif isinstance(item, Exception):
                log.error("generate failed for request %s: %s: %s", job.seq.request_id, type(item).__name__, item)
                out = StepOutput(seq=job.seq, token_ids=[], text="", error=f"{type(item).__name__}: {item}")
            else:
                for token in item:
                    out = _merge(out, job.state.advance(job.seq, token, None))
                    self.num_generated_tokens += 1
                    if out.is_finished:
                        break
            if out is not None and (out.is_finished or out.error is not None):
                self._retire()
                break
        return out


def _cleanup(job: _Job) -> None:
    """The job's inputs are no longer needed (its generate returned, or it never started): once."""
    cleanup, job.cleanup = job.cleanup, None
    if cleanup is not None:
        try:
            cleanup()
        except OSError as exc:
            log.warning("cleanup after request %s failed: %s", job.seq.request_id, exc)


def _merge(a: StepOutput | None, b: StepOutput) -> StepOutput:
    """Two consecutive outputs of one request as one (tokens and text concatenated, b's end)."""
    if a is None:
        return b
    calls = (a.tool_calls or []) + (b.tool_calls or [])
    return StepOutput(seq=b.seq, token_ids=a.token_ids + b.token_ids, text=a.text + b.text,
                      finish_reason=b.finish_reason, tool_calls=calls or None)
