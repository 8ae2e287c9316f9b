"""``ray-router calibrate``: from "here are my upstreams" to an offline-informed router.

Reads the arms (each with an OpenAI-compatible ``upstream`` and an optional ``upstream.price``)
from a Serve config, asks every arm every prompt of a small category-labelled set (the starter set
that ships in ``ray_router/data/prompts/``, or the operator's own JSONL), scores the answers, and
writes into ``--out``:

- ``table.parquet`` + ``table.summary.json``: a routing table in the generic format
  (:mod:`ray_router.data.generic`: ``sample_id``, ``prompt``, ``category``, one score column per arm,
  ``<arm>|total_cost`` = the answer's measured USD cost, ``usage`` × ``upstream.price``, 0 without a
  price), readable by ``ray-router evaluate --dataset DIR/table.parquet``;
- ``arm_embeddings.npz``: the arm embeddings a_k that ``arm_embeddings.from_dataset`` would compute
  from this table (every row offline; :func:`~ray_router.embeddings.model_embeddings.offline_arm_embeddings`
  with the config's encoder) together with the per-category profile that the offline prior
  (``policy.config.offline_prior: category``, ALGORITHM.md s.5) starts from: category centroids,
  mean score per category and arm, rows per category. ``arm_embeddings.file`` reads it, so routing
  follows the calibration from the first request;
- ``answers.jsonl``: every (arm, prompt) call: answer, score, how it was scored, usage, cost, error;
- ``serve_config.yaml``: the input Serve config with the calibrated ``arms`` (``price_usd`` = the
  measured mean cost per query), ``arm_embeddings.file`` and the policy settings; the same section
  is printed.

**Scoring** (per answer, in [0, 1]):

- a prompt with a ``reference`` (a string or a list of accepted strings) is scored 1/0 by its
  ``match`` rule, after normalisation (case-folded, whitespace collapsed, ``**``/backticks removed):
  ``numeric`` (the default when the reference is a number): the *last* number in the answer
  (thousands separators allowed) equals the reference to a relative 1e-6; ``contains`` (the
  default otherwise): the reference occurs in the answer as a whole word or phrase; ``exact``: the
  whole answer, stripped of surrounding punctuation and quotes, equals the reference;
- a prompt without a reference is graded by the judge model (pointwise: the question and the
  answer, "grade 0-10, reply with the number"); the grade /10 is the score. The reply is parsed
  leniently (``7``, ``7/10``, ``Grade: **7**``, ``7.5``); a reply with no grade in 0-10, or a judge
  that fails twice, leaves the cell empty (NaN: the row is dropped from the embeddings and profile,
  and counted);
- an arm's failed call (HTTP error, timeout, refused connection) scores 0 and is recorded; an arm
  that answers *no* prompt stops the calibration with an error naming it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ray_router.errors import ConfigError, DataError, RouterError

MATCH_RULES = ("numeric", "contains", "exact")
JUDGE_SYSTEM = "You are a strict, fair grader of answers written by AI assistants."
JUDGE_TEMPLATE = (
    "Grade the answer to the question below on a scale from 0 (wrong, unhelpful or missing) to 10 "
    "(correct, complete and well written). Reply with the grade only, as a number from 0 to 10.\n\n"
    "[Question]\n{question}\n\n[Answer]\n{answer}\n\nGrade (0-10):"
)
TABLE_FILE, EMBEDDINGS_FILE, ANSWERS_FILE, CONFIG_FILE = (
    "table.parquet",
    "arm_embeddings.npz",
    "answers.jsonl",
    "serve_config.yaml",
)
# the policy settings a calibrated router needs: start from the profile, serve its best arm
CALIBRATED_POLICY = {"offline_prior": "category", "arm_selection": "exploit_first", "distinct_arms": True}


class CalibrationError(RouterError, code="calibration_failed"):
    """An upstream or the judge could not be used (the CLI prints the message, no traceback)."""


# ----------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    references: tuple[str, ...] = ()
    match: str | None = None  # None: numeric for a numeric reference, else contains

    @property
    def rule(self) -> str | None:
        if not self.references:
            return None
        if self.match:
            return self.match
        return "numeric" if all(_as_number(r) is not None for r in self.references) else "contains"


def starter_path() -> Path:
    """The starter prompt set that ships with the package."""
    return Path(str(resources.files("ray_router.data") / "prompts" / "starter.jsonl"))


def load_prompts(source: str | os.PathLike[str] = "starter", per_category: int | None = None) -> list[Prompt]:
    """Prompts from ``starter`` or a JSONL file (fields: ``id``, ``category``, ``prompt``, optional
    ``reference`` (str or list of str) and ``match``); the first ``per_category`` of each category."""
    path = starter_path() if str(source) == "starter" else Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"--prompts: {path} does not exist (use 'starter' or a .jsonl file)")
    prompts: list[Prompt] = []
    ids: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            unknown = sorted(set(row) - {"id", "category", "prompt", "reference", "match"})
            if unknown:
                raise DataError(f"{path}:{n}: unknown field(s) {unknown}")
            text, cat = row.get("prompt"), row.get("category")
            if not isinstance(text, str) or not text.strip() or not isinstance(cat, str) or not cat.strip():
                raise DataError(f"{path}:{n}: 'prompt' and 'category' must be non-empty strings")
            ref = row.get("reference")
            refs = [ref] if isinstance(ref, str) else ref if ref is not None else []
            if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
                raise DataError(f"{path}:{n}: 'reference' must be a non-empty string or a list of them")
            match = row.get("match")
            if match is not None and match not in MATCH_RULES:
                raise DataError(f"{path}:{n}: 'match' must be one of {list(MATCH_RULES)}, got {match!r}")
            if match is not None and not refs:
                raise DataError(f"{path}:{n}: 'match' needs a 'reference'")
            pid = str(row.get("id", f"{cat}-{n}"))
            if pid in ids:
                raise DataError(f"{path}:{n}: duplicate id {pid!r}")
            ids.add(pid)
            prompts.append(Prompt(pid, cat, text, tuple(refs), match))
    if per_category is not None:
        if per_category < 1:
            raise ConfigError("--per-category must be at least 1")
        taken: dict[str, int] = {}
        kept = []
        for p in prompts:
            if taken.get(p.category, 0) < per_category:
                taken[p.category] = taken.get(p.category, 0) + 1
                kept.append(p)
        prompts = kept
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


# ----------------------------------------------------------------------------- scoring
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def normalise(text: str) -> str:
    """Case-folded, markdown emphasis and code ticks removed, whitespace collapsed."""
    text = text.replace("**", "").replace("`", "").replace("__", "")
    return " ".join(text.casefold().split())


def _as_number(text: str) -> float | None:
    t = text.strip().replace(",", "")
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _as_number(found[-1]) if found else None


def score_reference(answer: str, prompt: Prompt) -> float:
    """1.0 when ``answer`` matches one of the prompt's references under its rule, else 0.0."""
    rule = prompt.rule
    if rule is None:
        raise ConfigError(f"prompt {prompt.id!r} has no reference: it needs the judge")
    ans = normalise(answer)
    for ref in prompt.references:
        r = normalise(ref)
        if rule == "numeric":
            want, got = _as_number(r), last_number(ans)
            if want is not None and got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
                return 1.0
        elif rule == "contains":
            if re.search(r"(?<!\w)" + re.escape(r) + r"(?!\w)", ans):
                return 1.0
        elif ans.strip(" \t.,;:!?\"'()[]") == r.strip(" \t.,;:!?\"'()[]"):
            return 1.0
    return 0.0


