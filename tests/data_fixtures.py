"""Helpers for the data-layer tests: where the real shared data lies, and writers of small files in
the exact release formats: RouterBench pickles (37 columns, ``str(list)`` prompts and responses,
object-dtype score columns with NaN, a duplicated 5-shot ``sample_id`` pair) and MixInstruct JSON lines."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SUBSET = "routerbench_5shot_arc_mbpp_winogrande.parquet"
ROUTERDC = "routerdc_7model_in_distribution.parquet"


def shared_data_dir() -> Path | None:
    """The directory holding the real shared data files, or None. ``$RAY_ROUTER_DATA_DIR``, when set,
    is the only place looked at (as for the product); else ``../shared/data``, else ``./data``."""
    env = os.environ.get("RAY_ROUTER_DATA_DIR")
    for cand in [env] if env else [REPO.parent / "shared" / "data", REPO / "data"]:
        if (Path(cand) / SUBSET).is_file():
            return Path(cand)
    return None


def routerbench_reference_columns() -> list[str] | None:
    """The 37 columns of the real 0-shot pickle, in order (from the shared reference stats)."""
    d = shared_data_dir()
    if d is None or not (d / "routerbench_0shot_reference_stats.json").is_file():
        return None
    return json.loads((d / "routerbench_0shot_reference_stats.json").read_text())["columns"]


RB_MODELS = [
    "WizardLM/WizardLM-13B-V1.2",
    "claude-instant-v1",
    "claude-v1",
    "claude-v2",
    "gpt-3.5-turbo-1106",
    "gpt-4-1106-preview",
    "meta/code-llama-instruct-34b-chat",
    "meta/llama-2-70b-chat",
    "mistralai/mistral-7b-chat",
    "mistralai/mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat",
]
# Response/cost columns of the release are in this (different) order.
RB_RESPONSE_ORDER = [
    "gpt-3.5-turbo-1106",
    "claude-instant-v1",
    "claude-v1",
    "claude-v2",
    "gpt-4-1106-preview",
    "meta/llama-2-70b-chat",
    "mistralai/mixtral-8x7b-chat",
    "zero-one-ai/Yi-34B-Chat",
    "WizardLM/WizardLM-13B-V1.2",
    "meta/code-llama-instruct-34b-chat",
    "mistralai/mistral-7b-chat",
]
RB_COLUMNS = (
    ["sample_id", "prompt", "eval_name"]
    + RB_MODELS
    + [f"{m}|model_response" for m in RB_RESPONSE_ORDER]
    + [f"{m}|total_cost" for m in RB_RESPONSE_ORDER]
    + ["oracle_model_to_route_to"]
)
GPT35 = "gpt-3.5-turbo-1106"


def write_routerbench_pickle(path: Path, dup_order: str = "normal_first", seed: int = 0) -> dict:
    """Write a 6-row (5 queries) RouterBench-format pickle; return what the loader must produce.

    Rows: arc-challenge.test.0 (complete); arc-challenge.test.1 twice, as in the 5-shot release
    (one row scores only gpt-3.5 and holds the prompt twice, the other scores the other 10 models);
    mbpp.dev.1 with a two-part prompt; winogrande.dev.2 (complete); winogrande.dev.3 with a NaN
    score for claude-v2 and its cost. ``dup_order``: ``normal_first`` or ``gpt_first``."""
    rng = np.random.default_rng(seed)
    k = len(RB_MODELS)

    def row(sid, parts, evname, scores, costs):
        rec = {"sample_id": sid, "prompt": str(parts), "eval_name": evname}
        for m, s in zip(RB_MODELS, scores):
            rec[m] = s
        for m in RB_RESPONSE_ORDER:
            rec[f"{m}|model_response"] = str([f"answer of {m}"])
            rec[f"{m}|total_cost"] = costs[RB_MODELS.index(m)]
        finite = {m: s for m, s in zip(RB_MODELS, scores) if not (isinstance(s, float) and np.isnan(s))}
        best = max(finite.values()) if finite else 0
        rec["oracle_model_to_route_to"] = (
            min((m for m, s in finite.items() if s == best), key=lambda m: costs[RB_MODELS.index(m)])
            if best > 0
            else "no_model_correct"
        )
        return rec

    def scores01():
        return [float(v) for v in rng.integers(0, 2, size=k)]

    def costs():
        return [float(v) for v in rng.uniform(1e-5, 5e-3, size=k)]

    g = RB_MODELS.index(GPT35)
    arc_prompt = "Question: which is warmer?\nA) ice\nB) fire\nPrint only a single choice."
    normal_scores, normal_costs = scores01(), costs()
    normal_scores[g] = np.nan
    normal_costs[g] = 0.0  # a stale value: the merge must replace it
    gpt_scores = [np.nan] * k
    gpt_scores[g] = 1.0
    gpt_costs = [np.nan] * k
    gpt_costs[g] = 4.2e-4
    normal = row("arc-challenge.test.1", [arc_prompt], "arc-challenge", normal_scores, normal_costs)
    gpt_only = row("arc-challenge.test.1", [arc_prompt, arc_prompt], "arc-challenge", gpt_scores, gpt_costs)
    pair = [normal, gpt_only] if dup_order == "normal_first" else [gpt_only, normal]

    nan_scores, nan_costs = scores01(), costs()
    c2 = RB_MODELS.index("claude-v2")
    nan_scores[c2], nan_costs[c2] = np.nan, np.nan
    rows = [
        row("arc-challenge.test.0", ["Question: 2+2?\nA) 4\nB) 5"], "arc-challenge", scores01(), costs()),
        *pair,
        row("mbpp.dev.1", ["Write a function that adds two numbers.", "def add(a, b):"], "mbpp", scores01(), costs()),
        row(
            "winogrande.dev.2",
            ["The trophy didn't fit in the case because _ was too big."],
            "winogrande",
            scores01(),
            costs(),
        ),
        row("winogrande.dev.3", ["Sam lent Max money because _ was rich."], "winogrande", nan_scores, nan_costs),
    ]
    df = pd.DataFrame(rows, columns=RB_COLUMNS, index=[36497 + i for i in range(len(rows))])
    for col in [
        "sample_id",
        "prompt",
        "eval_name",
        "oracle_model_to_route_to",
        *[f"{m}|model_response" for m in RB_RESPONSE_ORDER],
    ]:
        df[col] = df[col].astype(object)
    for m in RB_MODELS:  # the release stores scores as object dtype
        df[m] = pd.Series([float(v) for v in df[m]], index=df.index, dtype=object)
    df.to_pickle(path)

    merged_scores = list(normal_scores)
    merged_scores[g] = 1.0
    merged_costs = list(normal_costs)
    merged_costs[g] = 4.2e-4
    return {
        "frame": df,
        "arc_prompt": arc_prompt,
        "merged_scores": merged_scores,
        "merged_costs": merged_costs,
        "nan_row_scores": nan_scores,
        "nan_row_costs": nan_costs,
    }


# --------------------------------------------------------------------------- MixInstruct
MIXINSTRUCT_MODELS = (  # the 11 candidate models of the release
    "alpaca-native",
    "chatglm-6b",
    "dolly-v2-12b",
    "flan-t5-xxl",
    "koala-7B-HF",
    "llama-7b-hf-baize-lora-bf16",
    "moss-moon-003-sft",
    "mpt-7b",
    "oasst-sft-4-pythia-12b-epoch-3.5",
    "stablelm-tuned-alpha-7b",
    "vicuna-13b-1.1",
)
_SOURCES = ("unified_chip2", "dolly_15k/open_qa", "dolly_15k/brainstorming", "itwgpt4", "sharegpt")


def write_mixinstruct_fixture(
    path: str | Path,
    n: int = 20,
    seed: int = 0,
    *,
    cmp_fraction: float = 0.8,
    models: Sequence[str] = MIXINSTRUCT_MODELS,
    json_array: bool = False,
) -> Path:
    """Write ``n`` synthetic MixInstruct records in the exact release format (ray_router.data.mixinstruct).

    A ``cmp_fraction`` share of records carries ``cmp_results`` (JSON string over all model pairs,
    verdicts consistent with bartscore up to ties); the rest carry the string ``"null"``. The
    first record's ``instruction`` is empty and the second's ``input`` is empty."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    quality = rng.normal(0.0, 0.4, size=len(models))
    records = []
    for i in range(n):
        source = _SOURCES[i % len(_SOURCES)]
        instruction = "" if i == 0 else f"Instruction {i}: describe item {int(rng.integers(1000))}."
        inp = "" if i == 1 else f"Input text number {i}."
        cands = []
        for k, model in enumerate(models):
            bart = float(-3.6 + quality[k] + rng.normal(0, 0.5))
            cands.append(
                {
                    "decoding_method": "top_p_sampling",
                    "model": model,
                    "text": f"answer of {model} to record {i}",
                    "scores": {
                        "logprobs": float(-rng.gamma(2.0, 20.0)),
                        "rougeL": float(rng.uniform(0, 0.5)),
                        "rouge2": float(rng.uniform(0, 0.3)),
                        "rougeLsum": float(rng.uniform(0, 0.5)),
                        "rouge1": float(rng.uniform(0, 0.6)),
                        "bleu": float(rng.uniform(0, 40)),
                        "bertscore": float(rng.uniform(0.5, 0.8)),
                        "bleurt": float(rng.normal(-0.6, 0.3)),
                        "bartscore": round(bart, 4),
                    },
                }
            )
        cmp: Any = "null"
        if rng.random() < cmp_fraction:
            verdicts = {}
            for a in range(len(models)):
                for b in range(a + 1, len(models)):
                    sa, sb = cands[a]["scores"]["bartscore"], cands[b]["scores"]["bartscore"]
                    diff = sa - sb
                    if abs(diff) < 0.05:
                        verdict = "Same good" if (sa + sb) / 2 > -3.6 else "Same bad"
                    else:
                        verdict = "A is better" if diff > 0 else "B is better"
                    verdicts[f"{models[a]},{models[b]}"] = verdict
            cmp = json.dumps(verdicts)
        records.append(
            {
                "id": f"{source}/{10000 + i}",
                "instruction": instruction,
                "input": inp,
                "output": f"reference answer {i}",
                "candidates": cands,
                "cmp_results": cmp,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        if json_array:
            json.dump(records, fh)
        else:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
    return path


# --------------------------------------------------------------------------- RouterBench Parquet subset
SUBSET_CATEGORIES = ("arc-challenge", "mbpp", "winogrande")


def write_routerbench_subset(data_dir: Path, n: int = 600, seed: int = 0) -> Path:
    """Write a synthetic ``routerbench_5shot_arc_mbpp_winogrande.parquet`` into ``data_dir``, with the
    real subset's 33 columns and dtypes (scores in {0, 1} whose mean depends on the arm and the category,
    USD costs per query, a shared 5-shot block before each ARC and WinoGrande question): what
    ``load_dataset("routerbench")`` reads where the real data is missing. Returns ``data_dir``."""
    rng = np.random.default_rng(seed)
    cats = np.array(SUBSET_CATEGORIES)[rng.choice(3, size=n, p=[0.46, 0.14, 0.40])]
    quality = rng.uniform(0.2, 0.9, (3, len(RB_MODELS)))
    price = rng.uniform(1e-5, 3e-3, len(RB_MODELS))
    shots = {
        c: "".join(
            f"Solved example {k} of {c}: a question, four choices and its answer.\nAnswer:\nA\n\n" for k in range(5)
        )
        for c in ("arc-challenge", "winogrande")
    }
    prompts = [
        f"Write a function number {i}.\ndef f{i}():"
        if c == "mbpp"
        else f"{shots[c]}Question {i} about {c}: what is {i % 17} + {i % 5}?\nAnswer:"
        for i, c in enumerate(cats)
    ]
    ci = np.searchsorted(SUBSET_CATEGORIES, cats)
    frame: dict[str, Any] = {
        "orig_index": np.arange(n, dtype=np.int64),
        "sample_id": [f"{c}.test.{i}" for i, c in enumerate(cats)],
        "eval_name": cats.astype(str),
        "prompt": prompts,
        "prompt_parts": [[p] for p in prompts],
        "n_prompt_parts": np.ones(n, dtype=np.int16),
    }
    scores = (rng.random((n, len(RB_MODELS))) < quality[ci]).astype(np.float64)
    for k, m in enumerate(RB_MODELS):
        frame[m] = scores[:, k]
    for k, m in enumerate(RB_MODELS):
        frame[f"{m}|total_cost"] = price[k] * rng.uniform(0.5, 1.5, n)
    frame.update(
        {
            "oracle_model_to_route_to": [
                RB_MODELS[int(np.argmax(s))] if s.max() > 0 else "no_model_correct" for s in scores
            ],
            "merged_duplicate": np.zeros(n, dtype=bool),
            "orig_index_dup": np.full(n, np.nan),
            "routerdc_split": np.where(rng.random(n) < 0.8, "train", "test"),
            "routerdc_cluster_id": rng.integers(0, 8, n).astype(np.float64),
        }
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(frame).to_parquet(data_dir / SUBSET, index=False)
    return data_dir
