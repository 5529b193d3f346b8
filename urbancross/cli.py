"""`urbancross` command line: one subcommand per pipeline stage.

Handlers import their stage lazily, so `urbancross --help` stays fast and a stage's
heavy dependencies (Ray, DeepSpeed, MLflow) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from urbancross.config import Config, ConfigError, load_config


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


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# --------------------------------------------------------------------------- handlers


def cmd_demo(args: argparse.Namespace) -> int:
    from urbancross.demo import run_demo

    cfg = _config(args)
    if args.out:
        cfg.out_dir = args.out
    run_demo(cfg)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from urbancross.data.manifest import summary_json
    from urbancross.data.synth import synthesize

    cfg = _config(args)
    for name in ("images_per_domain", "image_size", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg.synth, name, value)
    if args.domains:
        cfg.synth.domains = args.domains.split(",")
    table = synthesize(cfg.synth, args.out)
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
    )
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from urbancross.data.manifest import read_manifest, summary_json

    print(summary_json(read_manifest(args.manifest)))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="urbancross",
        description="Cross-domain satellite image-text retrieval on Ray: "
        "synth/import data -> preprocess (SAM, LMM) -> train -> adapt -> tune -> evaluate -> promote.",
    )
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
    p.add_argument("--domains", help="comma-separated domain names (config synth.domains)")
    p.add_argument("--seed", type=int, help="random seed (config synth.seed)")

    p = add("import", cmd_data_import, "Convert an existing dataset into a manifest and print a JSON summary.", dsub)
    p.add_argument(
        "--format",
        required=True,
        choices=["urbancross", "precomp", "karpathy"],
        help="urbancross: the UrbanCross release (one folder per country); "
        "precomp: {split}_caps.txt + {split}_filename.txt (RSICD, RSITMD, UCM, Sydney); "
        "karpathy: dataset_*.json with images[].filename/split/sentences[].raw",
    )
    p.add_argument("--root", required=True, metavar="DIR", help="folder of the dataset to import")
    p.add_argument("--out", required=True, metavar="DIR", help="manifest folder to write")
    p.add_argument("--images", metavar="DIR", help="images folder (default: ROOT/images)")
    p.add_argument("--domain", help="domain name for formats that do not carry one (default: ROOT's folder name)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip rows with missing/unreadable images or bad captions and report them, instead of failing",
    )

    p = add("summary", cmd_data_summary, "Print images and captions per split and domain of a manifest.", dsub)
    p.add_argument("manifest", help="manifest folder or URI")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"urbancross: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("urbancross: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any user-facing failure gets one clear line + exit 1
        from urbancross.data.manifest import ManifestError

        if isinstance(e, (ManifestError, FileNotFoundError)):
            print(f"urbancross: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
