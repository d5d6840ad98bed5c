"""Train step: chunked loss vs full logits, mesh invariance, frozen params, accumulation, non-finite skip."""
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.train import optim, sharding, train_step
from qwen2vl_jax.model import model
from qwen2vl_jax.model.config import get_config

CFG = get_config("test")


def synthetic_batch(cfg, batch_size=8, seq_len=32, grid=(1, 2, 4), seed=0):
    """A packed batch obeying the docs/architecture.md contract: per row one image sample (vision_start,
    pads, vision_end, text) and one text sample, then padding."""
    rng = np.random.default_rng(seed)
    t, gh, gw = grid
    n_patch = t * gh * gw
    n_pad = n_patch // 4
    P = n_patch
    B, S = batch_size, seq_len
    out = {k: np.zeros(s.shape, s.dtype) for k, s in train_step.batch_spec(cfg, B, S, P).items()}
    text_vocab = cfg.special_token_base
    for b in range(B):
        n1 = S // 2 + int(rng.integers(0, 4))
        n2 = S - n1 - int(rng.integers(1, 4))
        s1 = np.concatenate([[cfg.vision_start_token_id], np.full(n_pad, cfg.image_token_id),
                             [cfg.vision_end_token_id], rng.integers(0, text_vocab, n1 - n_pad - 2)])
        s2 = rng.integers(0, text_vocab, n2)
        pos = 0
        for sid, s in ((1, s1), (2, s2)):
            n = len(s)
            out["input_ids"][b, pos:pos + n] = s
            out["targets"][b, pos:pos + n - 1] = s[1:]
            sup = np.ones(n - 1, np.float32)
            sup[s[1:] >= cfg.special_token_base] = 0.0
            out["loss_mask"][b, pos:pos + n - 1] = sup
            out["segment_ids"][b, pos:pos + n] = sid
            out["positions"][b, :, pos:pos + n] = np.arange(n)
            pos += n
        out["pixel_values"][b, :n_patch] = rng.integers(0, 256, (n_patch, cfg.vision.patch_dim))
        out["patch_segment_ids"][b, :n_patch] = 1
        hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        out["patch_positions"][b, :n_patch] = np.tile(np.stack([hh.ravel(), ww.ravel()], -1), (t, 1))
    return out


STEP = train_step.StepConfig(loss_chunk=8, optim=optim.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=20))


def _params(cfg=CFG, seed=0):
    return model.init_params(cfg, jax.random.key(seed))


# ----------------------------------------------------------------------------------------------

