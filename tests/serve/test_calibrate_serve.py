"""From "here are my upstreams" to routing, on a real local Ray Serve over real HTTP.

Three stub upstreams (:mod:`tests.openai_stub`), each good at two of the starter set's six
categories and poor at the rest, and a pointwise grader for the open-ended category. ``ray-router
calibrate`` (through the CLI's ``main``, with the real MiniLM encoder) asks them the starter prompts,
then the Serve config it writes is deployed as it is, and the first 100 single-mode chat requests
(prompts of each category that calibration never saw) must reach their category's best arm at
least 90 times, before any feedback. Then a cold start (no offline data) deploys, routes and says
so in ``/v1/stats``.
"""

from __future__ import annotations

import itertools
import time

import httpx
import pytest
import yaml

from ray_router.cli import main
from tests.serve.conftest import TOKEN, delete_router, wait_for
from tests.test_calibrate import BEST, stub_pool, write_config

pytestmark = pytest.mark.integration

# prompts of the starter categories that are NOT in the starter set (what users send later)
HELD_OUT = {
    "arithmetic": [
        "What is 46 + 79?",
        "What is 12 * 12?",
        "What is 900 divided by 4?",
        "What is 3 cubed?",
        "What is 250 - 117?",
        "What is 20% of 150?",
        "What is 9 * 8 - 5?",
        "What is 1.5 + 2.25?",
    ],
    "unit_conversion": [
        "How many metres are there in 3 kilometres?",
        "How many hours are there in a week?",
        "How many millimetres are there in 12 centimetres?",
        "How many ounces are there in 2 pounds?",
        "Convert 0 degrees Celsius to Fahrenheit.",
        "How many kilobytes are there in 3 megabytes?",
        "How many seconds are there in 15 minutes?",
        "How many litres are there in 2500 millilitres?",
    ],
    "factual": [
        "What is the capital city of Canada?",
        "Who painted the Mona Lisa?",
        "What is the chemical symbol for sodium?",
        "Which is the longest river in Africa?",
        "Who was the first person to walk on the Moon?",
        "What is the tallest mountain on Earth?",
        "Which planet is the largest in the solar system?",
        "What language is spoken in Brazil?",
    ],
    "code_output": [
        "What does this Python code print? print(len([1, 2, 3, 4]))",
        "What does this Python code print? print('hi' * 3)",
        "What does this Python code print? print(10 % 3)",
        "What does this Python code print? print(max([4, 9, 2]))",
        "What does this JavaScript code log? console.log(1 + '1')",
        "What does this Python code print? print(list(range(3)))",
        "What does this Python code print? print('Hello'.upper())",
        "What does this Python code print? print(bool(''))",
    ],
    "logic": [
        "If all cats are mammals and all mammals breathe air, do all cats breathe air? Answer yes or no.",
        "Sam is older than Kim, and Kim is older than Lee. Who is the oldest?",
        "If it takes 3 painters 3 hours to paint 3 walls, how long do 6 painters take to paint 6 walls?",
        "What number comes next in the sequence 1, 4, 9, 16, 25?",
        "If today is Monday, what day of the week will it be 9 days from now?",
        "Two fathers and two sons go fishing and each catches one fish. There are three fish. How many people went?",
        "If some doctors are tall and all tall people are strong, must some doctors be strong? Answer yes or no.",
        "Tom has twice as many apples as Ann, and Ann has three. Who has more apples?",
    ],
    "writing": [
        "Write a haiku about the ocean at night.",
        "Write a short thank-you note to a colleague.",
        "Write a two-line poem about spring rain.",
        "Write a friendly reminder email about an overdue library book.",
        "Write a tagline for a bicycle repair shop.",
        "Summarise the story of Little Red Riding Hood in two sentences.",
        "Write a short toast for a friend's wedding.",
        "Describe a sunrise over the mountains in one paragraph.",
    ],
}
FAST_CLIENT = {"clients": [{"name": "default", "key_env": "RAY_ROUTER_CLIENT_KEY", "rate_per_s": 1000, "burst": 1000}]}


@pytest.fixture(scope="module")
def pool():
    held_out = {q: c for c, qs in HELD_OUT.items() for q in qs}
    with stub_pool(extra_prompts=held_out) as up:
        yield up


def _deploy(cluster, config: dict, state_dir) -> str:
    from ray_router.serve import launch

    cfg = launch.with_overrides(
        config, port=cluster.http_port, args={"state": {"dir": str(state_dir)}, "auth": FAST_CLIENT}
    )
    return launch.deploy(cfg, timeout_s=600)


