"""ColdWorker: one persistent background thread, futures, errors, close, Ctrl-C."""
import gc
import signal
import threading
import time
import traceback

import numpy as np
import pytest

from offload.cpu.cold import ColdFFN
from offload.cpu.worker import ColdWorker


def test_result_order_and_kwargs():
    with ColdWorker() as w:
        futs = [w.submit(lambda i, k=0: (i, k, threading.current_thread().name), i, k=2 * i)
                for i in range(50)]
        res = [f.result(timeout=10) for f in futs]
    assert [r[:2] for r in res] == [(i, 2 * i) for i in range(50)]
    assert {r[2] for r in res} == {"offload-cold-worker"}  # one persistent thread
    assert futs[0].done()
    assert futs[0].result() == res[0]  # result() can be called again


def test_none_result_is_done():
    with ColdWorker() as w:
        f = w.submit(lambda: None)
        assert f.result(timeout=10) is None
        assert f.done() and f.exception() is None


def _failing_job():
    raise ValueError("boom in worker")


def test_exception_reraised_with_worker_traceback():
    with ColdWorker() as w:
        f = w.submit(_failing_job)
        with pytest.raises(ValueError, match="boom in worker") as ei:
            f.result(timeout=10)
        frames = [fs.name for fs in traceback.extract_tb(ei.value.__traceback__)]
        assert "_failing_job" in frames  # the worker's frame is kept
        assert isinstance(f.exception(), ValueError)
        assert w.submit(lambda: 7).result(timeout=10) == 7  # worker survives


def test_overlaps_with_caller():
    # the job blocks until the caller, which keeps running, releases it
    go = threading.Event()
    with ColdWorker() as w:
        f = w.submit(go.wait, 10)
        assert not f.done()
        go.set()
        assert f.result(timeout=10) is True


def test_timeout():
    go = threading.Event()
    with ColdWorker() as w:
        f = w.submit(go.wait, 10)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            f.result(timeout=0.05)
        assert time.monotonic() - t0 < 2
        go.set()
        f.result(timeout=10)


def test_close_idempotent_and_refuses_new_jobs():
    w = ColdWorker()
    f = w.submit(time.sleep, 0.01)
    w.close()
    assert f.done()  # jobs submitted before close still run
    assert w.closed and not w._thread.is_alive()
    w.close()
    w.close(wait=False)
    with pytest.raises(RuntimeError):
        w.submit(lambda: 1)


def test_dropped_worker_stops_its_thread():
    w = ColdWorker()
    t = w._thread
    w.submit(lambda: 1).result(timeout=10)
    del w
    gc.collect()
    t.join(5)
    assert not t.is_alive()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_ctrl_c_interrupts_wait():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals go to the main thread")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT handler replaced")
    go = threading.Event()
    main_id = threading.main_thread().ident
    with ColdWorker() as w:
        f = w.submit(go.wait, 30)
        timer = threading.Timer(0.2, signal.pthread_kill, (main_id, signal.SIGINT))
        t0 = time.monotonic()
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                f.result()
        finally:
            timer.join()
        assert time.monotonic() - t0 < 5
        go.set()  # the abandoned job finishes; the worker is still usable
        assert f.result(timeout=10) is True
        assert w.submit(lambda: 3).result(timeout=10) == 3


def test_runs_cold_ffn():
    rng = np.random.default_rng(0)
    n, d = 100, 32
    cold = ColdFFN(rng.standard_normal((n, d)).astype(np.float32),
                   rng.standard_normal((n, d)).astype(np.float32),
                   rng.standard_normal((d, n)).astype(np.float32))
    x = rng.standard_normal(d).astype(np.float32)
    idx = np.arange(0, n, 2)
    with ColdWorker() as w:
        y = w.submit(cold.forward, x, idx).result(timeout=30)
    np.testing.assert_allclose(y, cold.forward(x, idx), rtol=1e-5, atol=1e-5)