_GRADE_OUT_OF = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b")
_GRADE_NAMED = re.compile(r"(?:grade|score|rating)\s*(?:is|:|=)?\s*(\d+(?:\.\d+)?)")


def parse_grade(text: str) -> float | None:
    """The judge's 0-10 grade as a score in [0, 1], or None when the reply holds none."""
    t = normalise(text)
    for pattern in (_GRADE_OUT_OF, _GRADE_NAMED):
        m = pattern.search(t)
        if m:
            v = float(m.group(1))
            return v / 10.0 if 0 <= v <= 10 else None
    m = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])", t)
    if m:
        v = float(m.group(1))
        return v / 10.0 if 0 <= v <= 10 else None
    return None


# ----------------------------------------------------------------------------- upstream calls
@dataclass(frozen=True)
class Endpoint:
    """Where one arm (or the judge) answers: an OpenAI-compatible chat completions endpoint."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    price: Any = None  # serve.config.TokenPrice or None

    def cost(self, usage: Any) -> float:
        return float(self.price.usd(usage)) if self.price is not None else 0.0


@dataclass
class CallResult:
    text: str | None
    usage: dict | None = None
    error: str | None = None
    latency_s: float = 0.0


def _error_message(resp: Any) -> str:
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (body.get("message") if isinstance(body, dict) else None)
        return f"HTTP {resp.status_code}: {msg or err or resp.text[:200]}"
    except ValueError:
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


async def chat(
    client: Any, ep: Endpoint, messages: list[dict], max_tokens: int, retries: int = 1, backoff_s: float = 0.5
) -> CallResult:
    """One chat completion; 429/5xx and transport errors are retried ``retries`` times."""
    import httpx

    headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    body = {"model": ep.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    error = "no attempt"
    t0 = time.monotonic()
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(backoff_s * attempt)
        try:
            resp = await client.post(f"{ep.base_url}/chat/completions", json=body, headers=headers)
        except httpx.TimeoutException:
            error = f"timed out after {client.timeout.read}s"
            continue
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e or 'connection failed'}"
            continue
        if resp.status_code != 200:
            error = _error_message(resp)
            if resp.status_code == 429 or resp.status_code >= 500:
                continue
            break  # a 4xx will not change on retry
        try:
            data = resp.json()
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            error = "the answer is not an OpenAI chat completion"
            break
        if not isinstance(text, str):
            error = "the answer has no text content"
            break
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        return CallResult(text, usage, None, time.monotonic() - t0)
    return CallResult(None, None, error, time.monotonic() - t0)


# ----------------------------------------------------------------------------- the run
@dataclass
class Answer:
    arm: str
    prompt: Prompt
    result: CallResult
    score: float = float("nan")
    scored_by: str = ""
    judge_reply: str | None = None
    cost_usd: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "prompt_id": self.prompt.id,
            "category": self.prompt.category,
            "prompt": self.prompt.text,
            "reference": list(self.prompt.references) or None,
            "answer": self.result.text,
            "error": self.result.error,
            "score": None if math.isnan(self.score) else self.score,
            "scored_by": self.scored_by,
            "judge_reply": self.judge_reply,
            "usage": self.result.usage,
            "cost_usd": self.cost_usd,
            "latency_s": round(self.result.latency_s, 4),
        }


@dataclass
class Calibration:
    arms: list[str]
    prompts: list[Prompt]
    answers: list[Answer] = field(default_factory=list)

    def matrix(self, what: str) -> np.ndarray:
        """(n_prompts, n_arms) of ``score`` or ``cost_usd``."""
        M = np.full((len(self.prompts), len(self.arms)), np.nan)
        row = {p.id: i for i, p in enumerate(self.prompts)}
        col = {a: k for k, a in enumerate(self.arms)}
        for a in self.answers:
            M[row[a.prompt.id], col[a.arm]] = getattr(a, what)
        return M


async def run_calibration(
    arms: Sequence[Endpoint],
    prompts: Sequence[Prompt],
    judge: Endpoint | None,
    *,
    concurrency: int = 8,
    timeout_s: float = 60.0,
    max_tokens: int = 512,
    retries: int = 1,
    progress: Any = None,
) -> Calibration:
    """Ask every arm every prompt (at most ``concurrency`` calls at once), score each answer."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    cal = Calibration([a.name for a in arms], list(prompts))

    async def one(client: Any, ep: Endpoint, p: Prompt) -> Answer:
        async with sem:
            res = await chat(client, ep, [{"role": "user", "content": p.text}], max_tokens, retries)
        ans = Answer(ep.name, p, res, cost_usd=ep.cost(res.usage) if res.text is not None else 0.0)
        if res.text is None:
            ans.score, ans.scored_by = 0.0, "failed call"
        elif p.rule is not None:
            ans.score, ans.scored_by = score_reference(res.text, p), f"reference ({p.rule})"
        else:
            assert judge is not None  # checked before any call
            msg = JUDGE_TEMPLATE.format(question=p.text, answer=res.text)
            async with sem:
                verdict = await chat(
                    client,
                    judge,
                    [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": msg}],
                    16,
                    retries,
                )
            ans.judge_reply = verdict.text if verdict.text is not None else f"judge failed: {verdict.error}"
            grade = parse_grade(verdict.text) if verdict.text is not None else None
            ans.score = float("nan") if grade is None else grade
            ans.scored_by = "judge" if grade is not None else "judge (no grade)"
        if progress is not None:
            progress(ans)
        return ans

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        tasks = [one(client, ep, p) for ep in arms for p in prompts]
        cal.answers = list(await asyncio.gather(*tasks))
    return cal


# ----------------------------------------------------------------------------- config in, artefacts out
def _read_config(path: str | os.PathLike[str]) -> tuple[dict, dict]:
    """``(serve config, the ray-router app's args)`` of a Serve config YAML."""
    from ray_router.serve.launch import load_serve_config, our_apps

    cfg = load_serve_config(path)
    apps = our_apps(cfg)
    if not apps:
        raise ConfigError(f"{path}: no application with import_path ray_router.serve.app:build_app")
    args = apps[0].get("args")
    if not isinstance(args, dict):
        raise ConfigError(f"{path}: the ray-router application has no args mapping")
    return cfg, args


def _app_args(args: Mapping[str, Any], where: str):
    """The app's args validated as :class:`AppArgs`, with what calibration itself provides filled
    in (a missing ``price_usd`` is 0, a missing ``arm_embeddings`` is a cold start)."""
    from ray_router.config import parse
    from ray_router.serve.config import AppArgs

    filled = dict(args)
    arms = filled.get("arms")
    if isinstance(arms, list):
        filled["arms"] = [{"price_usd": 0.0, **a} if isinstance(a, dict) else a for a in arms]
    filled.setdefault("arm_embeddings", {"cold_start": True})
    return parse(AppArgs, filled, where=where)


def endpoints(app_args: Any) -> list[Endpoint]:
    out = []
    missing = [a.id for a in app_args.arms if a.upstream is None]
    if missing:
        raise ConfigError(f"arms {missing} have no upstream: calibrate asks each arm's upstream (arms[].upstream)")
    for a in app_args.arms:
        up = a.upstream
        key = None
        if up.api_key_env:
            key = os.environ.get(up.api_key_env)
            if not key:
                raise ConfigError(f"arm {a.id!r}: upstream.api_key_env {up.api_key_env} is not set")
        out.append(Endpoint(a.id, up.base_url, up.model, key, up.price))
    return out


def judge_endpoint(base_url: str | None, model: str | None, key_env: str | None) -> Endpoint | None:
    if base_url is None and model is None:
        return None
    if not base_url or not model:
        raise ConfigError("the judge needs both --judge-base-url and --judge-model")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError("--judge-base-url must start with http:// or https://")
    key = None
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise ConfigError(f"--judge-api-key-env {key_env} is not set")
    return Endpoint("judge", base_url.rstrip("/"), model, key)


def write_table(cal: Calibration, out: Path) -> Path:
    """The generic-format table (+ its summary JSON naming the arm columns)."""
    import pandas as pd

    scores, costs = cal.matrix("score"), cal.matrix("cost_usd")
    df = pd.DataFrame(
        {
            "sample_id": [p.id for p in cal.prompts],
            "prompt": [p.text for p in cal.prompts],
            "category": [p.category for p in cal.prompts],
            "reference": [" | ".join(p.references) if p.references else None for p in cal.prompts],
        }
    )
    for k, arm in enumerate(cal.arms):
        df[arm] = scores[:, k]
    for k, arm in enumerate(cal.arms):
        df[f"{arm}|total_cost"] = costs[:, k]
    path = out / TABLE_FILE
    df.to_parquet(path, index=False)
    (out / "table.summary.json").write_text(
        json.dumps({"models": cal.arms, "source": "ray-router calibrate"}, indent=2) + "\n", encoding="utf-8"
    )
    return path


def calibrated_embeddings(table_path: Path, app_args: Any, cache_dir: Any = None) -> tuple[np.ndarray, dict, str]:
    """``(A (K, d), profile, encoder identity)`` from the written table: the arm embeddings of
    ``arm_embeddings.from_dataset`` with every row offline, and the per-category profile."""
    from ray_router.data import load_generic
    from ray_router.embeddings.model_embeddings import (
        WeightingConfig,
        category_centroids,
        category_order,
        category_stats,
        offline_arm_embeddings,
    )
    from ray_router.serve.arms import _encoder_for

    table = load_generic(table_path)  # NaN cells (no judge grade): the row is dropped
    if table.n_queries == 0:
        raise CalibrationError("no prompt has a score from every arm: nothing to calibrate from")
    encoder = _encoder_for(app_args, cache_dir=cache_dir)
    X = np.asarray(encoder.encode([str(t) for t in table.texts]), dtype=np.float64)
    rows = np.arange(table.n_queries)
    A = offline_arm_embeddings(table, X, rows, WeightingConfig(), cost_normaliser="category_max")
    names = category_order(table.categories)
    P, _ = category_stats(table, rows, names)
    idx = np.array([names.index(str(c)) for c in table.categories])
    profile = {
        "centroids": category_centroids(X, idx, len(names)),
        "utility": P.T,  # (M, K) mean score of each arm per category (quality: λ applies at ranking)
        "counts": np.bincount(idx, minlength=len(names)).astype(np.float64),
        "categories": list(names),
    }
    return A, profile, encoder.identity


def config_section(app_args_raw: Mapping[str, Any], cal: Calibration, npz: Path) -> dict[str, Any]:
    """The calibrated app args: arms with measured prices, the arm-embeddings file, the policy."""
    costs = cal.matrix("cost_usd")
    ok = np.array([[False] * len(cal.arms)] * len(cal.prompts))
    row = {p.id: i for i, p in enumerate(cal.prompts)}
    for a in cal.answers:
        ok[row[a.prompt.id], cal.arms.index(a.arm)] = a.result.text is not None
    arms = []
    for k, arm in enumerate(app_args_raw["arms"]):
        spent = costs[ok[:, k], k]
        price = float(spent.mean()) if spent.size else 0.0
        arms.append({**arm, "price_usd": float(f"{price:.6g}")})
    policy = dict(app_args_raw.get("policy") or {})
    policy["config"] = {**dict(policy.get("config") or {}), **CALIBRATED_POLICY}
    policy.setdefault("name", "fgts_cdb")
    section = {"arms": arms, "arm_embeddings": {"file": str(npz.resolve())}, "policy": policy}
    if "encoder" in app_args_raw:
        section["encoder"] = app_args_raw["encoder"]
    return section


def summary_lines(cal: Calibration) -> list[str]:
    """Mean score per category and arm (and failures), for the terminal."""
    scores = cal.matrix("score")
    cats = list(dict.fromkeys(p.category for p in cal.prompts))
    cat_of = np.array([p.category for p in cal.prompts])
    width = max(12, *(len(c) for c in cats))
    lines = ["mean score per category (rows) and arm (columns):", " " * width + "  " + "  ".join(cal.arms)]
    for c in cats:
        sel = cat_of == c
        vals = []
        for k, arm in enumerate(cal.arms):
            col = scores[sel, k]
            col = col[~np.isnan(col)]
            vals.append(f"{col.mean():.2f}".rjust(len(arm)) if col.size else "-".rjust(len(arm)))
        lines.append(c.ljust(width) + "  " + "  ".join(vals))
    failed = [a for a in cal.answers if a.result.error]
    if failed:
        lines.append(f"{len(failed)} call(s) failed (scored 0); first: {failed[0].arm}: {failed[0].result.error}")
    ungraded = [a for a in cal.answers if a.result.text is not None and math.isnan(a.score)]
    if ungraded:
        lines.append(f"{len(ungraded)} answer(s) got no grade from the judge (their prompts are left out)")
    return lines


def calibrate(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    prompts: str = "starter",
    per_category: int | None = 5,
    judge: Endpoint | None = None,
    *,
    no_judge: bool = False,
    concurrency: int = 8,
    timeout_s: float = 60.0,
    max_tokens: int = 512,
    retries: int = 1,
    cache_dir: Any = None,
    log: Any = None,
) -> dict[str, Any]:
    """The whole command; returns ``{"config": section, "paths": {...}}``."""
    from ray_router.serve.arms import save_arm_embeddings

    say = log or (lambda msg: print(msg, file=sys.stderr))
    cfg, raw = _read_config(config)
    app_args = _app_args(raw, where=f"{config}: args")
    eps = endpoints(app_args)
    plist = load_prompts(prompts, per_category)
    unreferenced = sorted({p.category for p in plist if p.rule is None})
    if unreferenced and judge is None:
        if not no_judge:
            raise ConfigError(
                f"prompts of categories {unreferenced} carry no reference answer: give a judge "
                "(--judge-base-url URL --judge-model M) or leave them out (--no-judge)"
            )
        plist = [p for p in plist if p.rule is not None]
        say(f"[calibrate] --no-judge: left out the categories {unreferenced} (no reference answers)")
        if not plist:
            raise DataError("no prompt with a reference answer is left")
    outdir = Path(out).expanduser()
    outdir.mkdir(parents=True, exist_ok=True)
    n_calls = len(eps) * len(plist)
    say(
        f"[calibrate] {len(eps)} arms x {len(plist)} prompts "
        f"({len({p.category for p in plist})} categories) = {n_calls} calls, {concurrency} at a time"
    )
    cal = asyncio.run(
        run_calibration(
            eps, plist, judge, concurrency=concurrency, timeout_s=timeout_s, max_tokens=max_tokens, retries=retries
        )
    )
    with (outdir / ANSWERS_FILE).open("w", encoding="utf-8") as fh:
        for a in cal.answers:
            fh.write(json.dumps(a.record(), ensure_ascii=False) + "\n")
    for ep in eps:
        mine = [a for a in cal.answers if a.arm == ep.name]
        if all(a.result.text is None for a in mine):
            raise CalibrationError(
                f"arm {ep.name!r} answered none of {len(mine)} prompts ({ep.base_url}, model {ep.model!r}); "
                f"first error: {mine[0].result.error}. Every answer is in {outdir / ANSWERS_FILE}"
            )
    if judge is not None:
        judged = [a for a in cal.answers if a.scored_by.startswith("judge")]
        if judged and all(a.scored_by != "judge" for a in judged):
            raise CalibrationError(
                f"the judge ({judge.base_url}, model {judge.model!r}) graded none of {len(judged)} answers; "
                f"first reply: {judged[0].judge_reply!r}"
            )
    table_path = write_table(cal, outdir)
    A, profile, identity = calibrated_embeddings(table_path, app_args, cache_dir=cache_dir)
    npz = save_arm_embeddings(outdir / EMBEDDINGS_FILE, app_args.arm_ids, A, identity, profile=profile)
    section = config_section(raw, cal, npz)
    from ray_router.serve.launch import IMPORT_PATH

    new_args = {**raw, **section}
    _app_args(new_args, where="the calibrated config")  # what serve will read: valid by construction, checked
    full = dict(cfg)
    full["applications"] = [
        {**app, "args": new_args} if app.get("import_path") == IMPORT_PATH else app
        for app in cfg.get("applications", [])
    ]
    import yaml

    (outdir / CONFIG_FILE).write_text(
        "# written by ray-router calibrate: ray-router serve --config "
        + str(outdir / CONFIG_FILE)
        + "\n"
        + yaml.safe_dump(full, sort_keys=False),
        encoding="utf-8",
    )
    for line in summary_lines(cal):
        say(line)
    return {
        "config": section,
        "calibration": cal,
        "paths": {
            "table": str(table_path),
            "arm_embeddings": str(npz),
            "answers": str(outdir / ANSWERS_FILE),
            "serve_config": str(outdir / CONFIG_FILE),
        },
    }
