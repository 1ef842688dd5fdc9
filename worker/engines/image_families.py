"""What differs between diffusers pipeline families, behind one small adapter the image engine drives.

The engine owns admission, each job's scheduler and its Euler steps, size buckets, decode batching and
the outputs; a family owns how its pipeline encodes prompts, lays out its latents, calls its
transformer and turns latents back into pixels, each reproducing the stock pipeline's math:

- `encode(jobs)`: every new job's conditioning in one batch per text encoder; sets `job.prompt_embeds`
  and `job.pooled_embeds` with one row per transformer row of the job.
- `initial_latents(job, generator)`: the job's noise, as the stock pipeline draws it for n images.
- `schedule(job)`: (sigmas, mu) for `retrieve_timesteps`, as the stock pipeline passes them.
- `forward_inputs(jobs)`: the transformer's keyword arguments for one size bucket.
- `guide(jobs, out)`: each job's noise prediction [n, ...] from the forward's rows.
- `decode(latents, width, height)`: pixels [B, 3, H, W] in [-1, 1].

A job's transformer rows: n for FLUX (guidance-distilled: guidance is an embedding, not a second
pass); 2n for SD3 with classifier-free guidance (guidance_scale > 1): n negative, then n positive.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from worker.engines.image_job import ImageJob


def family_for(pipe, max_sequence_length: int | None):
    """The adapter for a loaded pipeline; ValueError for a family the engine does not serve."""
    family = FAMILIES.get(type(pipe).__name__)
    if family is None:
        served = ", ".join(FAMILIES)
        raise ValueError(f"the image engine serves {served}; {type(pipe).__name__} is not one of them")
    return family(pipe, max_sequence_length)


def check_served(class_name: str) -> None:
    """Before loading a model directory: refuse a pipeline class no family serves (model_index.json)."""
    if class_name not in FAMILIES:
        raise ValueError(f"the image engine serves {', '.join(FAMILIES)}; the model directory holds "
                         f"{class_name or 'no _class_name'}")


def _rows(jobs: list[ImageJob], out: torch.Tensor) -> list[torch.Tensor]:
    """Split a forward's output [B, ...] back into each job's rows, in job order."""
    return list(torch.split(out, [j.num_rows for j in jobs]))


class FluxFamily:
    """FluxPipeline: CLIP pooled + T5, packed 2x2 latents [n, L, C], the timestep / 1000, guidance as an
    embedding for dev-like models (None for schnell-like), no negative prompt."""

    default_guidance_scale = 3.5
    negative_prompt_error = "this model takes no negative_prompt (FLUX is guidance-distilled)"

    def __init__(self, pipe, max_sequence_length: int | None):
        self.pipe = pipe
        self.device = pipe._execution_device
        self.max_sequence_length = max_sequence_length or 512  # the stock pipeline's default
        self.has_guidance = bool(pipe.transformer.config.guidance_embeds)
        self.size_multiple = pipe.vae_scale_factor * 2
        self.default_steps = 28 if self.has_guidance else 4
        self._encoder_dtypes = (pipe.text_encoder.dtype, pipe.text_encoder_2.dtype)  # (CLIP, T5), as the pipeline casts

    def is_cfg(self, guidance_scale: float) -> bool:
        return False

    def encode(self, jobs: list[ImageJob]) -> None:
        """FluxPipeline.encode_prompt's math (CLIP pooled output, T5 last hidden state, both padded to their
        max length) without its per-call costs: it tokenizes every prompt twice to warn about truncation and
        walks every module for offload hooks, ~half its time on small batches."""
        pipe = self.pipe
        prompts = [j.body.prompt for j in jobs]
        clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = pipe.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output  # [J, P]
        t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = pipe.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]  # [J, T, D]
        embeds, pooled = embeds.to(self._encoder_dtypes[1]), pooled.to(self._encoder_dtypes[0])
        for i, job in enumerate(jobs):
            job.prompt_embeds = embeds[i : i + 1].expand(job.num_images, -1, -1)  # [n, T, D]: the pipeline's repeat
            job.pooled_embeds = pooled[i : i + 1].expand(job.num_images, -1)  # [n, P]

    def initial_latents(self, job: ImageJob, generator: torch.Generator) -> torch.Tensor:
        latents, _ = self.pipe.prepare_latents(job.num_images, self.pipe.transformer.config.in_channels // 4,
                                               job.height, job.width, job.prompt_embeds.dtype, self.device, generator)
        return latents  # [n, L, C]

    def schedule(self, job: ImageJob, scheduler) -> tuple[np.ndarray | None, float]:
        """FluxPipeline's: sigmas linspace(1, 1/N, N), mu from the job's own image token count (always passed;
        the scheduler uses it only with dynamic shifting)."""
        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / job.num_steps, job.num_steps)
        mu = calculate_shift(job.latents.shape[1], cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return sigmas, mu

    def forward_inputs(self, jobs: list[ImageJob]) -> dict:
        latents = torch.cat([j.latents for j in jobs])  # [B, L, C]
        dtype = latents.dtype
        timestep = torch.cat([j.timestep.expand(j.num_images) for j in jobs]).to(dtype)  # [B]
        guidance = None
        if self.has_guidance:
            guidance = torch.tensor([j.guidance_scale for j in jobs for _ in range(j.num_images)],
                                    device=self.device, dtype=torch.float32)  # [B]
        first = jobs[0]
        img_ids = self.pipe._prepare_latent_image_ids(len(latents), first.height // self.size_multiple,
                                                      first.width // self.size_multiple, self.device, dtype)
        embeds = torch.cat([j.prompt_embeds for j in jobs])  # [B, T, D]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        return {"hidden_states": latents, "timestep": timestep / 1000, "guidance": guidance,
                "pooled_projections": torch.cat([j.pooled_embeds for j in jobs]), "encoder_hidden_states": embeds,
                "txt_ids": txt_ids, "img_ids": img_ids}

    def guide(self, jobs: list[ImageJob], out: torch.Tensor) -> list[torch.Tensor]:
        return _rows(jobs, out)

    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # [B, C, h, w]
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]


class SD3Family:
    """StableDiffusion3Pipeline: CLIP-L and CLIP-G (penultimate hidden states, concatenated, zero-padded to
    T5's width, then T5's states after them; pooled outputs concatenated), latents [n, C, h, w] unpacked,
    the raw timestep, classifier-free guidance when guidance_scale > 1 (negative prompt default "")."""

    default_guidance_scale = 7.0
    negative_prompt_error = None

    def __init__(self, pipe, max_sequence_length: int | None):
        self.pipe = pipe
        self.device = pipe._execution_device
        self.max_sequence_length = max_sequence_length or 256  # the stock pipeline's default
        self.size_multiple = pipe.vae_scale_factor * pipe.patch_size
        self.default_steps = 28

    def is_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1  # the stock pipeline's do_classifier_free_guidance

    def encode(self, jobs: list[ImageJob]) -> None:
        """StableDiffusion3Pipeline.encode_prompt's math for every prompt and every CFG job's negative prompt
        in one batch per encoder (clip_skip None)."""
        cfg_jobs = [j for j in jobs if j.is_cfg]
        prompts = [j.body.prompt for j in jobs] + [j.body.negative_prompt or "" for j in cfg_jobs]
        embeds, pooled = self._encode(prompts)  # [P, T, D], [P, D_pooled]
        negative = {j.request_id: len(jobs) + k for k, j in enumerate(cfg_jobs)}
        for i, job in enumerate(jobs):
            rows = [negative[job.request_id], i] if job.is_cfg else [i]  # the stock order: negative, then positive
            index = torch.tensor(rows, device=embeds.device).repeat_interleave(job.num_images)
            job.prompt_embeds = embeds[index]  # [rows, T, D]
            job.pooled_embeds = pooled[index]  # [rows, D_pooled]

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        clip_states, clip_pooled = [], []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            clip_pooled.append(out[0])  # [P, proj]
            clip_states.append(out.hidden_states[-2].to(pipe.text_encoder.dtype))  # [P, 77, width]
        t5 = self._t5(prompts)  # [P, T, D]
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # to T5's width
        return torch.cat([clip, t5], dim=-2), torch.cat(clip_pooled, dim=-1)

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        pipe = self.pipe
        if pipe.text_encoder_3 is None:  # a checkpoint loaded without T5: zeros, as the stock pipeline
            return torch.zeros(len(prompts), self.max_sequence_length, pipe.transformer.config.joint_attention_dim,
                               device=self.device, dtype=pipe.text_encoder.dtype)
        ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return pipe.text_encoder_3(ids.to(self.device))[0].to(pipe.text_encoder_3.dtype)

    def initial_latents(self, job: ImageJob, generator: torch.Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(job.num_images, self.pipe.transformer.config.in_channels, job.height,
                                         job.width, job.prompt_embeds.dtype, self.device, generator)  # [n, C, h, w]

    def schedule(self, job: ImageJob, scheduler) -> tuple[None, float | None]:
        """The stock pipeline's: the scheduler's own sigmas for N steps; mu from the image's patch count only
        with dynamic shifting (SD3 and SD3.5 ship without it: a fixed shift of 3)."""
        cfg = scheduler.config
        if not cfg.get("use_dynamic_shifting"):
            return None, None
        patch = self.pipe.transformer.config.patch_size
        _, _, height, width = job.latents.shape
        num_patches = (height // patch) * (width // patch)
        mu = calculate_shift(num_patches, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))  # SD3's defaults
        return None, mu

    def forward_inputs(self, jobs: list[ImageJob]) -> dict:
        copies = [2 if j.is_cfg else 1 for j in jobs]
        latents = torch.cat([j.latents for j, c in zip(jobs, copies) for _ in range(c)])  # [B, C, h, w]
        timestep = torch.cat([j.timestep.expand(j.num_rows) for j in jobs])  # [B]
        return {"hidden_states": latents, "timestep": timestep,
                "encoder_hidden_states": torch.cat([j.prompt_embeds for j in jobs]),  # [B, 77 + T, D]
                "pooled_projections": torch.cat([j.pooled_embeds for j in jobs])}  # [B, P]

    def guide(self, jobs: list[ImageJob], out: torch.Tensor) -> list[torch.Tensor]:
        noise = []
        for job, rows in zip(jobs, _rows(jobs, out)):
            if job.is_cfg:
                uncond, text = rows.chunk(2)
                rows = uncond + job.guidance_scale * (text - uncond)
            noise.append(rows)
        return noise

    def decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


FAMILIES = {"FluxPipeline": FluxFamily, "StableDiffusion3Pipeline": SD3Family}
