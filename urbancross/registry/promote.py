"""Gate a run's model into the registry: `champion` only if it is clearly better.

Both the candidate and the current champion are evaluated on the same manifest split
(`cfg.promote`), so the comparison never mixes numbers from different data. The candidate
is evaluated from the run *before* anything is registered, and the tracking server is
checked first: a failure (server down, bad run id, broken model) leaves no version behind.
Every decision is written as tags on the new version. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from typing import Any, Callable

from urbancross.config import Config
from urbancross.evaluate.scoring import evaluate_model
from urbancross.model.pyfunc import load_urbancross
from urbancross.tracking import check_tracking_server, configure

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

Scores = dict[str, float]  # test domain -> mR


def decide(candidate: Scores, champion: Scores | None, margin: float, max_domain_drop: float) -> tuple[bool, str]:
    """Promote iff mean mR beats the champion's by >= `margin` and no domain drops > `max_domain_drop`.

    The mean is over the champion's domains, so both sides are averaged over the same set;
    a candidate missing one of them is refused. No champion: the candidate wins. A NaN or
    infinite score on either side refuses: every comparison with NaN is False, so an
    unchecked NaN passes a "no domain drops" test, and +inf beats any margin.
    """
    if not candidate:
        return False, "candidate has no evaluation scores"
    for side, scores in (("candidate", candidate), ("champion", champion or {})):
        bad = sorted(d for d, v in scores.items() if not math.isfinite(v))
        if bad:
            return False, f"{side} mR on {bad[0]} is {scores[bad[0]]}: not a finite score"
    if champion is None:
        return True, "no champion yet"
    missing = sorted(set(champion) - set(candidate))
    if missing:
        return False, f"candidate was not evaluated on {', '.join(missing)}"
    domains = sorted(champion)
    cand_mean = sum(candidate[d] for d in domains) / len(domains)
    champ_mean = sum(champion[d] for d in domains) / len(domains)
    gain = cand_mean - champ_mean
    drops = {d: champion[d] - candidate[d] for d in domains if champion[d] - candidate[d] > max_domain_drop}
    if drops:
        worst = max(drops, key=drops.get)
        return False, f"mR on {worst} drops by {drops[worst]:.2f} > max_domain_drop {max_domain_drop:g}"
    if gain < margin:
        return False, f"mean mR {cand_mean:.2f} vs champion {champ_mean:.2f}: gain {gain:+.2f} < margin {margin:g}"
    return True, f"mean mR {cand_mean:.2f} vs champion {champ_mean:.2f}: gain {gain:+.2f} >= margin {margin:g}"


def scores_of(records: list[dict[str, Any]]) -> Scores:
    """Evaluation records (one model) -> {test domain: mR}."""
    return {r["tested_on"]: float(r["mR"]) for r in records}


def evaluate_model_uri(cfg: Config, model_uri: str) -> Scores:
    """mR per domain of a logged/registered pyfunc model on the promotion split (no Ray)."""
    model, model_cfg = load_urbancross(model_uri)
    manifest = cfg.promote.manifest or cfg.data.manifest
    run_cfg = cfg.override({"model": model_cfg.model, "data.manifest": manifest}, where=f"{model_uri} on {manifest}")
    records = evaluate_model(model, run_cfg, manifest, cfg.promote.split)
    return scores_of(records)


def promote(
    cfg: Config,
    run_id: str,
    name: str | None = None,
    *,
    artifact: str = "model",
    evaluate: Callable[[Config, str], Scores] = evaluate_model_uri,
) -> dict[str, Any]:
    """Register `runs:/<run_id>/<artifact>` as a new version of `name` and move the aliases.

    `evaluate(cfg, model_uri) -> {domain: mR}` is a seam for tests; the default evaluates
    the real model. Returns the decision as a JSON-able dict.
    """
    import mlflow
    from mlflow import MlflowClient

    name = name or cfg.mlflow.registered_model
    uri = configure(cfg)
    check_tracking_server(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    source = f"runs:/{run_id}/{artifact}"
    client.get_run(run_id)  # a bad run id fails here, before anything is registered

    log.info("promote: evaluating candidate %s", source)
    candidate = evaluate(cfg, source)
    current = _champion_version(client, name)
    champion = evaluate(cfg, f"models:/{name}@{CHAMPION}") if current is not None else None
    ok, reason = decide(candidate, champion, cfg.promote.margin, cfg.promote.max_domain_drop)

    version = mlflow.register_model(source, name, tags={"source_run_id": run_id}).version
    try:
        tags = {
            "promote.decision": CHAMPION if ok else CHALLENGER,
            "promote.reason": reason,
            "promote.time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "promote.candidate_mR": json.dumps(candidate, sort_keys=True),
            "promote.champion_mR": json.dumps(champion, sort_keys=True) if champion is not None else "",
            "promote.champion_version": str(current.version) if current is not None else "",
            "promote.margin": str(cfg.promote.margin),
            "promote.max_domain_drop": str(cfg.promote.max_domain_drop),
            "promote.eval_data": f"{cfg.promote.manifest or cfg.data.manifest}#{cfg.promote.split}",
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHAMPION if ok else CHALLENGER, version)
    except BaseException:
        client.delete_model_version(name, version)  # no half-decided version left behind
        raise
    result = {
        "model": name,
        "version": int(version),
        "run_id": run_id,
        "decision": tags["promote.decision"],
        "promoted": ok,
        "reason": reason,
        "candidate_mR": candidate,
        "champion_mR": champion,
        "champion_version": int(current.version) if current is not None else None,
    }
    log.info("promote: %s v%s -> %s (%s)", name, version, result["decision"], reason)
    return result


def _champion_version(client, name: str):
    """The version holding `champion`, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
