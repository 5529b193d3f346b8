"""Training and adaptation loops: in-process runs on the tiny preset, objective gradients,
the DeepSpeed config, and (slow) real 2-worker ZeRO-2 runs that are killed and resumed."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch

from urbancross.config import AdaptConfig, LossConfig, ModelConfig, TrainConfig, load_config
from urbancross.train.adversarial import AdaptObjective
from urbancross.train.deepspeed_config import deepspeed_config


def tiny_cfg(manifest: str, out_dir, *overrides: str):
    return load_config(
        None,
        [
            f"data.manifest={manifest}",
            f"out_dir={out_dir}",
            "model.use_segments=false",
            "train.num_workers=0",
            "train.ingest_actors=0",
            "train.batch_size=4",
            "train.epochs=2",
            "train.curriculum.pacing=linear",
            "train.curriculum.difficulty=caption_complexity",
            "train.curriculum.start_fraction=0.5",
            "train.curriculum.length=1.0",
            "adapt.epochs=2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(ray_session, manifest, tmp_path_factory):
    from urbancross.train import run_train

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(manifest, out)
    return cfg, run_train(cfg)


# --------------------------------------------------------------------------- pure parts


def test_deepspeed_config_from_ours():
    ds = deepspeed_config(TrainConfig(batch_size=8, grad_accum=3, grad_clip=0.5, zero_stage=2), world_size=2)
    assert ds["train_batch_size"] == 48 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    assert ds["zero_allow_untested_optimizer"] is True
    assert deepspeed_config(TrainConfig(use_gpu=True), 1)["bf16"]["enabled"] is True
    assert deepspeed_config(TrainConfig(use_gpu=True, precision="fp32"), 1)["bf16"]["enabled"] is False


def test_the_stages_adamw_is_torchs_per_tensor_adamw_to_the_bit(tiny_model):
    """`adamw` (foreach) only changes the speed: five steps of the tiny model's param groups
    end at the same weights as torch's default CPU path (a loop over the tensors)."""
    from urbancross.train.loop import adamw, param_groups

    ends = []
    for make in (adamw, lambda groups: torch.optim.AdamW(groups, foreach=False)):
        model = copy.deepcopy(tiny_model)
        opt = make(param_groups(model, lr=1e-3, weight_decay=0.1))
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        ends.append([p.detach().clone() for p in model.parameters()])
    assert opt.defaults["foreach"] is False and adamw([torch.zeros(1, requires_grad=True)]).defaults["foreach"] is True
    assert all(torch.equal(a, b) for a, b in zip(*ends))
    assert not torch.equal(ends[0][0], next(tiny_model.parameters()))  # the steps moved the weights


@pytest.fixture(scope="module")
def tiny_model():
    from urbancross.model.factory import create_model

    torch.manual_seed(0)
    return create_model(ModelConfig(use_segments=False))


def _objective_grads(tiny_model, phase: str, weight: float, **adapt):
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    obj = AdaptObjective(model, LossConfig(), AdaptConfig(**{"select_fraction": 0.5, "disc_inputs": "image_text", **adapt}))
    g = torch.Generator().manual_seed(1)
    batch = lambda: {"images": torch.randn(4, 3, 64, 64, generator=g), "tokens": torch.randint(1, 400, (4, 64), generator=g)}  # noqa: E731
    loss, logs = obj(batch(), batch(), weight, 0.5, phase)
    loss.backward()
    enc = model.clip.visual.proj.grad.clone()
    disc = obj.disc.net[0].weight.grad
    logs["text_grad"] = model.clip.text_projection.grad.clone()
    return enc, None if disc is None else disc.clone(), logs


def test_reversal_inside_the_objective(tiny_model):
    """GRL: encoder gradient = retrieval - w * domain; the discriminator's is unaffected by w."""
    g0, d0, _ = _objective_grads(tiny_model, "grl", 0.0)
    gm, dm, _ = _objective_grads(tiny_model, "grl", -1.0)  # coefficient -1: the plain (un-reversed) domain gradient
    gw, dw, logs = _objective_grads(tiny_model, "grl", 0.5)
    g_domain = gm - g0
    assert g_domain.abs().max() > 1e-6
    assert torch.allclose(gw, g0 - 0.5 * g_domain, atol=1e-6, rtol=1e-4)
    assert torch.allclose(d0, dw) and torch.allclose(dm, dw)
    assert logs["weight_max"].item() == pytest.approx(4 / 3)  # 2 kept rows: min-max into [0.5, 1] -> mean 1


