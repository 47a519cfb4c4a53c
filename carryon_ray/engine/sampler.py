"""The sampler: a next token per row from the step's logits, penalties and logprobs included.

Penalties in vLLM's order (`apply_penalties`): the repetition penalty on prompt and generated
tokens first, then OpenAI's frequency and presence penalties on the generated tokens. Whatever
fails for one row (a broken adapter's NaN logits) is that row's error, never the batch's.
"""

from __future__ import annotations

import secrets

import torch

from .scheduler import Sequence

# Below this temperature a row decodes greedily: logits / T overflows float32 long before T
# reaches 0 (vLLM uses the same cut-off).
MIN_TEMPERATURE = 1e-5


class Sampler:
    """Next tokens for a batch of rows' logits [rows, vocab] (float32, CPU).

    Penalties first, only for rows that ask, in vLLM's order: the repetition penalty on prompt and
    generated tokens, then OpenAI's frequency and presence penalties on the generated tokens.
    Greedy rows take one batched argmax; unseeded rows sampling the full distribution share one
    batched inverse-CDF draw from the engine's generator; only seeded rows (their own generator,
    so their tokens repeat whatever else runs) and nucleus rows draw one by one. Log-probabilities
    are those of the model's logits (vLLM's default), before penalties and temperature."""

    def __init__(self):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(secrets.randbits(63))

    def __call__(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, dict | None, str | None]]:
        raw = logits
        bad = torch.isnan(logits).any(-1) | ~torch.isfinite(logits).any(-1)
        logits = self._penalize(seqs, logits)
        greedy = [s.request.temperature < MIN_TEMPERATURE for s in seqs]
        tokens = logits.argmax(-1).tolist()
        batched = [j for j, s in enumerate(seqs) if not greedy[j] and not bad[j] and s.generator is None
                   and s.request.top_p >= 1.0]
        if batched:
            t = torch.tensor([seqs[j].request.temperature for j in batched])[:, None]
            cdf = torch.softmax(logits[batched] / t, -1).cumsum(-1)
            u = torch.rand(len(batched), 1, generator=self.generator) * cdf[:, -1:]
            for j, tok in zip(batched, torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)[:, 0].tolist()):
                tokens[j] = tok
        done = set(batched)
        result = []
        for j, seq in enumerate(seqs):
            r = seq.request
            try:
                if bad[j]:
                    raise FloatingPointError("the model produced NaN or no finite logit")
                if not greedy[j] and j not in done:
                    tokens[j] = sample(logits[j], r.temperature, r.top_p, seq.generator or self.generator)
                entry = None
                if r.logprobs is not None:
                    lp = torch.log_softmax(raw[j], -1)
                    entry = {"logprob": float(lp[tokens[j]])}
                    if r.logprobs:
                        top = lp.topk(r.logprobs)
                        entry["top"] = list(zip(top.indices.tolist(), top.values.tolist()))
                result.append((tokens[j], entry, None))
            except (RuntimeError, FloatingPointError, ValueError) as exc:
                result.append((-1, None, str(exc)))
        return result

    @staticmethod
    def _penalize(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        rows = [j for j, s in enumerate(seqs) if s.request.presence_penalty or s.request.frequency_penalty
                or s.request.repetition_penalty != 1.0]
        if not rows:
            return logits
        logits = logits.clone()
        V = logits.shape[-1]
        for j in rows:
            r, seq = seqs[j].request, seqs[j]
            if r.repetition_penalty != 1.0:  # first (vLLM): on the model's logits, prompt and output tokens
                seen = torch.tensor(sorted(set(r.prompt) | set(seq.tokens)))
                x = logits[j, seen]
                logits[j, seen] = torch.where(x > 0, x / r.repetition_penalty, x * r.repetition_penalty)
            if seq.tokens and (r.presence_penalty or r.frequency_penalty):  # then OpenAI's, on output tokens
                counts = torch.bincount(torch.tensor(seq.tokens), minlength=V)[:V].to(logits.dtype)
                logits[j] -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(logits.dtype)
        return logits


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from a row of logits: nucleus sampling at `temperature`, by inverse CDF with one
    uniform draw (torch.multinomial and a full sort each cost ~1-4 ms on a 49k vocabulary on CPU;
    this costs ~0.1 ms). The nucleus is found among the top candidates, widened until it holds
    top_p of the mass, so it is exact. Safe for every valid parameter: the most likely token always
    stays in the nucleus (top_p may round to 0)."""
    probs = torch.softmax(logits.float() / max(temperature, MIN_TEMPERATURE), -1)
    idx = None
    if top_p < 1.0:
        k = 256
        while True:
            probs_k, idx = probs.topk(min(k, probs.numel()))
            if float(probs_k.sum()) >= top_p or k >= probs.numel():
                break
            k *= 4
        keep = probs_k.cumsum(-1) - probs_k < top_p
        keep[0] = True
        probs = probs_k * keep
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=gen) * cdf[-1]
    j = int(torch.searchsorted(cdf, u).clamp(max=cdf.numel() - 1))
    return j if idx is None else int(idx[j])
