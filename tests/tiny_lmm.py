"""Test scaffolding: a random tiny InstructBLIP saved as a local model folder (also used by
`bench/preprocess_bench.py`). Not part of the package: nothing in production builds it."""

from __future__ import annotations

import os

import torch


def save_tiny_instructblip(path: str | os.PathLike, corpus: list[str], seed: int = 0) -> str:
    """Save a random tiny InstructBLIP (OPT text model) with an offline word-level tokenizer.

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

    queries, width = 4, 32
    text_tok = tokenizer()
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=text_tok,
        qformer_tokenizer=tokenizer(),
        num_query_tokens=queries,
    )
    vocab = len(processor.tokenizer)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(processor.qformer_tokenizer), hidden_size=width, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=2 * width, max_position_embeddings=256,
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=vocab, hidden_size=width, num_hidden_layers=1, num_attention_heads=2, ffn_dim=2 * width,
            max_position_embeddings=512, word_embed_proj_dim=width, pad_token_id=text_tok.pad_token_id,
            bos_token_id=text_tok.bos_token_id, eos_token_id=text_tok.eos_token_id,
        ).to_dict(),
        num_query_tokens=queries,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    processor.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return str(path)
