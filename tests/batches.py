"""Small Grain pipeline settings and batch helpers shared by the pipeline and checkpoint tests."""
import numpy as np

from qwen2vl_jax.data import pipeline

SMALL = dict(seq_len=512, max_patches=1536, lookahead=4, read_threads=2, read_buffer_size=8)


def dcfg(mixture=(("synthetic:caption", 2.0), ("synthetic:chat", 1.0), ("synthetic:video", 1.0)), **kw):
    return pipeline.DataConfig(mixture=mixture, **{**SMALL, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