def test_chunked_loss_equals_full_logits_value_and_grads():
    rng = np.random.default_rng(0)
    B, S, D, V = 2, 24, 16, 50
    h = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    m = jnp.asarray(rng.random((B, S)) > 0.3, jnp.float32)

    def full(h, w):  # plain cross entropy over materialised logits, numpy-style
        logits = h @ w
        logp = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
        nll = -jnp.take_along_axis(logp, t[..., None], -1)[..., 0]
        lse = jax.scipy.special.logsumexp(logits, -1)
        return jnp.sum(nll * m) / m.sum() + 1e-3 * jnp.sum(lse ** 2 * m) / m.sum()

    def chunked(h, w):
        nll, z, n = train_step.chunked_cross_entropy(h, w, t, m, chunk=5)  # 5 -> chunk 4 (divisor of 24)
        return (nll + 1e-3 * z) / n

    v1, g1 = jax.value_and_grad(full, argnums=(0, 1))(h, w)
    v2, g2 = jax.value_and_grad(chunked, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, b in zip(g2, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the chunked forward holds one [B, c, V] block: no [B, S, V] array appears in the jaxpr
    jaxpr = str(jax.make_jaxpr(jax.grad(chunked))(h, w))
    assert f"{B},{S},{V}]" not in jaxpr.replace(" ", "")


def _hlo_computations(text: str) -> dict[str, list[str]]:
    """Compiled HLO text -> {computation name: its instruction lines}."""
    comps, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line)
    return comps


def _called(line: str, keys=("calls", "to_apply", "body", "condition", "branch_computations")) -> list[str]:
    return [n for k in keys for v in re.findall(k + r"=(\{[^}]*\}|%[\w.\-]+)", line)
            for n in re.findall(r"%([\w.\-]+)", v)]


def test_loss_gathers_the_output_embedding_once_and_reduces_its_gradient_once():
    """In the compiled step on fsdp=4 x tensor=2 (8 rows of 64 tokens, 8 loss chunks of 8), the chunk loops
    hold no collective larger than one chunk's [rows/4, 8] logsumexp / target values (the vocab-shard
    combination): the output embedding [64, 2048/2] is all-gathered once and its gradient reduce-scattered
    once per step, outside every loop (hand count; XLA's partitioner alone gathers it in every chunk)."""
    step_cfg = dataclasses.replace(STEP, loss_chunk=8)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    abs_state, st_sh = train_step.abstract_state(CFG, step_cfg, mesh)
    spec = train_step.batch_spec(CFG, 8, 64, 8)
    b_sh = sharding.batch_shardings(spec, mesh)
    abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in spec.items()}
    text = train_step.make_train_step(CFG, step_cfg, mesh, st_sh, b_sh).lower(abs_state, abs_batch).compile().as_text()
    comps = _hlo_computations(text)

    def closure(name, keys):
        out, todo = set(), [name]
        while todo:
            c = todo.pop()
            if c in out or c not in comps:
                continue
            out.add(c)
            todo += [n for line in comps[c] for n in _called(line, keys)]
        return out

    bodies = {b for lines in comps.values() for line in lines if " while(" in line for b in _called(line, ("body",))}
    chunk_loops = {b for b in bodies if any("bcd,dv->bcv" in line for c in closure(b, ("calls", "to_apply"))
                                            for line in comps[c])}
    assert len(chunk_loops) == 2                                     # the forward and the backward chunk scan
    in_loops = set().union(*(closure(b, ("calls", "to_apply", "body", "condition")) for b in chunk_loops))
    collective = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(")
    D, V = CFG.hidden_size, CFG.vocab_size
    gathers, scatters = [], []
    for c, lines in comps.items():
        for line in lines:
            m = collective.search(line)
            if not m:
                continue
            dims = re.findall(r"\[([\d,]*)\]", m.group(1))           # one per array of a tuple result
            if c in in_loops:
                assert max(math.prod(int(x) for x in d.split(",") if x) for d in dims) <= 2 * 8, line.strip()[:200]
            elif m.group(2) == "all-gather" and dims == [f"{D},{V // 2}"]:
                gathers.append(line)
            elif m.group(2) == "reduce-scatter" and dims == [f"{D // 4},{V // 2}"]:
                scatters.append(line)
    assert len(gathers) == 1 and len(scatters) == 1, (len(gathers), len(scatters))


# (mesh, microbatches): the (2,2,2) mesh also accumulates gradients over 2 microbatches
# the last: 2 slices (the dcn axis, data parallel over the data-centre network) of fsdp x tensor
MESHES = [(dict(data=8), 1), (dict(data=1, fsdp=8), 1), (dict(data=2, fsdp=2, tensor=2), 2),
          (dict(dcn=2, data=1, fsdp=2, tensor=2), 1)]


def _loss_grads_on_mesh(mesh_kw, params, batch, microbatches=1):
    if mesh_kw is None:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(**mesh_kw))
    step_cfg = dataclasses.replace(STEP, microbatches=microbatches)
    p_sh = train_step.param_shardings(CFG, mesh)
    b_sh = sharding.batch_shardings(batch, mesh)
    tr_sh, _ = optim.split_params(p_sh, STEP.trainable)
    fn = jax.jit(lambda p, b: train_step.loss_and_grads(CFG, p, b, step_cfg, mesh),
                 in_shardings=(p_sh, b_sh), out_shardings=(sharding.replicated(mesh), tr_sh))
    metrics, grads = fn(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
    return jax.device_get(metrics), jax.device_get(grads), p_sh


@pytest.mark.slow
def test_meshes_and_accumulation_match_single_device():
    params = _params()
    batch = synthetic_batch(CFG)
    ref_m, ref_g, _ = _loss_grads_on_mesh(None, params, batch)
    assert ref_m["tokens"] > 100
    for kw, mb in MESHES:
        m, g, p_sh = _loss_grads_on_mesh(kw, params, batch, mb)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5, err_msg=str(kw))
        assert m["tokens"] == ref_m["tokens"]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=str(kw)), g, ref_g)
    # the (2,2,2) mesh really shards: the lm head is split over fsdp x tensor
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    spec = train_step.param_shardings(CFG, mesh)["lm_head"]["kernel"].spec
    assert tuple(spec) == ("fsdp", "tensor")


