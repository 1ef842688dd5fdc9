"""The README's `curl` examples, run as written (real curl, in bash) against a live gateway and worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.redis

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://localhost:8000"
CURL_TIMEOUT_S = 120


def curl_blocks() -> list[str]:
    """The README's ```bash blocks that are curl commands."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if block.lstrip().startswith("curl ")]


def _sse_chunks(output: str) -> list[dict]:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(line.startswith("data: ") for line in lines), output
    assert lines[-1] == "data: [DONE]", output
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def _check_openai_shaped(block: str, output: str) -> str:
    """Asserts the reply is what OpenAI would send for this request; returns its kind."""
    if '"stream": true' in block:
        chunks = _sse_chunks(output)
        assert chunks and all(c["object"] == "chat.completion.chunk" and "error" not in c for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
        return "chat stream"
    reply = json.loads(output)
    assert "error" not in reply, reply
    if "/v1/chat/completions" in block:
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] > 0
        return "chat"
    if "/v1/completions" in block:
        assert reply["object"] == "text_completion" and reply["choices"][0]["text"]
        assert reply["choices"][0]["finish_reason"] in {"stop", "length"} and reply["usage"]["total_tokens"] > 0
        return "completion"
    if "/abort" in block:
        assert reply["object"] == "request.abort" and reply["aborted"] is False  # the stream above has finished
        return "abort"
    if "/v1/models" in block:
        assert reply["object"] == "list" and [m["id"] for m in reply["data"]] == ["tiny"]
        return "models"
    raise AssertionError(f"a README curl block this test does not know: {block}")


def test_readme_has_the_curl_examples():
    blocks = curl_blocks()
    assert len(blocks) >= 3 and all(README_URL in block for block in blocks)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_examples_answer_openai_shaped(worker_factory, gateway_factory):
    worker_factory().start()
    gateway = gateway_factory()
    kinds = []
    for block in curl_blocks():  # in the README's order: the abort follows the stream it names
        command = block.replace(README_URL, gateway.url)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True,
                                check=False, timeout=CURL_TIMEOUT_S)
        assert result.returncode == 0, (block, result.stderr)
        kinds.append(_check_openai_shaped(block, result.stdout))
    assert {"chat", "chat stream", "completion"} <= set(kinds)
