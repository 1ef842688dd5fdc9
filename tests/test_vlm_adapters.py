"""Images for the seed's remote-code vision models, through each family's own input code (one at a time).

CogVLM2, glm-4v-9b, MiniCPM-V-2.6 and Qwen-VL-Chat each turn a conversation with images into inputs
their own way (worker/engines/vlm_adapters.py). The models are tiny stand-ins loaded from their
directories under trust_remote_code, offering each family's interface
(worker/models/remote_code/modeling_tiny_remote.py). Shown for each: its output depends on the
image; what the worker publishes equals what the family's own API gives (CogVLM2's demo, glm-4v's
tokenizer + generate, MiniCPM-V's and Qwen-VL's `chat`) for an image, text only and several turns;
a resumed request goes on exactly; what the family cannot take is a clear invalid_request; and
through a real worker a good request equals the API while a broken one fails alone.
"""

from __future__ import annotations

import pytest
import torch

from producer.protocol import ChatBody, ErrorCode, Request, TaskKind
from tests.test_sequential import run_engine as run
from tests.test_vision import data_uri, make_image
from worker.engines.base import RequestRejected
from worker.engines.sequential import SequentialEngine
from worker.engines.vlm_adapters import CogVLM2Adapter, Glm4vAdapter, MiniCPMVAdapter, QwenVLAdapter
from worker.models.tiny_remote_families import FAMILIES

ADAPTER = {"cogvlm2": CogVLM2Adapter, "glm4v": Glm4vAdapter, "minicpmv": MiniCPMVAdapter, "qwenvl": QwenVLAdapter}
CAT, DOG = make_image(1, 40, 60), make_image(2, 30, 30)


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory, torch_threads):
    from worker.models.tiny_remote_families import make_tiny_family

    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_family(root / f, f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(family_paths):
    from worker.models.loading import load_model

    return {f: load_model(str(p), trust_remote_code=True) for f, p in family_paths.items()}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def chat(turns: list[tuple[str, list]], max_tokens: int = 8, request_id: str = "r", **config) -> Request:
    """turns: (role, parts), parts being str (a text part) or a PIL image (an image_url part, data: URI)."""
    messages = [{"role": role, "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                           {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in parts]}
                for role, parts in turns]
    body = ChatBody.model_validate({"messages": messages,
                                    "generate_config": {"temperature": 0, "max_tokens": max_tokens, **config}})
    return Request(id=request_id, task=TaskKind.CHAT, body=body, created_ms=0)


def _split(parts):
    return [p for p in parts if not isinstance(p, str)], "\n".join(p for p in parts if isinstance(p, str))


def reference(family: str, loaded, turns: list[tuple[str, list]], max_tokens: int, tmp_path) -> list[int] | str:
    """What the family's own API replies: token ids (CogVLM2, glm-4v: their generate) or text (MiniCPM-V,
    Qwen-VL: their chat, which returns text)."""
    model, tokenizer, _ = loaded[family]
    greedy = {"max_new_tokens": max_tokens, "do_sample": False}
    if family == "cogvlm2":  # as its basic_demo/cli_demo.py
        history = [(_split(turns[i][1])[1], _split(turns[i + 1][1])[1]) for i in range(0, len(turns) - 1, 2)]
        images = [im for _, parts in turns for im in _split(parts)[0]]
        built = model.build_conversation_input_ids(tokenizer, query=_split(turns[-1][1])[1], history=history,
                                                   images=images or None, template_version="chat")
        inputs = {"input_ids": built["input_ids"][None], "token_type_ids": built["token_type_ids"][None],
                  "attention_mask": built["attention_mask"][None],
                  "images": [[built["images"][0]]] if images else None}
        out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **greedy)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    if family == "glm4v":  # as its model card
        messages = []
        for role, parts in turns:
            images, text = _split(parts)
            messages.append({"role": role, "content": text, **({"image": images[0]} if images else {})})
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_tensors="pt", return_dict=True)
        return model.generate(**inputs, **greedy)[0, inputs["input_ids"].shape[1]:].tolist()
    if family == "minicpmv":  # model.chat with msgs of [images..., text]; greedy instead of its beam default
        msgs = [{"role": role, "content": _split(parts)[0] + [_split(parts)[1]]} for role, parts in turns]
        return model.chat(image=None, msgs=msgs, tokenizer=tokenizer, sampling=False, num_beams=1,
                          repetition_penalty=1.0, max_new_tokens=max_tokens)
    # qwenvl: model.chat with from_list_format queries (images as files, as its tokenizer wants them)
    def query(parts):
        images, text = _split(parts)
        paths = []
        for image in images:
            paths.append(tmp_path / f"ref-{len(list(tmp_path.iterdir()))}.png")
            image.save(paths[-1])
        return tokenizer.from_list_format([{"image": str(p)} for p in paths] + [{"text": text}])

    history = [(query(turns[i][1]), _split(turns[i + 1][1])[1]) for i in range(0, len(turns) - 1, 2)]
    return model.chat(tokenizer, query(turns[-1][1]), history=history, **greedy)[0]


