"""CMPAGL: Gswin image encoder + BERT text encoder, pre-aligned, then fused and matched (ALBEF-style).

1. Unimodal encoders: `GswinEncoder` (multi-scale pooled feature + last-stage tokens) and a
   `BertModel` ([CLS] state + token states).
2. Pre-alignment: both are projected to one `embed_dim` space and L2-normalised (`image`,
   `text`); an image-text contrastive loss (InfoNCE, `loss.pre_align_loss`) aligns them
   *before* fusion, and the same similarities rank the whole gallery at retrieval time.
   No momentum queue or momentum distillation (ALBEF has both): on CPU with small batches a
   second, momentum copy of both encoders would double the memory for a queue we cannot fill.
3. Fusion encoder: BERT-style post-norm layers over the text tokens, each with self-attention,
   cross-attention to the image tokens (a global mean token + the last Gswin stage) and an MLP.
4. Image-text matching (ITM) head on the fused [CLS]: trained on the positive pair and, per
   sample, the hardest negative text of its image and the hardest negative image of its text,
   mined from the pre-aligned similarities (`loss.hardest_negatives`); at retrieval time it
   re-scores each query's top-k candidates (`evaluate.rerank`).

The model has the UrbanCross model's surface (`encode_image`, `encode_text`,
`forward(images, tokens, segments=None, segment_mask=None)` returning `image, text, fused,
logit_scale, ...`), so `loss.retrieval_loss` and the evaluation code read its output
unchanged; `fused` is the pre-aligned image embedding (CMPAGL does not use SAM segments).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from urbancross.loss import hardest_negatives
from urbancross.model.gswin import GSWIN_T, GSWIN_TINY, GswinConfig, GswinEncoder, load_swin
from urbancross.model.model import MAX_LOGIT_SCALE
from urbancross.model.text_bert import (
    CONTEXT_LENGTH,
    TEXT_TINY,
    BertTextTokenizer,
    TextEncoder,
    read_vocab,
    text_config,
)

INIT_TEMPERATURE = 0.07  # CLIP's and ALBEF's


@dataclass(frozen=True)
class CMPAGLConfig:
    """Shapes of a CMPAGL model. `text` holds `BertConfig` fields for a random-init text encoder."""

    image: GswinConfig = GSWIN_TINY
    text: dict = field(default_factory=lambda: dict(TEXT_TINY))
    text_layers: int | None = None  # keep only the first BERT layers (when loading a BERT with more)
    embed_dim: int = 128  # the shared, pre-aligned space
    fusion_layers: int = 2
    fusion_heads: int = 4
    context_length: int = CONTEXT_LENGTH


SIZES = {
    "tiny": CMPAGLConfig(),
    # Swin-T + BERT-base split as in ALBEF: 6 text layers, then 6 fusion layers (initialised from
    # BERT's layers 6-11 when a BERT directory is given)
    "base": CMPAGLConfig(image=GSWIN_T, text={}, text_layers=6, embed_dim=256, fusion_layers=6, fusion_heads=12),
}


class FusionLayer(nn.Module):
    """A BERT layer with cross-attention (post-norm): text self-attention, text -> image attention, MLP."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_self = nn.LayerNorm(width, eps=1e-12)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm_mlp = nn.LayerNorm(width, eps=1e-12)

    def forward(self, text: torch.Tensor, padding: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`text` [B,L,W], `padding` [B,L] True = pad, `image` [B,N,W] -> [B,L,W]."""
        x = self.norm_self(text + self.self_attn(text, text, text, key_padding_mask=padding, need_weights=False)[0])
        x = self.norm_cross(x + self.cross_attn(x, image, image, need_weights=False)[0])
        return self.norm_mlp(x + self.mlp(x))


class CMPAGLModel(nn.Module):
    """See the module docstring. `tokenizer` (not a module) turns captions into the ids `encode_text` takes."""

    def __init__(self, cfg: CMPAGLConfig, image_encoder: GswinEncoder, text_encoder: TextEncoder,
                 tokenizer: BertTextTokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed_dim = cfg.embed_dim
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        width = text_encoder.width
        self.image_proj = nn.Linear(image_encoder.pooled_width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.image_to_fusion = nn.Identity() if image_encoder.width == width else nn.Linear(image_encoder.width, width)
        hidden = text_encoder.bert.config.intermediate_size  # as BERT's, so BERT layers can initialise them
        self.fusion = nn.ModuleList(FusionLayer(width, cfg.fusion_heads, hidden) for _ in range(cfg.fusion_layers))
        self.itm_head = nn.Linear(width, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))

    # ------------------------------------------------------------------ unimodal

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,H,W] -> (pre-aligned embedding [B,D], L2-normalised; tokens for fusion [B,1+N,W])."""
        out = self.image_encoder(images)
        tokens = torch.cat([out.tokens.mean(dim=1, keepdim=True), out.tokens], dim=1)
        return F.normalize(self.image_proj(out.pooled), dim=-1), self.image_to_fusion(tokens)

    def text_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,L] ids -> (pre-aligned embedding [B,D], token states [B,L',W], mask [B,L'] True = real)."""
        states, mask = self.text_encoder(tokens)
        return F.normalize(self.text_proj(states[:, 0]), dim=-1), states, mask

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,D], L2-normalised: what the gallery is ranked by."""
        return self.image_features(images)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B,L] token ids -> [B,D], L2-normalised."""
        return self.text_features(tokens)[0]

    # ------------------------------------------------------------------ fusion + matching

    def itm_logits(self, image_tokens: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Row-aligned pairs (image_tokens[b], text b) -> [B,2] logits (index 1 = match)."""
        x = states
        for layer in self.fusion:
            x = layer(x, ~mask, image_tokens)
        return self.itm_head(x[:, 0])

    def match_score(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """P(match) [B] for row-aligned pairs: cached `image_features(...)[1]` rows and caption ids."""
        _, states, mask = self.text_features(tokens)
        return self.itm_logits(image_tokens, states, mask).softmax(dim=-1)[:, 1]

    def pair_scorer(self, image_tokens: torch.Tensor, tokens: torch.Tensor):
        """For `evaluate.rerank`: gallery image tokens [I,1+N,W] and caption ids [T,L] -> a function
        mapping (image, text) index pairs [P,2] to P(match) [P], without gradients."""

        @torch.no_grad()
        def score(pairs: torch.Tensor) -> torch.Tensor:
            return self.match_score(image_tokens[pairs[:, 0]], tokens[pairs[:, 1]])

        return score

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        segments: torch.Tensor | None = None,
        segment_mask: torch.Tensor | None = None,
        *,
        itm: bool = True,
        same: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """-> `image, text, fused, pre_image, pre_text, logit_scale, segments, segment_mask`
        (+ `itm_logits` [B,3,2]: per sample, its positive pair, (image b, hardest negative text),
        (hardest negative image, text b), or [1,1,2] for a batch of one; `itm_negatives`: (text index per image, image index per text)).

        `fused`/`pre_*` are the pre-aligned embeddings themselves, so `retrieval_loss` with
        kind=triplet gives triplet + intra-class on them plus the pre-alignment InfoNCE.
        `segments` are accepted for the common surface and ignored. `same` [B,B] bool marks
        pairs that must not be mined as negatives (e.g. two captions of one image); default
        the diagonal. `itm=False` skips the fusion encoder (unimodal evaluation).
        """
        image, image_tokens = self.image_features(images)
        text, states, mask = self.text_features(tokens)
        out = {
            "image": image,
            "text": text,
            "fused": image,
            "pre_image": image,
            "pre_text": text,
            "segments": None,
            "segment_mask": None,
            "logit_scale": self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
        }
        if itm and image.shape[0] < 2:  # nothing to mine (an epoch's last batch of one): the positive pair only
            out["itm_logits"] = self.itm_logits(image_tokens, states, mask).unsqueeze(1)
            out["itm_negatives"] = None
        elif itm:
            text_of_image, image_of_text = hardest_negatives((image @ text.T).detach(), same)
            logits = self.itm_logits(
                torch.cat([image_tokens, image_tokens, image_tokens[image_of_text]]),
                torch.cat([states, states[text_of_image], states]),
                torch.cat([mask, mask[text_of_image], mask]),
            )
            out["itm_logits"] = logits.reshape(3, -1, 2).transpose(0, 1)
            out["itm_negatives"] = (text_of_image, image_of_text)
        return out


# ---------------------------------------------------------------------- build, save, load


def init_fusion_from_bert(fusion: nn.ModuleList, bert_state: dict[str, torch.Tensor], first_layer: int) -> list[str]:
    """ALBEF's initialisation: fusion layer i takes BERT layer `first_layer + i`'s self-attention,
    MLP and norms (the cross-attention is new and stays random). Returns the BERT keys used."""
    used = []
    for i, layer in enumerate(fusion):
        p = f"encoder.layer.{first_layer + i}."
        if p + "attention.self.query.weight" not in bert_state:
            raise ValueError(f"bert checkpoint has no layer {first_layer + i} to initialise fusion layer {i}")
        mapping = {  # FusionLayer parameter -> BERT tensor(s)
            "self_attn.in_proj_weight": [p + f"attention.self.{n}.weight" for n in ("query", "key", "value")],
            "self_attn.in_proj_bias": [p + f"attention.self.{n}.bias" for n in ("query", "key", "value")],
            "self_attn.out_proj.weight": [p + "attention.output.dense.weight"],
            "self_attn.out_proj.bias": [p + "attention.output.dense.bias"],
            "norm_self.weight": [p + "attention.output.LayerNorm.weight"],
            "norm_self.bias": [p + "attention.output.LayerNorm.bias"],
            "mlp.0.weight": [p + "intermediate.dense.weight"],
            "mlp.0.bias": [p + "intermediate.dense.bias"],
            "mlp.2.weight": [p + "output.dense.weight"],
            "mlp.2.bias": [p + "output.dense.bias"],
            "norm_mlp.weight": [p + "output.LayerNorm.weight"],
            "norm_mlp.bias": [p + "output.LayerNorm.bias"],
        }
        own = dict(layer.named_parameters())
        with torch.no_grad():
            for name, keys in mapping.items():
                own[name].copy_(torch.cat([bert_state[k] for k in keys]))
        used += [k for keys in mapping.values() for k in keys]
    return used


def _assemble(cfg: CMPAGLConfig, bert: BertConfig, tokenizer: BertTextTokenizer) -> CMPAGLModel:
    return CMPAGLModel(cfg, GswinEncoder(cfg.image), TextEncoder(bert), tokenizer)


def build_cmpagl(
    size: str | CMPAGLConfig = "tiny",
    *,
    swin_dir: str | os.PathLike | None = None,
    bert_dir: str | os.PathLike | None = None,
    global_local: bool | None = None,
) -> CMPAGLModel:
    """A CMPAGL model: `size` "tiny" (CPU, 64 px, shipped vocabulary) or "base" (Swin-T + BERT-base), or a config.

    `swin_dir`: a local Swin checkpoint directory, loaded into the Gswin's Swin parts where
    shapes agree (`gswin.load_swin`). `bert_dir`: a local BERT directory; the text encoder keeps
    its first `text_layers` layers, the fusion layers start from the next ones, and the tokenizer
    is the directory's. Without them everything is randomly initialised; nothing is downloaded.
    `global_local=False` builds the plain-Swin ablation.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"cmpagl size: unknown size {size!r}; choose one of: {', '.join(SIZES)}")
        cfg = SIZES[size]
    else:
        cfg = size
    if global_local is not None:
        cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, global_local=global_local))
    if bert_dir:
        tokenizer = BertTextTokenizer.from_dir(bert_dir, cfg.context_length)
        text = TextEncoder.from_pretrained(bert_dir)
        bert_state = text.bert.state_dict()
        n = cfg.text_layers or text.bert.config.num_hidden_layers
        text.keep_layers(n)
        model = CMPAGLModel(cfg, GswinEncoder(cfg.image), text, tokenizer)
        if cfg.fusion_layers:
            init_fusion_from_bert(model.fusion, bert_state, n)
    else:
        tokenizer = BertTextTokenizer(read_vocab(), cfg.context_length)
        fields = dict(cfg.text)
        if cfg.text_layers is not None:
            fields["num_hidden_layers"] = cfg.text_layers
        model = _assemble(cfg, text_config(len(tokenizer.vocab), **fields), tokenizer)
    if swin_dir:
        load_swin(model.image_encoder, swin_dir)
    return model


def save_cmpagl(model: CMPAGLModel, path: str | os.PathLike) -> None:
    """Write config, vocabulary and weights as plain data (atomically); `load_cmpagl` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "family": "cmpagl",
        "config": dataclasses.asdict(model.cfg),
        "bert_config": model.text_encoder.bert.config.to_dict(),
        "vocab": model.tokenizer.vocab,
        "lowercase": model.tokenizer.lowercase,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_cmpagl(path: str | os.PathLike) -> CMPAGLModel:
    """The model `save_cmpagl` wrote (`torch.load(weights_only=True)`: no code is unpickled)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("family") != "cmpagl":
        raise ValueError(f"{path}: not a CMPAGL model file (no 'family': 'cmpagl')")
    raw = dict(payload["config"])
    image = raw.pop("image")
    image = GswinConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in image.items()})
    cfg = CMPAGLConfig(image=image, **raw)
    tokenizer = BertTextTokenizer(payload["vocab"], cfg.context_length, payload["lowercase"])
    model = _assemble(cfg, BertConfig.from_dict(payload["bert_config"]), tokenizer)
    model.load_state_dict(payload["state_dict"])
    return model
