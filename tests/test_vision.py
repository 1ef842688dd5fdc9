"""Vision chat in the continuous batch: greedy fp32 output equals the model's own `generate` on each request.

Four native families (tiny random Qwen2-VL, Qwen2.5-VL, LLaVA, GLM-4.1V built from configs): image
requests of different sizes and text-only requests arrive at different steps and share steps; prefill
is chunked (an image is never split), a prefix cache must not let two different images share KV, and
preemption under a tight KV budget does not change any output. Each family first shows that its
greedy output depends on the image.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from producer.protocol import ChatBody, ErrorCode, Request, TaskKind
from worker.engines.base import RequestRejected
from worker.engines.llm import LLMEngine, LLMEngineConfig
from worker.engines.vision import VisionModel
from worker.models.images import ImagePolicy

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "glm4v")


def make_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_request(request_id: str, parts: list, max_tokens: int = 8) -> Request:
    """parts: str (a text part) or PIL image (an image_url part with a data: URI), in order, in one user turn."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else
               {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in parts]
    body = ChatBody.model_validate({"messages": [{"role": "user", "content": content}],
                                    "generate_config": {"temperature": 0, "max_tokens": max_tokens}})
    return Request(id=request_id, task=TaskKind.CHAT, body=body, created_ms=0)


def reference(vlm, parts: list, max_tokens: int) -> list[int]:
    """The model's own generate on one request: its image processor over all images at once, the placeholder
    expanded by the processor's own count (grid / merge² or patches²), pixel_values into generate."""
    model, tokenizer, image_processor = vlm
    images = [p for p in parts if not isinstance(p, str)]
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    kwargs = {}
    counts: list[int] = []
    if images:
        kwargs = dict(image_processor(images=images, return_tensors="pt"))
        if "image_grid_thw" in kwargs:
            counts = (kwargs["image_grid_thw"].prod(-1) // image_processor.merge_size ** 2).tolist()
        else:
            counts = [(kwargs["pixel_values"].shape[-1] // model.config.vision_config.patch_size) ** 2] * len(images)
    image_token = model.config.image_token_id
    ids, k = [], 0
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        if token == image_token:
            ids += [image_token] * counts[k]
            k += 1
        else:
            ids.append(token)
    x = torch.tensor([ids])
    if "image_grid_thw" in kwargs or hasattr(model.model, "get_rope_index"):
        kwargs["mm_token_type_ids"] = (x == image_token).int()
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         **kwargs)
    return out[0, x.shape[1]:].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory, torch_threads):
    from worker.models.loading import load_model
    from worker.models.tiny_vlm import make_tiny_vlm

    path = make_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param, seed=0)
    model, tokenizer, image_processor = load_model(str(path))
    assert image_processor is not None
    return model, tokenizer, image_processor


def make_engine(vlm, policy: ImagePolicy = ImagePolicy(), **config) -> LLMEngine:
    model, tokenizer, image_processor = vlm
    config = {"max_num_seqs": 4, "max_num_batched_tokens": 24, "block_size": 4, "max_model_len": 128, **config}
    return LLMEngine(model, tokenizer, LLMEngineConfig(**config), vision=VisionModel(model, tokenizer, image_processor,
                                                                                     policy))


def _workload() -> list[tuple[str, list, int, int]]:
    """(request_id, parts, max_tokens, arrival step): images of different sizes, several per request, text-only
    turns, a different image in the same place as another request's (same tokens), and the same image again."""
    a, b = make_image(1, 60, 90), make_image(2, 60, 90)  # same size: same placeholder tokens
    return [
        ("v0", [a, "the cat is"], 10, 0),
        ("t0", ["hello world the river"], 8, 0),
        ("v1", [make_image(3, 40, 40), "a dog"], 6, 1),
        ("v2", ["two", make_image(4, 80, 50), "and", make_image(5, 30, 70), "is"], 12, 3),
        ("t1", ["one two three four five six seven"], 10, 4),
        ("v3", [b, "the cat is"], 10, 6),
        ("v4", [a, "the cat is"], 10, 9),
    ]


