"""One text_to_image request inside the image engine, and what a step gives back for it.

A job owns its whole denoising state: its own scheduler instance (timesteps, sigmas, step
index), its latents, its prompt embeddings and the CPU generator its noise came from. The
engine only gathers jobs of one size into a forward and hands each its slice back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from producer.protocol import (
    DEFAULT_PRIORITY,
    EventType,
    FinishReason,
    Priority,
    TextToImageBody,
)
from worker.out_events import OutEvent, error_event, image_event, progress_event

_SIZE_RE = re.compile(r"([1-9][0-9]{0,4})\*([1-9][0-9]{0,4})")
MAX_SIDE_PX = 4096


class JobStatus(str, Enum):
    WAITING = "waiting"  # admitted by the loop, not yet encoded
    RUNNING = "running"  # denoising
    FINISHED = "finished"


class BadSize(ValueError):
    pass


def parse_size(size: str, multiple_of: int) -> tuple[int, int]:
    """'W*H' -> (width, height); each side a multiple of `multiple_of` (the VAE's factor x FLUX's 2x2 packing)."""
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        raise BadSize(f"size must be 'W*H' in pixels (e.g. '1024*1024'), not {size[:40]!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width > MAX_SIDE_PX or height > MAX_SIDE_PX:
        raise BadSize(f"size {size}: each side must be at most {MAX_SIDE_PX} pixels")
    if width % multiple_of or height % multiple_of:
        raise BadSize(f"size {size}: width and height must be multiples of {multiple_of} for this model")
    return width, height


@dataclass(eq=False)
class ImageJob:
    request_id: str
    body: TextToImageBody
    width: int
    height: int
    num_steps: int
    guidance_scale: float
    seed: int
    is_cfg: bool = False  # classifier-free guidance: two transformer rows per image (negative, positive)
    num_skipped_images: int = 0  # images an earlier worker already published (a resumed request)
    status: JobStatus = JobStatus.WAITING
    # denoising state, set when the job starts running
    scheduler: Any = None  # its own FlowMatchEulerDiscreteScheduler
    timesteps: Any = None  # [num_steps]
    latents: Any = None  # FLUX [n, L, C] packed, SD3 [n, C, h, w]; after the last step, the final ones
    prompt_embeds: Any = None  # [num_rows, T, D] text states, one row per transformer row
    pooled_embeds: Any = None  # [num_rows, P] pooled CLIP
    step_index: int = 0
    denoised_at_step: int | None = None  # the engine step after which it waited, denoised, for a shared decode
    arrival_s: float = field(default_factory=time.monotonic)
    added_at_step: int = 0  # the engine's step count when it was added (its wait, for admission order)
    started_s: float | None = None
    priority: Priority = DEFAULT_PRIORITY  # kept for the loop's free-slot count; admission here is FIFO
    # the loop's bookkeeping (out_events.Tracked); the engine never reads them
    entry_id: Any = None  # worker.streams.EntryRef
    num_deliveries: int = 1
    next_seq: int = 0
    is_stream: bool = True
    task: str = "text_to_image"

    @property
    def num_images(self) -> int:
        return self.body.n

    @property
    def num_rows(self) -> int:
        """The job's rows in a transformer forward: n, or 2n with classifier-free guidance."""
        return 2 * self.body.n if self.is_cfg else self.body.n

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def is_denoised(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def timestep(self):
        return self.timesteps[self.step_index]


@dataclass
class ImageOutput:
    """A step's result for one job: progress, or its images and the end, or its failure."""

    seq: ImageJob
    progress: tuple[int, int] | None = None  # (steps done, total)
    pngs: list[bytes] | None = None  # the request's images, in index order, when it finished
    urls: list[str] | None = None  # file:// URLs of the images written to the output directory
    error: str | None = None
    finish_reason: FinishReason | None = None
    num_tokens: int = 0  # images produce no tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def events(self) -> Iterator[OutEvent]:
        if self.error is not None:
            yield error_event(self.error)
            return
        if self.progress is not None:
            yield progress_event(*self.progress)
        if self.pngs is not None:
            urls = self.urls or [None] * len(self.pngs)
            for index, (png, url) in enumerate(zip(self.pngs, urls)):
                if index >= self.seq.num_skipped_images:
                    yield image_event(index, png, self.seq.body.response_format, url)
        if self.is_finished:
            yield OutEvent(EventType.DONE, {"finish_reason": self.finish_reason})
