"""text_to_image end to end: a real worker loop on a tiny FLUX (and SD3), real Redis, the producer clients."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch

from producer import AsyncClient, Client
from producer.errors import InvalidRequest, RequestAborted
from producer.protocol import EventType, TaskKind
from tests.conftest import StepGate
from tests.test_loop import wait_for

pytestmark = [pytest.mark.redis]
pytest.importorskip("diffusers")


@pytest.fixture
def client(redis_server_url, prefix, rds):
    with Client(redis_server_url, prefix=prefix) as c:
        yield c


def _png_size(b64: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_text_to_image_returns_the_xinference_shape_with_seeded_reproducible_images(image_worker_factory, client):
    image_worker_factory("dev", image_sizes="32*32,48*32").start()
    model = client.get_model("flux")
    out = model.text_to_image("a red cat", n=2, size="48*32", num_inference_steps=3, seed=5)
    assert set(out) == {"created", "data"} and isinstance(out["created"], int)
    assert [set(d) for d in out["data"]] == [{"b64_json"}] * 2
    assert [_png_size(d["b64_json"]) for d in out["data"]] == [(48, 32)] * 2
    again = model.text_to_image("a red cat", n=2, size="48*32", num_inference_steps=3, seed=5)
    assert again["data"] == out["data"]  # same seed, same images
    other = model.text_to_image("a red cat", n=1, size="48*32", num_inference_steps=3, seed=6)
    assert other["data"][0] != out["data"][0]


def test_the_worker_registers_text_to_image_and_llm_calls_are_refused(image_worker_factory, client):
    from producer.errors import UnsupportedTask

    image_worker_factory("schnell").start()
    assert client.list_models()["flux"]["tasks"] == ["text_to_image"]
    with pytest.raises(UnsupportedTask):
        client.get_model("flux").generate("hi")


def test_events_on_the_wire_progress_png_bytes_done_and_the_same_image_as_b64(image_worker_factory, client, tmp_path):
    image_worker_factory("schnell", progress_every_steps=2, image_output_dir=str(tmp_path)).start()
    model = client.get_model("flux")
    request_id = model.submit(TaskKind.TEXT_TO_IMAGE, {"prompt": "sun", "size": "32*32", "num_inference_steps": 4,
                                                       "seed": 3, "response_format": "png"})
    events = list(client.events(request_id, timeout_s=60))
    assert [e.type for e in events] == [EventType.PROGRESS, EventType.IMAGE, EventType.DONE]
    assert [e.seq for e in events] == [0, 1, 2] and (events[0].step, events[0].total) == (2, 4)
    image = events[1]
    assert image.index == 0 and image.format == "png" and image.data.startswith(b"\x89PNG")
    assert (tmp_path / f"{request_id}-0.png").read_bytes() == image.data
    as_b64 = model.text_to_image("sun", size="32*32", num_inference_steps=4, seed=3)
    assert base64.b64decode(as_b64["data"][0]["b64_json"]) == image.data
    as_url = model.text_to_image("sun", size="32*32", num_inference_steps=4, seed=3, response_format="url")
    assert as_url["data"][0]["url"].startswith("file://") and as_url["data"][0]["url"].endswith("-0.png")


def test_requests_of_different_sizes_and_steps_batch_in_one_worker(image_worker_factory, client):
    handle = image_worker_factory("dev", max_num_seqs=8).start()
    model = client.get_model("flux")
    bodies = [{"prompt": f"p{i}", "size": ["32*32", "48*32"][i % 2], "num_inference_steps": 2 + i, "seed": i}
              for i in range(4)]
    ids = [model.submit(TaskKind.TEXT_TO_IMAGE, b) for b in bodies]
    for request_id, body in zip(ids, bodies):
        assert client.wait(request_id, timeout_s=60).type == EventType.DONE
    assert handle.worker.engine.num_steps < sum(b["num_inference_steps"] for b in bodies)  # steps were shared


@pytest.mark.parametrize("kind", ["dev", "sd3"])
def test_abort_mid_denoising_publishes_no_image_and_others_finish(image_worker_factory, client, kind):
    handle = image_worker_factory(kind, progress_every_steps=1)
    gate = StepGate(handle.worker.engine, hold={3})
    handle.start()
    model = client.get_model("flux")
    doomed = model.submit(TaskKind.TEXT_TO_IMAGE, {"prompt": "gone", "size": "32*32", "num_inference_steps": 6})
    kept = model.submit(TaskKind.TEXT_TO_IMAGE, {"prompt": "kept", "size": "32*32", "num_inference_steps": 6})
    gate.wait_entered(3)
    assert client.abort_request("flux", doomed) is True
    gate.release_all()
    events = list(client.events(doomed, timeout_s=60))
    assert events[-1].type == EventType.ABORTED
    assert all(e.type == EventType.PROGRESS for e in events[:-1]) and len(events) <= 4
    assert client.wait(kept, timeout_s=60).type == EventType.DONE
    wait_for(lambda: handle.worker.engine.num_active == 0)
    with pytest.raises(RequestAborted):
        from producer.results import image_list

        image_list(doomed, events)


def test_bad_image_requests_fail_alone_with_invalid_request(image_worker_factory, client):
    image_worker_factory("dev", image_sizes="32*32", max_images_per_request=2, max_inference_steps=8).start()
    model = client.get_model("flux")
    cases = {"size 1024x1024": {"size": "1024x1024"}, "size not allowed": {"size": "48*32"},
             "n above the limit": {"n": 3}, "steps above the limit": {"num_inference_steps": 9},
             "negative prompt": {"negative_prompt": "blurry"}, "url without output dir": {"response_format": "url"}}
    for change in cases.values():
        with pytest.raises(InvalidRequest):
            model.text_to_image("x", **{"size": "32*32", "num_inference_steps": 2, **change})
    out = model.text_to_image("fine", size="32*32", num_inference_steps=2)
    assert len(out["data"]) == 1


def test_the_async_client_text_to_image(image_worker_factory, redis_server_url, prefix):
    image_worker_factory("schnell").start()

    async def main():
        async with AsyncClient(redis_server_url, prefix=prefix) as client:
            model = await client.get_model("flux")
            return await model.text_to_image("rain", n=2, size="32*32", num_inference_steps=2, seed=1, timeout_s=60)

    out = asyncio.run(main())
    assert len(out["data"]) == 2 and all(_png_size(d["b64_json"]) == (32, 32) for d in out["data"])


def test_build_worker_detects_a_diffusers_model_and_serves_it(tiny_flux_paths, redis_server_url, prefix, client):
    from tests.conftest import WorkerThread
    from worker.config import WorkerConfig
    from worker.engines.image import ImageEngine
    from worker.main import build_worker

    config = WorkerConfig(model_name="auto-flux", model_path=str(tiny_flux_paths["schnell"]), redis_url=redis_server_url,
                          prefix=prefix, read_block_ms=100, max_sequence_length=64, num_threads=torch.get_num_threads())
    worker = build_worker(config)
    assert isinstance(worker.engine, ImageEngine)
    handle = WorkerThread(worker).start()
    try:
        out = client.get_model("auto-flux").text_to_image("x", size="32*32", num_inference_steps=2, timeout_s=60)
        assert len(out["data"]) == 1
    finally:
        handle.stop()


def test_build_worker_serves_stable_diffusion_3_with_negative_prompts_as_the_stock_pipeline(
        tiny_sd3_paths, tiny_sd3_pipes, redis_server_url, prefix, client):
    import numpy as np
    from PIL import Image

    from tests.conftest import WorkerThread
    from worker.config import WorkerConfig
    from worker.engines.image import ImageEngine
    from worker.engines.image_families import SD3Family
    from worker.main import build_worker

    config = WorkerConfig(model_name="sd3", model_path=str(tiny_sd3_paths["sd3"]), redis_url=redis_server_url,
                          prefix=prefix, read_block_ms=100, max_sequence_length=64, num_threads=torch.get_num_threads())
    worker = build_worker(config)
    assert isinstance(worker.engine, ImageEngine) and isinstance(worker.engine.family, SD3Family)
    handle = WorkerThread(worker).start()
    try:
        model = client.get_model("sd3")
        ids = [model.submit(TaskKind.TEXT_TO_IMAGE, {"prompt": f"sky {i}", "size": "32*32", "num_inference_steps": 5,
                                                     "seed": i}) for i in range(2)]  # batch mates
        out = model.text_to_image("a red cat", n=2, size="48*32", num_inference_steps=3, seed=7,
                                  negative_prompt="blurry", guidance_scale=4.0, timeout_s=60)
        assert all(client.wait(i, timeout_s=60).type == EventType.DONE for i in ids)
    finally:
        handle.stop()
    stock = tiny_sd3_pipes["sd3"]("a red cat", height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                                  negative_prompt="blurry", num_images_per_prompt=2, max_sequence_length=64,
                                  generator=torch.Generator("cpu").manual_seed(7)).images
    for data, expected in zip(out["data"], stock, strict=True):
        ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))), dtype=np.int16)
        assert np.abs(ours - np.asarray(expected, dtype=np.int16)).max() <= 1  # uint8 rounding at most
