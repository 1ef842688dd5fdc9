"""Continuous batching across denoising steps for diffusers text-to-image pipelines (FLUX.1, SD3).

step(): admit waiting jobs under the image budget and encode their prompts in one batch
→ for each size bucket, one transformer forward over every running image, each at its own
timestep ([B] timestep tensor; FLUX and SD3 take one per sample) → each job takes its own scheduler
step on its slice → jobs that took their last step are decoded together (one VAE call per size)
→ progress, images and `done`. What differs between pipeline families (prompt encoders, latent
layout, the transformer's arguments, classifier-free guidance, VAE scaling) is in image_families.

Exactness: a job's noise is the pipeline's `prepare_latents` from `torch.Generator("cpu").manual_seed(seed)`
for its n images, its schedule is the stock pipeline's (its sigmas and `mu` for the job's own size), so an
image made in any batch equals the stock pipeline called with that generator and `num_images_per_prompt=n`,
up to float rounding of batched matmuls.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from producer.protocol import (
    ErrorCode,
    FinishReason,
    Request,
    TaskKind,
    TextToImageBody,
)
from worker.engines.base import RequestRejected
from worker.engines.image_job import (
    BadSize,
    ImageJob,
    ImageOutput,
    JobStatus,
    parse_size,
)
from worker.request import Resume

log = logging.getLogger("redbatch.engine")


@dataclass(frozen=True)
class ImageEngineConfig:
    max_num_seqs: int = 16  # images in flight (a request of n images takes n)
    max_images_per_request: int = 4
    max_inference_steps: int = 100
    default_inference_steps: int | None = None  # None: the family's (28; FLUX without a guidance embedding: 4)
    allowed_sizes: tuple[str, ...] | None = None  # "W*H" sizes this worker serves; None: any valid size
    progress_every_steps: int = 5
    max_sequence_length: int | None = None  # T5 tokens per prompt; None: the stock pipeline's (FLUX 512, SD3 256)
    output_dir: str | None = None  # also write each image here as <request_id>-<index>.png
    coalesce_decodes: bool = True  # a denoised job may wait one step to share its VAE call with the next finisher


class ImageEngine:
    tasks = (TaskKind.TEXT_TO_IMAGE,)

    def __init__(self, pipe, config: ImageEngineConfig = ImageEngineConfig()):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from worker.engines.image_families import family_for

        self.family = family_for(pipe, config.max_sequence_length)
        self.pipe = pipe
        self.config = config
        self.max_num_seqs = config.max_num_seqs
        self.device = pipe._execution_device
        self.size_multiple = self.family.size_multiple
        self.default_steps = config.default_inference_steps or self.family.default_steps
        self.max_images = min(config.max_images_per_request, config.max_num_seqs)
        self.allowed_sizes = None if config.allowed_sizes is None else {
            parse_size(s, self.size_multiple) for s in config.allowed_sizes}
        # each job gets a deep copy (from_config per request costs ~2 ms of config handling)
        self._scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
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
        if body.negative_prompt is not None and self.family.negative_prompt_error is not None:
            raise RequestRejected(ErrorCode.INVALID_REQUEST, self.family.negative_prompt_error)
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        guidance = body.guidance_scale if body.guidance_scale is not None else self.family.default_guidance_scale
        return ImageJob(request_id=request_id, body=body, width=width, height=height, num_steps=num_steps,
                        guidance_scale=guidance, seed=seed, is_cfg=self.family.is_cfg(guidance))

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
        denoising = [j for j in self.running if not j.is_denoised]
        for jobs in self._buckets(denoising).values():
            self._denoise(jobs)
        self.num_steps += 1
        outputs = [self._progress(j) for j in denoising if not j.is_denoised]
        finished = self._to_decode()
        if finished:
            outputs += self._finish(finished)
        return [o for o in outputs if o is not None]

    def _to_decode(self) -> list[ImageJob]:
        """The denoised jobs to decode now, per size: all of them, unless a job of that size finishes at the
        next step and none of them has already waited a step. Then they wait one step beside it and go in
        the same VAE call: a decode call's fixed cost is paid once for both (a call of 16 small images costs
        ~3x one of 1), and no image waits more than one step, nor for a finish that is not certain."""
        done_by_size: dict[tuple[int, int], list[ImageJob]] = {}
        next_sizes = set()
        for job in self.running:
            if job.is_denoised:
                done_by_size.setdefault(job.size, []).append(job)
            elif job.step_index + 1 == job.num_steps:
                next_sizes.add(job.size)
        out = []
        for size, jobs in done_by_size.items():
            waited = any(j.denoised_at_step is not None and j.denoised_at_step < self.num_steps for j in jobs)
            if size in next_sizes and not waited and self.config.coalesce_decodes:
                for job in jobs:
                    if job.denoised_at_step is None:
                        job.denoised_at_step = self.num_steps
                continue
            out += jobs
        return out

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
        self.family.encode(jobs)
        for job in jobs:
            job.latents = self.family.initial_latents(job, torch.Generator("cpu").manual_seed(job.seed))
            job.scheduler, job.timesteps = self._schedule(job)
            job.status = JobStatus.RUNNING
            job.started_s = time.monotonic()
            self.running.append(job)
        self.profile["encode_s"] += time.perf_counter() - started

    def _schedule(self, job: ImageJob):
        """The job's own scheduler with the stock pipeline's timesteps for its step count and size."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        scheduler = copy.deepcopy(self._scheduler)
        sigmas, mu = self.family.schedule(job, scheduler)
        kwargs = {} if mu is None else {"mu": mu}
        timesteps, _ = retrieve_timesteps(scheduler, job.num_steps, self.device, sigmas=sigmas, **kwargs)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    @staticmethod
    def _buckets(jobs: list[ImageJob]) -> dict[tuple[int, int], list[ImageJob]]:
        """Jobs by image size: the transformer's positions (img_ids) are one size per forward."""
        buckets: dict[tuple[int, int], list[ImageJob]] = {}
        for job in jobs:
            buckets.setdefault(job.size, []).append(job)
        return buckets

    def _denoise(self, jobs: list[ImageJob]) -> None:
        """One forward over every image of one size, each at its job's timestep; then each job's own step."""
        started = time.perf_counter()
        inputs = self.family.forward_inputs(jobs)
        forward_started = time.perf_counter()
        out = self.pipe.transformer(**inputs, return_dict=False)[0]  # [rows, ...]
        forward_done = time.perf_counter()
        self.profile["forward_s"] += forward_done - forward_started
        for job, noise in zip(jobs, self.family.guide(jobs, out)):
            job.latents = job.scheduler.step(noise, job.timestep, job.latents, return_dict=False)[0]
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
            images = self.family.decode(torch.cat([j.latents for j in group]), width, height)  # [B, 3, H, W] in [-1, 1]
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
    """The image engine for a WorkerConfig: the pipeline from --model-path, on --device, maybe offloaded.
    The family (FLUX, SD3) is the model_index.json's `_class_name`, checked before any weight is read."""
    from worker.engines.image_families import check_served
    from worker.models.loading import diffusers_class_name, load_diffusers

    check_served(diffusers_class_name(config.model_path))
    pipe = load_diffusers(config.model_path, config.device, config.dtype, config.cpu_offload)
    return ImageEngine(pipe, ImageEngineConfig(
        max_num_seqs=config.max_num_seqs, max_images_per_request=config.max_images_per_request,
        max_inference_steps=config.max_inference_steps, allowed_sizes=config.allowed_image_sizes,
        progress_every_steps=config.progress_every_steps, max_sequence_length=config.max_sequence_length,
        output_dir=config.image_output_dir))
