"""Scheduler over the BlockManager: plain Python, so these run without torch."""

from __future__ import annotations

import itertools
import random

import pytest

from producer.protocol import GenerateConfig
from worker.engines.blocks import BlockManager
from worker.request import Sequence, SeqStatus
from worker.scheduler import Schedule, ScheduledChunk, Scheduler

BLOCK_SIZE = 4
_first_ids = itertools.count(1000, 1000)  # every prompt its own tokens: no accidental prefix hits


def make_seq(request_id: str, num_prompt_tokens: int, prompt_ids: list[int] | None = None) -> Sequence:
    first = next(_first_ids)
    ids = prompt_ids if prompt_ids is not None else list(range(first, first + num_prompt_tokens))
    return Sequence(request_id=request_id, prompt_ids=ids, params=GenerateConfig(), max_tokens=16)


def make_scheduler(max_num_seqs: int, max_num_batched_tokens: int, num_blocks: int = 256,
                   enable_prefix_caching: bool = True) -> Scheduler:
    return Scheduler(max_num_seqs, max_num_batched_tokens,
                     BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching))


def run_step(scheduler: Scheduler, schedule: Schedule) -> None:
    """What the engine does after a forward: advance the cache and sample for completed chunks."""
    for chunk in schedule.chunks:
        completes = chunk.completes
        scheduler.computed(chunk.seq, chunk.num_tokens)
        if completes:
            chunk.seq.output_ids.append(7)


def planned(schedule: Schedule) -> list[tuple[str, int]]:
    return [(c.seq.request_id, c.num_tokens) for c in schedule.chunks]


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    manager = scheduler.blocks
    assert manager.num_free_blocks == manager.num_blocks
    assert [b.ref_count for b in manager.blocks] == [0] * manager.num_blocks


def assert_block_accounting(scheduler: Scheduler) -> None:
    """Every held block is counted once per holder; only running sequences hold blocks; a block
    held by two sequences is a cached (full, never written again) one."""
    manager = scheduler.blocks
    holders: dict[int, int] = {}
    for seq in scheduler.running:
        assert seq.num_computed <= len(seq.block_table) * BLOCK_SIZE
        for block_id in seq.block_table:
            holders[block_id] = holders.get(block_id, 0) + 1
    for seq in scheduler.waiting:
        assert seq.block_table == []
    for block in manager.blocks:
        assert block.ref_count == holders.get(block.block_id, 0)
        if block.ref_count > 1:
            assert block.hash is not None
    assert manager.num_free_blocks == manager.num_blocks - len(holders)


@pytest.mark.parametrize("max_num_seqs, max_num_batched_tokens", [(0, 8), (-1, 8), (4, 3)])
def test_constructor_rejects_bad_limits(max_num_seqs, max_num_batched_tokens):
    with pytest.raises(ValueError):
        make_scheduler(max_num_seqs, max_num_batched_tokens)


def test_constructor_accepts_budget_equal_to_seqs():
    scheduler = make_scheduler(4, 4)
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (4, 4)


def test_empty_scheduler_gives_empty_schedule():
    schedule = make_scheduler(2, 16).schedule()
    assert schedule.is_empty
    assert schedule.num_tokens == 0
    assert schedule.preempted == []


def test_admission_is_fifo_and_capped_by_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(f"r{i}", 3) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
        assert seq.status == SeqStatus.WAITING

    schedule = scheduler.schedule()

    assert planned(schedule) == [("r0", 3), ("r1", 3)]
    assert scheduler.running == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]
    assert [s.status for s in seqs] == [SeqStatus.RUNNING, SeqStatus.RUNNING, SeqStatus.WAITING, SeqStatus.WAITING]
    assert schedule.num_tokens == 6
    assert not schedule.is_empty
    assert [len(s.block_table) for s in seqs] == [1, 1, 0, 0]


def test_waiting_request_admitted_when_a_running_one_finishes():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(f"r{i}", 3) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())

    scheduler.finish(seqs[0])
    schedule = scheduler.schedule()

    assert planned(schedule) == [("r1", 1), ("r2", 3)]  # r1 decodes, r2 (not r3) is admitted
    assert scheduler.running == [seqs[1], seqs[2]]
    assert list(scheduler.waiting) == [seqs[3]]