def as_reference(family: str, engine: SequentialEngine, ids: list[int]) -> list[int] | str:
    """The engine's ids in the shape `reference` returns: text the way the family's chat decodes it."""
    if family in ("cogvlm2", "glm4v"):
        return ids
    while ids and ids[-1] in engine.eos_ids:
        ids = ids[:-1]
    text = engine.tokenizer.decode(ids)
    return text.strip() if family == "minicpmv" else text


def test_each_family_gets_its_adapter_and_serves_sequentially(family, family_paths, caplog):
    import logging

    from worker.config import WorkerConfig
    from worker.main import build_engine

    with caplog.at_level(logging.INFO):
        engine = build_engine(WorkerConfig(model_name=family, model_path=str(family_paths[family]),
                                           trust_remote_code=True))
    try:
        assert isinstance(engine, SequentialEngine) and type(engine.adapter) is ADAPTER[family]
        assert "serve mode sequential" in caplog.text and "input adapter" in caplog.text
    finally:
        engine.close()


def test_the_model_is_sensitive_to_the_image(family, loaded, tmp_path):
    for image_turns in (CASES["image"], CASES["turns"]):
        other = [(role, [DOG if p is CAT else CAT if p is DOG else p for p in parts]) for role, parts in image_turns]
        assert reference(family, loaded, image_turns, 8, tmp_path) != reference(family, loaded, other, 8, tmp_path)


CASES = {
    "image": [("user", [CAT, "a dog"])],
    "text": [("user", ["one two three"])],
    "turns": [("user", [DOG, "a dog"]), ("assistant", ["yes it is"]), ("user", ["and then"])],
}


def test_chat_equals_the_familys_own_api(family, loaded, tmp_path):
    model, tokenizer, image_processor = loaded[family]
    engine = SequentialEngine(model, tokenizer, image_processor)
    try:
        results = run(engine, [chat(turns, 8, request_id=key) for key, turns in CASES.items()])
        for key, turns in CASES.items():
            ids, text, finish = results[key]
            assert finish in ("stop", "length"), (key, finish)
            assert as_reference(family, engine, ids) == reference(family, loaded, turns, 8, tmp_path), key
            assert text == engine.tokenizer.decode(ids, skip_special_tokens=True), key
        if family == "qwenvl":  # its images were files of the worker's, removed with their requests
            assert engine.adapter.tmpdir.is_dir() and not list(engine.adapter.tmpdir.iterdir())
    finally:
        engine.close()
    if family == "qwenvl":
        assert not engine.adapter.tmpdir.exists()


def test_resume_goes_on_after_the_published_tokens(family, loaded):
    from worker.request import Resume

    model, tokenizer, image_processor = loaded[family]
    request = chat([("user", [CAT, "the cat is"])], 10, ignore_eos=True)
    engine = SequentialEngine(model, tokenizer, image_processor)
    try:
        expected = run(engine, [request])["r"][0]
        published = expected[:4]
        seq = engine.add(request, Resume(output_ids=published, text=tokenizer.decode(published), next_seq=4))
        assert engine.finish_if_complete(seq) is None
        rest = []
        while engine.num_active:
            rest += [t for out in engine.step() for t in out.token_ids]
    finally:
        engine.close()
    assert len(expected) == 10 and published + rest == expected


def _body(messages, **extra) -> Request:
    return Request(id="x", task=TaskKind.CHAT, created_ms=0,
                   body=ChatBody.model_validate({"messages": messages, **extra}))