def run_engine(engine: LLMEngine, work) -> tuple[dict[str, list[int]], list[tuple[list, int, int]]]:
    """Outputs by request, and every scheduled chunk as (image spans, first token, one past the last)."""
    outputs: dict[str, list[int]] = {}
    chunks: list[tuple[list, int, int]] = []
    real_run = engine._run

    def recording_run(scheduled):
        chunks.extend((c.seq.image_spans, c.seq.num_computed, c.seq.num_computed + c.num_tokens) for c in scheduled)
        return real_run(scheduled)

    engine._run = recording_run
    pending = sorted(work, key=lambda w: w[3])
    step = 0
    while pending or engine.num_active:
        while pending and pending[0][3] <= step:
            request_id, parts, max_tokens, _ = pending.pop(0)
            engine.add(chat_request(request_id, parts, max_tokens))
        for out in engine.step():
            outputs.setdefault(out.seq.request_id, []).extend(out.token_ids)
        step += 1
        assert step < 2000, "engine made no progress"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return outputs, chunks


# ---------------------------------------------------------------- the comparison can fail


def test_model_is_sensitive_to_the_image(vlm):
    a, b = make_image(1, 60, 90), make_image(2, 60, 90)
    assert reference(vlm, [a, "the cat is"], 10) != reference(vlm, [b, "the cat is"], 10)


def test_features_of_another_image_are_caught(vlm, monkeypatch):
    """Feeding request v3 the features of v0's image (what a prefix cache keyed by tokens alone would do)
    changes its output: the exactness test below would see it."""
    a, b = make_image(1, 60, 90), make_image(2, 60, 90)
    engine = make_engine(vlm, enable_prefix_caching=False)
    seq_a = engine.add(chat_request("a", [a, "the cat is"], 10))
    seq_b = engine.add(chat_request("b", [b, "the cat is"], 10))
    engine._features[seq_b] = engine._features[seq_a]
    outputs, _ = run_engine(engine, [])
    assert outputs["b"] == outputs["a"] != reference(vlm, [b, "the cat is"], 10)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("tight_kv", [False, True], ids=["roomy", "preempting"])
def test_mixed_batch_equals_generate(vlm, tight_kv):
    work = _workload()
    engine = make_engine(vlm, max_cached_tokens=80 if tight_kv else None, max_model_len=80)
    outputs, chunks = run_engine(engine, work)
    for request_id, parts, max_tokens, _ in work:
        assert outputs[request_id] == reference(vlm, parts, max_tokens), request_id
    assert outputs["v3"] != outputs["v0"] == outputs["v4"]  # a different image in the same place, then the same
    for spans, start, end in chunks:  # no chunk ends inside an image it began before
        assert not any(start <= first < end < last for first, last, _ in spans), (spans, start, end)
    assert any(start < first and end >= last for spans, start, end in chunks for first, last, _ in spans)
    assert engine.blocks.num_hit_tokens > 0  # v4 reused v0's blocks, image included
    if tight_kv:
        assert engine.num_preemptions > 0


def test_decode_steps_mix_images_of_different_sizes_and_text(vlm):
    engine = make_engine(vlm, max_num_batched_tokens=64)
    work = [("t", ["hello world"], 6, 0), ("small", [make_image(3, 40, 40), "a"], 6, 0),
            ("large", [make_image(4, 80, 50), "b"], 6, 0)]
    decode_steps = []
    real_run = engine._run

    def recording_run(scheduled):
        if all(c.num_tokens == 1 for c in scheduled):
            decode_steps.append({c.seq.request_id for c in scheduled})
        return real_run(scheduled)

    engine._run = recording_run
    outputs, _ = run_engine(engine, work)
    assert {"t", "small", "large"} in decode_steps  # one forward decodes all three
    for request_id, parts, max_tokens, _ in work:
        assert outputs[request_id] == reference(vlm, parts, max_tokens), request_id