def test_running_decodes_are_scheduled_before_prefills():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100)
    first, second = make_seq("first", 4), make_seq("second", 2)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler, scheduler.schedule())
    late = make_seq("late", 5)
    scheduler.add(late)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("first", 1), ("second", 1), ("late", 5)]
    assert [c.completes for c in schedule.chunks] == [True, True, True]
    assert [c.is_decode for c in schedule.chunks] == [True, True, False]
    assert len(first.block_table) == 2  # its decode at position 4 got a second block


def test_long_prompt_is_chunked_while_decodes_keep_running():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    short = make_seq("short", 3)
    scheduler.add(short)
    run_step(scheduler, scheduler.schedule())
    long = make_seq("long", 20)
    scheduler.add(long)

    steps = []
    for _ in range(3):
        schedule = scheduler.schedule()
        steps.append((planned(schedule), [c.completes for c in schedule.chunks]))
        assert schedule.num_tokens <= 8
        run_step(scheduler, schedule)
        assert len(long.block_table) == scheduler.blocks.blocks_for(long.num_computed)

    assert steps == [
        ([("short", 1), ("long", 7)], [True, False]),
        ([("short", 1), ("long", 7)], [True, False]),
        ([("short", 1), ("long", 6)], [True, True]),  # only the last chunk samples a token
    ]
    assert long.num_computed == 20 and long.output_ids == [7]
    assert planned(scheduler.schedule()) == [("short", 1), ("long", 1)]


def test_chunked_prefill_under_way_goes_before_new_admissions():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=6)
    long, other = make_seq("long", 10), make_seq("other", 4)
    scheduler.add(long)
    schedule = scheduler.schedule()
    assert planned(schedule) == [("long", 6)]
    run_step(scheduler, schedule)
    scheduler.add(other)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("long", 4), ("other", 2)]
    assert [c.completes for c in schedule.chunks] == [True, False]


def test_no_admission_once_the_budget_is_spent():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=4)
    short, long, late = make_seq("short", 1), make_seq("long", 10), make_seq("late", 1)
    scheduler.add(short)
    run_step(scheduler, scheduler.schedule())
    scheduler.add(long)
    run_step(scheduler, scheduler.schedule())  # short decodes, long takes 3
    scheduler.add(late)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("short", 1), ("long", 3)]
    assert list(scheduler.waiting) == [late] and late.status == SeqStatus.WAITING
    assert late.block_table == []
    assert scheduler.num_free_slots == 0


def test_completes_only_when_chunk_reaches_end_of_sequence():
    seq = make_seq("a", 10)
    assert not ScheduledChunk(seq, 9).completes
    assert ScheduledChunk(seq, 10).completes
    seq.num_computed = 6
    assert not ScheduledChunk(seq, 3).completes
    assert ScheduledChunk(seq, 4).completes


def test_is_decode_needs_a_computed_prefix():
    seq = make_seq("a", 1)
    assert not ScheduledChunk(seq, 1).is_decode  # a one-token prompt is a prefill
    seq.output_ids.append(5)
    seq.num_computed = 1
    assert ScheduledChunk(seq, 1).is_decode


# ---------------------------------------------------------------- blocks


def test_admission_waits_for_blocks_and_the_head_is_not_overtaken():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=3)
    first, big, small = make_seq("first", 8), make_seq("big", 12), make_seq("small", 2)
    for seq in (first, big, small):
        scheduler.add(seq)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("first", 8)]  # small would fit in the free block, but big is first
    assert list(scheduler.waiting) == [big, small]
    assert big.block_table == [] and small.block_table == []
    assert scheduler.blocks.num_free_blocks == 1
    assert schedule.preempted == []

    run_step(scheduler, schedule)
    scheduler.finish(first)
    assert planned(scheduler.schedule()) == [("big", 12)]


def test_a_prefill_under_way_is_not_overtaken_by_a_later_arrival():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8, num_blocks=4)
    a, b = make_seq("a", 6), make_seq("b", 20)
    scheduler.add(a)
    scheduler.add(b)
    schedule = scheduler.schedule()
    assert planned(schedule) == [("a", 6), ("b", 2)]
    run_step(scheduler, schedule)
    late = make_seq("late", 3)
    scheduler.add(late)

    schedule = scheduler.schedule()  # a decodes; b's next chunk of 7 would need two more blocks, one is free

    scheduled = [c.seq.request_id for c in schedule.chunks]
    assert scheduled[0] == "a"
    # b has room for 6 more tokens (2 in its own block, 4 in the free one); the free block must not go to
    # the later arrival while b, admitted first, makes no progress
    assert "b" in scheduled or "late" not in scheduled, planned(schedule)


