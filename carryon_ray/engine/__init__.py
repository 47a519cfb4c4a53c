"""The decode engine, one file per job (vLLM v1's layout):

    scheduler.py  requests, rows and the step plan; finishing (no tensors: tested without a model)
    kv.py         KV memory: the base's slot pools, the cache-keeping adapters' pools
    flat.py       the base's own layer loop over one flat batch of tokens
    runner.py     the model runner: a step's tokens through the base(s) and each row's carry-on, to logits
    sampler.py    next tokens from logits (penalties, temperature, nucleus, logprobs)
    engine.py     the step: schedule -> execute -> sample -> update, and failure isolation per adapter
"""

from .engine import Engine, EngineStats, StepOutput
from .scheduler import Request, Scheduler, Sequence, StepPlan

__all__ = ["Engine", "EngineStats", "Request", "Scheduler", "Sequence", "StepOutput", "StepPlan"]
