"""benchmarks/train_step.py smoke test on CPU (--model=test): the JAX step and the transformers step run
on the same packed batch with the same initial weights, so their first-step losses agree."""
import numpy as np
import pytest

from benchmarks import train_step


@pytest.mark.slow
def test_benchmark_smoke_on_cpu(capsys):
    results = train_step.run(model="test", batch_sizes=(1,), steps=1, warmup=1)
    out = capsys.readouterr().out
    assert "| side | batch | step s | tokens/s | model TFLOP/s | MFU | peak GB | first loss |" in out
    torch_r, jax_r = results
    assert torch_r.side.startswith("torch") and jax_r.side.startswith("jax")
    assert jax_r.tokens == 256 and jax_r.patches == 128            # 2 images of 112px = 2 x 64 patches
    assert jax_r.mfu is None                                        # no peak for a CPU
    # random init: loss ~ ln(V) = ln(2048) = 7.62; bf16 on both sides
    assert abs(jax_r.first_loss - np.log(2048)) < 0.3
    np.testing.assert_allclose(jax_r.first_loss, torch_r.first_loss, rtol=2e-3)
    assert jax_r.step_s > 0 and jax_r.tokens_per_s > 0


def test_row_layout():
    from qwen2vl_jax.model.config import get_config
    cfg = get_config("2b")
    row, grid = train_step.make_row(cfg, 4096, 4, 448)
    assert grid.tolist() == [[1, 32, 32]] * 4
    assert row["pixel_values"].shape == (4096, 1176)
    assert int((row["input_ids"] == cfg.image_token_id).sum()) == 4 * 256
    assert row["segment_ids"].min() == 1                            # one sample fills the whole row
    assert row["loss_mask"].sum() == 4096 - 4 * 258 - 1             # every text target