def test_resume_after_published_tokens_continues_exactly(vlm):
    """A request reclaimed from a dead worker is re-admitted with the tokens already published: its image is
    encoded again and the output goes on as if never interrupted."""
    from worker.request import Resume

    parts = ["two", make_image(4, 80, 50), "and", make_image(5, 30, 70), "is"]
    expected = reference(vlm, parts, 12)
    _, tokenizer, _ = vlm
    engine = make_engine(vlm)
    engine.add(chat_request("r", parts, 12), Resume(output_ids=expected[:5], text=tokenizer.decode(expected[:5]),
                                                     next_seq=5))
    outputs, _ = run_engine(engine, [])
    assert expected[:5] + outputs["r"] == expected


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_flex_attention_backend_serves_images_too(family, tmp_path, torch_threads):
    from worker.models.loading import load_model
    from worker.models.tiny_vlm import make_tiny_vlm

    vlm = load_model(str(make_tiny_vlm(tmp_path, family, seed=0)))
    work = _workload()[:4]
    outputs, _ = run_engine(make_engine(vlm, attention_backend="flex"), work)
    for request_id, parts, max_tokens, _ in work:
        assert outputs[request_id] == reference(vlm, parts, max_tokens), request_id


# ---------------------------------------------------------------- bad images fail alone


