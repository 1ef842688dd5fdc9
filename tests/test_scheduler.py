"""Scheduler: plain Python, so these run without torch."""

from __future__ import annotations

import pytest

from producer.protocol import GenerateConfig
from worker.request import Sequence, SeqStatus
from worker.scheduler import Schedule, ScheduledChunk, Scheduler


def make_seq(request_id: str, num_prompt_tokens: int) -> Sequence:
    return Sequence(request_id=request_id, prompt_ids=list(range(1, num_prompt_tokens + 1)),
                    params=GenerateConfig(), max_tokens=16)


def run_step(schedule: Schedule) -> None:
    """What the engine does after a forward: advance the cache and sample for completed chunks."""
    for chunk in schedule.chunks:
        completes = chunk.completes
        chunk.seq.num_computed += chunk.num_tokens
        if completes:
            chunk.seq.output_ids.append(7)


def planned(schedule: Schedule) -> list[tuple[str, int]]:
    return [(c.seq.request_id, c.num_tokens) for c in schedule.chunks]


@pytest.mark.parametrize("max_num_seqs, max_num_batched_tokens", [(0, 8), (-1, 8), (4, 3)])
def test_constructor_rejects_bad_limits(max_num_seqs, max_num_batched_tokens):
    with pytest.raises(ValueError):
        Scheduler(max_num_seqs, max_num_batched_tokens)


def test_constructor_accepts_budget_equal_to_seqs():
    scheduler = Scheduler(4, 4)
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (4, 4)


def test_empty_scheduler_gives_empty_schedule():
    schedule = Scheduler(2, 16).schedule()
    assert schedule.is_empty
    assert schedule.num_tokens == 0


def test_admission_is_fifo_and_capped_by_max_num_seqs():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=100)
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


def test_waiting_request_admitted_when_a_running_one_finishes():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(f"r{i}", 3) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler.schedule())

    scheduler.finish(seqs[0])
    schedule = scheduler.schedule()

    assert planned(schedule) == [("r1", 1), ("r2", 3)]  # r1 decodes, r2 (not r3) is admitted
    assert scheduler.running == [seqs[1], seqs[2]]
    assert list(scheduler.waiting) == [seqs[3]]


def test_running_decodes_are_scheduled_before_prefills():
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=100)
    first, second = make_seq("first", 4), make_seq("second", 2)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler.schedule())
    late = make_seq("late", 5)
    scheduler.add(late)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("first", 1), ("second", 1), ("late", 5)]
    assert [c.completes for c in schedule.chunks] == [True, True, True]


def test_long_prompt_is_chunked_while_decodes_keep_running():
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=8)
    short = make_seq("short", 3)
    scheduler.add(short)
    run_step(scheduler.schedule())
    long = make_seq("long", 20)
    scheduler.add(long)

    steps = []
    for _ in range(3):
        schedule = scheduler.schedule()
        steps.append((planned(schedule), [c.completes for c in schedule.chunks]))
        assert schedule.num_tokens <= 8
        run_step(schedule)

    assert steps == [
        ([("short", 1), ("long", 7)], [True, False]),
        ([("short", 1), ("long", 7)], [True, False]),
        ([("short", 1), ("long", 6)], [True, True]),  # only the last chunk samples a token
    ]
    assert long.num_computed == 20 and long.output_ids == [7]
    assert planned(scheduler.schedule()) == [("short", 1), ("long", 1)]


def test_chunked_prefill_under_way_goes_before_new_admissions():
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=6)
    long, other = make_seq("long", 10), make_seq("other", 4)
    scheduler.add(long)
    schedule = scheduler.schedule()
    assert planned(schedule) == [("long", 6)]
    run_step(schedule)
    scheduler.add(other)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("long", 4), ("other", 2)]
    assert [c.completes for c in schedule.chunks] == [True, False]


def test_no_admission_once_the_budget_is_spent():
    scheduler = Scheduler(max_num_seqs=3, max_num_batched_tokens=4)
    short, long, late = make_seq("short", 1), make_seq("long", 10), make_seq("late", 1)
    scheduler.add(short)
    run_step(scheduler.schedule())
    scheduler.add(long)
    run_step(scheduler.schedule())  # short decodes, long takes 3
    scheduler.add(late)

    schedule = scheduler.schedule()

    assert planned(schedule) == [("short", 1), ("long", 3)]
    assert list(scheduler.waiting) == [late] and late.status == SeqStatus.WAITING
    assert scheduler.num_free_slots == 0


def test_completes_only_when_chunk_reaches_end_of_sequence():
    seq = make_seq("a", 10)
    assert not ScheduledChunk(seq, 9).completes
    assert ScheduledChunk(seq, 10).completes
    seq.num_computed = 6
    assert not ScheduledChunk(seq, 3).completes
    assert ScheduledChunk(seq, 4).completes


def test_finish_removes_from_running_and_waiting():
    scheduler = Scheduler(max_num_seqs=1, max_num_batched_tokens=8)
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


def test_finish_of_unknown_sequence_is_harmless():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=8)
    kept = make_seq("kept", 2)
    scheduler.add(kept)
    stranger = make_seq("stranger", 2)

    scheduler.finish(stranger)

    assert stranger.is_finished
    assert list(scheduler.waiting) == [kept]


def test_finish_matches_identity_not_equal_fields():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=8)
    kept, twin = make_seq("same", 2), make_seq("same", 2)
    kept.arrival_s = twin.arrival_s
    scheduler.add(kept)

    scheduler.finish(twin)

    assert list(scheduler.waiting) == [kept]


def test_find_looks_in_running_and_waiting():
    scheduler = Scheduler(max_num_seqs=1, max_num_batched_tokens=8)
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
    scheduler = Scheduler(max_num_seqs=3, max_num_batched_tokens=8)
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
