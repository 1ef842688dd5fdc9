"""The one-at-a-time path for a `trust_remote_code` model whose forward the batched engine cannot drive.

The model is a tiny random VLM whose modeling code sits in its own directory (config.json's auto_map),
with its own attention and its own image handling (worker/models/remote_code/). Shown: it is sensitive
to its image; the batched engine refuses it and auto mode falls back to sequential (and says so);
without --trust-remote-code the worker refuses to load it; greedy output equals the model's own
generate; and through a real worker: concurrent requests all complete (one at a time), a bad one fails
alone, an abort lands mid-generation while the loop keeps turning, and the next request then runs.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from producer.protocol import ChatBody, ErrorCode, Request, TaskKind, now_ms
from tests.test_vision import data_uri, make_image
from worker.engines.base import RequestRejected
from worker.engines.sequential import SequentialEngine

HOLD_S = 30  # a held forward that the test never releases fails the test instead of hanging it


@pytest.fixture(scope="module")
def remote_path(tmp_path_factory, torch_threads):
    from worker.models.tiny_remote_vlm import make_tiny_remote_vlm

    return make_tiny_remote_vlm(tmp_path_factory.mktemp("remote-vlm"), seed=0)


@pytest.fixture(scope="module")
def remote(remote_path):
    from worker.models.loading import load_model

    return load_model(str(remote_path), trust_remote_code=True)


def chat_request(request_id: str, parts: list, max_tokens: int = 8, **config) -> Request:
    content = [{"type": "text", "text": p} if isinstance(p, str) else
               {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in parts]
    body = ChatBody.model_validate({"messages": [{"role": "user", "content": content}],
                                    "generate_config": {"temperature": 0, "max_tokens": max_tokens, **config}})
    return Request(id=request_id, task=TaskKind.CHAT, body=body, created_ms=0)


def reference(remote, parts: list, max_tokens: int) -> list[int]:
    """The model's own generate on one request: chat template with `<image>` per image, pixel_values."""
    model, tokenizer, image_processor = remote
    images = [p for p in parts if not isinstance(p, str)]
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    x = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    kwargs = dict(image_processor(images=images, return_tensors="pt")) if images else {}
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         **kwargs)
    return out[0, x.shape[1]:].tolist()


def run_engine(engine: SequentialEngine, requests: list[Request]) -> dict[str, list]:
    """Every request to its end: {id: [token ids, text, finish_reason or error]}."""
    seqs = [engine.add(r) for r in requests]
    results = {s.request_id: [[], "", None] for s in seqs}
    while engine.num_active:
        for out in engine.step():
            result = results[out.seq.request_id]
            result[0] += out.token_ids
            result[1] += out.text
            if out.is_finished or out.error is not None:
                result[2] = out.finish_reason or out.error_code
    return results


def test_model_is_sensitive_to_the_image(remote):
    cat, dog = make_image(1, 40, 60), make_image(2, 40, 60)
    assert reference(remote, [cat, "the cat is"], 8) != reference(remote, [dog, "the cat is"], 8)


def test_batched_engine_cannot_drive_it(remote_path):
    from worker.engines.llm import LLMEngine
    from worker.models.loading import load_model

    model, tokenizer, _ = load_model(str(remote_path), trust_remote_code=True)
    with pytest.raises(ValueError, match="attention interface"):
        LLMEngine(model, tokenizer)


def _config(path, **overrides):
    from worker.config import WorkerConfig

    return WorkerConfig(model_name="remote", model_path=str(path), **overrides)


def test_auto_mode_falls_back_to_sequential_and_says_so(remote_path, caplog):
    from worker.main import build_engine

    with caplog.at_level(logging.INFO, logger="redbatch.worker"):
        engine = build_engine(_config(remote_path, trust_remote_code=True))
    assert isinstance(engine, SequentialEngine)
    assert "serve mode sequential" in caplog.text and "cannot run in the batched engine" in caplog.text
    with pytest.raises(AttributeError, match="get_image_features"):
        build_engine(_config(remote_path, trust_remote_code=True, serve_mode="batched"))


def test_native_model_stays_batched(tiny_llama_path, caplog):
    from worker.engines.llm import LLMEngine
    from worker.main import build_engine

    with caplog.at_level(logging.INFO, logger="redbatch.worker"):
        assert isinstance(build_engine(_config(tiny_llama_path, max_model_len=64, kv_cache_tokens=64)), LLMEngine)
    assert "serve mode batched" in caplog.text
    assert isinstance(build_engine(_config(tiny_llama_path, serve_mode="sequential")), SequentialEngine)


