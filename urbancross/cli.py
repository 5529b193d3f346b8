"""`urbancross` command line: one subcommand per pipeline stage.

Handlers import their stage lazily, so `urbancross --help` stays fast and a stage's
heavy dependencies (Ray, DeepSpeed, MLflow, torch, open_clip) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from urbancross.config import Config, ConfigError, load_config
from urbancross.tracking import RegistryError, check_tracking_server, configure


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="run configuration (YAML); defaults are used for what it omits")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one config field, e.g. --set train.epochs=3 (repeatable)",
    )


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output folder that exists and is not a manifest (never one that overlaps an input)",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# --------------------------------------------------------------------------- handlers


def cmd_demo(args: argparse.Namespace) -> int:
    from urbancross.demo import DEMO_CONFIG, METHODS, run_demo

    cfg = load_config(args.config or DEMO_CONFIG, [*METHODS[args.method], *(args.overrides or [])])
    run_demo(cfg.override({"out_dir": args.out}, where="--out") if args.out else cfg)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from urbancross.data.manifest import summary_json
    from urbancross.data.synth import synthesize

    flags = {f"synth.{name}": getattr(args, name) for name in ("images_per_domain", "image_size", "seed")}
    flags["synth.domains"] = args.domains.split(",") if args.domains else None
    cfg = _config(args).override({k: v for k, v in flags.items() if v is not None}, where="command line")
    table = synthesize(cfg.synth, args.out, overwrite=args.overwrite)
    print(summary_json(table))
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from urbancross.data.importers import import_dataset

    report = import_dataset(
        args.format,
        args.root,
        args.out,
        images=args.images,
        domain=args.domain,
        skip_bad=args.skip_bad,
        strict=args.strict,
        overwrite=args.overwrite,
        cfg=_config(args).data,
    )
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def cmd_data_dedup(args: argparse.Namespace) -> int:
    from urbancross.data.dedup import run_dedup

    summary = run_dedup(
        args.manifests,
        _config(args).dedup,
        args.report,
        drop_from=args.drop_from,
        out=args.out,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from urbancross.data.manifest import read_manifest, summary_json

    print(summary_json(read_manifest(args.manifest)))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from urbancross.preprocess import run_preprocess

    summary = run_preprocess(_config(args), overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`train` and `adapt`: one Ray Train + DeepSpeed stage; prints the result dict."""
    from urbancross.train import run_adapt, run_train

    run = run_adapt if args.command == "adapt" else run_train
    result = run(_config(args), resume=args.resume)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def cmd_pretrain_sam(args: argparse.Namespace) -> int:
    from urbancross.preprocess.sam_pretrain import run_pretrain_sam

    argv = ["urbancross", "pretrain-sam"] + (["--config", args.config] if args.config else []) + [f"--set {o}" for o in args.overrides]
    record = run_pretrain_sam(_config(args), command=" ".join(argv))
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from urbancross.pretrain import command_line, run_pretrain

    record = run_pretrain(_config(args), command=command_line(args.config, args.overrides))
    print(json.dumps(record, indent=2, sort_keys=True, default=str))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from urbancross.tune import run_tune

    summary = run_tune(_config(args), args.space)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from urbancross.evaluate.job import run_evaluate
    from urbancross.evaluate.report import to_markdown

    models = dict(m.split("=", 1) for m in args.models) if args.models else None
    records = run_evaluate(_config(args), models, use_ray=not args.no_ray)
    print(to_markdown(records))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from urbancross.registry.promote import promote

    result = promote(_config(args), args.run, args.model)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from urbancross.registry.search import build_index

    cfg = _config(args)
    check_tracking_server(configure(cfg))
    summary = build_index(args.model, args.manifest, args.out, cfg, split=args.split, use_ray=not args.no_ray)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from urbancross.registry.search import format_results, search

    cfg = _config(args)
    check_tracking_server(configure(cfg))
    print(format_results(search(args.model, args.index, args.query, args.top)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from urbancross.registry.serve import run_forever

    flags = {"serve.port": args.port, "serve.host": args.host}
    cfg = _config(args).override({k: v for k, v in flags.items() if v is not None}, where="command line")
    check_tracking_server(configure(cfg))
    if not os.path.exists(args.index):  # demo -> promote -> serve: the first serve builds the index
        from urbancross.registry.search import build_index

        manifest = args.manifest or cfg.data.manifest
        if not manifest:
            raise ConfigError(f"{args.index}: no such index, and no manifest to build it from: pass --manifest or set data.manifest")
        logging.getLogger("urbancross").info("serve: %s does not exist: building it from %s", args.index, manifest)
        build_index(args.model, manifest, args.index, cfg, use_ray=False)
    run_forever(cfg, args.model, args.index, args.manifest)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="urbancross",
        description="Cross-domain satellite image-text retrieval on Ray: "
        "synth/import data -> preprocess (SAM, LMM) -> train -> adapt -> tune -> evaluate -> promote.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add(
        "demo",
        cmd_demo,
        "Run the whole pipeline on the embedded benchmark (local Ray, local MLflow store) and print its results.",
    )
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default: config out_dir)")
    p.add_argument("--method", choices=["urbancross", "cmpagl"], default="urbancross",
                   help="model family (cmpagl: Gswin + BERT + fusion/matching head; its loss and lr); --set overrides it")
    p.epilog = "Without --config the demo uses urbancross/demo.yaml (the embedded default, sized for 2 CPUs)."

    data = sub.add_parser("data", help="Create, import and inspect manifests (Parquet dataset folders).")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = add(
        "synth",
        cmd_data_synth,
        "Generate the embedded benchmark: procedural satellite-like tiles with captions in three domains.",
        dsub,
    )
    _add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="manifest folder to write")
    p.add_argument("--images-per-domain", type=int, help="images per domain (config synth.images_per_domain)")
    p.add_argument("--image-size", type=int, help="tile size in pixels (config synth.image_size)")
    p.add_argument("--domains", help="comma-separated domain names, each once (config synth.domains)")
    p.add_argument("--seed", type=int, help="random seed, >= 0 (config synth.seed)")
    _add_overwrite(p)

    p = add(
        "import",
        cmd_data_import,
        "Convert an existing dataset into a manifest and print a JSON summary: images and captions per split, "
        "rows skipped, and release anomalies repaired or dropped (count, file:line of the first few).",
        dsub,
    )
    _add_config_args(p)
    p.add_argument(
        "--format",
        required=True,
        choices=["urbancross", "precomp", "karpathy"],
        help="urbancross: the UrbanCross release (one folder per country); "
        "precomp: {split}_caps.txt + {split}_filename.txt (RSICD, RSITMD, UCM, Sydney); "
        "karpathy: dataset*.json with images[].filename/split/sentences[].raw",
    )
    p.add_argument("--root", required=True, metavar="DIR", help="folder of the dataset to import")
    p.add_argument("--out", required=True, metavar="DIR", help="manifest folder to write")
    p.add_argument(
        "--images", metavar="DIR", help="images folder (default: ROOT/images, ROOT/imgs or the one ROOT/*_images)"
    )
    p.add_argument("--domain", help="domain name for formats that do not carry one (default: ROOT's folder name)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad rows (missing, unreadable or oversized images, paths outside the images folder, malformed "
        "entries) and report them, instead of failing on the first",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first release anomaly (blank or duplicate caption, caption count, image in several splits, "
        "...) instead of repairing it and reporting it",
    )
    _add_overwrite(p)

    p = add(
        "dedup",
        cmd_data_dedup,
        "Find exact and near-duplicate images within and across manifests (perceptual hash, Hamming distance "
        "<= dedup.max_distance; Ray Data from dedup.ray_min_images images on), write a JSON report of the pairs "
        "with their splits and distance, and optionally a copy of the first manifest without them.",
        dsub,
    )
    _add_config_args(p)
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="manifest folders to compare (within and across)")
    p.add_argument("--report", required=True, metavar="FILE", help="JSON report to write: every pair, splits, distance")
    p.add_argument(
        "--drop-from",
        metavar="SPLIT",
        help="write a copy of the FIRST manifest without its SPLIT rows that duplicate another row (in another split "
        "or manifest, or earlier in SPLIT); needs --out",
    )
    p.add_argument("--out", metavar="DIR", help="folder for the cleaned manifest (never an input)")
    _add_overwrite(p)

    p = add("summary", cmd_data_summary, "Print images and captions per split and domain of a manifest.", dsub)
    p.add_argument("manifest", help="manifest folder or URI")

    p = add(
        "preprocess",
        cmd_preprocess,
        "Add SAM segments and LMM-refined captions to a manifest with Ray Data (preprocess.input -> "
        "preprocess.output; bad rows go to <output>_rejects.parquet; a re-run skips finished rows).",
    )
    _add_config_args(p)
    _add_overwrite(p)

    for name, text in (
        (
            "train",
            "Train the retrieval model with Ray Train + DeepSpeed and curriculum sampling (checkpoint every "
            "epoch, MLflow logging); writes OUT_DIR/train/model.pt.",
        ),
        (
            "adapt",
            "Weighted adversarial fine-tuning of the trained model from the source to the target domain "
            "(Ray Train + DeepSpeed); writes OUT_DIR/adapt/model.pt.",
        ),
    ):
        p = add(name, cmd_train, text)
        _add_config_args(p)
        p.add_argument("--resume", action="store_true", help="continue the last run of this stage from its latest checkpoint")

    p = add(
        "pretrain-sam",
        cmd_pretrain_sam,
        "Train the tiny SAM (preprocess.sam.model_type: tiny) from random init on the procedural generator's own "
        "object masks of random web-style tiles, with SAM's point-prompt objective (best of 3 masks, focal + dice, "
        "IoU-head MSE), as a Ray Train job; print and record its mask recall on held-out web and benchmark val tiles.",
    )
    _add_config_args(p)
    p.epilog = (
        "Settings: config section sam_pretrain (tiles, steps, batch_size, lr, seed, output, ...); recall uses "
        "preprocess.sam's points_per_side / pred_iou_thresh / stability_score_thresh and synth's val split. Writes the "
        "fp16 checkpoint to sam_pretrain.output (default OUT_DIR/sam_pretrain/sam-tiny.pt) and beside it a sidecar "
        "<output>.json (command, config, seed, sha256, metrics). The packaged embedded SAM was made with: "
        "urbancross pretrain-sam --config urbancross/assets/sam-tiny.yaml"
    )

    p = add(
        "pretrain",
        cmd_pretrain,
        "Pretrain the tiny CLIP's two towers contrastively on the embedded world's web corpus (many random "
        "styles, never the benchmark's countries; generated by Ray Data as a manifest, domain 'web'), running "
        "the train stage (Ray Train + DeepSpeed) with the config's pretrain section; the model is chosen on the "
        "web val split. Writes the CLIP towers as an fp16 open_clip checkpoint at pretrain.output with a sidecar "
        "<output>.json (command, config, seed, sha256, web val metrics) and prints the sidecar.",
    )
    _add_config_args(p)
    p.epilog = (
        "The packaged checkpoint (model.pretrained: embedded) was made by: urbancross pretrain --config "
        "urbancross/pretrain.yaml (from the repository root; see urbancross/assets/clip-tiny.pt.json)."
    )

    p = add(
        "tune",
        cmd_tune,
        "Sweep a search space with Ray Tune (each trial a Ray Train run; ASHA or PBT), log every trial "
        "to MLflow under one parent run, and write the best trial's config (resumes an interrupted sweep).",
    )
    _add_config_args(p)
    p.add_argument("--space", required=True, metavar="YAML", help="search space file, e.g. tune_spaces/curriculum.yaml")


    p = add(
        "evaluate",
        cmd_evaluate,
        "Evaluate the trained (and adapted) models on every domain of the test split (Ray Data batch "
        "inference); write the cross-domain table as JSON, Markdown and PNG and log it to MLflow.",
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        metavar="NAME=PATH",
        action="append",
        default=[],
        dest="models",
        help="a model to evaluate (repeatable; default: OUT_DIR/train/model.pt as `source`, OUT_DIR/adapt/model.pt as "
        "`adapted`); trained_on/adapted_to come from a model.json beside the weights, else from data.*_domain",
    )
    p.add_argument("--no-ray", action="store_true", help="embed in this process instead of a Ray Data actor pool")

    p = add(
        "promote",
        cmd_promote,
        "Register a run's model as a new version; move the `champion` alias to it only if it beats the current "
        "champion on the promotion split by promote.margin (else set `challenger`); record the decision as tags.",
    )
    _add_config_args(p)
    p.add_argument("--run", required=True, metavar="RUN_ID", help="MLflow run whose `model` was logged by training")
    p.add_argument("--model", metavar="NAME", help="registered model name (default: mlflow.registered_model)")

    p = add(
        "index",
        cmd_index,
        "Embed the images of a manifest with a logged model (Ray Data batch inference) into a Parquet index.",
    )
    _add_config_args(p)
    p.add_argument("--model", required=True, metavar="URI", help="e.g. models:/urbancross@champion or runs:/RUN_ID/model")
    p.add_argument("--manifest", required=True, metavar="DIR", help="manifest folder whose images to index")
    p.add_argument("--out", required=True, metavar="FILE", help="index file to write (Parquet)")
    p.add_argument("--split", help="index only this split (default: all rows)")
    p.add_argument("--no-ray", action="store_true", help="embed in this process instead of a Ray Data actor pool")

    p = add("search", cmd_search, "Print the images of an index that best match a text query (id, domain, score).")
    _add_config_args(p)
    p.add_argument("--model", required=True, metavar="URI", help="the model that built the index, e.g. models:/urbancross@champion")
    p.add_argument("--index", required=True, metavar="FILE", help="index written by `urbancross index`")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many images to print (default 5)")
    p.add_argument("query", help='text query, e.g. "a stadium next to a river"')

    p = add(
        "serve",
        cmd_serve,
        "Serve text -> tile search over an index as a Ray Serve app (HTTP API and a web page at /); "
        "the model is loaded once per replica and queries are batched (config section `serve`).",
    )
    _add_config_args(p)
    p.add_argument("--model", required=True, metavar="URI", help="e.g. models:/urbancross@champion (followed when serve.follow_alias_s > 0)")
    p.add_argument("--index", required=True, metavar="FILE", help="index written by `urbancross index` (built from the manifest if missing)")
    p.add_argument("--manifest", metavar="DIR", help="manifest of the indexed tiles (default: the one recorded in the index, else data.manifest)")
    p.add_argument("--port", type=int, help="HTTP port (config serve.port, default 8000)")
    p.add_argument("--host", help="HTTP host (config serve.host, default 127.0.0.1)")

    return parser