def test_decode_that_needs_a_block_preempts_the_newest():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=4)
    a, b, c = make_seq("a", 4), make_seq("b", 4), make_seq("c", 8)
    for seq in (a, b, c):
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())  # every block in use; a and b each need one more to decode
    assert scheduler.blocks.num_free_blocks == 0
    c_blocks = list(c.block_table)
    late = make_seq("late", 2)
    scheduler.add(late)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("a", 1), ("b", 1)]
    assert schedule.preempted == [c]
    assert scheduler.num_preemptions == 1 and c.num_preemptions == 1
    assert scheduler.running == [a, b]
    assert list(scheduler.waiting) == [c, late]  # back at the front, ahead of the later arrival
    assert c.status == SeqStatus.WAITING
    assert (c.num_computed, c.block_table, c.num_registered_blocks) == (0, [], 0)  # recomputed when readmitted
    assert c.output_ids == [7]  # its output is kept
    assert sorted(a.block_table[1:] + b.block_table[1:]) == sorted(c_blocks)  # its blocks went to the decodes
    assert_block_accounting(scheduler)


def test_a_decode_that_cannot_get_a_block_preempts_itself_last():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=3)
    a, b, c = make_seq("a", 4), make_seq("b", 4), make_seq("c", 4)
    for seq in (a, b, c):
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())

    schedule = scheduler.schedule()

    # a gets c's block; b then finds nothing free and, being the newest left, is preempted itself
    assert planned(schedule) == [("a", 1)]
    assert schedule.preempted == [c, b]
    assert list(scheduler.waiting) == [b, c]  # admission order kept
    assert scheduler.num_preemptions == 2
    assert b.block_table == [] and c.block_table == []
    assert_block_accounting(scheduler)


def test_preempted_sequence_gets_its_blocks_back_from_the_prefix_cache():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=4)
    a, c = make_seq("a", 4), make_seq("c", 11)  # c: two full blocks and a partial one
    scheduler.add(a)
    scheduler.add(c)
    run_step(scheduler, scheduler.schedule())
    full_blocks = c.block_table[:2]

    schedule = scheduler.schedule()  # a's decode needs a block: c goes
    assert schedule.preempted == [c]
    assert planned(schedule) == [("a", 1)]
    run_step(scheduler, schedule)
    scheduler.finish(a)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("c", 4)]  # prompt positions 8..10 and its sampled token, recomputed
    assert c.block_table[:2] == full_blocks
    assert (c.num_computed, c.num_cached_tokens) == (8, 8)
    assert schedule.chunks[0].completes
    assert scheduler.blocks.num_hit_tokens == 8


def test_finish_releases_the_blocks():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=8)
    a, b = make_seq("a", 9), make_seq("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler, scheduler.schedule())
    assert scheduler.blocks.num_free_blocks == 4

    scheduler.finish(a)
    assert a.block_table == [] and scheduler.blocks.num_free_blocks == 7
    scheduler.finish(b)
    assert_all_blocks_free(scheduler)


def test_preempted_then_finished_sequence_leaves_no_block_behind():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=3)
    seqs = [make_seq(f"r{i}", 4) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())
    schedule = scheduler.schedule()
    assert len(schedule.preempted) == 2
    run_step(scheduler, schedule)

    for seq in seqs:  # aborted while waiting (preempted) or running
        scheduler.finish(seq)

    assert_all_blocks_free(scheduler)
    assert scheduler.num_active == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_every_block_is_free_again_after_preemptions_and_finishes(seed, enable_prefix_caching):
    rng = random.Random(seed)
    scheduler = make_scheduler(max_num_seqs=6, max_num_batched_tokens=24, num_blocks=12,
                               enable_prefix_caching=enable_prefix_caching)
    shared = list(range(1, 9))  # a two-block system prompt some requests share
    pending = []
    for i in range(20):
        length = rng.randint(1, 20)
        prompt = shared + list(range(100 * i, 100 * i + length)) if rng.random() < 0.5 else None
        seq = make_seq(f"r{i}", length, prompt)
        seq.max_tokens = rng.randint(1, 12)
        pending.append(seq)
    finished = []
    for _ in range(500):
        if pending and rng.random() < 0.5:
            scheduler.add(pending.pop(0))
        schedule = scheduler.schedule()
        run_step(scheduler, schedule)
        for chunk in schedule.chunks:
            seq = chunk.seq
            if seq.num_output_tokens >= seq.max_tokens or rng.random() < 0.02:  # done or aborted
                scheduler.finish(seq)
                finished.append(seq)
        assert_block_accounting(scheduler)
        if not pending and scheduler.num_active == 0:
            break

    assert len(finished) == 20
    assert scheduler.num_preemptions > 0  # the pool is small enough to force preemptions
    assert_all_blocks_free(scheduler)
    assert scheduler.schedule().is_empty


