"""Which requests run in the next step. Plain Python: no torch, no Redis."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.request import Sequence, SeqStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq.all_ids[seq.num_computed:] computed in this step

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence, so the step samples a token for it."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class Schedule:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Running first, then waiting (FIFO), under max_num_seqs and a per-step token budget.

    A prompt longer than the budget is prefilled in chunks over several steps, so one
    long prompt never stalls the decodes of the running requests.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_active(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_free_slots(self) -> int:
        return max(0, self.max_num_seqs - self.num_active)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule(self, max_running: int | None = None) -> Schedule:
        """The next step's chunks. `max_running` caps admission below max_num_seqs (KV memory pressure)."""
        limit = self.max_num_seqs if max_running is None else min(self.max_num_seqs, max_running)
        schedule = Schedule()
        budget = self.max_num_batched_tokens
        for seq in self.running:  # decodes first: one token each, never starved by prefills
            if seq.num_pending == 1:
                schedule.chunks.append(ScheduledChunk(seq, 1))
                budget -= 1
        for seq in self.running:  # then prefills already under way, in admission order
            if seq.num_pending > 1 and budget > 0:
                take = min(seq.num_pending, budget)
                schedule.chunks.append(ScheduledChunk(seq, take))
                budget -= take
        while self.waiting and len(self.running) < limit and budget > 0:
            seq = self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            take = min(seq.num_pending, budget)
            schedule.chunks.append(ScheduledChunk(seq, take))
            budget -= take
        return schedule

    def preempt_newest(self, num: int) -> list[Sequence]:
        """Send the `num` most recently admitted running sequences back to the front of the queue.

        Their KV is dropped; they keep their output and are recomputed (prompt + output) when
        readmitted, so their result is the same as if they had never been preempted.
        """
        victims = []
        for _ in range(min(num, len(self.running))):
            seq = self.running.pop()
            seq.status = SeqStatus.WAITING
            seq.num_computed = 0
            seq.num_preemptions += 1
            victims.append(seq)
        self.waiting.extendleft(victims)  # the newest victim ends up last, so admission order is kept
        return victims

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from whichever queue holds it."""
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