def _client_key(state_dir) -> dict[str, str]:
    return {"Authorization": f"Bearer {(state_dir / 'secrets' / 'client_default').read_text().strip()}"}


def _chat(client: httpx.Client, key: dict, text: str) -> httpx.Response:
    body = {"model": "router", "messages": [{"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", json=body, headers=key)


def test_calibrated_router_routes_each_category_to_its_best_arm_from_the_first_request(
    serve_cluster, pool, tmp_path_factory, capsys
):
    from ray_router.serve import launch

    tmp = tmp_path_factory.mktemp("calibrate-serve")
    cfg = write_config(tmp / "mine.yaml", pool.base_url)  # the shipped local.yaml's encoder: MiniLM
    out = tmp / "calibrated"
    t0 = time.monotonic()
    rc = main(
        [
            "calibrate",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--per-category",
            "8",
            "--judge-base-url",
            pool.base_url,
            "--judge-model",
            "grader",
        ]
    )
    seconds = time.monotonic() - t0
    printed, err = capsys.readouterr()
    assert rc == 0, err
    section = yaml.safe_load(printed)  # the printed args section is YAML (its comment lines included)
    written = launch.load_serve_config(out / "serve_config.yaml")
    assert launch.our_apps(written)[0]["args"]["arm_embeddings"] == section["arm_embeddings"]
    assert [a["price_usd"] for a in section["arms"]] == [
        a["price_usd"] for a in launch.our_apps(written)[0]["args"]["arms"]
    ]

    state = tmp / "state"
    url = _deploy(serve_cluster, written, state)
    try:
        # the first 100 requests: round-robin over the categories, none of them a calibration prompt
        order = [
            (c, q) for qs in itertools.zip_longest(*[[(c, q) for q in HELD_OUT[c]] for c in HELD_OUT]) for c, q in qs
        ]
        stream = list(itertools.islice(itertools.cycle(order), 100))
        hits, misses = 0, []
        with httpx.Client(base_url=url, timeout=120) as client:
            key = _client_key(state)
            for category, text in stream:
                r = _chat(client, key, text)
                assert r.status_code == 200, r.text
                served = r.headers["X-Router-Model"]
                assert r.json()["choices"][0]["message"]["content"].endswith(f"[stub:{served.removeprefix('arm-')}]")
                if served == BEST[category]:
                    hits += 1
                else:
                    misses.append((category, text, served))
            stats = client.get("/v1/stats").json()
        assert hits >= 90, f"{hits}/100 routed to their category's best arm; misses: {misses}"
        post = stats["posterior"]
        assert post["n_updates"] == 0 and post["cold_start"] is False  # no feedback: the calibration alone
        assert post["offline_prior"].startswith("offline prior: given (6 categories)")
        print(
            f"calibrate: {seconds:.1f} s (3 arms x 48 starter prompts + 24 grades, MiniLM); "
            f"then {hits}/100 of the first single-mode chat requests went to their category's best arm"
        )
    finally:
        delete_router()


def test_cold_start_routes_and_says_so(serve_cluster, pool, tmp_path_factory):
    from ray_router.serve import launch

    tmp = tmp_path_factory.mktemp("cold-start")
    path = write_config(tmp / "cold.yaml", pool.base_url, price_usd=0.001, arm_embeddings={"cold_start": True})
    state = tmp / "state"
    url = _deploy(serve_cluster, launch.load_serve_config(path), state)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            key = _client_key(state)
            post = wait_for(lambda: client.get("/v1/stats").json()["posterior"], what="/v1/stats")
            assert post["cold_start"] is True
            assert post["offline_prior"] == "cold start: no offline data; all arms equal, learning online only"
            assert post["unreachable_arms"] == []
            r = client.post("/v1/route", json={"query": "What is 2 + 2?", "mode": "duel"})
            assert r.status_code == 200, r.text
            first, second = r.json()["arms"]
            assert first != second and {first, second} <= {"arm-alpha", "arm-beta", "arm-gamma"}
            r = _chat(client, key, "What is the capital city of Canada?")
            assert r.status_code == 200, r.text
            assert r.headers["X-Router-Model"] in {"arm-alpha", "arm-beta", "arm-gamma"}
            # it learns online: a duel's feedback is accepted and applied
            d = client.post("/v1/route", json={"query": "Who painted the Mona Lisa?", "mode": "duel"}).json()
            fb = client.post(
                "/v1/feedback",
                json={"decision_id": d["decision_id"], "outcome": "first"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert fb.status_code == 200, fb.text
            wait_for(lambda: client.get("/v1/stats").json()["posterior"]["n_updates"] == 1, what="the update")
    finally:
        delete_router()
