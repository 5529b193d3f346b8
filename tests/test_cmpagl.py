"""CMPAGL family: Gswin (and its Swin checkpoint layout), BERT text side + tokenizer, ITM mining and
loss, the rerank stages, training steps, determinism, save/load. All on tiny shapes, CPU, no downloads."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizer, SwinConfig, SwinModel

from urbancross.config import LossConfig, SMRConfig, SynthConfig
from urbancross.data import synth
from urbancross.evaluate.rerank import STAGES, candidate_pairs, itm_matrix, rerank_stages, stage_metrics
from urbancross.evaluate.smr import smr_rerank
from urbancross.loss import cmpagl_loss, hardest_negatives, itm_hard_negative
from urbancross.model import build_cmpagl, load_cmpagl, save_cmpagl
from urbancross.model.cmpagl import CMPAGLConfig
from urbancross.model.gswin import GSWIN_T, GSWIN_TINY, GlobalLocalCrossAttention, GswinConfig, GswinEncoder, load_swin
from urbancross.model.text_bert import BertTextTokenizer, build_vocab, read_vocab, split_words

SMALL_SWIN = GswinConfig(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
LOSS = LossConfig(kind="triplet")


def zero_gates(enc: GswinEncoder) -> None:
    for m in enc.modules():
        if isinstance(m, GlobalLocalCrossAttention):
            m.gate.data.zero_()


def random_swin(cfg: GswinConfig, seed: int = 0) -> SwinModel:
    """A SwinModel with every parameter random (its init leaves the position-bias tables at 0)."""
    torch.manual_seed(seed)
    model = SwinModel(cfg.swin_config(), add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a loaded 2-CPU machine two OpenMP threads
    spin-wait for each other (measured: 1-4 s of CPU per training step instead of 0.1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench():
    """8 benchmark tiles (64 px, normalised) and one caption each, with their scene domain as a label."""
    rows = synth.domain_rows(SynthConfig(images_per_domain=4), "Finland") + synth.domain_rows(
        SynthConfig(images_per_domain=4), "Spain")
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.float32))
                          for r in rows]).permute(0, 3, 1, 2) / 127.5 - 1
    return images, [r["captions"][0] for r in rows], torch.tensor([r["domain"] == "Spain" for r in rows]).long()


# ---------------------------------------------------------------------- Gswin


def test_gswin_tiny_multiscale_shapes():
    out = GswinEncoder(GSWIN_TINY)(torch.randn(2, 3, 64, 64))
    assert out.tokens.shape == (2, 16, 128)
    assert [tuple(s.shape) for s in out.stages] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    assert out.pooled.shape == (2, 32 + 64 + 128)


def test_gswin_with_closed_gates_is_exactly_swin_and_open_gates_differ():
    torch.manual_seed(0)
    enc = GswinEncoder(SMALL_SWIN).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        open_ = enc(x).tokens
        zero_gates(enc)
        closed = enc(x).tokens
        ref = enc.swin(x).last_hidden_state
    torch.testing.assert_close(closed, ref, rtol=0, atol=0)
    assert (open_ - ref).abs().max() > 1e-3
    plain = GswinEncoder(dataclasses.replace(SMALL_SWIN, global_local=False)).eval()
    plain.swin.load_state_dict(enc.swin.state_dict())
    assert plain.global_local is None
    torch.testing.assert_close(plain(x).tokens, ref)  # same maths; kernels may round differently


def test_swin_checkpoint_directory_loads_every_swin_key(tmp_path):
    src = random_swin(SMALL_SWIN)
    src.save_pretrained(tmp_path)
    torch.manual_seed(1)
    enc = GswinEncoder(SMALL_SWIN).eval()
    report = load_swin(enc, tmp_path)
    assert report.missing == report.unexpected == report.shape_mismatch == []
    assert set(report.loaded) == set(enc.swin.state_dict()) == set(src.state_dict())
    for k, v in src.state_dict().items():
        torch.testing.assert_close(enc.swin.state_dict()[k], v, rtol=0, atol=0)
    # Gswin-only: per block the cross-attention to the global window, per earlier stage a norm
    assert {k.split(".")[0] for k in report.gswin_only} == {"global_local", "stage_norms"}
    assert len([k for k in report.gswin_only if k.endswith(".gate")]) == sum(SMALL_SWIN.depths)
    zero_gates(enc)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).tokens, src(x).last_hidden_state)
    # the state-dict route, with a classifier's "swin." prefix
    enc2 = GswinEncoder(SMALL_SWIN)
    assert load_swin(enc2, {f"swin.{k}": v for k, v in src.state_dict().items()}).missing == []
    torch.testing.assert_close(enc2.swin.state_dict(), enc.swin.state_dict())


def test_swin_checkpoint_in_the_older_key_layout_loads(tmp_path):
    """Released Swin checkpoints (SwinForImageClassification) use `attention.self.query`-style names."""
    src = random_swin(SMALL_SWIN, seed=2)
    old = {}
    renames = [("attention.q_proj", "attention.self.query"), ("attention.k_proj", "attention.self.key"),
               ("attention.v_proj", "attention.self.value"), ("attention.o_proj", "attention.output.dense"),
               ("attention.relative_position_bias.relative_position_bias_table",
                "attention.self.relative_position_bias_table"),
               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
    for k, v in src.state_dict().items():
        for new, legacy in renames:
            k = k.replace(new, legacy)
        old["swin." + k] = v.contiguous()
    assert any("attention.self.query" in k for k in old)
    old["classifier.weight"] = torch.zeros(3, 32)
    cfg = src.config
    cfg.architectures = ["SwinForImageClassification"]
    cfg.save_pretrained(tmp_path)
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    enc = GswinEncoder(SMALL_SWIN)
    report = load_swin(enc, tmp_path)
    assert report.missing == [] and report.shape_mismatch == []
    torch.testing.assert_close(enc.swin.state_dict(), src.state_dict())


def test_swin_checkpoint_with_other_shapes_keeps_those_keys_random(tmp_path):
    src = random_swin(dataclasses.replace(SMALL_SWIN, embed_dim=24, num_heads=(2, 4)))
    src.save_pretrained(tmp_path)
    enc = GswinEncoder(SMALL_SWIN)
    before = {k: v.clone() for k, v in enc.swin.state_dict().items()}
    report = load_swin(enc, tmp_path)
    assert report.shape_mismatch and report.loaded and not report.missing
    assert "embeddings.patch_embeddings.projection.weight" in report.shape_mismatch
    after = enc.swin.state_dict()
    for k in report.shape_mismatch:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    for k in report.loaded:  # only shape-free tensors, e.g. the relative position-bias tables
        torch.testing.assert_close(after[k], src.state_dict()[k], rtol=0, atol=0)


def test_swin_t_sized_config_has_swin_t_layout():
    enc = GswinEncoder(GSWIN_T)
    ref = SwinModel(SwinConfig(), add_pooling_layer=False)  # SwinConfig's defaults are Swin-T
    assert {k: v.shape for k, v in enc.swin.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# ---------------------------------------------------------------------- tokenizer + text encoder


def test_tokenizer_round_trips_benchmark_captions_without_unk():
    tok = BertTextTokenizer.tiny()
    vocab = set(tok.vocab)
    captions = [c for d in synth.STYLES for r in synth.domain_rows(SynthConfig(images_per_domain=12, seed=5), d)
                for c in r["captions"]]
    ids = tok(captions)
    assert ids.shape == (len(captions), 64)
    assert not (ids == tok.unk_id).any()
    assert (ids[:, 0] == tok.vocab.index("[CLS]")).all()
    for caption, row in zip(captions, ids):
        words = split_words(caption)
        assert all(w in vocab for w in words)  # every benchmark word is one whole token
        assert int((row != 0).sum()) == len(words) + 2
        assert split_words(tok.decode(row)) == words
    pieces = tok._tok.convert_ids_to_tokens(tok("zyxq")[0, 1:6].tolist())
    assert pieces == ["z", "##y", "##x", "##q", "[SEP]"]  # unknown words fall back to characters


def test_shipped_vocabulary_is_up_to_date():
    assert read_vocab() == build_vocab(), "run: python -m urbancross.model.text_bert"
    assert read_vocab()[0] == "[PAD]" and len(read_vocab()) < 1000


def test_text_embedding_ignores_padding_and_batch_company():
    torch.manual_seed(0)
    model = build_cmpagl("tiny").eval()
    short, long = "a lake.", "three houses north of a river, two trees south of it, and a large field."
    with torch.no_grad():
        alone = model.encode_text(model.tokenizer([short]))
        together = model.encode_text(model.tokenizer([short, long]))
    torch.testing.assert_close(alone[0], together[0], rtol=1e-5, atol=1e-5)


def test_bert_directory_gives_text_encoder_fusion_init_and_tokenizer(tmp_path):
    vocab = read_vocab()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)
    bert.save_pretrained(tmp_path)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path)
    cfg = CMPAGLConfig(text={}, text_layers=2, embed_dim=32, fusion_layers=2, fusion_heads=2)
    model = build_cmpagl(cfg, bert_dir=tmp_path)
    src = bert.state_dict()
    text = model.text_encoder.bert.state_dict()
    assert len(model.text_encoder.bert.encoder.layer) == 2
    for k, v in text.items():
        torch.testing.assert_close(v, src[k], rtol=0, atol=0)
    layer = dict(model.fusion[1].named_parameters())  # fusion layer 1 <- BERT layer 3
    qkv = torch.cat([src[f"encoder.layer.3.attention.self.{n}.weight"] for n in ("query", "key", "value")])
    torch.testing.assert_close(layer["self_attn.in_proj_weight"], qkv, rtol=0, atol=0)
    torch.testing.assert_close(layer["mlp.2.weight"], src["encoder.layer.3.output.dense.weight"], rtol=0, atol=0)
    assert model.tokenizer.vocab == vocab
    assert isinstance(model.image_to_fusion, torch.nn.Linear)  # Gswin 128 -> BERT 32


# ---------------------------------------------------------------------- ITM: mining, loss, assembly


def test_hardest_negatives_picks_the_most_similar_non_matching_pair():
    sim = torch.tensor([[0.9, 0.5, 0.7], [0.2, 0.8, 0.1], [0.6, 0.95, 0.3]])
    text_of_image, image_of_text = hardest_negatives(sim)
    assert text_of_image.tolist() == [2, 0, 1]
    assert image_of_text.tolist() == [2, 2, 0]
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[0, 2] = same[2, 0] = True  # e.g. two captions of one image: not negatives of each other
    text_of_image, image_of_text = hardest_negatives(sim, same)
    assert text_of_image.tolist() == [1, 0, 1]
    assert image_of_text.tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="needs a negative"):
        hardest_negatives(torch.ones(1, 1))


def test_itm_loss_values():
    logits = torch.zeros(2, 3, 2)
    torch.testing.assert_close(itm_hard_negative(logits), torch.tensor(np.log(2.0), dtype=torch.float32))
    logits[0] = torch.tensor([[0.0, 3.0], [3.0, 0.0], [3.0, 0.0]])  # sample 0: all three right, confidently
    per0 = float(np.log1p(np.exp(-3.0)))
    torch.testing.assert_close(itm_hard_negative(logits, torch.tensor([1.0, 0.0])), torch.tensor(per0))
    expected = (per0 + np.log(2.0)) / 2
    torch.testing.assert_close(itm_hard_negative(logits), torch.tensor(expected, dtype=torch.float32))


def test_forward_shapes_and_itm_pairs_are_the_mined_ones(bench):
    images, captions, _ = bench
    torch.manual_seed(0)
    model = build_cmpagl("tiny").eval()
    tokens = model.tokenizer(captions)
    with torch.no_grad():
        out = model(images, tokens)
        image, image_tokens = model.image_features(images)
        _, states, mask = model.text_features(tokens)
    for key in ("image", "text", "fused"):
        assert out[key].shape == (8, 128)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(8))
    assert image_tokens.shape == (8, 17, 128) and out["itm_logits"].shape == (8, 3, 2)
    text_of_image, image_of_text = out["itm_negatives"]
    expected = hardest_negatives(out["image"] @ out["text"].T)
    assert text_of_image.tolist() == expected[0].tolist() and image_of_text.tolist() == expected[1].tolist()
    with torch.no_grad():
        pos = model.itm_logits(image_tokens, states, mask)
        neg_text = model.itm_logits(image_tokens, states[text_of_image], mask[text_of_image])
        neg_image = model.itm_logits(image_tokens[image_of_text], states, mask)
        score = model.pair_scorer(image_tokens, tokens)(torch.tensor([[0, 0], [3, 5]]))
    torch.testing.assert_close(out["itm_logits"], torch.stack([pos, neg_text, neg_image], dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score, torch.stack([pos[0].softmax(-1)[1], model.itm_logits(
        image_tokens[3:4], states[5:6], mask[5:6])[0].softmax(-1)[1]]), rtol=1e-5, atol=1e-5)
    assert "itm_logits" not in model(images, tokens, itm=False)


def test_loss_reaches_every_parameter(bench):
    images, captions, labels = bench
    torch.manual_seed(0)
    model = build_cmpagl("tiny")
    out = model(images, model.tokenizer(captions))
    total, parts = cmpagl_loss(out, LOSS, labels=labels)
    assert set(parts) == {"image_text", "intra_class", "pre_align", "itm"}
    total.backward()
    used = set(model.tokenizer(captions).unique().tolist())
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert dead == []
    emb = model.text_encoder.bert.embeddings.word_embeddings.weight.grad
    assert set(emb.abs().sum(1).nonzero().flatten().tolist()) <= used


# ---------------------------------------------------------------------- rerank


def test_candidate_pairs_are_both_directions_top_k():
    sim = torch.tensor([[0.5, 0.6, 0.0], [0.4, 0.3, 0.1], [0.0, 0.1, 0.9]])
    pairs = candidate_pairs(sim, k=2)
    # rows: 0->{1,0}, 1->{0,1}, 2->{2,1}; columns: 0->{0,1}, 1->{0,1}, 2->{2,1}
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]


def test_matching_head_rescoring_changes_the_ranking():
    sim = torch.tensor([[0.5, 0.6, 0.0], [0.4, 0.3, 0.1], [0.0, 0.1, 0.9]])
    owner = [0, 1, 2]  # caption t belongs to image t: images 0 and 1 rank the wrong caption first

    def oracle(pairs):  # a matching head that knows the truth
        return torch.where(pairs[:, 0] == pairs[:, 1], 0.9, 0.2)

    stages = rerank_stages(sim, oracle, k=2, smr=SMRConfig(enabled=False), sim_weight=0.1)
    assert set(stages) == set(STAGES)
    r = stages["itm"]
    torch.testing.assert_close(r[0, 0], torch.tensor(0.9 * 0.9 + 0.1 * 0.75))  # re-scored match
    torch.testing.assert_close(r[0, 1], torch.tensor(0.9 * 0.2 + 0.1 * 0.8))  # re-scored non-match
    torch.testing.assert_close(r[0, 2], torch.tensor(-0.5))  # not a candidate: (S - 1) / 2
    torch.testing.assert_close(r[2, 0], torch.tensor(-0.5))
    torch.testing.assert_close(stages["itm_smr"], smr_rerank(r, SMRConfig(enabled=True)))
    torch.testing.assert_close(stages["prealign_smr"], smr_rerank(sim, SMRConfig(enabled=True)))
    metrics = stage_metrics(stages, owner, ks=(1,))
    assert metrics["prealign"]["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["prealign"]["t2i_r1"] == pytest.approx(200 / 3)  # text 1 -> image 0 is wrong
    assert metrics["itm"]["i2t_r1"] == metrics["itm"]["t2i_r1"] == 100.0
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        rerank_stages(sim * 10, oracle, k=2, smr=SMRConfig())
    with pytest.raises(ValueError, match="probabilities"):
        itm_matrix(sim, torch.tensor([[0, 0]]), torch.tensor([2.0]))


# ---------------------------------------------------------------------- training, determinism, save/load


def train_steps(bench, steps: int, seed: int = 0) -> list[dict[str, float]]:
    """AdamW steps on one fixed batch; the contrastive pre-alignment weighted as the main term
    (with LossConfig's default 0.1 the hardest-negative triplet collapses every embedding to one
    point from a random init: triplet stuck at 2 * margin, intra-class -> 0)."""
    images, captions, _ = bench
    torch.manual_seed(seed)
    model = build_cmpagl("tiny")
    tokens = model.tokenizer(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    history = []
    for _ in range(steps):
        total, parts = cmpagl_loss(model(images, tokens), dataclasses.replace(LOSS, pre_align_weight=1.0))
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in parts.items()}})
    return history


def test_a_few_training_steps_reduce_the_loss_and_a_seed_repeats_them(bench):
    history = train_steps(bench, 10)
    first, last = history[0], history[-1]
    assert last["total"] < 0.85 * first["total"], history
    assert last["pre_align"] < 0.8 * first["pre_align"]
    assert train_steps(bench, 3) == history[:3]  # same seed, same numbers
    assert train_steps(bench, 1, seed=1)[0] != history[0]


def test_save_load_round_trip_is_weights_only(tmp_path, bench):
    images, captions, _ = bench
    torch.manual_seed(0)
    model = build_cmpagl("tiny", global_local=False).eval()
    assert model.image_encoder.global_local is None
    save_cmpagl(model, tmp_path / "m" / "model.pt")
    loaded = load_cmpagl(tmp_path / "m" / "model.pt").eval()
    assert loaded.cfg == model.cfg and loaded.tokenizer.vocab == model.tokenizer.vocab
    tokens = model.tokenizer(captions)
    with torch.no_grad():
        a, b = model(images, tokens), loaded(images, tokens)
    for key in ("image", "text", "itm_logits"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["model.pt"]  # no temp file left
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CMPAGL model"):
        load_cmpagl(tmp_path / "other.pt")