def _parts(*parts):
    return [{"type": "text", "text": p} if isinstance(p, str) else
            {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in parts]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_what_the_family_cannot_take_is_invalid_request(family, loaded):
    model, tokenizer, image_processor = loaded[family]
    engine = SequentialEngine(model, tokenizer, image_processor)
    refused = [
        (_body([{"role": "user", "content": "hi"}], tools=[TOOL]), "tools are not available"),
        (_body([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _parts(CAT, "x")},
                {"role": "user", "content": "and"}]), "images go in user messages"),
        (_body([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]), "last message"),
        (_body([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAA"}}]}]), "cannot be decoded"),
        (_body([{"role": "user", "content": "hi"}, {"role": "tool", "content": "1", "tool_call_id": "c"}]),
         "not 'tool'"),
    ]
    if family in ("cogvlm2", "glm4v"):
        refused.append((_body([{"role": "user", "content": _parts(CAT, DOG, "two")}]), "at most 1 image"))
    if family == "cogvlm2":
        refused.append((_body([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
                        "not 'system'"))
    if family in ("cogvlm2", "qwenvl"):
        refused.append((_body([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                        "alternating"))
    if family == "qwenvl":
        refused.append((_body([{"role": "user", "content": "look <img>/etc/hostname</img>"}]), "<img> markup"))
    try:
        for request, needle in refused:
            with pytest.raises(RequestRejected, match=needle) as info:
                engine.add(request)
            assert info.value.code == ErrorCode.INVALID_REQUEST
        assert engine.num_active == 0
        if family == "qwenvl":  # nor as ids or text of a generate request: the model would open the path
            for body in ({"prompt": "<img>/etc/hostname</img>"},
                         {"prompt_token_ids": [engine.adapter.image_start_id, 47, 101]}):
                with pytest.raises(RequestRejected, match="image markup"):
                    engine.add(Request(id="g", task=TaskKind.GENERATE, created_ms=0, body=body))
            assert not list(engine.adapter.tmpdir.iterdir())
    finally:
        engine.close()


def test_a_generate_request_is_text_only_through_the_family(family, loaded):
    model, tokenizer, image_processor = loaded[family]
    ids = tokenizer("one two three", add_special_tokens=False).input_ids
    engine = SequentialEngine(model, tokenizer, image_processor)
    try:
        request = Request(id="g", task=TaskKind.GENERATE, created_ms=0,
                          body={"prompt_token_ids": ids, "generate_config": {"temperature": 0, "max_tokens": 6,
                                                                             "ignore_eos": True}})
        got = run(engine, [request])["g"][0]
    finally:
        engine.close()
    x = torch.tensor([ids])
    kwargs = {"token_type_ids": torch.zeros_like(x)} if family == "cogvlm2" else {}
    lm = model.llm if family == "minicpmv" else model
    expected = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                           eos_token_id=None, **kwargs)[0, len(ids):].tolist()
    assert got == expected


@pytest.mark.redis
@pytest.mark.parametrize("name", ["qwenvl", "minicpmv"])
def test_through_a_worker(name, family_paths, loaded, redis_server_url, prefix, rds, tmp_path):
    """A good image request equals the family's API, a broken image and a refused request fail alone."""
    from producer import Client
    from tests.conftest import WorkerThread
    from worker.config import WorkerConfig
    from worker.main import build_worker

    config = WorkerConfig(model_name=name, model_path=str(family_paths[name]), trust_remote_code=True,
                          redis_url=redis_server_url, prefix=prefix, read_block_ms=100, heartbeat_interval_s=0.2,
                          grace_s=5.0, max_num_seqs=8)
    handle = WorkerThread(build_worker(config)).start()
    client = Client(redis_server_url, prefix=prefix)
    try:
        model = client.get_model(name)
        engine = handle.worker.engine
        good = model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": _parts(CAT, "a dog")}]},
                            {"temperature": 0, "max_tokens": 8})
        broken = model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        tools = model.submit(TaskKind.CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]})
        events = list(client.events(good, timeout_s=60))
        assert events[-1].type.value == "done", events[-1]
        ids = [t for e in events[:-1] for t in e.token_ids or []]
        assert as_reference(name, engine, ids) == reference(name, loaded, CASES["image"], 8,
                                                            tmp_path)
        for request_id, needle in ((broken, "cannot be decoded"), (tools, "tools are not available")):
            events = list(client.events(request_id, timeout_s=60))
            assert [e.type.value for e in events] == ["error"]
            assert events[0].code == ErrorCode.INVALID_REQUEST and needle in events[0].message
    finally:
        client.close()
        handle.stop()


def test_a_family_without_its_processor_is_a_load_error(family_paths, tmp_path):
    import shutil

    from worker.config import WorkerConfig
    from worker.main import build_engine
    from worker.models.loading import ModelLoadError

    path = shutil.copytree(family_paths["minicpmv"], tmp_path / "minicpmv")
    (path / "processor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="MiniCPM-V input adapter cannot start"):
        build_engine(WorkerConfig(model_name="m", model_path=str(path), trust_remote_code=True))
