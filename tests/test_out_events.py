"""Engine outputs as typed events: what the loop publishes, without knowing the task."""

from __future__ import annotations

from producer.protocol import EventType, FinishReason, GenerateConfig, encode_event
from worker.config import WorkerConfig
from worker.main import resolve_task
from worker.out_events import error_event, image_event, progress_event
from worker.request import Sequence, StepOutput


def _seq(stream: bool) -> Sequence:
    seq = Sequence(request_id="r", prompt_ids=[1, 2, 3], params=GenerateConfig(stream=stream), max_tokens=4,
                   is_stream=stream, text="ab", logprobs=[{"token_id": 8}])
    seq.output_ids = [7, 8]
    return seq


def test_a_streamed_llm_output_is_a_token_then_done_with_the_fields_in_wire_order():
    out = StepOutput(seq=_seq(True), token_ids=[8], text="b", finish_reason=FinishReason.STOP)
    token, done = list(out.events())
    assert token.type == EventType.TOKEN and done.type == EventType.DONE and done.is_terminal
    assert list(encode_event(0, token.type, **token.fields)) == ["seq", "type", "text", "token_ids"]
    wire = encode_event(1, done.type, **done.fields)
    assert list(wire) == ["seq", "type", "finish_reason", "text", "usage"]
    assert wire["usage"] == '{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}'


def test_an_unstreamed_llm_output_publishes_only_done_with_its_logprobs():
    silent = StepOutput(seq=_seq(False), token_ids=[7], text="a")
    assert list(silent.events()) == []
    (done,) = StepOutput(seq=_seq(False), token_ids=[8], text="b", finish_reason=FinishReason.LENGTH).events()
    assert done.fields["logprobs"] == [{"token_id": 8}]


def test_an_output_with_an_error_is_only_that_error():
    (event,) = StepOutput(seq=_seq(True), token_ids=[], text="", error="grammar said no").events()
    assert event.type == EventType.ERROR and event.fields["message"] == "grammar said no"


def test_image_and_progress_events_carry_their_fields():
    assert image_event(1, b"\x89PNG", "png").fields == {"index": 1, "format": "png", "data": b"\x89PNG"}
    assert image_event(0, b"\x89PNG", "b64_json").fields["b64"] == "iVBORw=="
    assert image_event(0, b"\x89PNG", "url", "file:///x.png").fields == {"index": 0, "format": "png",
                                                                          "url": "file:///x.png"}
    assert progress_event(3, 20).fields == {"step": 3, "total": 20}
    assert error_event("x").is_terminal


def test_the_engine_follows_task_or_the_model_directory(tmp_path):
    def config(**kw):
        return WorkerConfig(model_name="m", model_path=str(tmp_path), **kw)

    assert resolve_task(config()) == "generate"
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_task(config()) == "text_to_image"
    assert resolve_task(config(task="chat")) == "chat"