def _one_line(e: BaseException, limit: int = 2000) -> str:
    """An error as one line: newlines folded, a huge value cut (the message can quote input)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or an unreachable service: their message is the whole story."""
    from urbancross.data.manifest import ManifestError
    from urbancross.model.factory import CheckpointError

    return (ManifestError, CheckpointError, RegistryError, FileNotFoundError, PermissionError)


def quiet_when_redirected(stream=None) -> bool:
    """Output not a terminal (a file, a pipe, CI): progress as log lines, no redrawn bars.

    Redrawn bars (Ray Data's, in the driver and in Ray workers; MLflow's artifact downloads;
    tqdm in libraries) are nearly all of a redirected log otherwise. Set before Ray starts, so
    its workers inherit it. Returns whether it quieted.
    """
    if (stream or sys.stderr).isatty():
        return False
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "ray.data" in sys.modules:  # its defaults were read at import
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line on stderr (exit 1; 2 for config errors); `--debug`
    shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("urbancross").setLevel(logging.INFO)  # our progress; libraries' chatter stays at WARNING
    quiet_when_redirected()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("urbancross: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, ConfigError):
            print(f"urbancross: config error: {_one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, _user_errors()):
            print(f"urbancross: error: {_one_line(e)}", file=sys.stderr)
        else:
            hint = "(--debug shows the traceback)"
            print(f"urbancross: error: {type(e).__name__}: {_one_line(e)} {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
