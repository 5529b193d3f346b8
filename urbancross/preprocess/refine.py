"""LMM stage: rewrite each caption with the image in view (InstructBLIP in the paper).

Any model `AutoModelForImageTextToText` loads from a local folder works; the prompt comes
from config and may use the row's `{geo_tags}` and the `{caption}` being rewritten.
Small or off-domain models often emit empty, runaway or looping text, so every output is
checked and the original caption is kept when it fails. `passthrough` copies the captions
(for data whose captions need no refinement).
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from urbancross.config import Config, ConfigError, RefineConfig


def repeat_fraction(text: str) -> float:
    """Share of the words that repeat an earlier word (0 = all distinct; ->1 = one word looped)."""
    words = text.lower().split()
    return 0.0 if not words else 1.0 - len(set(words)) / len(words)


def check_caption(text: str, cfg: RefineConfig) -> str | None:
    """Why a generated caption is unusable, or None when it is fine."""
    text = text.strip()
    if len(text) < cfg.min_chars:
        return "empty" if not text else "too short"
    if len(text) > cfg.max_chars:
        return "too long"
    if repeat_fraction(text) > cfg.max_repeat_fraction:
        return "repeated tokens"
    return None


def format_prompt(template: str, caption: str, geo_tags) -> str:
    tags = ", ".join(str(t) for t in (geo_tags if geo_tags is not None else [])) or "none"
    return template.format(caption=caption, geo_tags=tags)


def choose_captions(originals: list[str], generated: list[str], cfg: RefineConfig) -> tuple[list[str], int]:
    """Generated captions where they pass the check, else the originals; and how many were kept."""
    out, kept = [], 0
    for orig, gen in zip(originals, generated, strict=True):
        if check_caption(gen, cfg) is None:
            out.append(gen.strip())
        else:
            out.append(orig)
            kept += 1
    return out, kept


class Passthrough:
    """`refine.kind: passthrough`: the refined captions are the captions."""

    needs_image = False

    def __init__(self, cfg: Config):
        self.cfg = cfg.preprocess.refine

    def process(self, images: list, rows: list[dict]) -> list[dict]:
        return [{"refined_captions": [str(c) for c in row["captions"]]} for row in rows]


class Refiner:
    """`refine.kind: lmm`: one generation per (image, caption) pair, batched over the rows."""

    needs_image = True

    def __init__(self, cfg: Config):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg.preprocess.refine
        if not self.cfg.model_dir or not os.path.isdir(self.cfg.model_dir):
            raise ConfigError(f"preprocess.refine.model_dir: no such folder {self.cfg.model_dir!r}")
        self.processor = AutoProcessor.from_pretrained(self.cfg.model_dir, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # decoder-only models generate after the prompt
        gpu = self.cfg.num_gpus > 0 and torch.cuda.is_available()
        bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and gpu)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(self.cfg.model_dir, local_files_only=True, dtype=self.dtype).eval()
        if gpu:
            self.model.to("cuda")

    def _prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return text

    @torch.no_grad()
    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        inputs = self.processor(images=images, text=[self._prompt(p) for p in prompts], return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device, dtype=self.dtype)  # dtype: floating inputs only (the pixels)
        ids = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        prompt_ids = inputs["input_ids"]
        if ids.shape[1] >= prompt_ids.shape[1] and torch.equal(ids[:, : prompt_ids.shape[1]], prompt_ids):
            ids = ids[:, prompt_ids.shape[1] :]  # decoder-only models echo the prompt
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def process(self, images: list[Image.Image], rows: list[dict]) -> list[dict]:
        pairs = [(img, str(c), row.get("geo_tags")) for img, row in zip(images, rows) for c in row["captions"]]
        generated = self.generate([p[0] for p in pairs], [format_prompt(self.cfg.prompt, c, t) for _, c, t in pairs])
        out, start = [], 0
        for row in rows:
            n = len(row["captions"])
            captions, _ = choose_captions([str(c) for c in row["captions"]], generated[start : start + n], self.cfg)
            out.append({"refined_captions": captions})
            start += n
        return out


def make_refiner(cfg: Config):
    return Passthrough(cfg) if cfg.preprocess.refine.kind == "passthrough" else Refiner(cfg)
