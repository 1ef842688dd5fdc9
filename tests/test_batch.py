"""build_group: range layouts with dummy rows, left-padded gathered layouts, masks and write plans."""

from __future__ import annotations

import torch

from producer.protocol import GenerateConfig
from worker.engines.batch import build_group
from worker.request import Sequence
from worker.scheduler import ScheduledChunk

torch.set_num_threads(1)
CPU = torch.device("cpu")
DTYPE = torch.float32
MIN = torch.finfo(DTYPE).min


def chunk(slot: int, prompt_ids: list[int], output_ids: list[int], num_computed: int, num_tokens: int) -> ScheduledChunk:
    seq = Sequence(request_id=f"s{slot}", prompt_ids=prompt_ids, params=GenerateConfig(), max_tokens=8,
                   output_ids=list(output_ids), slot=slot, num_computed=num_computed)
    return ScheduledChunk(seq, num_tokens)


def decode_chunk(slot: int, num_prompt_tokens: int, first_id: int) -> ScheduledChunk:
    # prompt fully in the cache, one sampled token pending at position num_prompt_tokens
    prompt = list(range(first_id, first_id + num_prompt_tokens))
    return chunk(slot, prompt, [first_id + 100], num_computed=num_prompt_tokens, num_tokens=1)


def allowed(mask: torch.Tensor) -> torch.Tensor:
    # [R, 1, T, L] additive -> [R, T, L] bool; every entry must be exactly 0 or the dtype's min
    assert bool(((mask == 0) | (mask == MIN)).all())
    return mask[:, 0] == 0


def expected_allowed(position_ids: torch.Tensor, valid: torch.Tensor, kv_len: int, window: int | None = None):
    rows, cols = position_ids.shape
    out = torch.zeros((rows, cols, kv_len), dtype=torch.bool)
    for r in range(rows):
        for t in range(cols):
            for j in range(kv_len):
                p = int(position_ids[r, t])
                if not valid[r, t]:
                    out[r, t, j] = j == 0
                else:
                    out[r, t, j] = j <= p and (window is None or j > p - window)
    return out


# ---------------------------------------------------------------- range layout (decode groups)


def test_range_group_with_a_hole_gets_a_dummy_row():
    a, c = decode_chunk(slot=0, num_prompt_tokens=5, first_id=10), decode_chunk(slot=2, num_prompt_tokens=3, first_id=30)

    inputs = build_group([a, c], use_range=True, device=CPU, dtype=DTYPE)

    assert inputs.input_ids.tolist() == [[110], [0], [130]]
    assert inputs.position_ids.tolist() == [[5], [0], [3]]
    assert inputs.member_rows.tolist() == [0, 2]
    layout = inputs.layout
    assert layout.slot_range == (0, 3)
    assert layout.row_slots.tolist() == [0, 1, 2]
    assert layout.kv_len == 6
    assert layout.write_rows.tolist() == [0, 2]  # the dummy row writes nothing
    assert layout.write_pos.tolist() == [5, 3]
    assert [t.tolist() for t in layout.write_cols] == [[0, 2], [0, 0]]
    assert inputs.attention_mask.shape == (3, 1, 1, 6)
    assert allowed(inputs.attention_mask)[:, 0].tolist() == [
        [True] * 6,
        [True, False, False, False, False, False],  # dummy row: key 0 only
        [True, True, True, True, False, False],
    ]


def test_range_group_offset_from_slot_zero():
    b, d = decode_chunk(slot=2, num_prompt_tokens=2, first_id=1), decode_chunk(slot=3, num_prompt_tokens=4, first_id=5)

    inputs = build_group([b, d], use_range=True, device=CPU, dtype=DTYPE)

    assert inputs.layout.slot_range == (2, 4)
    assert inputs.layout.row_slots.tolist() == [2, 3]
    assert inputs.member_rows is None  # every row is a member, in order
    assert inputs.layout.write_cols[0].tolist() == [0, 1]
    assert inputs.layout.kv_len == 5


def test_range_group_member_rows_follow_group_order():
    a, c = decode_chunk(slot=0, num_prompt_tokens=2, first_id=1), decode_chunk(slot=1, num_prompt_tokens=2, first_id=5)
    inputs = build_group([c, a], use_range=True, device=CPU, dtype=DTYPE)
    assert inputs.member_rows.tolist() == [1, 0]
    assert inputs.input_ids.tolist() == [[101], [105]]


# ---------------------------------------------------------------- gathered layout (prefill groups)


