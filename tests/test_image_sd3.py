"""The image engine on tiny random Stable Diffusion 3 pipelines: exactness against the stock
StableDiffusion3Pipeline inside staggered mixed batches (classifier-free guidance on and off,
negative prompts, two sizes, fixed and dynamic shift), the PNG, defaults, family detection."""

from __future__ import annotations

import io

import pytest
import torch

from producer.protocol import ErrorCode, EventType, TextToImageBody
from worker.engines.base import RequestRejected

pytest.importorskip("diffusers")

from tests.test_image import LIMIT, TOKENS, engine_for, image_request, run


def stock_latents(pipe, body: TextToImageBody) -> torch.Tensor:
    width, height = map(int, body.size.split("*"))
    return pipe(body.prompt, height=height, width=width, num_inference_steps=body.num_inference_steps,
                guidance_scale=7.0 if body.guidance_scale is None else body.guidance_scale,
                negative_prompt=body.negative_prompt, generator=torch.Generator("cpu").manual_seed(body.seed),
                num_images_per_prompt=body.n, output_type="latent", max_sequence_length=TOKENS).images  # [n, C, h, w]


@pytest.mark.parametrize("kind", ["sd3", "sd3-dynamic"])
def test_sd3_images_made_in_a_staggered_mixed_batch_equal_the_stock_pipeline_alone(tiny_sd3_pipes, kind):
    pipe = tiny_sd3_pipes[kind]
    requests = {
        0: [image_request("a", prompt="a red cat on a stone", n=2, num_inference_steps=6, seed=11)],
        1: [image_request("b", prompt="blue river under rain", size="48*32", num_inference_steps=4, seed=12,
                          guidance_scale=3.0, negative_prompt="blurry")],
        2: [image_request("c", prompt="the dog", num_inference_steps=3, seed=13, guidance_scale=1.0),  # no CFG
            image_request("d", prompt="green tree", size="48*32", n=2, num_inference_steps=5, seed=14,
                          guidance_scale=5.0, negative_prompt="dark night"),
            image_request("e", prompt="a red cat on a stone", num_inference_steps=4, seed=15, negative_prompt="")],
    }
    engine = engine_for(pipe)
    outputs = run(engine, requests)
    assert engine.num_steps < sum(r.body.num_inference_steps for batch in requests.values() for r in batch)
    worst = 0.0
    for batch in requests.values():
        for request in batch:
            final = outputs[request.id][-1]
            assert final.is_finished and len(final.pngs) == request.body.n
            width, height = map(int, request.body.size.split("*"))
            assert final.seq.latents.shape == (request.body.n, 4, height // 2, width // 2)  # unpacked, VAE factor 2
            worst = max(worst, (final.seq.latents - stock_latents(pipe, request.body)).abs().max().item())
    print(f"\nSD3 ({kind}) max abs latent difference vs the stock pipeline: {worst:.3g}")
    assert worst <= LIMIT


def test_the_tiny_sd3_is_sensitive_to_prompt_negative_prompt_guidance_steps_and_seed(tiny_sd3_pipes):
    """So the exactness test above could fail: each input changes the latents far beyond the limit."""
    pipe = tiny_sd3_pipes["sd3"]
    base = {"prompt": "a red cat", "n": 1, "size": "32*32", "num_inference_steps": 4, "seed": 1}
    ref = stock_latents(pipe, TextToImageBody(**base))
    changes = ({"prompt": "a blue dog"}, {"negative_prompt": "ugly"}, {"guidance_scale": 3.0},
               {"guidance_scale": 1.0}, {"num_inference_steps": 5}, {"seed": 2})
    for change in changes:
        assert (stock_latents(pipe, TextToImageBody(**{**base, **change})) - ref).abs().max() > 100 * LIMIT, change


def test_dynamic_shifting_makes_the_schedule_depend_on_the_size(tiny_sd3_pipes):
    engine = engine_for(tiny_sd3_pipes["sd3-dynamic"])
    small, large = (engine.add(image_request(s, prompt="x", size=s, num_inference_steps=3, seed=1))
                    for s in ("32*32", "64*64"))
    engine.step()
    assert not torch.equal(small.timesteps, large.timesteps)
    fixed = engine_for(tiny_sd3_pipes["sd3"])
    jobs = [fixed.add(image_request(s, prompt="x", size=s, num_inference_steps=3, seed=1)) for s in ("32*32", "64*64")]
    fixed.step()
    assert torch.equal(jobs[0].timesteps, jobs[1].timesteps)


def test_the_sd3_png_is_the_stock_pipelines_image(tiny_sd3_pipes):
    import numpy as np
    from PIL import Image

    pipe = tiny_sd3_pipes["sd3"]
    body = {"prompt": "night cloud", "size": "48*32", "num_inference_steps": 3, "seed": 5, "response_format": "png",
                "negative_prompt": "sun"}
    outs = run(engine_for(pipe), {0: [image_request("q", **body)], 1: [image_request("o", prompt="o", seed=6)]})
    png = next(e for out in outs["q"] for e in out.events() if e.type == EventType.IMAGE).fields["data"]
    ours = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
    stock = np.asarray(pipe("night cloud", height=32, width=48, num_inference_steps=3, max_sequence_length=TOKENS,
                            negative_prompt="sun", generator=torch.Generator("cpu").manual_seed(5)).images[0],
                       dtype=np.int16)
    assert ours.shape == (32, 48, 3) and np.abs(ours - stock).max() <= 1  # uint8 rounding of float noise at most


def test_sd3_defaults_negative_prompts_and_cfg_rows(tiny_sd3_pipes):
    from worker.engines.image_families import SD3Family

    engine = engine_for(tiny_sd3_pipes["sd3"])
    assert isinstance(engine.family, SD3Family) and engine.default_steps == 28 and engine.size_multiple == 4
    guided = engine.add(image_request("g", prompt="p", n=2, negative_prompt="ugly"))
    plain = engine.add(image_request("p", prompt="p", guidance_scale=1.0, negative_prompt="ignored without CFG"))
    assert (guided.guidance_scale, guided.num_steps, guided.is_cfg, guided.num_rows) == (7.0, 28, True, 4)
    assert (plain.is_cfg, plain.num_rows) == (False, 1)
    assert engine.num_active == 3  # max_num_seqs counts images, not transformer rows
    engine.step()
    assert guided.prompt_embeds.shape[0] == 4 and plain.prompt_embeds.shape[0] == 1
    assert not torch.equal(guided.prompt_embeds[0], guided.prompt_embeds[2])  # negative rows, then positive
    assert torch.equal(guided.prompt_embeds[2], plain.prompt_embeds[0])  # the same prompt, batched


@pytest.mark.parametrize(("body", "needle"), [
    ({"size": "30*32"}, "multiples of 4"),
    ({"n": 5}, "at most 4 images"),
    ({"num_inference_steps": 101}, "limit here is 100"),
])
def test_bad_sd3_requests_are_rejected_with_a_clear_invalid_request(tiny_sd3_pipes, body, needle):
    engine = engine_for(tiny_sd3_pipes["sd3"])
    with pytest.raises(RequestRejected) as info:
        engine.add(image_request("bad", prompt="p", **body))
    assert info.value.code == ErrorCode.INVALID_REQUEST and needle in info.value.message
    assert engine.num_active == 0


def test_a_pipeline_of_no_served_family_is_refused(tiny_sd3_pipes, tiny_sd3_paths):
    from worker.engines.image import ImageEngine
    from worker.engines.image_families import check_served
    from worker.models.loading import diffusers_class_name

    assert diffusers_class_name(str(tiny_sd3_paths["sd3"])) == "StableDiffusion3Pipeline"
    check_served("StableDiffusion3Pipeline")
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        check_served("StableDiffusionXLPipeline")

    class OtherPipeline:
        pass

    with pytest.raises(ValueError, match="OtherPipeline is not one of them"):
        ImageEngine(OtherPipeline())
