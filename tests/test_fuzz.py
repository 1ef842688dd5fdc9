"""Hostile input: 10,000+ generated malformed entries straight onto the stream, mixed with valid ones.

The worker must never die, every valid request must complete with the right output,
every bad entry with a readable id must get exactly one `error` event, and every
entry without a readable id must be dead-lettered.
"""

from __future__ import annotations

import json
import random
import string

import pytest
import torch

from producer.keys import GROUP, Keys, check_request_id
from producer.protocol import EventType, GenerateBody, TaskKind, decode_event, encode_request
from tests.test_loop import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

NUM_BAD = 10_000
NUM_GOOD = 40
VALID_PROMPTS = ["the river", "a cloud over the mountain", "redis stream worker", "café 東京"]


def _valid_body(rng: random.Random) -> dict:
    return {"prompt": rng.choice(VALID_PROMPTS), "generate_config": {"max_tokens": 4, "temperature": 0}}


def _bad_body(rng: random.Random) -> str | bytes:
    """A body that must be refused (`error` event) whatever else is in the entry."""
    choice = rng.randrange(14)
    prompt = {"prompt": "x"}
    return [
        lambda: "{not json",
        lambda: json.dumps([1, 2, 3]),
        lambda: json.dumps({"prompt": "x", "generate_config": {"max_tokens": rng.choice([-5, 0, 10**9, "7", 1.5, True])}}),
        lambda: '{"prompt": "x", "generate_config": {"temperature": NaN}}',
        lambda: json.dumps({"prompt": "x", "generate_config": {"temperature": rng.choice([-1, 1e9, "hot"])}}),
        lambda: json.dumps({"prompt": "x", "generate_config": {rng.choice(["max_tokns", "beam", ""]): 1}}),
        lambda: json.dumps({"prompt_token_ids": [rng.randrange(10**6, 10**9)]}),
        lambda: json.dumps({"prompt_token_ids": [5] * 3000}),  # longer than the context
        lambda: json.dumps({"prompt": None}),
        lambda: json.dumps({**prompt, "prompt_token_ids": [1]}),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),  # invalid UTF-8 (almost surely)
        lambda: "x" * (1 << 20 + 1),  # over the body limit
        lambda: json.dumps({"prompt": "x", "generate_config": {"stop": ["" for _ in range(3)]}}),
        lambda: "[" * 100_000 + "]" * 100_000,  # nesting deeper than the JSON parser allows
    ][choice]()


def _bad_fields(rng: random.Random, request_id: str) -> dict:
    """An entry with a readable id that must get exactly one error event."""
    kind = rng.randrange(6)
    fields = {"v": "1", "id": request_id, "task": "generate", "body": json.dumps({"prompt": "x"}), "created": "1"}
    if kind == 0:
        fields["body"] = _bad_body(rng)
    elif kind == 1:
        fields["v"] = rng.choice(["2", "0", "", "v1", "1.0", "99999999999"])
    elif kind == 2:
        fields["task"] = rng.choice(["paint", "", "GENERATE", "text_to_image\x00", "chat"])  # chat: wrong body
    elif kind == 3:
        del fields[rng.choice(["v", "task", "body", "created"])]
    elif kind == 4:
        fields["created"] = rng.choice(["yesterday", "-", "1e3", "--5", "9" * 40])
    else:
        fields["body"] = _bad_body(rng)
        fields["extra"] = "".join(rng.choice(string.printable) for _ in range(20))
    return fields


def _unreadable_id_fields(rng: random.Random) -> dict:
    bad_id = rng.choice(["*", "{", "}", "a b", "x" * 10_000, "", "id\n", "ü", "a/b", "$(rm)", "x" * 129])
    fields = {"v": "1", "task": "generate", "body": json.dumps({"prompt": "x"}), "created": "1"}
    if rng.random() < 0.8:
        fields["id"] = bad_id
    return fields


