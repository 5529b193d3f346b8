"""Gate a run's model into the registry: `champion` only if it is clearly better.

Both the candidate and the current champion are evaluated on the same manifest split
(`cfg.promote`), so the comparison never mixes numbers from different data. The candidate
is evaluated from the run *before* anything is registered, and the tracking server is
checked first: a failure (server down, bad run id, broken model) leaves no version behind.
Every decision is written as tags on the new version. Aliases, not the deprecated stages.
The alias moves only if the champion is still the version that was evaluated (`alias_lock`):
of two concurrent promotions, the second compared against a stale champion and is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import random
import time
from typing import Any, Callable, Iterator

from urbancross.config import Config, ConfigError
from urbancross.evaluate.scoring import evaluate_model
from urbancross.model.pyfunc import load_urbancross
from urbancross.tracking import RegistryError, check_tracking_server, configure

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_SUFFIX = ".promote-lock"  # registered model that serialises alias moves (alias_lock)
LOCK_WAIT = 60.0  # seconds to wait for another promotion's alias move

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
    manifest = cfg.promote.manifest or cfg.data.manifest
    if not manifest:
        raise ConfigError("promote.manifest and data.manifest are both empty: set one to the manifest to evaluate on")
    model, model_cfg = load_urbancross(model_uri)
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
    # the champion by version, not by alias: the alias may move while we evaluate
    champion = evaluate(cfg, f"models:/{name}/{current.version}") if current is not None else None
    ok, reason = decide(candidate, champion, cfg.promote.margin, cfg.promote.max_domain_drop)

    version = mlflow.register_model(source, name, tags={"source_run_id": run_id}).version
    try:
        with alias_lock(client, name):
            now = _champion_version(client, name)
            if _number(now) != _number(current):  # compare-and-set: we compared with a champion that is gone
                ok = False
                reason = f"champion moved from v{_number(current)} to v{_number(now)} during evaluation: promote again to compare with it"
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


@contextlib.contextmanager
def alias_lock(client, name: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the registry-wide lock for `name`'s aliases: registered model `<name>.promote-lock`.

    MLflow has no conditional alias update; creating a registered model is atomic on every
    store (a unique name), so it serves as the mutex that makes "re-read the champion, then
    move the alias" a compare-and-set. Held only for that step, never during evaluation. A
    lock older than the wait is reported, not broken: a crashed holder is for a person to see.
    """
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    deadline = time.monotonic() + wait
    while True:
        try:
            client.create_registered_model(lock, description=f"held while `urbancross promote` moves the aliases of {name}")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"registered model {lock} held for over {wait:g}s: another promotion of {name} is running, "
                    f"or one crashed (then delete {lock})"
                ) from None
            time.sleep(random.uniform(0.05, 0.25))
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _number(version) -> int | None:
    return int(version.version) if version is not None else None


def _champion_version(client, name: str):
    """The version holding `champion`, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
