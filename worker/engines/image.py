"""Continuous batching across denoising steps for a diffusers FLUX pipeline.

step(): admit waiting jobs under the image budget and encode their prompts in one batch
→ for each size bucket, one transformer forward over every running image, each at its own
timestep ([B] timestep tensor; FLUX takes one per sample) → each job takes its own scheduler
step on its slice → jobs that took their last step are decoded together (one VAE call per size)
→ progress, images and `done`.

Exactness: a job's noise is `pipe.prepare_latents` from `torch.Generator("cpu").manual_seed(seed)`
for its n images, its schedule is the stock pipeline's (sigmas linspace(1, 1/N, N), `mu` from its
own image token count), so an image made in any batch equals `FluxPipeline(prompt, generator=that
generator, num_images_per_prompt=n)` up to float rounding of batched matmuls.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from producer.protocol import ErrorCode, FinishReason, Request, TaskKind, TextToImageBody
from worker.engines.base import RequestRejected
from worker.engines.image_job import BadSize, ImageJob, ImageOutput, JobStatus, parse_size
from worker.request import Resume

log = logging.getLogger("redbatch.engine")


@dataclass(frozen=True)
class ImageEngineConfig:
    max_num_seqs: int = 16  # images in flight (a request of n images takes n)
    max_images_per_request: int = 4
    max_inference_steps: int = 100
    default_inference_steps: int | None = None  # None: 28 with a guidance embedding (dev), 4 without (schnell)
    allowed_sizes: tuple[str, ...] | None = None  # "W*H" sizes this worker serves; None: any valid size
    progress_every_steps: int = 5
    max_sequence_length: int = 512  # T5 tokens per prompt (the stock pipeline's default)
    output_dir: str | None = None  # also write each image here as <request_id>-<index>.png


class ImageEngine:
    tasks = (TaskKind.TEXT_TO_IMAGE,)

    def __init__(self, pipe, config: ImageEngineConfig = ImageEngineConfig()):
        from diffusers import FluxPipeline

        if not isinstance(pipe, FluxPipeline):
            raise ValueError(f"the image engine serves FLUX pipelines; {type(pipe).__name__} is not one")
        self.pipe = pipe
        self.config = config
        self.max_num_seqs = config.max_num_seqs
        self.device = pipe._execution_device
        self.has_guidance = bool(pipe.transformer.config.guidance_embeds)
        self.size_multiple = pipe.vae_scale_factor * 2
        self.default_steps = config.default_inference_steps or (28 if self.has_guidance else 4)
        self.max_images = min(config.max_images_per_request, config.max_num_seqs)
        self.allowed_sizes = None if config.allowed_sizes is None else {
            parse_size(s, self.size_multiple) for s in config.allowed_sizes}
        from diffusers import FlowMatchEulerDiscreteScheduler

        # each job gets a deep copy (from_config per request costs ~2 ms of config handling)
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self._encoder_dtypes = (pipe.text_encoder.dtype, pipe.text_encoder_2.dtype)  # (CLIP, T5), as the pipeline casts
        self.waiting: list[ImageJob] = []
        self.running: list[ImageJob] = []
        self.num_steps = 0
        self.num_images_done = 0
        # cumulative seconds: prompt encoders; the transformer's forward alone; each job's Euler step and the
        # batch's gather/scatter; the VAE; postprocess, PNG and files
        self.profile = {"encode_s": 0.0, "forward_s": 0.0, "euler_s": 0.0, "decode_s": 0.0, "png_s": 0.0}

    # ------------------------------------------------------------ requests in and out

    @property
    def num_active(self) -> int:
        """Images held, waiting or running: what max_num_seqs bounds."""
        return sum(j.num_images for j in self.waiting + self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free(self) -> int:
        """Room for one batch of requests waiting beside the running one: an image that finishes at the end
        of a step is replaced in the next step (reads land between steps, two steps after a slot frees)."""
        return max(0, 2 * self.max_num_seqs - self.num_active)

    def sequences(self) -> list[ImageJob]:
        return self.running + self.waiting

    def add(self, request: Request, resume: Resume | None = None) -> ImageJob:
        if not isinstance(request.body, TextToImageBody):
            raise RequestRejected(ErrorCode.UNSUPPORTED_TASK, f"this worker serves text_to_image, not {request.task.value}")
        job = self._job(request.id, request.body)
        job.priority = request.priority
        if resume is not None:
            job.num_skipped_images = resume.num_images
        job.added_at_step = self.num_steps
        self.waiting.append(job)
        return job

    def _job(self, request_id: str, body: TextToImageBody) -> ImageJob:
        try:
            width, height = parse_size(body.size, self.size_multiple)
        except BadSize as exc:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if self.allowed_sizes is not None and (width, height) not in self.allowed_sizes:
            allowed = ", ".join(f"{w}*{h}" for w, h in sorted(self.allowed_sizes))
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"size {body.size} is not served here; allowed: {allowed}")
        if body.n > self.max_images:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"n is {body.n}; this worker makes at most {self.max_images} "
                                                             "images per request")
        num_steps = body.num_inference_steps or self.default_steps
        if num_steps > self.config.max_inference_steps:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, f"num_inference_steps is {num_steps}; the limit here is "
                                                             f"{self.config.max_inference_steps}")
        if body.response_format == "url" and self.config.output_dir is None:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "response_format url needs a worker with an image output "
                                                             "directory (--image-output-dir)")
        if body.negative_prompt is not None:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, "this model takes no negative_prompt (FLUX is guidance-"
                                                             "distilled)")
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        guidance = body.guidance_scale if body.guidance_scale is not None else 3.5  # the stock pipeline's default
        return ImageJob(request_id=request_id, body=body, width=width, height=height, num_steps=num_steps,
                        guidance_scale=guidance, seed=seed)

    def finish_if_complete(self, seq: ImageJob) -> ImageOutput | None:
        return None  # a resumed image request runs again; the images already published are not sent twice

    def abort(self, request_id: str) -> ImageJob | None:
        for queue in (self.running, self.waiting):
            for job in queue:
                if job.request_id == request_id:
                    queue.remove(job)
                    self._release(job)
                    return job
        return None

    def fail_running(self) -> list[ImageJob]:
        failed, self.running = self.running, []
        for job in failed:
            self._release(job)
        return failed

    def metrics(self) -> dict[str, int | float]:
        return {"images_done": self.num_images_done, "images_running": sum(j.num_images for j in self.running),
                **{k: round(v, 3) for k, v in self.profile.items()}}

    @staticmethod
    def _release(job: ImageJob) -> None:
        job.status = JobStatus.FINISHED
        job.prompt_embeds = job.pooled_embeds = job.scheduler = None

    # ------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[ImageOutput]:
        self._start(self._admit())
        if not self.running:
            return []
        for jobs in self._buckets().values():
            self._denoise(jobs)
        self.num_steps += 1
        outputs = [self._progress(j) for j in self.running if not j.is_denoised]
        finished = [j for j in self.running if j.is_denoised]
        if finished:
            outputs += self._finish(finished)
        return [o for o in outputs if o is not None]

    def _admit(self) -> list[ImageJob]:
        """Waiting jobs while their images fit in max_num_seqs beside the running ones, shortest first: a job's
        rank is its step count minus the steps it has waited, so a long job passed over is not passed forever."""
        num_running = sum(j.num_images for j in self.running)
        admitted = []
        for job in sorted(self.waiting, key=lambda j: (j.num_steps - (self.num_steps - j.added_at_step), j.arrival_s)):
            if num_running + job.num_images > self.max_num_seqs:
                break
            num_running += job.num_images
            admitted.append(job)
        for job in admitted:
            self.waiting.remove(job)
        return admitted

    def _start(self, jobs: list[ImageJob]) -> None:
        """Encode every new job's prompt in one batch, then give each its noise and its own schedule."""
        if not jobs:
            return
        started = time.perf_counter()
        embeds, pooled = self._encode([j.body.prompt for j in jobs])  # [J, T, D], [J, P]
        for i, job in enumerate(jobs):
            n = job.num_images
            job.prompt_embeds = embeds[i : i + 1].expand(n, -1, -1)  # [n, T, D]: the pipeline's repeat per image
            job.pooled_embeds = pooled[i : i + 1].expand(n, -1)  # [n, P]
            generator = torch.Generator("cpu").manual_seed(job.seed)
            job.latents, _ = self.pipe.prepare_latents(n, self.pipe.transformer.config.in_channels // 4, job.height,
                                                       job.width, embeds.dtype, self.device, generator)
            job.scheduler, job.timesteps = self._schedule(job, job.latents.shape[1])
            job.status = JobStatus.RUNNING
            job.started_s = time.monotonic()
            self.running.append(job)
        self.profile["encode_s"] += time.perf_counter() - started

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """FluxPipeline.encode_prompt's math (CLIP pooled output, T5 last hidden state, both padded to their
        max length) without its per-call costs: it tokenizes every prompt twice to warn about truncation and
        walks every module for offload hooks, ~half its time on small batches. Returns [J, T, D], [J, P]."""
        pipe = self.pipe
        clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = pipe.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=self.config.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = pipe.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        return embeds.to(self._encoder_dtypes[1]), pooled.to(self._encoder_dtypes[0])

    def _schedule(self, job: ImageJob, num_image_tokens: int):
        """The job's own scheduler with the stock pipeline's timesteps for its step count and size."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = copy.deepcopy(self._scheduler)
        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / job.num_steps, job.num_steps)
        mu = calculate_shift(num_image_tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, job.num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    def _buckets(self) -> dict[tuple[int, int], list[ImageJob]]:
        """Running jobs by image size: the transformer's positions (img_ids) are one size per forward."""
        buckets: dict[tuple[int, int], list[ImageJob]] = {}
        for job in self.running:
            buckets.setdefault(job.size, []).append(job)
        return buckets

    def _denoise(self, jobs: list[ImageJob]) -> None:
        """One forward over every image of one size, each at its job's timestep; then each job's own step."""
        started = time.perf_counter()
        latents = torch.cat([j.latents for j in jobs])  # [B, L, C]
        dtype = latents.dtype
        timestep = torch.cat([j.timestep.expand(j.num_images) for j in jobs]).to(dtype)  # [B]
        guidance = None
        if self.has_guidance:
            guidance = torch.tensor([j.guidance_scale for j in jobs for _ in range(j.num_images)],
                                    device=self.device, dtype=torch.float32)  # [B]
        first = jobs[0]
        height, width = 2 * (first.height // self.size_multiple), 2 * (first.width // self.size_multiple)
        img_ids = self.pipe._prepare_latent_image_ids(len(latents), height // 2, width // 2, self.device, dtype)
        embeds = torch.cat([j.prompt_embeds for j in jobs])  # [B, T, D]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        forward_started = time.perf_counter()
        noise = self.pipe.transformer(
            hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=torch.cat([j.pooled_embeds for j in jobs]), encoder_hidden_states=embeds,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # [B, L, C]
        forward_done = time.perf_counter()
        self.profile["forward_s"] += forward_done - forward_started
        offset = 0
        for job in jobs:
            rows = noise[offset : offset + job.num_images]
            offset += job.num_images
            job.latents = job.scheduler.step(rows, job.timestep, job.latents, return_dict=False)[0]
            job.step_index += 1
        self.profile["euler_s"] += time.perf_counter() - forward_done + forward_started - started

    def _progress(self, job: ImageJob) -> ImageOutput | None:
        every = self.config.progress_every_steps
        if every <= 0 or job.step_index % every:
            return None
        return ImageOutput(seq=job, progress=(job.step_index, job.num_steps))

    def _finish(self, jobs: list[ImageJob]) -> list[ImageOutput]:
        """Decode the finished jobs, one VAE call per size; they leave the running batch."""
        outputs = []
        by_size: dict[tuple[int, int], list[ImageJob]] = {}
        for job in jobs:
            by_size.setdefault(job.size, []).append(job)
        for (width, height), group in by_size.items():
            started = time.perf_counter()
            images = self._decode(torch.cat([j.latents for j in group]), width, height)  # [B, 3, H, W] in [-1, 1]
            decoded = time.perf_counter()
            images = self.pipe.image_processor.postprocess(images, output_type="pil")
            offset = 0
            for job in group:
                pngs = [_png(image) for image in images[offset : offset + job.num_images]]
                offset += job.num_images
                urls = self._write_files(job, pngs)
                outputs.append(ImageOutput(seq=job, pngs=pngs, urls=urls, finish_reason=FinishReason.STOP))
            self.profile["decode_s"] += decoded - started
            self.profile["png_s"] += time.perf_counter() - decoded
        for job in jobs:
            self.running.remove(job)
            self._release(job)
            self.num_images_done += job.num_images
        return outputs

    def _decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # [B, C, h, w]
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]

    def _write_files(self, job: ImageJob, pngs: list[bytes]) -> list[str] | None:
        """With an output directory: write <request_id>-<index>.png there; returns their file:// URLs."""
        if self.config.output_dir is None:
            return None
        out = Path(self.config.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        urls = []
        for index, png in enumerate(pngs):
            path = out / f"{job.request_id}-{index}.png"
            path.write_bytes(png)
            urls.append(path.as_uri())
        return urls


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_image_engine(config) -> ImageEngine:
    """The image engine for a WorkerConfig: the pipeline from --model-path, on --device, maybe offloaded."""
    from worker.models.loading import load_diffusers

    pipe = load_diffusers(config.model_path, config.device, config.dtype, config.cpu_offload)
    return ImageEngine(pipe, ImageEngineConfig(
        max_num_seqs=config.max_num_seqs, max_images_per_request=config.max_images_per_request,
        max_inference_steps=config.max_inference_steps, allowed_sizes=config.allowed_image_sizes,
        progress_every_steps=config.progress_every_steps, max_sequence_length=config.max_sequence_length,
        output_dir=config.image_output_dir))
