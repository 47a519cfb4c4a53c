"""Layer probe: which blocks of a base matter, and which shallow layers carry what the top lost.

Two measurements on a calibration set, both from forward passes of the frozen base:

Macro Influence (FuseGPT): for each block k, run the base with block k replaced by the identity
and compare the final hidden states with the full model's, token by token:
    influence_k = 1 - mean cos(h_final, h_final without block k)
A block with influence near 0 is nearly redundant (a candidate to recycle); a high one carries
what the output depends on.

Shortcut gain: how much a shallow layer j helps predict the next token *beyond the top layer*.
The loss gradient with respect to the final state, r = W^T (softmax(W x) - onehot(y)), is the
direction a carry-on should move the residual stream for each token. A ridge regression predicts
-r from the features [x] (top only) or [x, h_j] (top plus layer j); on held-out sequences
    explained(F) = 1 - |(-r) - F b|^2 / |r|^2
    gain_j = explained([x, h_j]) - explained([x])
A gain above that of a noise control (as many random features) means layer j's states hold information about the next token that a linear read
of the top layer does not recover: a shortcut worth feeding to the carry-on (layers.shallow).
Only forward passes and one vocabulary projection per token: minutes on a CPU for SmolLM2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .base import FrozenBase
from .config import DataConfig
from .progress import Progress, quiet
from .data import collate, load_examples

RIDGE = [0.01, 0.1, 1.0, 10.0]  # ridge strengths (x the mean feature variance) tried on the tuning tokens


@dataclass
class ProbeResult:
    base: str
    tokens: int
    num_layers: int
    influence: list[float]                       # per block k = 0..L-1: 1 - mean cosine
    base_loss: float                             # held-out next-token loss of the base
    top_only: float                              # share of the loss gradient a linear read of the top explains
    gain: dict[int, float] = field(default_factory=dict)  # shallow layer -> share explained beyond the top
    control: float = 0.0                         # the same gain from as many features of noise
    recommended: list[int] = field(default_factory=list)
    least_influential: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gain"] = {str(k): v for k, v in self.gain.items()}
        return d


def calibration_batch(base: FrozenBase, data: str, tokens: int, max_length: int = 256, fmt: str = "auto"):
    """(input_ids, attention_mask) of whole rows of `data` until `tokens` tokens are reached."""
    examples, _ = load_examples(data, base.tokenizer, DataConfig(train=data, format=fmt, max_length=max_length,
                                                                 loss_on_prompt=True, max_bad_fraction=1.0))
    picked, n = [], 0
    for ex in examples:
        if n >= tokens:
            break
        picked.append(ex)
        n += len(ex.input_ids)
    batch = collate(picked, base.tokenizer.pad_token_id)
    return batch["input_ids"], batch["attention_mask"]


@torch.inference_mode()
def macro_influence(base: FrozenBase, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 8,
                    progress: Progress = quiet) -> list[float]:
    """1 - mean cosine similarity of final hidden states with and without each block."""
    blocks = base.model.model.layers
    real = mask.bool()

    def finals():
        out = []
        for i in range(0, len(ids), batch_size):
            out.append(base.hidden_states(ids[i : i + batch_size], mask[i : i + batch_size])[0][0].float().cpu())
        return torch.cat(out)

    ref = finals()
    influence = []
    for k in progress(range(len(blocks)), "macro influence (blocks)", len(blocks)):
        # The hook hands the block's input straight through: the model runs without block k.
        hook = blocks[k].register_forward_hook(
            lambda _m, args, kwargs, _out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        try:
            skipped = finals()
        finally:
            hook.remove()
        cos = F.cosine_similarity(ref[real], skipped[real], dim=-1)
        influence.append(float(1.0 - cos.mean()))
    return influence


def _loss_gradient(head_w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """r = W^T (softmax(W x) - onehot(y)) per token: d(cross entropy)/dx."""
    out = torch.empty_like(x)
    for i in range(0, len(x), chunk):
        p = torch.softmax(x[i : i + chunk] @ head_w.T, -1)
        p[torch.arange(len(p)), y[i : i + chunk]] -= 1.0
        out[i : i + chunk] = p @ head_w
    return out


def _loss(head_w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(F.cross_entropy(x[i : i + chunk] @ head_w.T, y[i : i + chunk], reduction="sum"))
    return total / max(len(x), 1)


def _explained(feats: torch.Tensor, r: torch.Tensor, split: torch.Tensor) -> float:
    """Held-out share of -r's squared norm a ridge map from `feats` explains (the ridge strength is
    chosen on the tuning tokens, the share reported on the held-out ones)."""
    fit, tune, held = (split == 0), (split == 1), (split == 2)
    mean, std = feats[fit].mean(0), feats[fit].std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    gram, rhs = z[fit].T @ z[fit], z[fit].T @ -r[fit]
    scale = float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)

    def share(coef, rows):
        resid = -r[rows] - z[rows] @ coef
        return 1.0 - float(resid.pow(2).sum() / r[rows].pow(2).sum())

    coefs = [torch.linalg.solve(gram + lam * scale * eye, rhs) for lam in RIDGE]
    best = max(coefs, key=lambda c: share(c, tune))
    return share(best, held)


@torch.inference_mode()
def shortcut_gain(base: FrozenBase, ids: torch.Tensor, mask: torch.Tensor, layers: list[int],
                  batch_size: int = 8, progress: Progress = quiet) -> tuple[float, float, dict[int, float]]:
    """(base loss, top-only share, {layer: gain}, noise-control gain) on held-out tokens; see the
    module docstring."""
    per_layer: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    tops, targets, rows = [], [], []
    for i in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[i : i + batch_size], mask[i : i + batch_size]
        states, _ = base.hidden_states(b_ids, b_mask, shallow=layers)
        keep = (b_mask[:, :-1] & b_mask[:, 1:]).bool()  # positions with a real next token
        tops.append(states[0][:, :-1][keep].float().cpu())
        targets.append(b_ids[:, 1:][keep])
        rows.append(torch.arange(i, i + len(b_ids))[:, None].expand_as(keep)[keep])
        for j, s in zip(layers, states[1:]):
            per_layer[j].append(s[:, :-1][keep].float().cpu())
    x, y, row = torch.cat(tops), torch.cat(targets), torch.cat(rows)
    split = row % 4  # whole sequences: 0, 3 fit, 1 tune the ridge strength, 2 held out
    split = torch.where(split == 3, torch.zeros_like(split), split)
    head_w = base.head_weight.float().cpu()
    r = _loss_gradient(head_w, x, y)
    base_loss = _loss(head_w, x[split == 2], y[split == 2])
    top_only = _explained(x, r, split)
    gain = {j: _explained(torch.cat([x, torch.cat(per_layer[j])], dim=-1), r, split) - top_only
            for j in progress(layers, "shortcut gain (layers)", len(layers))}
    # Control: as many extra features of pure noise. Whatever they "explain" is the bar a layer
    # has to clear to carry real information (ridge and the held-out split keep it near 0).
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    control = _explained(torch.cat([x, noise], dim=-1), r, split) - top_only
    return base_loss, top_only, gain, control


def probe(base: FrozenBase, data: str, tokens: int = 2048, layers: list[int] | None = None, max_length: int = 256,
          fmt: str = "auto", recommend: int = 2, progress: Progress = quiet) -> ProbeResult:
    """Both measurements; recommends the `recommend` shallow layers with the largest positive gain."""
    ids, mask = calibration_batch(base, data, tokens, max_length, fmt)
    L = base.num_layers
    layers = list(range(L)) if layers is None else layers
    bad = [j for j in layers if not 0 <= j < L]
    if bad:
        raise ValueError(f"layers {bad} out of range: the base has blocks 0..{L - 1} (0 = token embeddings)")
    influence = macro_influence(base, ids, mask, progress=progress)
    base_loss, top_only, gain, control = shortcut_gain(base, ids, mask, layers, progress=progress)
    ranked = sorted((j for j in layers if gain[j] > max(control, 0.0)), key=lambda j: -gain[j])
    least = sorted(range(L), key=lambda k: influence[k])[: max(1, math.ceil(L / 10))]
    return ProbeResult(base.name, int(mask.sum()), L, influence, base_loss, top_only, gain, control,
                       sorted(ranked[:recommend]), least)


def plot(result: ProbeResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(range(result.num_layers), result.influence, color="tab:blue")
    a.set_xlabel("block")
    a.set_ylabel("Macro Influence (1 - cos)")
    a.set_title("final-state change without each block")
    layers = sorted(result.gain)
    b.bar(layers, [result.gain[j] for j in layers],
          color=["tab:green" if j in result.recommended else "tab:gray" for j in layers])
    b.axhline(0, color="black", lw=0.5)
    b.axhline(result.control, color="red", ls=":", label="noise control")
    b.legend()
    b.set_xlabel("shallow layer (0 = embeddings)")
    b.set_ylabel("gradient share explained beyond the top layer")
    b.set_title(f"shortcut gain (green: recommended {result.recommended})")
    fig.suptitle(f"{result.base}: layer probe on {result.tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