def _image_request(url: str) -> Request:
    body = ChatBody.model_validate({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]})
    return Request(id="bad", task=TaskKind.CHAT, body=body, created_ms=0)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory, torch_threads):
    from worker.models.loading import load_model
    from worker.models.tiny_vlm import make_tiny_vlm

    return load_model(str(make_tiny_vlm(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl", seed=0)))


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,!!!notbase64", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "cannot be decoded"),
    ("data:image/png," + "abc", "must be base64"),
    ("http://127.0.0.1:9/cat.png", "does not fetch image URLs"),
    ("/etc/hostname", "does not read local image files"),
    ("ftp://host/cat.png", "unsupported image URL scheme"),
])
def test_bad_image_is_invalid_request(qwen2_vl, url, message):
    engine = make_engine(qwen2_vl)
    with pytest.raises(RequestRejected) as caught:
        engine.add(_image_request(url))
    assert caught.value.code == ErrorCode.INVALID_REQUEST and message in caught.value.message
    assert engine.num_active == 0


def test_oversized_image_is_invalid_request(qwen2_vl):
    big = data_uri(make_image(0, 200, 200))
    engine = make_engine(qwen2_vl, policy=ImagePolicy(max_image_bytes=1000))
    with pytest.raises(RequestRejected, match="limit of 1000 bytes"):
        engine.add(_image_request(big))
    engine = make_engine(qwen2_vl, policy=ImagePolicy(max_image_pixels=100 * 100))
    with pytest.raises(RequestRejected, match="200x200 pixels"):
        engine.add(_image_request(big))
    engine = make_engine(qwen2_vl, max_num_batched_tokens=8)  # 200x200 is 16 tokens: one chunk cannot hold it
    with pytest.raises(RequestRejected, match="an image of 16 tokens"):
        engine.add(_image_request(big))


def test_placeholder_count_must_match_the_images(qwen2_vl):
    engine = make_engine(qwen2_vl)
    request = chat_request("x", [make_image(0, 40, 40), "look <|image_pad|> here"])
    with pytest.raises(RequestRejected, match="2 image placeholders for 1 images"):
        engine.add(request)


def test_text_only_model_rejects_images(tiny_llama):
    model, tokenizer = tiny_llama
    engine = LLMEngine(model, tokenizer, LLMEngineConfig(max_num_seqs=2))
    with pytest.raises(RequestRejected, match="does not accept image inputs"):
        engine.add(chat_request("x", [make_image(0, 40, 40), "hi"]))


# ---------------------------------------------------------------- through a worker


class _ImageServer:
    """A loopback HTTP server: /cat.png an image; /gated.png the same, trickled a byte at a time (never idle
    past the fetch timeout) until the test opens `gate`; /slow.png silent past the fetch timeout; /big.png over
    the cap; /missing.png a 404."""

    def __init__(self, image_bytes: bytes, delay_s: float):
        import http.server
        import threading
        import time

        gate = self.gate = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path == "/slow.png":
                    time.sleep(delay_s)
                body = image_bytes * (50 if self.path == "/big.png" else 1)
                self.send_response(200 if self.path != "/missing.png" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    sent = 0
                    while self.path == "/gated.png" and not gate.is_set() and sent < len(body) - 1:
                        self.wfile.write(body[sent:sent + 1])
                        self.wfile.flush()
                        sent += 1
                        time.sleep(0.05)
                    self.wfile.write(body[sent:])
                except OSError:
                    pass  # the worker gave up (timeout)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _content(parts):
    """parts: str (text) or ("url", URL) (an image part)."""
    return [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": p[1]}}
            for p in parts]


@pytest.mark.redis
def test_vision_chat_through_a_worker(tmp_path, redis_server_url, prefix, rds, torch_threads):
    """Image requests (data: URI, http URL, local file), text requests and bad images in one worker: the good
    ones equal generate, each bad one is an invalid_request alone, a slow URL never stalls the others."""
    from producer import Client
    from tests.conftest import WorkerThread
    from worker.config import WorkerConfig
    from worker.main import build_worker
    from worker.models.loading import load_model
    from worker.models.tiny_vlm import make_tiny_vlm

    path = make_tiny_vlm(tmp_path / "vlm", "qwen2_vl", seed=0)
    vlm = load_model(str(path))
    cat, dog = make_image(1, 60, 90), make_image(2, 40, 60)
    buf = io.BytesIO()
    dog.save(buf, format="PNG")
    (tmp_path / "dog.png").write_bytes(buf.getvalue())
    server = _ImageServer(buf.getvalue(), delay_s=3.0)
    config = WorkerConfig(model_name="vlm", model_path=str(path), redis_url=redis_server_url, prefix=prefix,
                          read_block_ms=100, heartbeat_interval_s=0.2, grace_s=5.0, max_num_seqs=8,
                          max_num_batched_tokens=64, allow_image_urls=True, allow_image_files=True,
                          max_image_bytes=len(buf.getvalue()) * 10, image_fetch_timeout_s=0.5)
    handle = WorkerThread(build_worker(config)).start()
    client = Client(redis_server_url, prefix=prefix)
    try:
        model = client.get_model("vlm")
        cfg = {"temperature": 0, "max_tokens": 8}

        def submit(parts):
            return model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": _content(parts)}]}, cfg)

        gated = submit([("url", f"{server.url}/gated.png"), "a dog"])
        text = submit(["one two three"])
        events = list(client.events(text, timeout_s=60))  # finishes while the gated image is still being fetched
        assert events[-1].type.value == "done" and not server.gate.is_set()
        assert gated in {p.request.id for p in handle.worker.intake.parked}
        server.gate.set()
        good = {
            gated: [dog, "a dog"],
            submit([("url", data_uri(cat)), "the cat is"]): [cat, "the cat is"],
            submit([("url", f"{server.url}/cat.png"), "a dog"]): [dog, "a dog"],
            submit([("url", str(tmp_path / "dog.png")), "a dog"]): [dog, "a dog"],
            submit(["hello world the river"]): ["hello world the river"],
        }
        bad = {
            submit([("url", f"{server.url}/slow.png"), "x"]): "cannot fetch the image",
            submit([("url", f"{server.url}/big.png"), "x"]): "limit of",
            submit([("url", f"{server.url}/missing.png"), "x"]): "cannot fetch the image",
            submit([("url", "data:image/png;base64,AAAA"), "x"]): "cannot be decoded",
            submit([("url", str(tmp_path / "nope.png")), "x"]): "cannot read the image file",
        }
        for request_id, parts in good.items():
            events = list(client.events(request_id, timeout_s=60))
            assert events[-1].type.value == "done", events[-1]
            assert [t for e in events[:-1] for t in e.token_ids or []] == reference(vlm, parts, 8)
        for request_id, needle in bad.items():
            events = list(client.events(request_id, timeout_s=60))
            assert [e.type.value for e in events] == ["error"]
            assert events[0].code == ErrorCode.INVALID_REQUEST and needle in events[0].message, events[0].message
    finally:
        client.close()
        handle.stop()
        server.close()
