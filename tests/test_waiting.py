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


def test_a_driver_that_does_not_answer_the_interrupt_is_ended_with_the_message(tmp_path):
    """The watch's interrupt reaches the main thread only when it runs Python code. A main thread
    parked in a wait that never polls for signals (here a plain lock) is ended by the watch after
    its grace, with the job's message and exit status 1, instead of hanging."""
    import subprocess
    import sys
    import time

    script = tmp_path / "stuck.py"
    script.write_text(
        "import threading\n"
        "from jobs.waiting import ResourceWatch\n"
        "w = ResourceWatch(timeout_s=1, grace_s=1.0)\n"
        "w.message = 'the job could not be scheduled for 1s (resources.wait_timeout_s = 1)'\n"
        "lock = threading.Lock(); lock.acquire()\n"
        "def watch():\n"
        "    __import__('time').sleep(0.5)  # the main thread is parked by now\n"
        "    __import__('_thread').interrupt_main()\n"
        "    w._force_exit()\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "lock.acquire()  # parked: the simulated interrupt never wakes it\n"
        "print('unreachable')\n")
    t0 = time.time()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path.parent), env={"PYTHONPATH": str(__import__("conftest").ROOT)})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "error: the job could not be scheduled for 1s" in res.stderr and "unreachable" not in res.stdout
    assert "main thread waited at" in res.stderr and "stuck.py" in res.stderr
    assert time.time() - t0 < 30
