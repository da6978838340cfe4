"""One end-to-end chat through the server with the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest

from tests.server_support import InProcessServer

pytestmark = [pytest.mark.slow, pytest.mark.local]


def test_default_model_answers_through_the_server(tmp_path):
    with InProcessServer(None, tmp_path / "data") as srv, srv.client() as client:
        assert srv.model == "SmolLM2-135M-Instruct"
        assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
        msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        r = client.chat.completions.create(model=srv.model, messages=msgs, temperature=0, max_tokens=30)
        text = r.choices[0].message.content
        assert "Paris" in text and r.choices[0].finish_reason in ("stop", "length")
        cut = client.chat.completions.create(model=srv.model, messages=msgs, temperature=0, max_tokens=30,
                                             stop="Paris", stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in cut if c.choices)
        assert streamed == text[:text.index("Paris")]
