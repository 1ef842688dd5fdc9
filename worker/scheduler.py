"""Which requests run in the next step, and which KV blocks they get. Plain Python: no torch, no Redis."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engines.blocks import BlockManager
from worker.request import Sequence, SeqStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq.all_ids[seq.num_computed:] computed in this step

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence, so the step samples a token for it."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.seq.num_computed > 0


@dataclass
class Schedule:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def unschedule(self, seq: Sequence) -> int:
        """Drop seq's chunk (it was preempted after being planned); returns the tokens that frees."""
        num_tokens = sum(c.num_tokens for c in self.chunks if c.seq is seq)
        self.chunks = [c for c in self.chunks if c.seq is not seq]
        return num_tokens

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Running first (decodes, then prefills under way), then waiting (highest priority level first,
    FIFO within a level), under max_num_seqs, a per-step token budget and the KV blocks.

    A prompt longer than the budget is prefilled in chunks over several steps, so one long prompt
    never stalls the decodes of the running requests. When a decode needs a block and none is
    free, the most recently admitted sequence of the lowest running level is preempted: its blocks
    are released and it is recomputed later (its full blocks usually come back from the prefix
    cache). The same happens, before a step is planned, to make a slot (and blocks) for waiting
    work of a higher level than some running work: bulk never holds a slot interactive work waits for.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_active(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_free_slots(self) -> int:
        return max(0, self.max_num_seqs - self.num_active)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._enqueue(seq, is_front=False)

    def _enqueue(self, seq: Sequence, is_front: bool) -> None:
        """Into the waiting queue behind every higher level; within its level last (new) or first (preempted)."""
        rank = seq.priority.rank
        for i, other in enumerate(self.waiting):
            if other.priority.rank > rank or (is_front and other.priority.rank == rank):
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def schedule(self, max_num_tokens: int | None = None) -> Schedule:
        """The next step. `max_num_tokens` lowers the token budget (a retry after running out of memory)."""
        limit = max(1, min(max_num_tokens or self.max_num_batched_tokens, self.max_num_batched_tokens))
        schedule = Schedule()
        self._make_room_for_higher(schedule, limit)
        budget = self._schedule_decodes(schedule, limit)
        budget = self._schedule_prefills(schedule, budget)
        self._admit(schedule, budget)
        while schedule.is_empty and self.running:  # running prefills all wait for blocks: free some
            schedule.preempted.append(self._preempt_newest())
            budget = self._schedule_prefills(schedule, limit)
            self._admit(schedule, budget)
        return schedule

    def _schedule_decodes(self, schedule: Schedule, budget: int) -> int:
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING or seq.num_pending != 1:
                continue  # preempted meanwhile, or still prefilling
            while not self.blocks.grow(seq, seq.num_tokens):
                victim = self._preempt_newest()
                schedule.preempted.append(victim)
                if victim is seq:
                    break
                budget += schedule.unschedule(victim)  # a lower level's decode planned earlier in this loop
            if seq.status == SeqStatus.RUNNING:
                schedule.chunks.append(ScheduledChunk(seq, 1))
                budget -= 1
        return budget

    def _schedule_prefills(self, schedule: Schedule, budget: int) -> int:
        """Running prefills, oldest first; a chunk shrinks to the blocks that are free."""
        scheduled = {id(c.seq) for c in schedule.chunks}
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_pending > 1 and id(seq) not in scheduled:
                room = self.blocks.room(seq)
                take = min(seq.num_pending, budget, room)
                take = seq.chunk_end(seq.num_computed, seq.num_computed + take) - seq.num_computed
                if take > 0 and self.blocks.grow(seq, seq.num_computed + take):
                    schedule.chunks.append(ScheduledChunk(seq, take))
                    budget -= take
        return budget

    def _admit(self, schedule: Schedule, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            take = self.blocks.admit(seq, budget)
            if take is None:
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            schedule.chunks.append(ScheduledChunk(seq, take))
            budget -= take

    def _make_room_for_higher(self, schedule: Schedule, limit: int) -> None:
        """Waiting sequences that find no free slot take the slot of running ones of a lower level (the
        newest of the lowest level first); the head of the queue also gets the blocks its first chunk
        needs that way."""
        num_slots = self.max_num_seqs - len(self.running)
        for seq in list(self.waiting):  # highest level first
            if num_slots > 0:
                num_slots -= 1
                continue
            if not self._preempt_below(seq, schedule):
                break
        head = self.waiting[0] if self.waiting else None
        while head is not None and self._is_short_of_blocks(head, limit):
            if not self._preempt_below(head, schedule):
                break

    def _is_short_of_blocks(self, head: Sequence, limit: int) -> bool:
        """Whether the free blocks fall short of the head's first chunk once this step's decodes have grown."""
        blocks = self.blocks
        decode_need = sum(1 for s in self.running
                          if s.num_pending == 1 and blocks.blocks_for(s.num_tokens) > len(s.block_table))
        return blocks.num_free_blocks < decode_need + blocks.blocks_for(min(head.num_tokens, limit))

    def _preempt_below(self, seq: Sequence, schedule: Schedule) -> bool:
        """Preempt the newest running sequence of the lowest level if that level is below seq's."""
        victim = self._newest_of_lowest()
        if victim is None or victim.priority.rank <= seq.priority.rank:
            return False
        self.preempt(victim)
        schedule.preempted.append(victim)
        return True

    def _newest_of_lowest(self) -> Sequence | None:
        """The preemption victim: the most recently admitted running sequence of the lowest level."""
        if not self.running:
            return None
        lowest = max(s.priority.rank for s in self.running)
        return next(s for s in reversed(self.running) if s.priority.rank == lowest)

    def _preempt_newest(self) -> Sequence:
        seq = self._newest_of_lowest()
        self.preempt(seq)
        return seq

    def preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue with no KV; it keeps its output and is recomputed
        (prompt + output) when readmitted, so its result is the same as if never preempted."""
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_registered_blocks = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq, is_front=True)  # preempted newest-first, so admission order within a level is kept

    def preempt_newest(self, num: int) -> list[Sequence]:
        """Preempt up to `num` running sequences, newest of the lowest level first (e.g. after an OOM)."""
        return [self._preempt_newest() for _ in range(min(num, len(self.running)))]

    def computed(self, seq: Sequence, num_tokens: int) -> None:
        """A step computed num_tokens more of seq: advance it and offer its full blocks to the prefix cache."""
        seq.num_computed += num_tokens
        self.blocks.register_computed(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from whichever queue holds it and release its blocks."""
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