# ---------------------------------------------------------------- finish and find


def test_finish_removes_from_running_and_waiting():
    scheduler = make_scheduler(max_num_seqs=1, max_num_batched_tokens=8)
    running, waiting = make_seq("running", 2), make_seq("waiting", 2)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    assert scheduler.running == [running] and list(scheduler.waiting) == [waiting]

    scheduler.finish(waiting)
    assert list(scheduler.waiting) == [] and scheduler.running == [running]
    assert waiting.is_finished

    scheduler.finish(running)
    assert scheduler.running == []
    assert running.status == SeqStatus.FINISHED
    assert scheduler.schedule().is_empty
    assert_all_blocks_free(scheduler)


def test_finish_of_unknown_sequence_is_harmless():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=8)
    kept = make_seq("kept", 2)
    scheduler.add(kept)
    stranger = make_seq("stranger", 2)

    scheduler.finish(stranger)

    assert stranger.is_finished
    assert list(scheduler.waiting) == [kept]


def test_finish_matches_identity_not_equal_fields():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=8)
    kept = make_seq("same", 2)
    twin = make_seq("same", 2, prompt_ids=list(kept.prompt_ids))
    twin.arrival_s = kept.arrival_s
    scheduler.add(kept)

    scheduler.finish(twin)

    assert list(scheduler.waiting) == [kept]


def test_find_looks_in_running_and_waiting():
    scheduler = make_scheduler(max_num_seqs=1, max_num_batched_tokens=8)
    running, waiting = make_seq("running", 2), make_seq("waiting", 2)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()

    assert scheduler.find("running") is running
    assert scheduler.find("waiting") is waiting
    assert scheduler.find("missing") is None
    scheduler.finish(running)
    assert scheduler.find("running") is None


def test_num_free_slots_counts_running_and_waiting():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=8)
    assert scheduler.num_free_slots == 3
    seqs = [make_seq(f"r{i}", 2) for i in range(4)]
    scheduler.add(seqs[0])
    assert scheduler.num_free_slots == 2
    scheduler.schedule()
    scheduler.add(seqs[1])
    assert (scheduler.num_active, scheduler.num_free_slots) == (2, 1)
    scheduler.add(seqs[2])
    scheduler.add(seqs[3])  # over-admitted: never negative
    assert (scheduler.num_active, scheduler.num_free_slots) == (4, 0)
    scheduler.finish(seqs[0])
    scheduler.finish(seqs[1])
    assert scheduler.num_free_slots == 1


def test_preempt_newest_after_an_out_of_memory_step():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100)
    seqs = [make_seq(f"r{i}", 5) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.schedule()

    victims = scheduler.preempt_newest(2)

    assert victims == [seqs[2], seqs[1]]
    assert scheduler.running == [seqs[0]]
    assert list(scheduler.waiting) == [seqs[1], seqs[2]]
    assert scheduler.preempt_newest(5) == [seqs[0]]
    assert_all_blocks_free(scheduler)
    assert scheduler.num_preemptions == 3


# ---------------------------------------------------------------- priority levels


def prio_seq(request_id: str, num_prompt_tokens: int, priority: str) -> Sequence:
    from producer.protocol import Priority

    seq = make_seq(request_id, num_prompt_tokens)
    seq.priority = Priority(priority)
    return seq


def test_a_higher_level_is_admitted_first_and_fifo_holds_within_a_level():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [prio_seq("g0", 3, "background"), prio_seq("b0", 3, "bulk"), prio_seq("i0", 3, "interactive"),
            prio_seq("b1", 3, "bulk"), prio_seq("i1", 3, "interactive")]
    for seq in seqs:
        scheduler.add(seq)
    assert [s.request_id for s in scheduler.waiting] == ["i0", "i1", "b0", "b1", "g0"]
    assert planned(scheduler.schedule()) == [("i0", 3), ("i1", 3)]


def test_waiting_interactive_work_preempts_the_newest_bulk_request_for_its_slot():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=100)
    bulk = [prio_seq(f"b{i}", 3, "bulk") for i in range(3)]
    for seq in bulk:
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())
    late_bulk, chat = prio_seq("b3", 3, "bulk"), prio_seq("chat", 3, "interactive")
    scheduler.add(late_bulk)
    scheduler.add(chat)

    schedule = scheduler.schedule()

    assert schedule.preempted == [bulk[2]]  # the newest bulk request gives its slot
    assert planned(schedule) == [("b0", 1), ("b1", 1), ("chat", 3)]  # chat prefills in this very step
    assert [s.request_id for s in scheduler.waiting] == ["b2", "b3"]  # the victim keeps its place in its level
    assert bulk[2].output_ids == [7] and bulk[2].block_table == []  # kept output, recomputed later
    assert_block_accounting(scheduler)


