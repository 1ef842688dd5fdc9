"""The image engine on tiny random FLUX pipelines: exactness against the stock pipeline inside
staggered mixed batches, sizes, dev/schnell, limits, abort, resume."""

from __future__ import annotations

import io

import pytest
import torch

from producer.protocol import ErrorCode, EventType, Request, TaskKind, TextToImageBody
from worker.engines.base import RequestRejected
from worker.request import Resume

pytest.importorskip("diffusers")

from worker.engines.image import ImageEngine, ImageEngineConfig

TOKENS = 64  # T5 max_sequence_length for both the engine and the stock pipeline (the tiny T5's positions)
LIMIT = 1e-4


def image_request(request_id: str, **body) -> Request:
    body.setdefault("size", "32*32")
    return Request(id=request_id, task=TaskKind.TEXT_TO_IMAGE, body=TextToImageBody(**body), created_ms=0)


def engine_for(pipe, **overrides) -> ImageEngine:
    options = {"max_num_seqs": 8, "max_sequence_length": TOKENS, "progress_every_steps": 2}
    options.update(overrides)
    return ImageEngine(pipe, ImageEngineConfig(**options))


def stock_latents(pipe, body: TextToImageBody) -> torch.Tensor:
    width, height = map(int, body.size.split("*"))
    return pipe(body.prompt, height=height, width=width, num_inference_steps=body.num_inference_steps,
                guidance_scale=3.5 if body.guidance_scale is None else body.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(body.seed), num_images_per_prompt=body.n,
                output_type="latent", max_sequence_length=TOKENS).images  # [n, L, C]


def run(engine: ImageEngine, arrivals: dict[int, list[Request]]) -> dict[str, list]:
    """Step until idle, adding arrivals[k] before step k; returns request id -> its outputs in order."""
    outputs: dict[str, list] = {}
    step = 0
    while engine.num_active or any(k >= step for k in arrivals):
        for request in arrivals.get(step, []):
            engine.add(request)
        for out in engine.step():
            outputs.setdefault(out.seq.request_id, []).append(out)
        step += 1
        assert step < 200
    return outputs


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_images_made_in_a_staggered_mixed_batch_equal_the_stock_pipeline_alone(tiny_flux_pipes, kind):
    pipe = tiny_flux_pipes[kind]
    requests = {
        0: [image_request("a", prompt="a red cat on a stone", n=2, num_inference_steps=6, seed=11)],
        1: [image_request("b", prompt="blue river under rain", size="48*32", num_inference_steps=4, seed=12,
                          guidance_scale=5.0)],
        2: [image_request("c", prompt="the dog", num_inference_steps=3, seed=13),
            image_request("d", prompt="green tree", size="48*32", n=2, num_inference_steps=5, seed=14)],
    }
    outputs = run(engine_for(pipe), requests)
    worst = 0.0
    for batch in requests.values():
        for request in batch:
            final = outputs[request.id][-1]
            assert final.is_finished and len(final.pngs) == request.body.n
            worst = max(worst, (final.seq.latents - stock_latents(pipe, request.body)).abs().max().item())
    assert worst <= LIMIT


def test_the_tiny_model_is_sensitive_to_prompt_steps_seed_and_guidance(tiny_flux_pipes):
    """So the exactness test above could fail: each input changes the latents far beyond the limit."""
    pipe = tiny_flux_pipes["dev"]
    base = {"prompt": "a red cat", "n": 1, "size": "32*32", "num_inference_steps": 4, "seed": 1}
    ref = stock_latents(pipe, TextToImageBody(**base))
    for change in ({"prompt": "a blue dog"}, {"num_inference_steps": 5}, {"seed": 2}, {"guidance_scale": 8.0}):
        assert (stock_latents(pipe, TextToImageBody(**{**base, **change})) - ref).abs().max() > 100 * LIMIT, change


def test_schnell_ignores_guidance_and_dev_uses_it(tiny_flux_pipes):
    assert tiny_flux_pipes["dev"].transformer.config.guidance_embeds
    assert not tiny_flux_pipes["schnell"].transformer.config.guidance_embeds
    engine = engine_for(tiny_flux_pipes["schnell"])
    outs = run(engine, {0: [image_request("s", prompt="x", guidance_scale=9.0, seed=3, num_inference_steps=2)]})
    assert outs["s"][-1].is_finished
    assert engine.default_steps == 4 and engine_for(tiny_flux_pipes["dev"]).default_steps == 28


def test_events_progress_then_each_image_as_png_then_done(tiny_flux_pipes):
    from PIL import Image

    engine = engine_for(tiny_flux_pipes["dev"], progress_every_steps=2)
    outs = run(engine, {0: [image_request("p", prompt="sun", n=2, size="48*32", num_inference_steps=5, seed=4,
                                          response_format="png")]})
    events = [e for out in outs["p"] for e in out.events()]
    assert [e.type for e in events] == [EventType.PROGRESS, EventType.PROGRESS, EventType.IMAGE, EventType.IMAGE,
                                        EventType.DONE]
    assert [e.fields["step"] for e in events[:2]] == [2, 4] and events[0].fields["total"] == 5
    assert [e.fields["index"] for e in events[2:4]] == [0, 1]
    image = Image.open(io.BytesIO(events[2].fields["data"]))
    assert image.format == "PNG" and image.size == (48, 32)
    assert events[2].fields["data"] != events[3].fields["data"]  # two images of one request differ