@functools.lru_cache(maxsize=None)
def _compiled(step_cfg, mesh_cfg):
    n = math.prod(getattr(mesh_cfg, a) for a in sharding.MESH_AXES)   # explicit sizes only
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n])
    _, st_sh = train_step.abstract_state(CFG, step_cfg, mesh)
    b_sh = sharding.batch_shardings(synthetic_batch(CFG), mesh)
    return mesh, st_sh, b_sh, train_step.make_train_step(CFG, step_cfg, mesh, st_sh, b_sh)


# one device: these tests are about the update rule; test_meshes_* covers the sharded layouts
def _run_steps(step_cfg, n, batch_fn, params=None, mesh_cfg=sharding.MeshConfig(data=1)):
    mesh, st_sh, b_sh, step = _compiled(step_cfg, mesh_cfg)
    state = (train_step.init_state(CFG, step_cfg, jax.random.key(0), mesh) if params is None
             else train_step.place_params(params, step_cfg, st_sh))
    metrics = []
    for i in range(n):
        state, m = step(state, sharding.global_batch(batch_fn(i), b_sh))
        metrics.append(train_step.host_metrics(m))
    return state, metrics


@pytest.mark.parametrize("stage", [1, 3])
def test_frozen_params_have_no_state_and_do_not_change(stage):
    step_cfg = dataclasses.replace(STEP, trainable=optim.STAGE_TRAINABLE[stage])
    params = _params()
    batch = synthetic_batch(CFG)
    state, metrics = _run_steps(step_cfg, 3, lambda i: batch, params=params)
    # optimizer state: Adam mu has exactly the trainable leaves
    mu = state.opt_state[0].mu
    trainable, frozen = optim.split_params(params, step_cfg.trainable)
    assert jax.tree.structure(mu) == jax.tree.structure(trainable)
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_state < 2 * n_train + 10
    new_tr, new_fr = optim.split_params(jax.device_get(state.params), step_cfg.trainable)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_fr, frozen)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_tr, trainable)
    assert all(jax.tree.leaves(changed))
    if stage == 1:
        assert set(frozen) == {"decoder", "lm_head"} and set(trainable) == {"visual"}
    else:
        assert set(frozen["visual"]) == {"patch_embed", "blocks"} and "merger" in trainable["visual"]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_non_finite_batch_skips_update_and_counts():
    # stage-3 step (same compiled step as the frozen test): a NaN loss weight makes the loss non-finite
    step_cfg = dataclasses.replace(STEP, trainable=optim.STAGE_TRAINABLE[3])
    params = _params()

    def batch_fn(i):
        b = synthetic_batch(CFG, seed=i)
        if i in (1, 2):
            b["loss_mask"][0, 3] = np.nan
        return b
    state, metrics = _run_steps(step_cfg, 4, batch_fn, params=params)
    assert [m["finite"] for m in metrics] == [True, False, False, True]
    assert [m["consecutive_skips"] for m in metrics] == [0, 1, 2, 0]
    assert metrics[-1]["skipped_steps"] == 2 and int(state.step) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    # skipped steps leave the state untouched: the same as running only the good batches
    ref_state, _ = _run_steps(step_cfg, 2, lambda i: synthetic_batch(CFG, seed=(0, 3)[i]), params=params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 jax.device_get(state.params), jax.device_get(ref_state.params))


