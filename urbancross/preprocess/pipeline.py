"""Ray Data glue: manifest -> SAM stage -> LMM stage -> enriched manifest + rejects.

Outputs, for `output = cfg.preprocess.output` (default `<out_dir>/preprocessed`):
- `output`: the manifest (same schema) with `segments`, `num_real_segments` and
  `refined_captions` filled, rows in input order, rejected rows left out;
- `<output>_rejects.parquet`: one row per rejected image (image_id, source, stage, reason);
- `<output>.parts/`: a journal of finished rows while the job runs (one Parquet file per
  block, each written atomically), merged into `output` and removed at the end.

A bad row (corrupt image, wrong mode or size, a model error) is rejected, never fatal: a
batch that raises is retried row by row and only the rows that still fail are rejected.
Re-running on the same output skips rows already in `output` or the journal (by
`image_id`, with segments and refined captions filled), so a killed job continues.
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from urbancross.atomic import write_fs
from urbancross.config import Config, ConfigError, PreprocessConfig, local_absolute
from urbancross.data.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    check_output,
    conform,
    decode_image,
    image_bytes,
    read_manifest,
    resolve_fs,
    write_manifest,
)
from urbancross.preprocess.refine import make_refiner
from urbancross.preprocess.sam import Segmenter, resolve_checkpoint

log = logging.getLogger("urbancross.preprocess")

REJECT_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)
STATUS_COLUMNS = [pa.field("reject_stage", pa.string()), pa.field("reject_reason", pa.string())]
STAGE_OUTPUTS = {"sam": ("segments", "num_real_segments"), "refine": ("refined_captions",)}


def _stage_class(name: str) -> Callable[[Config], Any]:
    return Segmenter if name == "sam" else make_refiner


# --------------------------------------------------------------------------- per-row safety


def load_image(data: bytes, where: str, cfg: PreprocessConfig):
    """Decoded RGB image; ManifestError when corrupt, of a mode not accepted, or out of size bounds."""
    from PIL import Image

    img = decode_image(data, where)
    mode = Image.open(io.BytesIO(data)).mode
    if mode not in cfg.image_modes:
        raise ManifestError(f"{where}: image mode {mode} not in preprocess.image_modes {cfg.image_modes}")
    side_lo, side_hi = min(img.size), max(img.size)
    if side_lo < cfg.min_image_side or side_hi > cfg.max_image_side:
        raise ManifestError(
            f"{where}: image size {img.size[0]}x{img.size[1]} outside "
            f"[{cfg.min_image_side}, {cfg.max_image_side}] px per side"
        )
    return img


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def run_guarded(process: Callable[[list, list], list], items: list, rows: list) -> list:
    """`process(items, rows)` per row: its output, or the error text for rows that fail alone.

    The batch is tried whole first; if it raises, each row is retried alone, so one bad
    row (or one flaky batch) costs only the rows that really fail.
    """
    if not rows:
        return []
    try:
        out = process(items, rows)
        if len(out) != len(rows):
            raise RuntimeError(f"stage returned {len(out)} results for {len(rows)} rows")
        return out
    except Exception as e:  # noqa: BLE001 - any model error becomes a reject, never a dead job
        if len(rows) == 1:
            return [error_text(e)]
        return [run_guarded(process, [i], [r])[0] for i, r in zip(items, rows)]


# Columns a stage never reads as Python objects: the encoded image (read only for live rows
# that need it, as one buffer) and the segments (only the SAM stage writes them).
_HEAVY = ("image", "segments")


class StageActor:
    """Ray Data `map_batches` callable (batch_format="pyarrow") around one stage.

    Rows rejected by an earlier stage pass through untouched; this stage's rejects get
    `reject_stage`/`reject_reason` set and their output columns left null. Only this stage's
    output and status columns are rebuilt: every other column (the image bytes above all)
    goes back as the same Arrow buffers, never copied into Python objects or re-encoded.
    """

    def __init__(self, stage: str, cfg: Config, root: str, factory: Callable[[Config], Any] | None = None):
        self.name = stage
        self.cfg = cfg
        self.root = root
        threads = getattr(cfg.preprocess, stage).threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.stage = (factory or _stage_class(stage))(cfg)  # models load here: once per actor
        self.seconds = 0.0  # time spent in __call__, for the bench

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        out = self._call(batch)
        self.seconds += time.perf_counter() - t0
        return out

    def _call(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns([c for c in _HEAVY if c in batch.column_names]).to_pylist()
        images = batch["image"] if "image" in batch.column_names else None
        results: list[dict | None] = [None] * len(rows)
        live, items = [], []
        for i, row in enumerate(rows):
            if row["reject_reason"] is not None:
                continue
            try:
                item = self._image(row, images[i].as_py() if images is not None else None) if self.stage.needs_image else None
            except Exception as e:  # noqa: BLE001 - a bad image is a reject
                self._reject(row, error_text(e))
                continue
            live.append(i)
            items.append(item)
        outs = run_guarded(self.stage.process, items, [rows[i] for i in live])
        for i, out in zip(live, outs):
            if isinstance(out, str):
                self._reject(rows[i], out)
            else:
                results[i] = out
        return self._table(batch, rows, results)

    def _image(self, row: dict, data: bytes | None):
        where = row.get("source") or str(row["image_id"])
        return load_image(image_bytes({**row, "image": data}, self.root), where, self.cfg.preprocess)

    def _reject(self, row: dict, reason: str) -> None:
        row["reject_stage"], row["reject_reason"] = self.name, reason

    def _table(self, batch: pa.Table, rows: list[dict], results: list[dict | None]) -> pa.Table:
        for col in (*STAGE_OUTPUTS[self.name], "reject_stage", "reject_reason"):
            before = batch[col].to_pylist() if col in _HEAVY else [row[col] for row in rows]
            values = [res[col] if res is not None and col in res else old for old, res in zip(before, results)]
            idx = batch.schema.get_field_index(col)
            batch = batch.set_column(idx, batch.schema.field(col), pa.array(values, type=batch.schema.field(col).type))
        return batch


# --------------------------------------------------------------------------- outputs


def rejects_path(output: str) -> str:
    return output.rstrip("/") + "_rejects.parquet"


def parts_path(output: str) -> str:
    return output.rstrip("/") + ".parts"


def _write_file_atomic(table: pa.Table, uri: str) -> None:
    write_fs(*resolve_fs(uri), lambda f: pq.write_table(table, f))


def _complete(table: pa.Table) -> pa.Table:
    """Rows with both stage outputs filled."""
    return table.filter(pc.and_(pc.is_valid(table["segments"]), pc.is_valid(table["refined_captions"])))


def finished_rows(output: str) -> pa.Table | None:
    """Rows a previous run finished: in the output manifest or in the journal of a killed run."""
    tables = []
    fs, path = resolve_fs(output)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        tables.append(read_manifest(output))
    fs, parts = resolve_fs(parts_path(output))
    if fs.get_file_info(parts).type == pafs.FileType.Directory:
        journal = ds.dataset(parts, filesystem=fs, format="parquet", schema=MANIFEST_SCHEMA).to_table()
        tables.append(conform(journal, parts))
    if not tables:
        return None
    done = _complete(pa.concat_tables(tables))
    return done.take(_first_occurrence(done["image_id"].to_pylist()))


def _first_occurrence(ids: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, x in enumerate(ids):
        if x not in seen:
            seen.add(x)
            keep.append(i)
    return keep


def in_order(table: pa.Table, ids: list[str]) -> pa.Table:
    """`table`'s rows in the order of `ids` (the input manifest's), dropping ids not listed."""
    pos = {x: i for i, x in enumerate(ids)}
    have = table["image_id"].to_pylist()
    take = sorted((i for i, x in enumerate(have) if x in pos), key=lambda i: pos[have[i]])
    return table.take(take)


# --------------------------------------------------------------------------- job


def resolve_paths(cfg: Config) -> tuple[Config, str, str, str]:
    """`cfg` with absolute paths (actors may run elsewhere), plus input, output, root."""
    src = cfg.preprocess.input or cfg.data.manifest
    if not src:
        raise ConfigError("preprocess.input (or data.manifest): no manifest to preprocess")
    out = cfg.preprocess.output or os.path.join(cfg.out_dir, "preprocessed")
    src, out = local_absolute(src), local_absolute(out)
    root = local_absolute(cfg.data.root) or os.path.dirname(src)
    cfg = cfg.override(
        {
            "preprocess.sam.checkpoint": local_absolute(resolve_checkpoint(cfg)),
            "preprocess.refine.model_dir": local_absolute(cfg.preprocess.refine.model_dir),
            "model.pretrained": local_absolute(cfg.model.pretrained),
        },
        where="preprocess paths",
    )
    if not os.path.isfile(cfg.preprocess.sam.checkpoint):  # fail here, not inside every actor
        raise ConfigError(f"preprocess.sam.checkpoint: no such file {cfg.preprocess.sam.checkpoint!r}")
    if cfg.preprocess.refine.kind == "lmm" and not os.path.isdir(cfg.preprocess.refine.model_dir):
        raise ConfigError(f"preprocess.refine.model_dir: no such folder {cfg.preprocess.refine.model_dir!r}")
    return cfg, src, out, root


def with_status(table: pa.Table) -> pa.Table:
    for f in STATUS_COLUMNS:
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def block_rows(cfg: Config) -> int:
    pre = cfg.preprocess
    return pre.block_rows or max(pre.sam.batch_size, pre.refine.batch_size)


def stage_dataset(todo: pa.Table, cfg: Config, root: str, stages: dict[str, Callable] | None = None):
    """The Ray Dataset of `todo` rows through both stages (lazy; nothing runs until consumed)."""
    import ray.data

    stages = stages or {}
    pre = cfg.preprocess
    blocks = [b for b in with_status(todo).to_batches(max_chunksize=block_rows(cfg))]  # small blocks: steady progress, pipelining
    ray.data.DataContext.get_current().enable_progress_bars = pre.progress_bars
    dataset = ray.data.from_arrow([pa.Table.from_batches([b]) for b in blocks])
    if pre.fuse_stages:  # one pool: each actor runs a block through SAM, then refinement
        extra = {"num_gpus": pre.sam.num_gpus} if pre.sam.num_gpus > 0 else {}
        return dataset.map_batches(
            LocalStages,
            fn_constructor_kwargs={"cfg": cfg, "root": root, "stages": stages},
            compute=ray.data.ActorPoolStrategy(size=pre.sam.concurrency),
            num_cpus=pre.sam.num_cpus,
            batch_size=block_rows(cfg),
            batch_format="pyarrow",
            **extra,
        )
    for name, scfg in (("sam", pre.sam), ("refine", pre.refine)):
        extra = {"num_gpus": scfg.num_gpus} if scfg.num_gpus > 0 else {}
        dataset = dataset.map_batches(
            StageActor,
            fn_constructor_kwargs={"stage": name, "cfg": cfg, "root": root, "factory": stages.get(name)},
            compute=ray.data.ActorPoolStrategy(size=scfg.concurrency),
            num_cpus=scfg.num_cpus,
            batch_size=scfg.batch_size,
            batch_format="pyarrow",
            **extra,
        )
    return dataset


class LocalStages:
    """Both stages in one process: the sequential baseline (bench), the reference the Ray path
    must match (tests), and with `preprocess.fuse_stages` the Ray actor. Call it on a block of
    `with_status` rows."""

    def __init__(self, cfg: Config, root: str, stages: dict[str, Callable] | None = None):
        stages = stages or {}
        self.cfg = cfg.preprocess
        self.sam = StageActor("sam", cfg, root, stages.get("sam"))
        self.refine = StageActor("refine", cfg, root, stages.get("refine"))

    def __call__(self, block: pa.Table) -> pa.Table:
        for stage, n in ((self.sam, self.cfg.sam.batch_size), (self.refine, self.cfg.refine.batch_size)):
            block = pa.concat_tables([stage(block.slice(i, n)) for i in range(0, block.num_rows, n)])
        return block


def local_blocks(todo: pa.Table, cfg: Config, root: str, stages: dict[str, Callable] | None = None):
    """`stage_dataset`'s output blocks, computed in this process one block at a time, in order."""
    run = LocalStages(cfg, root, stages)
    for block in with_status(todo).to_batches(max_chunksize=block_rows(cfg)):
        yield run(pa.Table.from_batches([block]))