@pytest.mark.parametrize("term", ["domain", "retrieval"])
def test_weights_scale_the_adversarial_term_not_the_retrieval_loss(tiny_model, term):
    """The reference weights each kept source row's `log p` (the domain term) and trains the
    retrieval loss on the kept rows unweighted; `weighted_term=retrieval` is the old variant."""
    flat = _objective_grads(tiny_model, "grl", 0.5, weight_floor=1.0, weighted_term=term)[2]  # uniform weights
    ref = _objective_grads(tiny_model, "grl", 0.5, weight_floor=0.0, weighted_term=term)[2]  # reference min-max
    weighted, unweighted = ("domain", "retrieval") if term == "domain" else ("retrieval", "domain")
    assert ref[unweighted].item() == pytest.approx(flat[unweighted].item(), abs=1e-7)
    assert abs(ref[weighted].item() - flat[weighted].item()) > 1e-5


def test_alternating_phases_touch_one_side_each(tiny_model):
    g_ret, d_grl, _ = _objective_grads(tiny_model, "grl", 0.0)
    g_disc_phase, d_disc_phase, _ = _objective_grads(tiny_model, "disc", 0.7)
    assert torch.allclose(g_disc_phase, g_ret, atol=1e-7)  # encoders: retrieval only
    assert torch.allclose(d_disc_phase, d_grl)  # discriminator: trained on true labels
    g_enc_phase, d_enc_phase, enc_logs = _objective_grads(tiny_model, "encoder", 0.7)
    assert d_enc_phase is None  # frozen discriminator
    assert not torch.allclose(g_enc_phase, g_ret)
    # same discriminator, same batches: the logged accuracy is against the true labels in both phases
    disc_logs = _objective_grads(tiny_model, "disc", 0.7)[2]
    assert disc_logs["disc_acc"].item() != 0.5
    assert enc_logs["disc_acc"].item() == pytest.approx(disc_logs["disc_acc"].item(), abs=1e-6)


def test_discriminator_on_image_embeddings_only(tiny_model):
    """disc_inputs=image: the reversed domain gradient reaches the image tower but not the text tower."""
    g_ret, _, ret = _objective_grads(tiny_model, "grl", 0.0, disc_inputs="image")
    g_img, _, img = _objective_grads(tiny_model, "grl", 0.5, disc_inputs="image")
    both = _objective_grads(tiny_model, "grl", 0.5)[2]
    assert not torch.allclose(g_img, g_ret, atol=1e-6)
    assert torch.allclose(img["text_grad"], ret["text_grad"], atol=1e-7)
    assert not torch.allclose(both["text_grad"], ret["text_grad"], atol=1e-6)


def test_scene_labels_reach_the_intra_class_term(tiny_model, caplog):
    """The manifest's `label` travels through ModelInputs (as `label_id`, -1 = none) into the
    stage-1 objective's loss; unlabelled data turns the intra-class term off and the driver says so once."""
    import logging

    import pyarrow as pa

    from urbancross.data.ingest import label_id
    from urbancross.train.objective import RetrievalObjective
    from urbancross.train.trainer import note_missing_labels

    assert label_id(None) == label_id("") == -1 and label_id("mountain") == label_id("mountain") != label_id("river") >= 0
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(4, 3, 64, 64, generator=g), "tokens": torch.randint(1, 400, (4, 64), generator=g)}
    obj = RetrievalObjective(copy.deepcopy(tiny_model), LossConfig(kind="triplet", intra_class_weight=0.1))
    labels = torch.tensor([label_id(x) for x in ("mountain", "river", "mountain", None)])
    assert set(obj(batch)[1]) == {"image_text"}
    assert set(obj({**batch, "label": torch.full((4,), -1)})[1]) == {"image_text"}
    assert set(obj({**batch, "label": labels})[1]) == {"image_text", "intra_class"}

    cfg = load_config(None, ["loss.kind=triplet"])
    unlabelled = pa.table({"image_id": ["a", "b"], "label": pa.array([None, ""], pa.string())})
    with caplog.at_level(logging.INFO, logger="urbancross.train.trainer"):
        assert note_missing_labels(cfg, unlabelled, "train")
        assert note_missing_labels(cfg, unlabelled.drop(["label"]), "train")
        assert not note_missing_labels(cfg, pa.table({"label": ["a", None]}), "train")
        assert not note_missing_labels(load_config(None, ["loss.kind=infonce"]), unlabelled, "train")
    assert sum("intra-class loss term is off" in r.getMessage() for r in caplog.records) == 2


# --------------------------------------------------------------------------- in-process runs (Ray Data + DeepSpeed)