def test_finite_loss_with_a_non_finite_gradient_is_skipped(monkeypatch):
    """One inf in one gradient leaf while the loss stays finite: the step is skipped like a NaN loss (params
    and Adam's moments exactly as before it, the skip counted). A check of the loss alone would apply it:
    the clipping scale clip/inf = 0 turns the inf into NaN and every updated leaf would change."""
    step_cfg = dataclasses.replace(STEP, trainable=optim.STAGE_TRAINABLE[3])
    mesh, st_sh, b_sh, good_step = _compiled(step_cfg, sharding.MeshConfig(data=1))
    state = train_step.place_params(_params(), step_cfg, st_sh)
    state, _ = good_step(state, sharding.global_batch(synthetic_batch(CFG, seed=0), b_sh))   # Adam moments != 0
    before = jax.device_get(state)

    real = train_step.loss_and_grads

    def inf_in_one_gradient(*args, **kwargs):          # the real loss and gradients, one entry of one leaf inf
        metrics, grads = real(*args, **kwargs)
        leaves, tree = jax.tree.flatten(grads)
        leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.inf)
        return metrics, jax.tree.unflatten(tree, leaves)

    monkeypatch.setattr(train_step, "loss_and_grads", inf_in_one_gradient)
    bad_step = train_step.make_train_step(CFG, step_cfg, mesh, st_sh, b_sh)
    state, m = bad_step(state, sharding.global_batch(synthetic_batch(CFG, seed=1), b_sh))
    m = train_step.host_metrics(m)
    assert math.isfinite(m["loss"]) and m["grad_norm"] == math.inf and m["finite"] is False
    assert (m["skipped_steps"], m["consecutive_skips"], int(state.step)) == (1, 1, 2)
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)


