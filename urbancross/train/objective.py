"""What the DeepSpeed engine runs: model + loss in one module (stage 1).

Every forward that touches parameters goes through the engine's module, so ZeRO-3 (which
gathers parameters in module hooks) and the collectives stay in step on all ranks.
"""

from __future__ import annotations

from torch import nn

from urbancross.loss import cmpagl_loss, retrieval_loss
from urbancross.model.embed import embed_batch


def vectorize_scalars(module: nn.Module) -> list[str]:
    """Turn 0-dim parameters (CLIP's `logit_scale`) into shape [1]; returns their names.

    DeepSpeed 0.19's initial parameter broadcast does `p.data.view(torch.uint8)`, which fails
    on 0-dim tensors. Shape [1] broadcasts the same way in every use; `scalar_state` undoes it.
    """
    names = []
    for mod_name, mod in module.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(mod, name, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
                names.append(f"{mod_name}.{name}" if mod_name else name)
    return names


def restore_scalars(module: nn.Module, names: list[str]) -> nn.Module:
    """Inverse of `vectorize_scalars` (in place), so the state dict matches a fresh model."""
    for full in names:
        mod_name, _, name = full.rpartition(".")
        mod = module.get_submodule(mod_name) if mod_name else module
        p = getattr(mod, name)
        setattr(mod, name, nn.Parameter(p.detach().reshape(()).clone(), requires_grad=p.requires_grad))
    return module


class RetrievalObjective(nn.Module):
    """forward(batch) -> (loss, parts); forward(batch, embed=True) -> `embed_batch`."""

    def __init__(self, model: nn.Module, loss_cfg):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg

    def forward(self, batch: dict, embed: bool = False):
        if embed:
            return embed_batch(self.model, batch)
        out = self.model(batch["images"], batch["tokens"], batch.get("segments"), batch.get("segment_mask"),
            **({"segment_pixels": batch["segment_pixels"]} if "segment_pixels" in batch else {}))
        if "itm_logits" in out:  # CMPAGL: + the matching head on hard negatives mined from the pre-aligned similarities
            return cmpagl_loss(out, self.loss_cfg, labels=batch.get("label"), itm_weight=self.loss_cfg.itm_weight)
        return retrieval_loss(out, self.loss_cfg, labels=batch.get("label"))