def test_the_png_is_the_stock_pipelines_image(tiny_flux_pipes):
    import numpy as np
    from PIL import Image

    pipe = tiny_flux_pipes["dev"]
    body = {"prompt": "night cloud", "size": "32*32", "num_inference_steps": 3, "seed": 5, "response_format": "png"}
    outs = run(engine_for(pipe), {0: [image_request("q", **body)], 1: [image_request("o", prompt="o", seed=6)]})
    png = next(e for out in outs["q"] for e in out.events() if e.type == EventType.IMAGE).fields["data"]
    ours = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
    stock = np.asarray(pipe("night cloud", height=32, width=32, num_inference_steps=3, max_sequence_length=TOKENS,
                            generator=torch.Generator("cpu").manual_seed(5)).images[0], dtype=np.int16)
    assert np.abs(ours - stock).max() <= 1  # uint8 rounding of float noise at most


def test_b64_images_and_the_output_directory(tiny_flux_pipes, tmp_path):
    import base64

    engine = engine_for(tiny_flux_pipes["schnell"], output_dir=str(tmp_path / "out"))
    outs = run(engine, {0: [image_request("f", prompt="fish", n=2, num_inference_steps=2, seed=7)]})
    images = [e for out in outs["f"] for e in out.events() if e.type == EventType.IMAGE]
    assert all("data" not in e.fields for e in images)
    assert [base64.b64decode(e.fields["b64"]) for e in images] == [
        (tmp_path / "out" / f"f-{i}.png").read_bytes() for i in range(2)]


def test_max_num_seqs_counts_images_and_requests_wait_for_room(tiny_flux_pipes):
    engine = engine_for(tiny_flux_pipes["schnell"], max_num_seqs=3)
    engine.add(image_request("x", prompt="x", n=2, num_inference_steps=3, seed=1))
    engine.add(image_request("y", prompt="y", n=2, num_inference_steps=3, seed=2))
    assert engine.num_active == 4 and engine.num_free == 2  # room for one more batch of waiting images
    engine.step()
    assert [j.request_id for j in engine.running] == ["x"] and engine.num_waiting == 1
    while engine.running:
        engine.step()
    engine.step()
    assert [j.request_id for j in engine.running] == ["y"]


@pytest.mark.parametrize(("body", "needle"), [
    ({"size": "32x32"}, "size must be 'W*H'"),
    ({"size": "30*32"}, "multiples of 4"),
    ({"size": "64*64"}, "not served here"),
    ({"n": 5}, "at most 4 images"),
    ({"num_inference_steps": 101}, "limit here is 100"),
    ({"negative_prompt": "ugly"}, "no negative_prompt"),
])
def test_bad_requests_are_rejected_with_a_clear_invalid_request(tiny_flux_pipes, body, needle):
    engine = engine_for(tiny_flux_pipes["dev"], allowed_sizes=("32*32", "48*32"))
    with pytest.raises(RequestRejected) as info:
        engine.add(image_request("bad", prompt="p", **body))
    assert info.value.code == ErrorCode.INVALID_REQUEST and needle in info.value.message
    assert engine.num_active == 0


def test_an_aborted_request_leaves_and_its_batch_mates_are_unchanged(tiny_flux_pipes):
    pipe = tiny_flux_pipes["dev"]
    engine = engine_for(pipe)
    keep = image_request("keep", prompt="stone", num_inference_steps=5, seed=8)
    engine.add(keep)
    engine.add(image_request("gone", prompt="wind", n=2, num_inference_steps=5, seed=9))
    engine.step()
    engine.step()
    assert engine.abort("gone").request_id == "gone" and engine.abort("gone") is None
    outputs = run(engine, {})
    assert set(outputs) == {"keep"}
    assert (outputs["keep"][-1].seq.latents - stock_latents(pipe, keep.body)).abs().max() <= LIMIT


def test_a_resumed_request_does_not_send_the_images_already_published(tiny_flux_pipes):
    engine = engine_for(tiny_flux_pipes["schnell"])
    request = image_request("r", prompt="rain", n=3, num_inference_steps=2, seed=10)
    engine.add(request, Resume(output_ids=[], text="", next_seq=2, num_images=2))
    outs = run(engine, {})
    images = [e for out in outs["r"] for e in out.events() if e.type == EventType.IMAGE]
    assert [e.fields["index"] for e in images] == [2]


