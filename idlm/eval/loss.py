"""Held-out losses of a model on a dataset split (`idlm eval loss`).

clean: next-token cross-entropy of the plain causal model (the AR loss; for an I-DLM its x0 half);
noisy: the I-DLM L_noisy of SPEC §3.3 at a given stride (models with a MASK token only).
Both are averaged over the same fixed windows, so numbers of different models are comparable.
"""

from __future__ import annotations

import torch

from idlm.training.objectives import ar_loss, idlm_loss


@torch.no_grad()
def heldout_loss(model, data_dir: str, split: str = "heldout", seq_len: int = 512, max_windows: int = 256,
                 batch_size: int = 8, stride: int | None = None) -> dict:
    from idlm.data.shards import TokenDataset

    ds = TokenDataset(data_dir, split, seq_len)
    n = min(max_windows, ds.num_windows)
    clean = noisy = 0.0
    targets = 0
    for start in range(0, n, batch_size):
        items = [ds.window(i) for i in range(start, min(n, start + batch_size))]
        tokens = torch.stack([t for t, _ in items]).to(model.device)
        lossmask = torch.stack([m for _, m in items]).to(model.device)
        out = ar_loss(model, tokens, lossmask)
        k = int(out["targets"])
        clean += float(out["loss"]) * k
        if stride is not None:
            out = idlm_loss(model, tokens, lossmask, stride - 1, model.config.mask_token_id, 0.0)
            noisy += float(out["l_noisy"]) * k
        targets += k
    res = {"clean_loss": clean / max(targets, 1), "windows": n, "targets": targets, "seq_len": seq_len}
    if stride is not None:
        res.update(noisy_loss=noisy / max(targets, 1), stride=stride)
    return res