def split_status(block: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(finished manifest rows, reject rows) of one output block."""
    bad = pc.is_valid(block["reject_reason"])
    ok = conform(block.filter(pc.invert(bad)).drop_columns(["reject_stage", "reject_reason"]))
    rej = block.filter(bad)
    rejects = pa.table(
        {
            "image_id": rej["image_id"],
            "source": rej["source"],
            "stage": rej["reject_stage"],
            "reason": rej["reject_reason"],
        },
        schema=REJECT_SCHEMA,
    )
    return ok, rejects


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def run_preprocess(
    cfg: Config,
    *,
    stages: dict[str, Callable[[Config], Any]] | None = None,
    overwrite: bool = False,
    on_block: Callable[[int], None] | None = None,
) -> dict:
    """Preprocess the manifest; returns a JSON-able summary.

    `stages` optionally replaces a stage class by name (`sam`, `refine`): a callable
    `cfg -> object` with `needs_image` and `process(images, rows) -> [dict]`. The output must
    not overlap the input, and may exist only as a manifest (a previous run's: resumed)
    unless `overwrite` (`manifest.check_output`). `on_block(rows)` is called after each output
    block is journaled (the bench times block arrivals with it).
    """
    t0 = time.perf_counter()
    cfg, src, out, root = resolve_paths(cfg)
    inputs = [src, root if cfg.data.root else None]  # the default root is the input's folder, which holds out_dir
    check_output(out, inputs, overwrite=overwrite)  # before the work
    table = read_manifest(src)
    ids = table["image_id"].to_pylist()
    dup = [x for x, n in Counter(ids).items() if n > 1]
    if dup:
        raise ManifestError(f"{src}: duplicate image_id {dup[0]!r} ({len(dup)} duplicated ids)")
    done = finished_rows(out)
    done = in_order(done, ids) if done is not None else table.schema.empty_table()
    done_ids = set(done["image_id"].to_pylist())
    todo = table.filter(pc.invert(pc.is_in(table["image_id"], pa.array(sorted(done_ids), pa.string()))))
    log.info("preprocess: %d rows, %d already done, %d to do -> %s", len(ids), len(done_ids), todo.num_rows, out)

    new, rejects, t_map = [], [], time.perf_counter()
    timing = {"first_block_s": None, "steady_rows": 0, "steady_s": 0.0, "write_s": 0.0}
    if todo.num_rows:
        _ensure_ray()
        log.info("preprocess: %s", stage_plan(cfg))
        fs, parts = resolve_fs(parts_path(out))
        fs.create_dir(parts, recursive=True)
        seen, t_first = 0, None
        for block in stage_dataset(todo, cfg, root, stages).iter_batches(batch_size=None, batch_format="pyarrow"):
            now = time.perf_counter()
            if t_first is None:  # start-up: actors, model loads, the first block through both stages
                t_first, timing["first_block_s"] = now, now - t_map
            else:
                timing["steady_rows"] += block.num_rows
            ok, rej = split_status(block)
            if ok.num_rows:
                _write_file_atomic(ok, f"{parts_path(out)}/part-{uuid.uuid4().hex}.parquet")
            new.append(ok)
            rejects.append(rej)
            seen += block.num_rows
            timing["write_s"] += time.perf_counter() - now
            timing["steady_s"] = time.perf_counter() - t_first
            if on_block is not None:
                on_block(block.num_rows)
            rate = seen / max(time.perf_counter() - t_map, 1e-9)
            log.info("preprocess: %d/%d rows, %.1f img/s", len(done_ids) + seen, len(ids), rate)
    map_seconds = time.perf_counter() - t_map

    final = in_order(pa.concat_tables([conform(done), *new]), ids)
    rejected = pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table()
    _write_file_atomic(rejected, rejects_path(out))
    if final.num_rows == 0:
        raise ManifestError(f"{src}: every row was rejected; reasons in {rejects_path(out)}")
    write_manifest(final, out, inputs=inputs, overwrite=overwrite)
    fs, parts = resolve_fs(parts_path(out))
    if fs.get_file_info(parts).type == pafs.FileType.Directory:
        fs.delete_dir(parts)
    return _summary(final, new, rejected, len(ids), len(done_ids), t0, map_seconds, out, timing)


def stage_plan(cfg: Config) -> str:
    """One line: per stage actors, CPUs, GPUs, torch threads and batch size; the block size."""
    pre = cfg.preprocess
    stages = "; ".join(
        f"{n}: {s.concurrency} actor(s) x {s.num_cpus:g} CPU {s.num_gpus:g} GPU, "
        f"threads {s.threads or 'torch default'}, batch {s.batch_size}"
        for n, s in (("sam", pre.sam), ("refine", pre.refine))
    )
    if pre.fuse_stages:
        stages = (f"sam+refine fused: {pre.sam.concurrency} actor(s) x {pre.sam.num_cpus:g} CPU {pre.sam.num_gpus:g} GPU, "
                  f"threads {pre.sam.threads or 'torch default'}, batch {pre.sam.batch_size}/{pre.refine.batch_size}")
    return f"{stages}; block_rows {block_rows(cfg)}"


def _summary(final, new, rejected, total, skipped, t0, map_seconds, out, timing) -> dict:
    processed = sum(t.num_rows for t in new)
    refined = sum(
        sum(r != c for r, c in zip(row["refined_captions"], row["captions"]))
        for t in new
        for row in t.select(["captions", "refined_captions"]).to_pylist()
    )
    real = [n for t in new for n in t["num_real_segments"].to_pylist()]
    summary = {
        "output": out,
        "rejects_path": rejects_path(out),
        "rows_total": total,
        "rows_done": final.num_rows,
        "rows_processed": processed,
        "rows_skipped_existing": skipped,
        "rejects": rejected.num_rows,
        "reject_reasons": dict(Counter(f"{s}: {r.split(':')[0]}" for s, r in zip(
            rejected["stage"].to_pylist(), rejected["reason"].to_pylist()))),
        "captions_refined": refined,
        "mean_real_segments": round(sum(real) / len(real), 3) if real else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "images_per_s": round((processed + rejected.num_rows) / map_seconds, 3) if processed + rejected.num_rows else 0.0,
        # after the first block (actor start-up, model loads, pipeline fill) has come back
        "startup_s": None if timing["first_block_s"] is None else round(timing["first_block_s"], 3),
        "steady_images_per_s": round(timing["steady_rows"] / timing["steady_s"], 3) if timing["steady_s"] > 0 else None,
        "journal_write_s": round(timing["write_s"], 3),
    }
    log.info("preprocess: done %s", summary)
    return summary
