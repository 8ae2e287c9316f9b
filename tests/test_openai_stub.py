"""The loopback OpenAI stub (tests/openai_stub.py) behaves as its docstring says, seen through the
official ``openai`` SDK: quality by category, streams with usage, the judge's accuracy, injected
errors with Retry-After, a dropped connection, a closed port."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.openai_stub import StubJudge, StubModel, StubServer

MATH = "[math] What is 2+2?"


@pytest.fixture()
def stub():
    models = {"good": StubModel("good", {"math": 0.9, "default": 0.1}), "bad": StubModel("bad", 0.2)}
    with StubServer(models, judge=StubJudge(strength={"good": 2, "bad": 1}), references={MATH: "4"}) as up:
        yield up


def client(up: StubServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0)


def ask(c: openai.OpenAI, model: str, text: str) -> str:
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return out.choices[0].message.content or ""


def test_quality_by_category_and_reference(stub):
    c = client(stub)
    math = [ask(c, "good", MATH) for _ in range(200)]
    other = [ask(c, "good", "[poetry] a haiku") for _ in range(200)]
    assert all(a.endswith("[stub:good]") for a in math + other)
    assert 0.83 <= sum(a.startswith("4 ") for a in math) / 200 <= 0.97  # p = 0.9
    assert sum(a.startswith("correct") for a in other) / 200 <= 0.2  # default p = 0.1


def test_stream_with_usage_and_models(stub):
    c = client(stub)
    chunks = list(
        c.chat.completions.create(
            model="bad",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.endswith("[stub:bad]")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [m.id for m in c.models.list()] == ["good", "bad", "judge"]


def test_judge_prefers_the_stronger_model(stub):
    c = client(stub)
    verdicts = [ask(c, "judge", f"Q{i}\nA: x [stub:bad]\nB: y [stub:good]") for i in range(300)]
    assert 0.72 <= verdicts.count("B") / 300 <= 0.88  # accuracy 0.8
    assert ask(c, "judge", "no answers here") == "tie"


def test_failures(stub):
    c = client(stub)
    stub.models["bad"].fail_next(1, 429, "slow down", retry_after=1)
    with pytest.raises(openai.RateLimitError) as e:
        ask(c, "bad", "hi")
    assert "slow down" in str(e.value) and e.value.response.headers["retry-after"] == "1"
    assert ask(c, "bad", "hi").endswith("[stub:bad]")  # only the next one failed
    stub.models["bad"].down = True
    with pytest.raises(openai.APIConnectionError):
        ask(c, "bad", "hi")
    stub.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{stub.base_url}/chat/completions", json={"model": "good"})
