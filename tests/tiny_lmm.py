"""Test scaffolding: a random InstructBLIP saved as a local model folder (also used by
`bench/preprocess_bench.py`). Not part of the package: nothing in production builds it."""

from __future__ import annotations

import os

import torch

# InstructBLIP-Vicuna-7B's layer layout (EVA ViT-g 39 layers at 224 px / patch 14, a 12-layer
# Q-Former with 32 queries, a 32-layer LLaMA) at 1/16 of its widths, heads kept where they divide.
REAL_LAYOUT = {
    "vision": {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 39, "num_attention_heads": 16,
               "image_size": 224, "patch_size": 14},
    "qformer": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 12, "num_attention_heads": 12,
                "cross_attention_frequency": 2, "max_position_embeddings": 512},
    "text": {"kind": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 32, "num_attention_heads": 32},
    "queries": 32,
}
TINY_LAYOUT = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8},
    "qformer": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "max_position_embeddings": 256},
    "text": {"kind": "opt", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "queries": 4,
}


def save_tiny_instructblip(path: str | os.PathLike, corpus: list[str], seed: int = 0, layout: dict = TINY_LAYOUT) -> str:
    """Save a random InstructBLIP of `layout` (OPT or LLaMA text model) with an offline word-level tokenizer.

    No weights can be downloaded, and the stage must still run the real `AutoProcessor` /
    `AutoModelForImageTextToText.from_pretrained(dir)` path.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    def tokenizer() -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>", "<s>"]))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", bos_token="<s>"
        )

    vision, qformer, text, queries = layout["vision"], layout["qformer"], dict(layout["text"]), layout["queries"]
    side = vision["image_size"]
    text_tok = tokenizer()
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": side, "width": side}),
        tokenizer=text_tok,
        qformer_tokenizer=tokenizer(),
        num_query_tokens=queries,
    )
    vocab = len(processor.tokenizer)
    ids = {"pad_token_id": text_tok.pad_token_id, "bos_token_id": text_tok.bos_token_id, "eos_token_id": text_tok.eos_token_id}
    kind, width, ffn = text.pop("kind"), text["hidden_size"], text.pop("intermediate_size")
    if kind == "opt":
        text_config = OPTConfig(vocab_size=vocab, ffn_dim=ffn, max_position_embeddings=512, word_embed_proj_dim=width, **text, **ids)
    else:
        text_config = LlamaConfig(vocab_size=vocab, intermediate_size=ffn, max_position_embeddings=2048, **text, **ids)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**vision).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(processor.qformer_tokenizer), encoder_hidden_size=vision["hidden_size"], **qformer
        ).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=queries,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    processor.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return str(path)
