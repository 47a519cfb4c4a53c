"""The pieces of training a carry-on: building it, one optimizer step, one evaluation at many
alphas, and the alpha rule. `carryon_ray/recipe.py` strings them into the one training recipe that
both runners (in-process and Ray Train) drive.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .config import CarryOnConfig
from .loss import IGNORE, chunked_cross_entropy, chunked_kl_to_base, select_targets
from .kinds import cast_trainable, kind_of
from .model import CarryOn, add_deltas
from .progress import Progress, quiet



# ---------------------------------------------------------------------------------------------
# Building the carry-on.
# ---------------------------------------------------------------------------------------------


# torch's default generator is one per process. Fits that share a process (the trainer service runs
# each in a thread: jobs/trainers.py) take turns to seed it and draw their initial weights, so each
# starts from the weights its seed gives alone (two fits starting together once drew from each
# other's stream, and one trained differently from `carryon train`).
_SEEDED_INIT = threading.Lock()


def build_carryon(
    cfg: CarryOnConfig, hidden_sizes: list[int], vocab_size: int, head_weight=None, head_bias=None,
    stages: int | None = None,
) -> CarryOn:
    """The carry-on of `cfg` (its kind's build) with `stages` stages (default: all of cfg.carryon.stages)."""
    with _SEEDED_INIT:
        torch.manual_seed(cfg.train.seed)
        return kind_of(cfg.carryon.kind).build(cfg, hidden_sizes, vocab_size, head_weight, head_bias, stages)


def grow_stage(model: CarryOn, cfg: CarryOnConfig) -> None:
    """Start the next stage: a fresh carry-on (seeded per stage) on top of the frozen ones."""
    with _SEEDED_INIT:
        torch.manual_seed(cfg.train.seed + len(model.stages))
        if cfg.carryon.stage_lora_rank:  # the newest stage so far gets deltas before it is frozen
            add_deltas(model.stages[-1], cfg.carryon.stage_lora_rank)
        model.grow(cfg.alpha.init)
    cast_trainable(model, cfg)
    model.freeze_earlier_stages()


def stage_digest(model: CarryOn, stage: int) -> str:
    """SHA-256 over one stage's tensors (names, dtypes, bytes): frozen stages must keep it."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.stages[stage].state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_optimizer(model: CarryOn, cfg: CarryOnConfig, total_steps: int):
    """AdamW (0.9, 0.95) with linear warmup then cosine decay to 10% of the peak."""
    opt = torch.optim.AdamW(
        model.trainable_parameters(), lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay
    )
    warm = cfg.train.warmup_steps

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ---------------------------------------------------------------------------------------------
# One training step and one evaluation.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured."""

    loss: float  # the optimized loss: ce + kl_weight * kl (+ balance_weight * balance with experts)
    ce: float  # cross entropy on the customization rows' target tokens
    kl: float  # KL to the base on the replay rows (0 without replay)
    tokens: int  # target tokens scored (CE) plus replay tokens (KL)
    replay_rows: int
    balance: float  # the MoE load-balance term (0 without experts)


def train_step(model, optimizer, scheduler, sources, labels, chunk: int = 1024, grad_clip: float = 1.0,
               replay: torch.Tensor | None = None, kl_weight: float = 1.0, kl_top_k: int | None = None,
               key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> dict:
    """One optimizer step on a decoded batch. `model` may be DDP-wrapped. Packed batches pass the
    examples' `positions` and their 4D `attn_mask` (attention inside each example).

    `key_mask` ([B, T], 1 = real token) keeps right padding out of the MoE load-balance loss and
    the expert-usage counts. Batches are right-padded and attention is causal, so real tokens never
    see a pad: without experts the mask changes nothing and is not passed, which keeps the fast
    causal attention kernel.

    Rows flagged in `replay` ([B] bool) are general-domain text: their loss is KL(base || carry-on)
    against the base's own logits W x (x = the deep state the carry-on corrects), not cross
    entropy. loss = mean CE over customization tokens + kl_weight * mean KL over replay tokens.
    Returns {"loss", "ce", "kl", "tokens", "replay_rows"}.
    """
    carryon: CarryOn = getattr(model, "module", model)
    carryon.train()
    routed = key_mask is not None and carryon.arch.experts > 0
    device = sources[0][0].device
    x = model(sources, key_mask=key_mask.to(device) if routed else None,
              positions=None if positions is None else positions.to(device),
              attn_mask=None if attn_mask is None else attn_mask.to(device))
    balance = carryon.balance_loss()  # 0 unless the carry-on routes over experts
    if replay is None or not bool(replay.any()):
        h, y = select_targets(x, labels)
        n = y.numel()
        ce = chunked_cross_entropy(carryon.logits, h, y, chunk) / max(n, 1)
        loss, kl, n_kl = ce, torch.zeros(()), 0
    else:
        replay = replay.to(labels.device)
        custom_labels = labels.masked_fill(replay[:, None], IGNORE)
        replay_labels = labels.masked_fill(~replay[:, None], IGNORE)
        h, y = select_targets(x, custom_labels)
        n = y.numel()
        ce = chunked_cross_entropy(carryon.logits, h, y, chunk) / max(n, 1)
        h_r, y_r = select_targets(x, replay_labels)
        base_x = carryon.base_state(sources, positions=None if positions is None else positions.to(device),
                                    attn_mask=None if attn_mask is None else attn_mask.to(device))
        hb_r, _ = select_targets(base_x.to(x.dtype), replay_labels)
        n_kl = y_r.numel()
        kl = chunked_kl_to_base(carryon.logits, hb_r, h_r, chunk, kl_top_k,
                                base_head=lambda h: carryon.logits(h, 0.0)) / max(n_kl, 1)
        loss = ce + kl_weight * kl
    if carryon.arch.experts:
        loss = loss + carryon.arch.balance_weight * balance
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(carryon.trainable_parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(float(loss.detach()), float(ce.detach()), float(kl.detach()), n + n_kl,
                      int(replay.sum()) if replay is not None else 0, float(balance.detach()))


def router_dropout_at(carryon: CarryOn, step: int, total: int, seed: int = 0) -> float:
    """Set the MoE router dropout for `step` of `total` (linear from start to end); returns it.
    `seed` picks the step's masks (the recipe passes its run seed, global step and rank)."""
    start, end = carryon.arch.router_dropout
    p = start + (end - start) * min(1.0, step / max(1, total - 1))
    carryon.set_router_dropout(p, seed)
    return p


@torch.no_grad()
def gate_mean(carryon: CarryOn, batches_: Iterable[tuple[list, torch.Tensor]]) -> float | None:
    """Mean of the last stage's gate sigmoid(g(s)) over scored tokens (None without a gate): how
    strongly the carry-on acts on a dataset. Compared between customization and general text."""
    stage = carryon.stages[-1]
    if getattr(stage, "g", None) is None:  # no gate (or a recycled carry-on: it has none)
        return None
    seen: list[torch.Tensor] = []
    hook = stage.g.register_forward_hook(lambda _m, _i, out: seen.append(torch.sigmoid(out.float())))
    total, count = 0.0, 0
    try:
        carryon.eval()
        for sources, labels in batches_:
            seen.clear()
            carryon.update(sources)
            g = seen[-1]
            keep = labels.to(g.device) != IGNORE
            total += float(g[keep].mean(-1).sum())
            count += int(keep.sum())
    finally:
        hook.remove()
    return total / max(count, 1)


@torch.no_grad()
def evaluate(carryon: CarryOn, batches_: Iterable[tuple[list, torch.Tensor]], alphas: list[float], chunk: int = 1024,
             progress: Progress = quiet, desc: str = "evaluation") -> dict[float, float]:
    """Mean token cross entropy at each alpha (see `states_at`: one carry-on forward per batch for a
    carry-on on the final state, where alpha only scales the last stage's dx). `progress` wraps the
    batches (one unit each)."""
    sums, count = evaluate_sums(carryon, batches_, alphas, chunk, progress, desc)
    return {a: s / max(count, 1) for a, s in sums.items()}


@torch.no_grad()
def evaluate_sums(carryon: CarryOn, batches_: Iterable[tuple[list, torch.Tensor]], alphas: list[float],
                  chunk: int = 1024, progress: Progress = quiet, desc: str = "evaluation") -> tuple[dict[float, float], int]:
    """`evaluate`'s summed token cross entropy per alpha and the scored tokens: sums over disjoint
    sets of batches add up to the union's (how an alpha chosen on a subset gets the whole set's loss)."""
    carryon.eval()
    sums = {a: 0.0 for a in alphas}
    count = 0
    total = len(batches_) if hasattr(batches_, "__len__") else None  # type: ignore[arg-type]
    for sources, labels in progress(batches_, desc, total):
        count += int((labels[:, 1:] != IGNORE).sum())
        for a, x in carryon.states_at(sources, alphas):
            h, y = select_targets(x, labels)
            sums[a] += float(chunked_cross_entropy(lambda h_, a=a: carryon.logits(h_, a), h, y, chunk))
    return sums, count


def strided_subset(batches_: list, rows: int) -> tuple[list, list]:
    """(every k-th batch, the others) with k the whole set's rows // `rows`: about `rows` rows from
    across the set (batches sorted by length stay represented); (all, []) when `rows` is 0 or the
    set is not larger."""
    total = sum(int(labels.shape[0]) for _, labels in batches_)
    if rows <= 0 or total <= rows:
        return list(batches_), []
    k = max(1, total // rows)
    return [b for i, b in enumerate(batches_) if i % k == 0], [b for i, b in enumerate(batches_) if i % k]


# ---------------------------------------------------------------------------------------------
# Choosing alpha on validation data.
# ---------------------------------------------------------------------------------------------


@dataclass
class AlphaSearch:
    """Per-epoch alpha candidates and the choice among them (paper sections 4-5).

    rule 'scale3': candidates {0.5a, a, 2a} around the current a.
    rule 'list': a fixed list; when 1.0 wins, every candidate c is replaced by sqrt(c), which
    narrows the list around 1.0 for the next epoch.
    """

    rule: str
    current: float
    maximum: float
    candidates_list: list[float] = field(default_factory=list)
    guard: float | None = None  # max general-loss increase over the base allowed (None = unguarded)

    @classmethod
    def from_config(cls, cfg: CarryOnConfig) -> "AlphaSearch":
        return cls(cfg.alpha.rule, cfg.alpha.init, cfg.alpha.max, list(cfg.alpha.candidates), cfg.alpha.general_guard)

    def candidates(self) -> list[float]:
        if self.rule == "list":
            cands = self.candidates_list
        else:
            a = self.current if self.current > 0 else 0.1
            cands = [0.5 * a, a, 2 * a]
        if self.guard is not None:
            cands = [*cands, 0.0]  # the base itself: a candidate that always meets the guard
        return sorted({round(min(max(c, 0.0), self.maximum), 6) for c in cands})

    def choose(self, losses: dict[float, float], general: dict[float, float] | None = None,
               base_general: float | None = None) -> float:
        """The candidate with the lowest customization loss; with a guard, only among candidates
        whose general-domain loss is within `guard` of the base's (the least-damaging candidate if
        none complies)."""
        pool = list(losses)
        if self.guard is not None and general is not None and base_general is not None:
            ok = [a for a in pool if general[a] <= base_general + self.guard]
            pool = ok or [min(pool, key=lambda a: (general[a], a))]
        best = min(pool, key=lambda a: (losses[a], a))
        if self.rule == "list" and math.isclose(best, 1.0):
            self.candidates_list = [math.sqrt(c) for c in self.candidates_list]
        self.current = best
        return best


def balance_point(sweep: dict[float, tuple[float, float]], base_general: float, tolerance: float = 0.0) -> float:
    """Largest alpha (sweeping down from 1.0) whose general-domain loss is within `tolerance` of
    the base's: the balance between customization and general ability (paper figure 2)."""
    for a in sorted(sweep, reverse=True):
        if sweep[a][1] <= base_general + tolerance:
            return a
    return 0.0