@pytest.mark.ray
def test_train_in_process_curriculum_checkpoint_export_mlflow(trained):
    import mlflow

    from urbancross.model.factory import create_model

    cfg, result = trained
    m = result["metrics"]
    # 8 images, pacing linear 0.5 -> 1.0 (the ramp's last epoch sees all): epoch 1 = 4 easiest (1 step), epoch 2 = 8 (2 steps)
    assert (m["epoch"], m["step"], m["samples"]) == (2, 3, 12)
    assert m["curriculum_fraction"] == 1.0
    assert 0.0 <= m["val_mR"] <= 100.0
    assert os.path.isdir(os.path.join(result["checkpoint_path"], "ds"))
    # in-process: the run keeps its checkpoint in its own out_dir, the last epoch's only
    checkpoints = os.path.join(cfg.out_dir, "train", "checkpoints")
    assert result["checkpoint_path"] == os.path.join(checkpoints, "epoch_000002")
    assert os.listdir(checkpoints) == ["epoch_000002"]
    model = create_model(cfg.model, pretrained=result["model_path"])
    fresh = create_model(cfg.model)
    assert model.clip.logit_scale.shape == () and not torch.equal(model.clip.visual.proj, fresh.clip.visual.proj)
    meta = os.path.join(os.path.dirname(result["model_path"]), "model.json")
    assert json.loads(open(meta).read()) == {"trained_on": "Finland", "adapted_to": None}

    mlflow.set_tracking_uri(cfg.tracking_uri())
    client = mlflow.MlflowClient()
    history = client.get_metric_history(result["mlflow_run_id"], "loss")
    assert [h.step for h in history] == [1, 2]
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["train.epochs"] == "2" and "val_mR" in run.data.metrics


def _loss_history(cfg, result) -> list[float]:
    import mlflow

    history = mlflow.MlflowClient(cfg.tracking_uri()).get_metric_history(result["mlflow_run_id"], "loss")
    return [h.value for h in sorted(history, key=lambda h: h.step)]


@pytest.mark.ray
def test_same_config_same_numbers_in_process(trained, tmp_path):
    """Seeded end to end (row order, shuffle, augmentation, captions, init): a second run of the
    same config gives the same per-epoch losses and validation mR, to the bit, on CPU; the
    rows cached on disk (memory-mapped) instead of in the object store change nothing."""
    from urbancross.train import run_train

    cfg, first = trained
    again = cfg.override({"out_dir": str(tmp_path), "train.cache": "disk"})
    second = run_train(again)
    assert len(list((tmp_path / "train" / "cache").glob("*/images.npy"))) == 1
    assert _loss_history(cfg, first) == _loss_history(again, second) and len(_loss_history(cfg, first)) == 2
    assert first["metrics"]["val_mR"] == second["metrics"]["val_mR"]
    other = run_train(again.override({"seed": 1, "out_dir": str(tmp_path / "seed1")}))
    assert _loss_history(cfg, first) != _loss_history(again, other)


def test_a_stage_saves_the_config_it_ran_with(trained, tmp_path, monkeypatch):
    """`<out_dir>/train/config.yaml` is the config the stage used (absolute paths, MLflow store
    pinned): a later command takes it as is, from any working directory."""
    from urbancross.evaluate.job import model_entries

    cfg, result = trained
    saved = os.path.join(cfg.out_dir, "train", "config.yaml")
    monkeypatch.chdir(tmp_path)
    used = load_config(saved)
    assert used.data.manifest == cfg.data.manifest and os.path.isabs(used.data.manifest)
    assert used.out_dir == str(cfg.out_dir) and used.mlflow.tracking_uri == cfg.tracking_uri()
    assert used.override({"mlflow.tracking_uri": ""}) == cfg  # nothing else changed
    assert model_entries(used)["source"]["path"] == result["model_path"]


@pytest.mark.ray
def test_adapt_in_process_alternating_zero2(trained, caplog):
    import logging

    from urbancross.model.factory import create_model
    from urbancross.train import run_adapt

    cfg, stage1 = trained
    cfg = tiny_cfg(cfg.data.manifest, cfg.out_dir, "adapt.mode=alternating", "train.zero_stage=2")
    caplog.set_level(logging.INFO, logger="urbancross")
    result = run_adapt(cfg)
    # the stage-1 weights are announced once per run (the loop's own load is quiet), never as "initialized randomly"
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model weights: loaded")]
    assert len(announced) == 1 and announced[0].startswith(f"model weights: loaded {stage1['model_path']} (sha256 ")
    assert "initialized randomly" not in caplog.text
    m = result["metrics"]
    assert (m["epoch"], m["step"]) == (2, 6)  # 9 source images in batches of 4: 3 steps per pass
    assert m["kept_share"] == pytest.approx(0.4)  # pass 2 of the reference's pacing: 0.2 + 0.2
    assert m["adv_weight"] > 0 and 0.0 <= m["disc_acc"] <= 1.0
    adapted = create_model(cfg.model, pretrained=result["model_path"])
    source = create_model(cfg.model, pretrained=stage1["model_path"])
    assert not torch.equal(adapted.clip.visual.proj, source.clip.visual.proj)
    meta = json.loads(open(os.path.join(os.path.dirname(result["model_path"]), "model.json")).read())
    assert meta == {"trained_on": "Finland", "adapted_to": "Spain"}