def test_gathered_prefill_group_is_left_padded():
    first = chunk(slot=3, prompt_ids=[11, 12, 13, 14, 15, 16], output_ids=[], num_computed=0, num_tokens=6)
    # second chunk of a 10-token prompt: tokens 4..6 at positions 4..6
    second = chunk(slot=1, prompt_ids=list(range(20, 30)), output_ids=[], num_computed=4, num_tokens=3)

    inputs = build_group([first, second], use_range=False, device=CPU, dtype=DTYPE)

    assert inputs.input_ids.tolist() == [[11, 12, 13, 14, 15, 16], [0, 0, 0, 24, 25, 26]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 4, 5, 6]]
    assert inputs.member_rows is None
    layout = inputs.layout
    assert layout.slot_range is None
    assert layout.row_slots.tolist() == [3, 1]
    assert layout.kv_len == 7
    assert layout.write_rows.tolist() == [3] * 6 + [1] * 3
    assert layout.write_pos.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert layout.write_cols[0].tolist() == [0] * 6 + [1] * 3
    assert layout.write_cols[1].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert inputs.attention_mask.shape == (2, 1, 6, 7)
    mask = allowed(inputs.attention_mask)
    assert mask[1, 3].tolist() == [True] * 5 + [False] * 2  # position 4 reads keys 0..4 (two from the cache)
    assert mask[1, 0].tolist() == [True] + [False] * 6  # padding reads key 0 only
    assert mask[0, 5].tolist() == [True] * 6 + [False]


def test_gathered_prefill_with_output_tokens_resumed():
    # a sequence resumed with output: all_ids = prompt + output, computed from position 0
    resumed = chunk(slot=0, prompt_ids=[1, 2], output_ids=[3, 4], num_computed=0, num_tokens=4)
    inputs = build_group([resumed], use_range=False, device=CPU, dtype=DTYPE)
    assert inputs.input_ids.tolist() == [[1, 2, 3, 4]]
    assert inputs.layout.kv_len == 4


def test_mask_allows_key_j_iff_j_not_after_the_query_position():
    group = [
        chunk(slot=0, prompt_ids=list(range(1, 9)), output_ids=[], num_computed=3, num_tokens=5),
        chunk(slot=1, prompt_ids=list(range(1, 4)), output_ids=[], num_computed=0, num_tokens=3),
        chunk(slot=2, prompt_ids=list(range(1, 12)), output_ids=[], num_computed=10, num_tokens=1),
    ]
    inputs = build_group(group, use_range=False, device=CPU, dtype=DTYPE)
    valid = torch.tensor([[True] * 5, [False] * 2 + [True] * 3, [False] * 4 + [True]])

    expected = expected_allowed(inputs.position_ids, valid, inputs.layout.kv_len)

    assert inputs.layout.kv_len == 11
    assert torch.equal(allowed(inputs.attention_mask), expected)


def test_mask_uses_the_requested_dtype():
    group = [decode_chunk(slot=0, num_prompt_tokens=3, first_id=1), decode_chunk(slot=2, num_prompt_tokens=1, first_id=5)]
    inputs = build_group(group, use_range=True, device=CPU, dtype=torch.bfloat16)
    mask = inputs.attention_mask
    assert mask.dtype == torch.bfloat16
    assert set(mask.flatten().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}


# ---------------------------------------------------------------- sliding window


def test_sliding_window_mask_also_blocks_keys_older_than_the_window():
    window = 3
    group = [
        chunk(slot=0, prompt_ids=list(range(1, 9)), output_ids=[], num_computed=2, num_tokens=6),
        chunk(slot=1, prompt_ids=list(range(1, 4)), output_ids=[], num_computed=0, num_tokens=3),
    ]

    inputs = build_group(group, use_range=False, device=CPU, dtype=DTYPE, sliding_window=window)

    masks = inputs.attention_mask
    assert set(masks) == {"full_attention", "sliding_attention"}
    valid = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    kv_len = inputs.layout.kv_len
    assert torch.equal(allowed(masks["full_attention"]), expected_allowed(inputs.position_ids, valid, kv_len))
    sliding = allowed(masks["sliding_attention"])
    assert torch.equal(sliding, expected_allowed(inputs.position_ids, valid, kv_len, window))
    assert sliding[0, 5].tolist() == [False] * 5 + [True] * 3  # position 7 reads keys 5, 6, 7
    no_window = build_group(group, use_range=False, device=CPU, dtype=DTYPE)
    assert torch.equal(masks["full_attention"], no_window.attention_mask)


def test_sliding_window_for_a_range_decode_with_a_dummy_row():
    a, c = decode_chunk(slot=0, num_prompt_tokens=6, first_id=1), decode_chunk(slot=2, num_prompt_tokens=2, first_id=9)
    inputs = build_group([a, c], use_range=True, device=CPU, dtype=DTYPE, sliding_window=4)
    sliding = allowed(inputs.attention_mask["sliding_attention"])[:, 0]
    assert sliding.tolist() == [
        [False, False, False, True, True, True, True],  # position 6: keys 3..6
        [True, False, False, False, False, False, False],  # dummy row
        [True, True, True, False, False, False, False],  # position 2: keys 0..2
    ]