def test_hostile_stream_never_kills_the_worker(worker_factory, rds, prefix, tiny_llama):
    rng = random.Random(1234)
    keys = Keys(prefix)
    handle = worker_factory(max_num_seqs=16, max_body_bytes=1 << 20, max_model_len=512).start()
    stream = keys.requests("tiny")
    bad_ids, good, unreadable = [], {}, 0
    pipe = rds.pipeline(transaction=False)
    for i in range(NUM_BAD + NUM_GOOD):
        if i % ((NUM_BAD + NUM_GOOD) // NUM_GOOD) == 0 and len(good) < NUM_GOOD:
            request_id = f"good-{i}"
            body = _valid_body(rng)
            good[request_id] = body["prompt"]
            pipe.xadd(stream, encode_request(request_id, TaskKind.GENERATE, GenerateBody.model_validate(body)))
        elif rng.random() < 0.1:
            pipe.xadd(stream, _unreadable_id_fields(rng))
            unreadable += 1
        else:
            request_id = f"bad-{i}"
            bad_ids.append(request_id)
            pipe.xadd(stream, _bad_fields(rng, request_id))
        if i % 500 == 0:
            pipe.execute()
    for _ in range(2):  # and a couple of 10 MB bodies
        request_id = f"bad-huge-{_}"
        bad_ids.append(request_id)
        pipe.xadd(stream, {"v": "1", "id": request_id, "task": "generate", "created": "1", "body": "y" * (10 << 20)})
    pipe.execute()
    assert len(bad_ids) + unreadable >= NUM_BAD

    wait_for(lambda: rds.xlen(stream) == 0 and rds.xpending(stream, GROUP)["pending"] == 0, timeout_s=240)
    assert handle.is_alive

    pipe = rds.pipeline(transaction=False)
    for request_id in bad_ids + list(good):
        pipe.xrange(keys.events(request_id))
    all_events = [[decode_event(f) for _, f in entries] for entries in pipe.execute()]
    bad_events = all_events[: len(bad_ids)]
    assert all(len(ev) == 1 and ev[0].type == EventType.ERROR for ev in bad_events)
    assert {ev[0].code for ev in bad_events} <= {"invalid_request", "unsupported_task"}

    model, tokenizer = tiny_llama
    expected = {}
    for prompt in VALID_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        expected[prompt] = out[0, ids.shape[1]:].tolist()
    for (request_id, prompt), events in zip(good.items(), all_events[len(bad_ids):]):
        assert events[-1].type == EventType.DONE, request_id
        tokens = [t for e in events if e.type == EventType.TOKEN for t in e.token_ids]
        assert tokens == expected[prompt], request_id  # the whole output, EOS included when it came first
        assert events[-1].usage.completion_tokens == len(tokens)
        assert events[-1].text == tokenizer.decode(expected[prompt], skip_special_tokens=True)

    assert rds.xlen(keys.dead("tiny")) == unreadable
    print(f"fuzz: {len(bad_ids)} bad entries with readable ids -> {len(bad_ids)} error events; "
          f"{unreadable} unreadable ids -> {unreadable} dead letters; {len(good)} valid requests completed")


def test_generated_ids_are_what_the_validator_expects():
    for request_id in ("good-1", "bad-22", "bad-huge-0"):
        check_request_id(request_id)
    with pytest.raises(ValueError):
        check_request_id("a b")


def _bad_image_body(rng: random.Random) -> dict:
    """A text_to_image body an image worker (sizes 32*32 and 48*32, n <= 2, steps <= 8) must refuse."""
    return rng.choice([
        {"size": rng.choice(["32x32", "32*", "*32", "0*32", "32*32*1", "-32*32", "３２*32", "32 * 32", ""])},
        {"size": rng.choice(["64*64", "1024*1024", "16*16"])},  # valid, but not one this worker serves
        {"size": rng.choice(["30*32", "32*33"])},  # not a multiple of the model's factor
        {"size": "99999*99999"},
        {"n": rng.choice([3, 16])},  # above the worker's limit
        {"n": rng.choice([0, 17, -1, "2", 1.5])},  # outside the protocol's range
        {"num_inference_steps": rng.choice([9, 1000])},  # above the worker's limit
        {"num_inference_steps": rng.choice([0, 1001, "4"])},
        {"negative_prompt": rng.choice(["blurry", ""])},  # FLUX takes none
        {"response_format": rng.choice(["url", "jpeg", "b64"])},  # url: no output dir here
        {"guidance_scale": rng.choice([-1, 1e9, "high"])},
        {"seed": rng.choice([-1, 2**63, "7"])},
        {"prompt": rng.choice([None, 5, ["a"]])},
        {"steps": 4},  # unknown key
    ])


def test_bad_image_requests_each_get_one_invalid_request_and_good_ones_still_finish(image_worker_factory, rds, prefix):
    from producer.protocol import TextToImageBody

    rng = random.Random(99)
    keys = Keys(prefix)
    handle = image_worker_factory("dev", image_sizes="32*32,48*32", max_images_per_request=2,
                                  max_inference_steps=8).start()
    stream = keys.requests("flux")
    bad_ids, good_ids = [], []
    pipe = rds.pipeline(transaction=False)
    for i in range(300):
        if i % 75 == 0:
            request_id = f"good-{i}"
            good_ids.append(request_id)
            body = TextToImageBody(prompt="cat", size=rng.choice(["32*32", "48*32"]), num_inference_steps=2, seed=i)
            pipe.xadd(stream, encode_request(request_id, TaskKind.TEXT_TO_IMAGE, body))
            continue
        request_id = f"bad-{i}"
        bad_ids.append(request_id)
        body = {"prompt": "x", "size": "32*32", "num_inference_steps": 2, **_bad_image_body(rng)}
        task = rng.choice(["text_to_image"] * 9 + ["generate"])  # an LLM body kind on an image worker too
        pipe.xadd(stream, {"v": "1", "id": request_id, "task": task, "body": json.dumps(body), "created": "1"})
    pipe.execute()

    wait_for(lambda: rds.xlen(stream) == 0 and rds.xpending(stream, GROUP)["pending"] == 0, timeout_s=120)
    assert handle.is_alive
    pipe = rds.pipeline(transaction=False)
    for request_id in bad_ids + good_ids:
        pipe.xrange(keys.events(request_id))
    all_events = [[decode_event(f) for _, f in entries] for entries in pipe.execute()]
    bad_events = all_events[: len(bad_ids)]
    assert all(len(ev) == 1 and ev[0].type == EventType.ERROR for ev in bad_events)
    assert {ev[0].code for ev in bad_events} <= {"invalid_request", "unsupported_task"}
    assert sum(ev[0].code == "invalid_request" for ev in bad_events) > len(bad_ids) // 2
    for events in all_events[len(bad_ids):]:
        assert [e.type for e in events] == [EventType.IMAGE, EventType.DONE]