def test_bf16_compute_keeps_fp32_master_weights_and_learns():
    cfg = CFG.replace(dtype="bfloat16")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    _, st_sh = train_step.abstract_state(cfg, STEP, mesh)
    state = train_step.init_state(cfg, STEP, jax.random.key(0), mesh)
    batch = synthetic_batch(cfg)
    b_sh = sharding.batch_shardings(batch, mesh)
    step = train_step.make_train_step(cfg, STEP, mesh, st_sh, b_sh)
    losses = []
    for _ in range(4):
        state, m = step(state, sharding.global_batch(batch, b_sh))
        losses.append(train_step.host_metrics(m)["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert losses[-1] < losses[0] - 0.3, losses


# Hand-derived from sharding.LOGICAL_RULES for the test config (decoder 64 wide, vocab 2048, 4 query / 2 kv
# heads of 16, mlp 128; tower 32 wide, 4 heads of 8, mlp 128; merger 128 -> 64) on data=2 x fsdp=2 x
# tensor=2: embedding-width dims over fsdp; vocab, heads, kv heads and mlp dims over tensor; the stacked
# layer axis, norms, head_dim, the qkv triple and the 1176-wide patch input replicated.
EXPECTED_PARAM_SPECS = {
    "decoder/embed_tokens/embedding": ("tensor", "fsdp"),
    "decoder/layers/input_layernorm/scale": (None, None),
    "decoder/layers/post_attention_layernorm/scale": (None, None),
    "decoder/layers/mlp/gate_proj/kernel": (None, "fsdp", "tensor"),
    "decoder/layers/mlp/up_proj/kernel": (None, "fsdp", "tensor"),
    "decoder/layers/mlp/down_proj/kernel": (None, "tensor", "fsdp"),
    "decoder/layers/self_attn/q_proj/kernel": (None, "fsdp", "tensor", None),
    "decoder/layers/self_attn/q_proj/bias": (None, "tensor", None),
    "decoder/layers/self_attn/k_proj/kernel": (None, "fsdp", "tensor", None),
    "decoder/layers/self_attn/k_proj/bias": (None, "tensor", None),
    "decoder/layers/self_attn/v_proj/kernel": (None, "fsdp", "tensor", None),
    "decoder/layers/self_attn/v_proj/bias": (None, "tensor", None),
    "decoder/layers/self_attn/o_proj/kernel": (None, "tensor", None, "fsdp"),
    "decoder/norm/scale": (None,),
    "lm_head/kernel": ("fsdp", "tensor"),
    "visual/patch_embed/kernel": (None, "fsdp"),
    "visual/blocks/norm1/scale": (None, None),
    "visual/blocks/norm1/bias": (None, None),
    "visual/blocks/norm2/scale": (None, None),
    "visual/blocks/norm2/bias": (None, None),
    "visual/blocks/attn/qkv/kernel": (None, "fsdp", None, "tensor", None),
    "visual/blocks/attn/qkv/bias": (None, None, "tensor", None),
    "visual/blocks/attn/proj/kernel": (None, "tensor", None, "fsdp"),
    "visual/blocks/attn/proj/bias": (None, "fsdp"),
    "visual/blocks/mlp/fc1/kernel": (None, "fsdp", "tensor"),
    "visual/blocks/mlp/fc1/bias": (None, "tensor"),
    "visual/blocks/mlp/fc2/kernel": (None, "tensor", "fsdp"),
    "visual/blocks/mlp/fc2/bias": (None, "fsdp"),
    "visual/merger/ln_q/scale": (None,),
    "visual/merger/ln_q/bias": (None,),
    "visual/merger/mlp_0/kernel": ("fsdp", "tensor"),
    "visual/merger/mlp_0/bias": ("tensor",),
    "visual/merger/mlp_2/kernel": ("tensor", "fsdp"),
    "visual/merger/mlp_2/bias": ("fsdp",),
}
# rows over data x fsdp (8 rows / 4); the sequence axis has size 1, so tokens and patches stay whole
DP = ("data", "fsdp")
EXPECTED_BATCH_SPECS = {"input_ids": (DP, None), "targets": (DP, None), "loss_mask": (DP, None),
                        "segment_ids": (DP, None), "positions": (DP, None, None),
                        "pixel_values": (DP, None, None), "patch_segment_ids": (DP, None),
                        "patch_positions": (DP, None, None)}


def _sdy_spec(dims: str) -> tuple:
    """'{"tensor"}, {}, {"data", "fsdp"}' (Shardy's per-dimension axes) -> ('tensor', None, ('data', 'fsdp'))."""
    out = []
    for d in re.findall(r"\{([^}]*)\}", dims):
        axes = tuple(re.findall(r'"(\w+)"', d))
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return tuple(out)


def test_train_step_shardings_in_the_lowered_program():
    """The shardings the compiler receives for every state and batch argument and every state result of the
    jitted step, read from the lowered StableHLO, equal the hand-derived PartitionSpecs; Adam's mu and nu
    follow their parameter; the state is donated (each argument aliases an output) and keeps its layout."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    abs_state, st_sh = train_step.abstract_state(CFG, STEP, mesh)
    spec = train_step.batch_spec(CFG, 8, 32, 8)
    b_sh = sharding.batch_shardings(spec, mesh)
    abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in spec.items()}
    text = train_step.make_train_step(CFG, STEP, mesh, st_sh, b_sh).lower(abs_state, abs_batch).as_text()
    main = text[text.index("func.func public @main"):]
    main = main[:main.index("{\n")]
    args = re.findall(r"%arg\d+: tensor<[^>]*> \{sdy\.sharding = #sdy\.sharding<@mesh, \[(.*?)\]>"
                      r"(, tf\.aliasing_output = \d+ : i32)?\}", main)
    results = dict(re.findall(r'jax\.result_info = "result\[0\]([^"]*)", sdy\.sharding = #sdy\.sharding<@mesh, '
                              r"\[(.*?)\]>", main))
    leaves = jax.tree_util.tree_flatten_with_path((abs_state, abs_batch))[0]
    assert len(args) == len(leaves)

    def expected(path: str):
        if path.startswith("[1]"):                                       # the batch
            return EXPECTED_BATCH_SPECS[re.match(r"\[1\]\['(\w+)'\]", path).group(1)]
        m = re.search(r"(?:\.params|\.mu|\.nu)((?:\['\w+'\])+)$", path)
        if m:                                                            # a parameter or its Adam moment
            return EXPECTED_PARAM_SPECS["/".join(re.findall(r"'(\w+)'", m.group(1)))]
        return ()                                                        # step counters: replicated scalars

    checked = set()
    for (path, _), (dims, alias) in zip(leaves, args):
        name = jax.tree_util.keystr(path)
        assert _sdy_spec(dims) == expected(name), name
        state_name = name[len("[0]"):]
        if name.startswith("[0]"):
            assert alias, f"{name} is not donated"
            assert _sdy_spec(results[state_name]) == expected(name), f"result {name}"
            checked.add(state_name)
        else:
            assert not alias, name
    assert {n for n in checked if n.startswith(".params")} == {
        ".params" + "".join(f"['{k}']" for k in p.split("/")) for p in EXPECTED_PARAM_SPECS}


def test_split_merge_and_bad_parts():
    params = _params()
    tr, fr = optim.split_params(params, ("merger",))
    assert list(tr) == ["visual"] and list(tr["visual"]) == ["merger"]
    merged = optim.merge_params(tr, fr)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="vision_tower"):
        optim.split_params(params, ("vit",))


def test_lr_scale_multiplies_each_named_parts_update_only():
    """AdamW updates with lr_scale=((vision_tower, 3), (merger, 0.5)) are exactly 3x / 0.5x the plain
    updates on those parts and equal elsewhere; bad entries are clear errors."""
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1) * jnp.sign(p + 1e-3), params)
    base = optim.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=10)
    scaled = dataclasses.replace(base, lr_scale=(("vision_tower", 3.0), ("merger", 0.5)))

    def first_update(cfg):
        opt = optim.make_optimizer(cfg)
        updates, _ = opt.update(grads, opt.init(params), params)
        return updates

    plain, got = first_update(base), first_update(scaled)
    for part, mult in (("vision_tower", 3.0), ("merger", 0.5), ("llm", 1.0)):
        a, _ = optim.split_params(plain, (part,))
        b, _ = optim.split_params(got, (part,))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert float(jnp.max(jnp.abs(x))) > 0
            np.testing.assert_allclose(np.asarray(y), mult * np.asarray(x), rtol=1e-6, err_msg=part)
    with pytest.raises(ValueError, match="vision_tower"):
        optim.OptimConfig(lr_scale=(("vit", 2.0),))
    with pytest.raises(ValueError, match="multiplier"):
        optim.OptimConfig(lr_scale=(("merger", 0.0),))
    with pytest.raises(ValueError, match="twice"):
        optim.OptimConfig(lr_scale=(("merger", 2.0), ("merger", 3.0)))


def test_microbatches_that_do_not_give_every_device_whole_rows_are_refused():
    """8 rows on 8 batch shards: 2 microbatches would leave 4 rows for 8 devices (XLA would replicate the
    microbatch over the mesh: 8x the activations); the valid counts, by hand, are [1]."""
    import numpy as np
    from qwen2vl_jax.train import sharding, train_step

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    batch = {"input_ids": np.zeros((8, 16), np.int32)}
    with pytest.raises(ValueError, match=r"^microbatches=2 leaves 4 rows per microbatch for 8 batch shards "
                                         r"\(mesh dcn x data x fsdp\); valid: \[1\]$"):
        train_step._split_microbatches(batch, 2, mesh)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=4))     # 2 batch shards: 2 microbatches fit
    assert train_step._split_microbatches(batch, 2, mesh)["input_ids"].shape == (2, 4, 16)