def test_admission_takes_the_shortest_job_first_and_a_passed_over_job_ages_in(tiny_flux_pipes):
    engine = engine_for(tiny_flux_pipes["schnell"], max_num_seqs=1)
    for request_id, steps in (("long", 5), ("mid", 3), ("short", 1)):
        engine.add(image_request(request_id, prompt=request_id, num_inference_steps=steps, seed=1))
    finished = []
    while engine.num_active:
        finished += [o.seq.request_id for o in engine.step() if o.is_finished]
    assert finished == ["short", "mid", "long"]  # added long first

    engine.add(image_request("patient", prompt="p", num_inference_steps=6, seed=2))
    num_steps = 0
    while not any(j.request_id == "patient" for j in engine.running):
        if not engine.running:  # a stream of short requests keeps arriving
            engine.add(image_request(f"s{num_steps}", prompt="s", num_inference_steps=1, seed=3))
        engine.step()
        num_steps += 1
        assert num_steps <= 8, "a long request waited forever behind short ones"


def test_cpu_offload_needs_cuda_and_a_cuda_device_gets_bf16(tiny_flux_paths, monkeypatch):
    """The CUDA placement wiring, checked on CPU: --cpu-offload without CUDA is refused before loading; on a
    CUDA device the pipeline loads in bfloat16 and is either moved there or handed to diffusers' model
    offload with the device's index (the two calls are recorded here; no GPU on this machine)."""
    from diffusers import DiffusionPipeline

    from worker.models.loading import ModelLoadError, load_diffusers

    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        load_diffusers(str(tiny_flux_paths["schnell"]), device="cpu", cpu_offload=True)
    calls = []
    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload",
                        lambda self, gpu_id=None: calls.append(("offload", gpu_id)))
    monkeypatch.setattr(DiffusionPipeline, "to", lambda self, device: calls.append(("to", device)) or self)
    offloaded = load_diffusers(str(tiny_flux_paths["schnell"]), device="cuda:1", cpu_offload=True)
    placed = load_diffusers(str(tiny_flux_paths["schnell"]), device="cuda")
    assert calls == [("offload", 1), ("to", "cuda")]
    for pipe in (offloaded, placed):
        assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {
            torch.bfloat16}
    fp16 = load_diffusers(str(tiny_flux_paths["schnell"]), device="cuda", dtype="float16")
    assert fp16.transformer.dtype == torch.float16


def _finish_steps(pipe, arrivals: dict[int, list[Request]], **config) -> tuple[dict[str, int], list[int]]:
    """Run arrivals; returns request id -> the step after which its images came out, and each VAE call's size."""
    engine = engine_for(pipe, progress_every_steps=0, **config)
    calls = []
    decode = engine.family.decode
    engine.family.decode = lambda latents, w, h: calls.append(len(latents)) or decode(latents, w, h)
    finished, step = {}, 0
    while engine.num_active or any(k >= step for k in arrivals):
        for request in arrivals.get(step, []):
            engine.add(request)
        for out in engine.step():
            if out.is_finished:
                finished[out.seq.request_id] = step
        step += 1
    return finished, calls


def test_a_denoised_job_waits_at_most_one_step_to_share_a_decode_with_a_certain_finisher(tiny_flux_pipes):
    pipe = tiny_flux_pipes["schnell"]
    staggered = {0: [image_request("a", prompt="p", num_inference_steps=3, seed=1)],
                 1: [image_request("b", prompt="q", num_inference_steps=3, seed=2)],
                 2: [image_request("c", prompt="r", num_inference_steps=3, seed=3)]}
    finished, calls = _finish_steps(pipe, staggered)
    # a is denoised after step 2 and b finishes at step 3: a waits one step, they share a call; c finishes at
    # step 4 but a has waited already, so c does not hold them back, and nobody finishes after c
    assert finished == {"a": 3, "b": 3, "c": 4} and calls == [2, 1]
    assert _finish_steps(pipe, staggered, coalesce_decodes=False) == ({"a": 2, "b": 3, "c": 4}, [1, 1, 1])
    # no finisher of its size at the next step: decoded at once
    lone = {0: [image_request("a", prompt="p", num_inference_steps=3, seed=1),
                image_request("w", prompt="w", size="48*32", num_inference_steps=4, seed=4)],
            1: [image_request("b", prompt="q", num_inference_steps=6, seed=2)]}
    assert _finish_steps(pipe, lone) == ({"a": 2, "w": 3, "b": 6}, [1, 1, 1])


def test_a_job_waiting_for_its_shared_decode_can_be_aborted(tiny_flux_pipes):
    engine = engine_for(tiny_flux_pipes["schnell"], progress_every_steps=0)
    engine.add(image_request("a", prompt="p", num_inference_steps=2, seed=1))
    engine.step()
    engine.add(image_request("b", prompt="q", num_inference_steps=2, seed=2))
    assert engine.step() == []  # a is denoised, waiting for b, which finishes at the next step
    assert engine.abort("a") is not None
    final = engine.step()
    assert [o.seq.request_id for o in final if o.is_finished] == ["b"] and engine.num_active == 0