def test_resume_without_a_run_is_a_clear_error(tmp_path, manifest):
    from urbancross.train.trainer import run_state

    with pytest.raises(FileNotFoundError, match="no train run to resume"):
        run_state(tiny_cfg(manifest, tmp_path), "train", resume=True)


@pytest.mark.ray
def test_in_process_resume_starts_from_the_local_checkpoint(ray_session, manifest, tmp_path):
    """Stopped after epoch 1, `--resume` continues at that step in the same MLflow run."""
    import mlflow

    from urbancross.train import run_train

    cfg = tiny_cfg(manifest, tmp_path)
    first = run_train(cfg, stop_epoch=1)
    assert first["metrics"]["epoch"] == 1
    second = run_train(cfg, resume=True)
    m = second["metrics"]
    assert (m["start_epoch"], m["start_step"], m["epoch"]) == (1, first["metrics"]["step"], 2)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    history = mlflow.MlflowClient(cfg.tracking_uri()).get_metric_history(second["mlflow_run_id"], "loss")
    assert [h.step for h in history] == [1, 2]


def test_latest_local_checkpoint_skips_unfinished_saves(tmp_path):
    from urbancross.train.trainer import latest_local_checkpoint

    assert latest_local_checkpoint(None) is None and latest_local_checkpoint(tmp_path) is None
    for name in ("epoch_000002", "epoch_000010", ".epoch_000011.partial"):
        (tmp_path / name).mkdir()
    assert latest_local_checkpoint(tmp_path) == str(tmp_path / "epoch_000010")


