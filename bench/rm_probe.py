"""Where a reward model's information is: linear probes on a frozen checkpoint's features.

For each preference pair of PAIRS (rendered as `align --method reward` renders them, the same
hash split of `val_fraction` held out), compares on the held-out pairs: the model's own summed
answer log-probs (chosen > rejected), and an L2-regularized logistic regression on the
difference of chosen and rejected features, fit on the training pairs, for two features: the
final hidden state at the last real token (what a score head reads) and the mean over the row.

Usage: .venv/bin/python bench/rm_probe.py /work/demo-out/sft \
           recipes/data/pairs/continuation_shuffle.jsonl [--val-fraction 0.15]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def fit(x: torch.Tensor, y: torch.Tensor, wd: float) -> torch.Tensor:
    """Logistic regression weights on standardized `x` (mean/std of `x` folded in)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(((x - mu) / sd) @ w, y) + wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.stack([mu, sd, w.detach()])


def accuracy(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((((x - p[0]) / p[1]) @ p[2] > 0).float() == y).float().mean())


def main() -> None:
    from llmctl.commands.align import AlignConfig
    from llmctl.data.preferences import PairRows, load_preferences, split_items
    from llmctl.model.io import load_model
    from llmctl.tokenizer import CHAT_TEMPLATE, chat_template_of, load_specials, load_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", type=Path)
    p.add_argument("pairs", type=Path)
    p.add_argument("--val-fraction", type=float, default=0.15)
    args = p.parse_args()
    ck = args.checkpoint
    tok, sp = load_tokenizer(ck), load_specials(ck)
    model = load_model(ck).float().eval()
    cfg = AlignConfig(method="reward", val_fraction=args.val_fraction)
    got = load_preferences([args.pairs], tok, template=chat_template_of(ck) or CHAT_TEMPLATE,
                           end_id=sp.end_of_turn, ctx=model.config.max_seq_len, opts=cfg,
                           kto=False)  # fmt: skip
    items = got.items
    train, val = split_items(items, args.val_fraction)
    rows = PairRows(items, list(range(len(items))), batch_size=16, seed=0,
                    pad_id=sp.pad_or_eos, shuffle=False)  # fmt: skip
    d = model.config.d_model
    last, mean, logp = (
        np.zeros((len(items), 2, d)),
        np.zeros((len(items), 2, d)),
        np.zeros((len(items), 2)),
    )
    with torch.no_grad():
        for b in rows.sequential():
            t, n = torch.tensor(b["tokens"]), torch.tensor(b["lengths"])
            idx, B = b["index"], len(b["index"])
            logits, h = model(t, return_hidden=True)
            lp = -F.cross_entropy(logits[:, :-1].transpose(1, 2), t[:, 1:], reduction="none")
            s = (lp * torch.tensor(b["loss_mask"])[:, 1:].float()).sum(-1)
            real = (torch.arange(t.shape[1])[None] < n[:, None])[..., None]
            for arr, v in ((last, h[torch.arange(len(t)), n - 1]),
                           (mean, (h * real).sum(1) / n[:, None]), (logp, s)):  # fmt: skip
                arr[idx, 0], arr[idx, 1] = v[:B].numpy(), v[B:].numpy()
    print(f"{args.pairs}: {len(train)} train, {len(val)} held-out pairs")
    lm = (logp[val, 0] > logp[val, 1]).mean()
    print(f"LM summed log-prob, chosen > rejected: held out {lm:.3f}")
    for name, feats in (("last-token hidden state", last), ("mean hidden state", mean)):
        diff = torch.tensor(feats[:, 0] - feats[:, 1], dtype=torch.float32)
        x = torch.cat([diff[train], -diff[train]])
        y = torch.cat([torch.ones(len(train)), torch.zeros(len(train))])
        for wd in (0.01, 0.1, 1.0):
            w = fit(x, y, wd)
            print(f"probe on {name}, L2 {wd}: train {accuracy(w, x, y):.3f}, held out "
                  f"{accuracy(w, diff[val], torch.ones(len(val))):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