def test_without_the_flag_the_worker_refuses_to_load(remote_path):
    from worker.main import build_engine
    from worker.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="ships its own code .*modeling_tiny_remote.*--trust-remote-code"):
        build_engine(_config(remote_path))


def test_greedy_output_equals_its_own_generate(remote):
    model, tokenizer, image_processor = remote
    engine = SequentialEngine(model, tokenizer, image_processor)
    cat, dog = make_image(1, 40, 60), make_image(2, 30, 30)
    work = {"cat": [cat, "the cat is"], "dog": [dog, "a dog"], "two": [cat, "and", dog], "text": ["one two three"]}
    results = run_engine(engine, [chat_request(k, parts, 10) for k, parts in work.items()])
    for key, parts in work.items():
        ids, text, finish = results[key]
        assert ids == reference(remote, parts, 10), key
        assert text == tokenizer.decode(ids, skip_special_tokens=True) and finish in ("length", "stop")


def test_stop_string_max_tokens_and_deadline(remote):
    model, tokenizer, image_processor = remote
    engine = SequentialEngine(model, tokenizer, image_processor)
    cat = make_image(1, 40, 60)
    full = tokenizer.decode(reference(remote, [cat, "the cat is"], 12), skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    late = chat_request("late", ["hello"])
    late = late.model_copy(update={"deadline_ms": now_ms() - 1})  # past its deadline before it starts here
    results = run_engine(engine, [chat_request("stop", [cat, "the cat is"], 12, stop=stop),
                                  chat_request("short", [cat, "the cat is"], 3), late])
    assert results["stop"][1] == full[:full.index(stop)] and results["stop"][2] == "stop"
    assert len(results["short"][0]) == 3 and results["short"][2] == "length"
    assert results["late"] == [[], "", ErrorCode.EXPIRED]


def test_unsupported_options_are_invalid_request(remote):
    model, tokenizer, image_processor = remote
    engine = SequentialEngine(model, tokenizer, image_processor)
    with pytest.raises(RequestRejected, match="logprobs"):
        engine.add(chat_request("a", ["hi"], logprobs=2))
    with pytest.raises(RequestRejected, match="grammar"):
        engine.add(chat_request("b", ["hi"], response_format={"type": "json_object"}))
    broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(RequestRejected, match="cannot be decoded"):
        engine.add(Request(id="c", task=TaskKind.CHAT, created_ms=0,
                           body=ChatBody.model_validate({"messages": [{"role": "user", "content": broken}]})))
    assert engine.num_active == 0


def test_resume_continues_after_the_published_tokens(remote):
    from worker.request import Resume

    model, tokenizer, image_processor = remote
    cat = make_image(1, 40, 60)
    expected = reference(remote, [cat, "the cat is"], 10)
    engine = SequentialEngine(model, tokenizer, image_processor)
    published = expected[:4]
    seq = engine.add(chat_request("r", [cat, "the cat is"], 10),
                     Resume(output_ids=published, text=tokenizer.decode(published), next_seq=4))
    assert engine.finish_if_complete(seq) is None
    rest = []
    while engine.num_active:
        rest += [t for out in engine.step() for t in out.token_ids]
    assert published + rest == expected


def test_a_model_error_fails_that_request_alone(remote):
    model, tokenizer, image_processor = remote
    engine = SequentialEngine(model, tokenizer, image_processor)
    calls = []

    def fail_third_forward(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fault")

    handle = model.register_forward_pre_hook(fail_third_forward)
    try:
        results = run_engine(engine, [chat_request("bad", ["hello"], 8), chat_request("good", ["one two three"], 8)])
    finally:
        handle.remove()
    assert results["bad"][2] == ErrorCode.MODEL_ERROR  # its first tokens may or may not have been published
    assert results["good"][0] == reference(remote, ["one two three"], 8)


def test_seeded_sampling_repeats(remote):
    model, tokenizer, image_processor = remote
    engine = SequentialEngine(model, tokenizer, image_processor)
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 50}
    results = run_engine(engine, [chat_request(f"s{i}", ["one two"], 12, seed=seed, **sampled)
                                  for i, seed in enumerate((7, 7, 8))])
    assert results["s0"][0] == results["s1"][0] != results["s2"][0]
    assert results["s0"][0] != reference(remote, ["one two"], 12)  # sampled, not greedy


def test_remote_vlm_mapping_only_causal_lm_serves_text(tmp_path):
    """Like glm-4v-9b: auto_map has only AutoModelForCausalLM and no image processor loads; text works, images
    are refused."""
    from worker.main import build_engine
    from worker.models.tiny_remote_vlm import make_tiny_remote_vlm

    path = make_tiny_remote_vlm(tmp_path / "text-only", seed=0, causal_lm_only=True)
    engine = build_engine(_config(path, trust_remote_code=True))
    assert isinstance(engine, SequentialEngine) and engine.image_processor is None
    with pytest.raises(RequestRejected, match="does not accept image inputs"):
        engine.add(chat_request("img", [make_image(1, 40, 60), "hi"]))
    results = run_engine(engine, [chat_request("text", ["one two three"], 6)])
    assert results["text"][0] == reference((engine.model, engine.tokenizer, None), ["one two three"], 6)


class _HeldForward:
    """A forward pre-hook: the `n`-th forward of the model waits until the test releases it."""

    def __init__(self, model, n: int):
        self.n, self.num_calls = n, 0
        self.entered, self.released = threading.Event(), threading.Event()
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.num_calls += 1
        if self.num_calls == self.n:
            self.entered.set()
            self.released.wait(HOLD_S)

    def remove(self):
        self.released.set()
        self.handle.remove()


@pytest.mark.redis
def test_through_a_worker(remote_path, remote, redis_server_url, prefix, rds):
    """Concurrent requests all complete (served one at a time) and equal generate; a bad one fails alone; an
    abort lands while a forward is held (the loop keeps reading, aborting and publishing meanwhile) and the
    next request then runs."""
    from producer import Client
    from tests.conftest import WorkerThread
    from worker.main import build_worker

    config = _config(remote_path, trust_remote_code=True, redis_url=redis_server_url, prefix=prefix,
                     read_block_ms=100, heartbeat_interval_s=0.2, grace_s=5.0, max_num_seqs=8)
    handle = WorkerThread(build_worker(config)).start()
    assert isinstance(handle.worker.engine, SequentialEngine)
    client = Client(redis_server_url, prefix=prefix)
    cat, dog = make_image(1, 40, 60), make_image(2, 30, 30)
    try:
        model = client.get_model("remote")

        def submit(parts, **cfg):
            content = [{"type": "text", "text": p} if isinstance(p, str) else
                       {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in parts]
            return model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": content}]},
                                {"temperature": 0, "max_tokens": 8, **cfg})

        work = {"cat": [cat, "the cat is"], "dog": [dog, "a dog"], "text": ["one two three"], "two": [cat, dog, "x"]}
        ids = {key: submit(parts) for key, parts in work.items()}
        bad = submit(["x"], logprobs=1)
        broken = model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        for key, request_id in ids.items():
            events = list(client.events(request_id, timeout_s=60))
            assert events[-1].type.value == "done", events[-1]
            assert [t for e in events[:-1] for t in e.token_ids or []] == reference(remote, work[key], 8), key
            assert [e.seq for e in events] == list(range(len(events)))
        for request_id, needle in ((bad, "logprobs"), (broken, "cannot be decoded")):
            events = list(client.events(request_id, timeout_s=60))
            assert [e.type.value for e in events] == ["error"]
            assert events[0].code == ErrorCode.INVALID_REQUEST and needle in events[0].message

        held = _HeldForward(handle.worker.engine.model, n=4)  # the 4th forward of the next request: mid-generation
        try:
            long = submit([cat, "the cat is"], max_tokens=200, ignore_eos=True)
            assert held.entered.wait(HOLD_S)
            after = submit([dog, "a dog"])  # read and queued while the generate is stuck in its forward
            first = next(iter(client.events(long, timeout_s=60)))
            assert first.type.value == "token"
            assert model.abort(long)
            events = list(client.events(long, timeout_s=60))  # the aborted event is written meanwhile
            assert events[-1].type.value == "aborted" and not held.released.is_set()
        finally:
            held.remove()
        assert all(e.type.value == "token" for e in events[:-1]) and len(events) - 1 < 200
        events = list(client.events(after, timeout_s=60))
        assert events[-1].type.value == "done"
        assert [t for e in events[:-1] for t in e.token_ids or []] == reference(remote, [dog, "a dog"], 8)
    finally:
        client.close()
        handle.stop()