# --------------------------------------------------------------------------- real Ray Train runs


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_zero2_survive_a_killed_worker_then_resume(ray_session, placement_groups, manifest, tmp_path):
    """Rank 1 dies mid-epoch 2 (first attempt only): FailureConfig restarts the group from the
    epoch-1 checkpoint and the run completes, leaving no placement group behind; `--resume` with
    one more epoch, in the same Ray runtime, continues at its step. No run, killed or not, leaves
    DeepSpeed's shared-memory segments in /dev/shm (they are RAM until reboot)."""
    from urbancross.train import run_train

    before = placement_groups()
    segments = lambda: set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))  # noqa: E731
    segments_before = segments()
    marker = str(tmp_path / "killed")

    def kill_rank1_in_epoch2(rank, epoch, step):
        if rank == 1 and epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            # Train V2's controller registers a reported checkpoint when it polls the workers
            # (every 2 s): a worker dying sooner after `report` loses that checkpoint
            time.sleep(5)
            os._exit(1)

    cfg = tiny_cfg(
        manifest,
        tmp_path,
        "train.num_workers=2",
        "train.zero_stage=2",
        "train.max_failures=1",
        "train.checkpoint_every=1",
        "train.curriculum.difficulty=similarity_margin",  # rescored from embeddings gathered over both ranks
    )
    first = run_train(cfg, on_step=kill_rank1_in_epoch2)
    assert os.path.exists(marker)
    m = first["metrics"]
    assert m["epoch"] == 2 and m["start_epoch"] == 1 and m["start_step"] >= 1  # restarted from the checkpoint
    assert placement_groups() - before == set()
    cfg = cfg.override({"train.epochs": 3})
    second = run_train(cfg, resume=True)
    assert second["run_name"] == first["run_name"]
    assert second["metrics"]["start_step"] == m["step"] and second["metrics"]["start_epoch"] == 2
    assert second["metrics"]["epoch"] == 3 and second["metrics"]["step"] > m["step"]
    assert placement_groups() - before == set()
    assert segments() - segments_before == set()


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_group_that_failed_to_start_leaves_no_placement_group(ray_session, placement_groups, manifest, tmp_path):
    """A worker group whose start fails after it was built (as when a worker dies during the
    backend setup): Ray Train 2.60 retries with a new group and leaves the failed one's placement
    group reserved (`WorkerGroup._start` cleans up only a group not yet built). The fit completes,
    that group is gone afterwards, and a following fit gets its CPUs."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    from urbancross.train import run_train

    class FailFirstStart(WorkerGroupCallback):
        failed = False

        def after_worker_group_start(self, worker_group):
            if not self.failed:
                self.failed = True
                raise WorkerGroupStartupFailedError("simulated: a worker died while the group started")

    before = placement_groups()
    cfg = tiny_cfg(manifest, tmp_path, "train.num_workers=1", "train.cpus_per_worker=0.75", "train.epochs=1")
    first = run_train(cfg, callbacks=[FailFirstStart()])
    assert first["metrics"]["epoch"] == 1
    assert placement_groups() - before == set()  # left alone, the failed group keeps 0.75 CPUs reserved
    # 1.5 of the 2 CPUs: what a group left over from the first fit would have starved
    second = run_train(cfg.override({"out_dir": str(tmp_path / "next"), "train.cpus_per_worker": 1.5}))
    assert second["metrics"]["epoch"] == 1


@pytest.mark.ray
@pytest.mark.heavy
def test_two_workers_same_config_same_numbers(ray_session, manifest, tmp_path):
    """Two real 2-worker TorchTrainer runs of one config: identical per-epoch losses and final mR
    (row-to-rank dealing, shuffles and augmentation do not depend on Ray's timing)."""
    from urbancross.train import run_train

    runs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(manifest, tmp_path / name, "train.num_workers=2", "train.curriculum.difficulty=similarity_margin")
        runs.append((cfg, run_train(cfg)))
    (ca, a), (cb, b) = runs
    assert _loss_history(ca, a) == _loss_history(cb, b) and len(_loss_history(ca, a)) == 2
    assert a["metrics"]["val_mR"] == b["metrics"]["val_mR"] and a["metrics"]["samples"] == b["metrics"]["samples"]


def test_held_out_slice_is_seeded_and_disjoint(manifest, tmp_path):
    from urbancross.data.ingest import read_split
    from urbancross.train.trainer import held_out, validation_slice

    cfg = tiny_cfg(manifest, tmp_path)
    table = read_split(cfg, "train", "Finland")
    rest, val = held_out(table, 3, seed=0)
    ids = lambda t: set(t.column("image_id").to_pylist())  # noqa: E731
    assert (rest.num_rows, val.num_rows) == (6, 3) and not ids(rest) & ids(val)
    assert ids(held_out(table, 3, seed=0)[1]) == ids(val) != ids(held_out(table, 3, seed=1)[1])
    train, val = validation_slice(cfg, table, "Finland")  # no val split: 9 // 5 = 1 image held out
    assert (train.num_rows, val.num_rows) == (8, 1)


def test_a_test_image_in_training_data_is_refused(manifest, tmp_path):
    from urbancross.data.ingest import read_split
    from urbancross.data.manifest import ManifestError
    from urbancross.train.trainer import check_disjoint

    cfg = tiny_cfg(manifest, tmp_path)
    check_disjoint(cfg, read_split(cfg, "train", None))
    with pytest.raises(ManifestError, match="1 test image"):
        check_disjoint(cfg, read_split(cfg, "test", "Spain").slice(0, 1))


def test_redirected_output_gets_no_progress_bars(monkeypatch):
    import io

    from urbancross.cli import quiet_when_redirected

    for key in ("RAY_DATA_DISABLE_PROGRESS_BARS", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TQDM_DISABLE"):
        monkeypatch.delenv(key, raising=False)
    tty = io.StringIO()
    tty.isatty = lambda: True
    assert not quiet_when_redirected(tty) and "TQDM_DISABLE" not in os.environ
    assert quiet_when_redirected(io.StringIO())
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_progress_is_a_line_every_few_seconds_with_rate_and_eta(caplog, monkeypatch):
    import logging
    import types

    from urbancross.train import loop

    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    cfg = load_config(None, ["train.progress_seconds=10"])
    clock = loop.StepClock(types.SimpleNamespace(rank=0, world=2), cfg, "train", 0, 3, rows=160)
    with caplog.at_level(logging.INFO, logger="urbancross.train.loop"):
        for _ in range(10):  # 10 steps of 8 rows per rank, 4 s each
            for phase in ("data", "forward", "backward"):
                now[0] += 1.0
                clock.mark(phase)
            now[0] += 1.0
            clock.stepped(8)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # at most one line per 10 s: after steps 3, 6, 9 (12, 24, 36 s)
    assert lines[1] == "train epoch 1/3: 96/160 rows, 4.0 rows/s, epoch ETA 16s"
    assert clock.metrics() == {"steps": 10, "ms_data": 1000.0, "ms_forward": 1000.0, "ms_backward": 1000.0, "ms_step": 1000.0}
