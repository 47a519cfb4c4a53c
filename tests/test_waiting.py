"""The job's wait report without a cluster: which pending demands are a stall and which are
capacity a running stage could use (jobs/waiting.py)."""

from jobs.waiting import kind, split_pending

POOL = ("MapWorker(MapBatches(EmbeddingProducer))", {"CPU": 1.0, "inference_node": 1.0})
TRAIN = ("RayTrainWorker", {"CPU": 1.0, "training_node": 1.0})
TOKENIZE = ("tokenize_batch", {"CPU": 1.0})


def test_a_stage_with_nothing_placed_blocks_and_a_stage_that_cannot_grow_does_not():
    assert kind(POOL[0]) == "EmbeddingProducer" and kind("SomethingElse") == "SomethingElse"
    # The elastic pool has an actor at work (or idle on backpressure) and cannot add its second:
    # the job runs below its maximum, nothing to warn about.
    assert split_pending([POOL], {"EmbeddingProducer", "RayTrainWorker"}) == ([], [POOL])
    # The trainer holds the last CPU and no embedding actor could start: the job cannot progress.
    assert split_pending([POOL], {"RayTrainWorker"}) == ([POOL], [])
    # Someone else holds every CPU: nothing of the job is placed.
    assert split_pending([TOKENIZE, TRAIN], set()) == ([TOKENIZE, TRAIN], [])
    # Train growing from 1 to 2 workers while the first trains.
    assert split_pending([TRAIN], {"RayTrainWorker", "EmbeddingProducer"}) == ([], [TRAIN])