def test_equal_or_lower_levels_never_preempt():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    running = [prio_seq("i0", 3, "interactive"), prio_seq("b0", 3, "bulk")]
    for seq in running:
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())
    scheduler.add(prio_seq("b1", 3, "bulk"))  # same level as the lowest running: waits
    schedule = scheduler.schedule()
    assert schedule.preempted == [] and planned(schedule) == [("i0", 1), ("b0", 1)]
    scheduler.finish(running[1])
    scheduler.add(prio_seq("i1", 3, "interactive"))
    run_step(scheduler, scheduler.schedule())  # i0 decodes, i1 takes the free slot (b1 waits behind it)
    assert [s.request_id for s in scheduler.running] == ["i0", "i1"]
    scheduler.add(prio_seq("i2", 3, "interactive"))
    schedule = scheduler.schedule()
    assert schedule.preempted == []  # interactive does not preempt interactive
    assert [s.request_id for s in scheduler.waiting] == ["i2", "b1"]


def test_a_decode_short_of_blocks_preempts_the_lowest_level_not_the_newest():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=3)
    bulk, chat_a, chat_b = prio_seq("bulk", 4, "bulk"), prio_seq("a", 4, "interactive"), prio_seq("b", 4, "interactive")
    scheduler.add(bulk)
    run_step(scheduler, scheduler.schedule())
    scheduler.add(chat_a)
    scheduler.add(chat_b)
    run_step(scheduler, scheduler.schedule())  # bulk decodes into a 2nd block; a gets the last one, b waits
    assert scheduler.blocks.num_free_blocks == 0

    schedule = scheduler.schedule()

    assert bulk in schedule.preempted and chat_a not in schedule.preempted
    assert chat_a in [c.seq for c in schedule.chunks]
    assert all(c.seq is not bulk for c in schedule.chunks)  # a preempted sequence keeps no planned chunk
    assert_block_accounting(scheduler)


def test_interactive_work_short_of_blocks_takes_them_from_bulk():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_blocks=4)
    bulk = [prio_seq("b0", 8, "bulk"), prio_seq("b1", 8, "bulk")]  # two blocks each: all four taken
    for seq in bulk:
        scheduler.add(seq)
    run_step(scheduler, scheduler.schedule())
    chat = prio_seq("chat", 6, "interactive")
    scheduler.add(chat)

    schedule = scheduler.schedule()

    assert schedule.preempted[0] is bulk[1]
    assert ("chat", 6) in planned(schedule)
    assert_block_accounting(scheduler)


# ---------------------------------------------------------------- images are never split across chunks


def test_chunk_end_stops_before_an_image_it_would_cut():
    seq = make_seq("img", 30)
    seq.image_spans = [(5, 15, "d1"), (20, 24, "d2")]
    assert seq.chunk_end(0, 10) == 5  # would cut the first image: stop before it
    assert seq.chunk_end(0, 15) == 15  # the whole image fits
    assert seq.chunk_end(5, 12) == 5  # begins at the image and cannot hold it: nothing this step
    assert seq.chunk_end(15, 22) == 20
    assert seq.chunk_end(8, 12) == 12  # begins inside the image (a cached prefix ended there): goes on
    assert seq.chunk_end(0, 30) == 30


def test_prefill_waits_for_a_budget_that_holds_the_whole_image():
    scheduler = make_scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    seq = make_seq("img", 20)
    seq.image_spans = [(6, 14, "d")]  # 8 image tokens
    scheduler.add(seq)
    chunks = []
    for _ in range(3):
        schedule = scheduler.schedule()
        chunks += [(seq.num_computed, seq.num_computed + c.num_tokens) for c in schedule.chunks]
        run_step(scheduler, schedule)
    assert chunks == [(0, 6), (6, 14), (14, 20)]
