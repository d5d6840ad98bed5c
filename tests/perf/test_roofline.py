"""perf.roofline: the compiled-program step-time estimate, against hand counts.

Synthetic HLO text (no libtpu needed) pins the parser: loop trip counts (condition constant, loop-invariant
bound, init, increment, known_trip_count; nested loops multiply), dot / convolution FLOPs, HBM bytes of
sliced and in-place fusion operands, collective ring bytes per replica-group format. Programs compiled for
compile-only TPU devices (skipped without libtpu) check the same against the real TPU compiler's output:
scans of matmuls, shard_map collectives on 8 chips, splash attention's visited blocks, the chip clocks, and
the test model's real train step against flops.py's formulas.
"""
import dataclasses
import re

import numpy as np
import pytest

from qwen2vl_jax.perf import roofline
from qwen2vl_jax.train import chips

V5P = chips.get_chip("v5p")


# ---------------------------------------------------------------------------------------------
# synthetic HLO

LOOPS = """HloModule synthetic, is_scheduled=true, num_partitions=8

%inner_body (p0: (s32[], f32[64,32], f32[32,32])) -> (s32[], f32[64,32], f32[32,32]) {
  %p0 = (s32[], f32[64,32]{1,0}, f32[32,32]{1,0}) parameter(0)
  %i0 = s32[] get-tuple-element(%p0), index=0
  %i0c = s32[] copy(%i0)
  %x0 = f32[64,32]{1,0} get-tuple-element(%p0), index=1
  %w0 = f32[32,32]{1,0} get-tuple-element(%p0), index=2
  %two = s32[] constant(2)
  %next0 = s32[] add(%i0c, %two)
  %y0 = f32[64,32]{1,0} dot(%x0, %w0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t0 = (s32[], f32[64,32]{1,0}, f32[32,32]{1,0}) tuple(%next0, %y0, %w0)
}

%inner_cond (p1: (s32[], f32[64,32], f32[32,32])) -> pred[] {
  %p1 = (s32[], f32[64,32]{1,0}, f32[32,32]{1,0}) parameter(0)
  %i1 = s32[] get-tuple-element(%p1), index=0
  %lim1 = s32[] constant(12)
  ROOT %lt1 = pred[] compare(%i1, %lim1), direction=LT
}

%outer_body (p2: (s32[], f32[64,32], s32[], f32[32,32])) -> (s32[], f32[64,32], s32[], f32[32,32]) {
  %p2 = (s32[], f32[64,32]{1,0}, s32[], f32[32,32]{1,0}) parameter(0)
  %j2 = s32[] get-tuple-element(%p2), index=0
  %x2 = f32[64,32]{1,0} get-tuple-element(%p2), index=1
  %lim2 = s32[] get-tuple-element(%p2), index=2
  %w2 = f32[32,32]{1,0} get-tuple-element(%p2), index=3
  %start = s32[] constant(2)
  %init = (s32[], f32[64,32]{1,0}, f32[32,32]{1,0}) tuple(%start, %x2, %w2)
  %inner = (s32[], f32[64,32]{1,0}, f32[32,32]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  %y2 = f32[64,32]{1,0} get-tuple-element(%inner), index=1
  %one = s32[] constant(1)
  %next2 = s32[] add(%j2, %one)
  ROOT %t2 = (s32[], f32[64,32]{1,0}, s32[], f32[32,32]{1,0}) tuple(%next2, %y2, %lim2, %w2)
}

%outer_cond (p3: (s32[], f32[64,32], s32[], f32[32,32])) -> pred[] {
  %p3 = (s32[], f32[64,32]{1,0}, s32[], f32[32,32]{1,0}) parameter(0)
  %j3 = s32[] get-tuple-element(%p3), index=0
  %lim3 = s32[] get-tuple-element(%p3), index=2
  ROOT %gt3 = pred[] compare(%lim3, %j3), direction=GT
}

%known_body (p4: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %p4 = (s32[], f32[64,32]{1,0}) parameter(0)
  %k4 = s32[] get-tuple-element(%p4), index=0
  %x4 = f32[64,32]{1,0} get-tuple-element(%p4), index=1
  %t4 = f32[32,64]{0,1} transpose(%x4), dimensions={1,0}
  %y4 = f32[64,64]{1,0} dot(%x4, %t4), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %r4 = (s32[], f32[64,32]{1,0}) tuple(%k4, %x4)
}

%known_cond (p5: (s32[], f32[64,32])) -> pred[] {
  %p5 = (s32[], f32[64,32]{1,0}) parameter(0)
  %k5 = s32[] get-tuple-element(%p5), index=0
  %n5 = s32[] parameter(1)
  ROOT %lt5 = pred[] compare(%k5, %n5), direction=LT
}

ENTRY %main (x: f32[64,32], w: f32[32,32], n: s32[]) -> f32[64,32] {
  %x = f32[64,32]{1,0} parameter(0)
  %w = f32[32,32]{1,0} parameter(1)
  %n = s32[] parameter(2)
  %zero = s32[] constant(0)
  %zc = s32[] copy(%zero)
  %three = s32[] constant(3)
  %init_outer = (s32[], f32[64,32]{1,0}, s32[], f32[32,32]{1,0}) tuple(%zc, %x, %three, %w)
  %outer = (s32[], f32[64,32]{1,0}, s32[], f32[32,32]{1,0}) while(%init_outer), condition=%outer_cond, body=%outer_body
  %xo = f32[64,32]{1,0} get-tuple-element(%outer), index=1
  %init_known = (s32[], f32[64,32]{1,0}) tuple(%n, %xo)
  %known = (s32[], f32[64,32]{1,0}) while(%init_known), condition=%known_cond, body=%known_body, backend_config={"known_trip_count":{"n":"7"}}
  %init_unknown = (s32[], f32[64,32]{1,0}) tuple(%n, %xo)
  %unknown = (s32[], f32[64,32]{1,0}) while(%init_unknown), condition=%known_cond, body=%known_body
  ROOT %out = f32[64,32]{1,0} get-tuple-element(%known), index=1
}
"""


def test_trip_counts_from_the_loop_and_nested_loops_multiply():
    module = roofline.parse_module(LOOPS)
    assert module.num_devices == 8
    trips = {name: roofline.trip_count(module, module.instrs[name]) for name in ("outer", "inner", "known", "unknown")}
    # outer: j = 0; 3 > j (bound carried in the tuple); j += 1 -> 3. inner: i = 2; i < 12; i += 2 -> 5.
    # known: backend_config says 7. unknown: its init comes from a parameter -> not readable.
    assert trips == {"outer": 3, "inner": 5, "known": 7, "unknown": None}
    a = roofline.analyze(LOOPS)
    # 3 x 5 dots [64,32]x[32,32], then 7 dots [64,32]x[32,64]; the unreadable loop counts once, with a warning
    assert a.matmul_flops == 3 * 5 * 2 * 64 * 32 * 32 + (7 + 1) * 2 * 64 * 64 * 32
    assert a.warnings == ["while %unknown: trip count not readable, counted once"]
    assert ("inner", 5) in a.loops and ("outer", 3) in a.loops


CONV_AND_FUSIONS = """HloModule convs, num_partitions=1

%fused_slice (param_0: f32[10,64,64], param_1: s32[]) -> f32[64,64] {
  %param_0 = f32[10,64,64]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = f32[1,64,64]{2,1,0} dynamic-slice(%param_0, %param_1, %c0, %c0), dynamic_slice_sizes={1,64,64}
  ROOT %bc = f32[64,64]{1,0} bitcast(%ds)
}

%fused_update (param_2: f32[10,64,64], param_3: f32[1,64,64], param_4: s32[]) -> f32[10,64,64] {
  %param_2 = f32[10,64,64]{2,1,0} parameter(0)
  %param_3 = f32[1,64,64]{2,1,0} parameter(1)
  %param_4 = s32[] parameter(2)
  %c1 = s32[] constant(0)
  ROOT %dus = f32[10,64,64]{2,1,0} dynamic-update-slice(%param_2, %param_3, %param_4, %c1, %c1)
}

%fused_matmul (param_5: bf16[2,256,4,128], param_6: bf16[2,256,4,128]) -> f32[2,4,256,256] {
  %param_5 = bf16[2,256,4,128]{3,2,1,0} parameter(0)
  %param_6 = bf16[2,256,4,128]{3,2,1,0} parameter(1)
  ROOT %conv = f32[2,4,256,256]{3,2,1,0} convolution(%param_5, %param_6), window={size=2x4 stride=1x3 lhs_dilate=2x4}, dim_labels=0b1f_0o1i->01bf
}

ENTRY %main (stack: f32[10,64,64], idx: s32[], upd: f32[1,64,64], q: bf16[2,256,4,128], v: f32[64,64], x: f32[8,32,16], k: f32[3,16,24], lhs3: bf16[8,512,2,48], rhs3: bf16[2,48,1536,1]) -> f32[8,512,1536,1] {
  %stack = f32[10,64,64]{2,1,0} parameter(0)
  %idx = s32[] parameter(1)
  %upd = f32[1,64,64]{2,1,0} parameter(2)
  %q = bf16[2,256,4,128]{3,2,1,0} parameter(3)
  %v = f32[64,64]{1,0:T(8,128)S(1)} parameter(4)
  %x = f32[8,32,16]{2,1,0} parameter(5)
  %k = f32[3,16,24]{2,1,0} parameter(6)
  %lhs3 = bf16[8,512,2,48]{3,2,1,0} parameter(7)
  %rhs3 = bf16[2,48,1536,1]{3,2,1,0} parameter(8)
  %sliced = f32[64,64]{1,0} fusion(%stack, %idx), kind=kLoop, calls=%fused_slice, backend_config={"window_config":{"estimated_cycles":"100"}}
  %updated = f32[10,64,64]{2,1,0} fusion(%stack, %upd, %idx), kind=kLoop, calls=%fused_update, backend_config={"window_config":{"estimated_cycles":"250"}}
  %scores = f32[2,4,256,256]{3,2,1,0} fusion(%q, %q), kind=kOutput, calls=%fused_matmul
  %vmem = f32[64,64]{1,0} add(%v, %sliced)
  %conv2 = f32[8,32,24]{2,1,0} convolution(%x, %k), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
  ROOT %conv3 = f32[8,512,1536,1]{2,1,0,3} convolution(%lhs3, %rhs3), window={size=2x1}, dim_labels=1b0f_0io1->1bf0
}
"""


def test_matmul_flops_and_hbm_bytes_of_fusions():
    module = roofline.parse_module(CONV_AND_FUSIONS)
    # the TPU form of einsum("bthd,bshd->bhts"): batch and heads as dilated spatial dimensions (one tap per
    # output position), so 2 * B * H * T * S * D
    assert roofline.conv_flops(module, module.instrs["conv"]) == 2 * 2 * 4 * 256 * 256 * 128
    # a real 1-D convolution: batch 8, 32 positions, 16 -> 24 features, window 3 padded by 1 on each side:
    # the two edge outputs have one tap in the padding -> 32 * 3 - 2 taps
    assert roofline.conv_flops(module, module.instrs["conv2"]) == 2 * 8 * 24 * 16 * (32 * 3 - 2)
    # a windowed-einsum piece as the TPU compiler emits it: two K=48 slices stacked on spatial dim 0 (window
    # 2), 8 rows on spatial dim 1 (window 1; listed first in the labels): 8 x 512 rows x 1536 x K=96
    assert roofline.conv_flops(module, module.instrs["conv3"]) == 2 * 8 * 512 * 1536 * 96
    a = roofline.analyze(CONV_AND_FUSIONS)
    slice_, plane, idx = 64 * 64 * 4, 64 * 64 * 4, 4
    assert a.hbm_bytes == (
        (slice_ + idx + plane)                     # sliced: reads one [64, 64] plane, writes it
        + (plane + idx + plane)                    # updated in place: reads the update, writes it
        + (2 * 2 * 256 * 4 * 128 * 2 + 2 * 4 * 256 * 256 * 4)   # scores: both operands + f32 result
        + (plane + plane)                          # vmem add: %v lives in VMEM (S(1)), not counted
        + (8 * 32 * 16 * 4 + 3 * 16 * 24 * 4 + 8 * 32 * 24 * 4)    # conv2
        + (8 * 512 * 96 * 2 + 96 * 1536 * 2 + 8 * 512 * 1536 * 4))  # conv3
    assert a.estimated_cycles == 350


COLLECTIVES = """HloModule collectives, num_partitions=8

ENTRY %main (a: f32[128,256]) -> f32[128,256] {
  %a = f32[128,256]{1,0} parameter(0)
  %ag = f32[1024,256]{1,0} all-gather(%a), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %ar = f32[128,256]{1,0} all-reduce(%a), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
  %rs = f32[64,256]{1,0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, to_apply=%add
  %ars = f32[128,256]{1,0} all-reduce-start(%a), channel_id=4, replica_groups={}, to_apply=%add
  %ard = f32[128,256]{1,0} all-reduce-done(%ars)
  %cps = (f32[128,256]{1,0}, f32[128,256]{1,0}, u32[], u32[]) collective-permute-start(%a), channel_id=5, source_target_pairs={{0,1},{1,2}}
  %cpd = f32[128,256]{1,0} collective-permute-done(%cps)
  ROOT %a2a = f32[128,256]{1,0} all-to-all(%a), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}
"""


def test_collective_bytes_by_kind_and_group_size():
    a = roofline.analyze(COLLECTIVES)
    b = 128 * 256 * 4
    assert {k: tuple(v) for k, v in a.collectives.items()} == {
        ("all-gather", 8): (1, b, 7 * b),                  # sends its shard to 7 others
        ("all-reduce", 4): (1, b, 2 * 3 / 4 * b),          # iota groups [2,4]: 4 devices each
        ("all-reduce", 8): (1, b, 2 * 7 / 8 * b),          # empty groups: all 8 devices (async start/done once)
        ("reduce-scatter", 2): (1, b, b / 2),
        ("collective-permute", 2): (1, b, b),
        ("all-to-all", 8): (1, b, 7 / 8 * b)}
    est = roofline.estimate(COLLECTIVES, V5P)
    assert est.ici_s == pytest.approx(a.ici_bytes / (2 * 100e9))   # one v5p link each way: 100 GB/s


FUSED_COLLECTIVES = """HloModule fused_collectives, num_partitions=8

%start (p0: f32[32,256]) -> (f32[32,256], f32[128,256]) {
  %p0 = f32[32,256]{1,0} parameter(0)
  %ag0 = f32[128,256]{1,0} all-gather(%p0), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  ROOT %cs = (f32[32,256]{1,0}, f32[128,256]{1,0}) custom-call(%ag0), custom_call_target="AsyncCollectiveStart"
}

%step (p1: f32[32,256], p2: f32[128,256], p3: f32[256,256]) -> (f32[128,256], f32[32,256]) {
  %p1 = f32[32,256]{1,0} parameter(0)
  %p2 = f32[128,256]{1,0} parameter(1)
  %p3 = f32[256,256]{1,0} parameter(2)
  %ag1 = f32[128,256]{1,0} all-gather(%p1), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %mm = f32[32,256]{1,0} dot(%p1, %p3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (f32[128,256]{1,0}, f32[32,256]{1,0}) tuple(%p2, %mm)
}

%done (p4: f32[32,256], p5: f32[128,256]) -> f32[128,256] {
  %p4 = f32[32,256]{1,0} parameter(0)
  %p5 = f32[128,256]{1,0} parameter(1)
  %ag2 = f32[128,256]{1,0} all-gather(%p4), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  ROOT %cd = f32[128,256]{1,0} custom-call(%p4, %p5, %ag2), custom_call_target="AsyncCollectiveDone"
}

%reduce (p6: f32[32,256]) -> f32[32,256] {
  %p6 = f32[32,256]{1,0} parameter(0)
  ROOT %ar = f32[32,256]{1,0} all-reduce(%p6), channel_id=8, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}, to_apply=%add
}

ENTRY %main (x: f32[32,256], w: f32[256,256]) -> f32[128,256] {
  %x = f32[32,256]{1,0} parameter(0)
  %w = f32[256,256]{1,0} parameter(1)
  %s = (f32[32,256]{1,0}, f32[128,256]{1,0}) fusion(%x), kind=kCustom, calls=%start
  %buf = f32[128,256]{1,0} get-tuple-element(%s), index=1
  %c = (f32[128,256]{1,0}, f32[32,256]{1,0}) fusion(%x, %buf, %w), kind=kOutput, calls=%step
  %buf2 = f32[128,256]{1,0} get-tuple-element(%c), index=0
  %r = f32[32,256]{1,0} fusion(%x), kind=kLoop, calls=%reduce
  ROOT %d = f32[128,256]{1,0} fusion(%x, %buf2), kind=kCustom, calls=%done
}
"""


def test_collectives_fused_with_compute_count_once_per_channel():
    # async collective fusion: one all-gather (channel 7) appears in its start fusion, in a compute fusion it
    # overlaps and in its done fusion; it runs once. Mesh-style replica groups: over the listed axes.
    a = roofline.analyze(FUSED_COLLECTIVES)
    b = 32 * 256 * 4
    assert {k: tuple(v) for k, v in a.collectives.items()} == {
        ("all-gather", 4): (1, b, 3 * b),                  # over 'axis_1' = 4 devices
        ("all-reduce", 8): (1, b, 2 * 7 / 8 * b)}          # over both axes
    assert a.matmul_flops == 2 * 32 * 256 * 256 and not a.warnings


def test_kernel_costs_are_pluggable_and_unknown_kernels_are_reported():
    text = """HloModule kernels, num_partitions=1

ENTRY %main (q: bf16[4,128,64]) -> bf16[4,128,64] {
  %q = bf16[4,128,64]{2,1,0} parameter(0)
  %k1 = bf16[4,128,64]{2,1,0} custom-call(%q), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/my_kernel/pallas_call"}
  ROOT %k2 = bf16[4,128,64]{2,1,0} custom-call(%k1), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/other/pallas_call"}
}
"""
    a = roofline.analyze(text)
    assert a.total_kernel_flops == 0 and len(a.warnings) == 2
    assert "kernel my_kernel: no KernelCostFn claims it" in a.warnings[0]

    def mine(call):
        if call.name != "my_kernel":
            return None
        assert call.operand_dims(0) == (4, 128, 64) and call.target == "tpu_custom_call"
        return roofline.KernelCost(flops=1e9, label="mine")

    a = roofline.analyze(text, [mine])
    assert dict(a.kernel_flops) == {"mine": 1e9, "other (unknown kernel: no FLOPs)": 0.0}
    # without its own HBM figure a kernel reads its operands and writes its results once
    assert a.kernel_hbm_bytes == a.hbm_bytes == 2 * 2 * (4 * 128 * 64 * 2)
    assert len(a.warnings) == 1 and "other" in a.warnings[0]


def _splash_call(phase: str, mask):
    meta = ('{kernel_metadata={\n"xprof_metadata":"{\\"block_q\\": 128, \\"block_kv\\": 128, \\"block_q_dkv\\": '
            '128, \\"block_kv_dkv\\": 128, \\"block_q_dq\\": 128, \\"block_kv_dq\\": 128}"\n}}')
    return roofline.KernelCall(
        name=f"splash_mqa_{phase}_segmented_no_residuals", target="tpu_custom_call", op_name="", metadata=meta,
        operands=("s8[1,4,4]", "s8[1,4,4]", "bf16[2,3,4,512,64]", "bf16[2,3,512,64]", "bf16[2,3,512,64]"),
        result="bf16[2,3,4,512,64]", constants=(None, mask, None, None, None))


def test_splash_cost_counts_the_blocks_its_mask_visits():
    causal = 2 * np.tril(np.ones((4, 4), np.int8)) - np.eye(4, dtype=np.int8)  # 2 full, 1 diagonal, 0 skip
    batch, heads, T, S, D = 2 * 3, 4, 512, 512, 64                          # vmapped [B, Hkv] = [2, 3]
    full_pairs = batch * heads * T * S
    for phase, matmuls in (("fwd", 2), ("dq", 3), ("dkv", 4)):
        full = roofline.splash_cost(_splash_call(phase, None))
        assert full.flops == 2 * full_pairs * D * matmuls
        assert "block mask not readable" in full.warning                         # never silently
        c = roofline.splash_cost(_splash_call(phase, causal[None]))
        assert c.flops == 2 * full_pairs * (10 / 16) * D * matmuls                # 10 of 16 blocks run
        assert not c.warning
        # HBM: operands + result + two [128, 64] bf16 blocks per visited block pair
        io = 2 * (2 * 3 * 4 * 512 * 64 * 2) + 2 * (2 * 3 * 512 * 64 * 2) + 2 * 16
        assert c.hbm_bytes == io + batch * heads * 10 * 2 * 128 * 64 * 2
    assert roofline.splash_cost(dataclasses.replace(_splash_call("fwd", None), name="flash_fwd")) is None


HOISTED_MASK = """HloModule hoisted, num_partitions=1

%fwd_body (pa: (s32[], s8[1,4,4])) -> (s32[], s8[1,4,4]) {
  %pa = (s32[], s8[1,4,4]{2,1,0}) parameter(0)
  %ia = s32[] get-tuple-element(%pa), index=0
  %ma = s8[1,4,4]{2,1,0} get-tuple-element(%pa), index=1
  %onea = s32[] constant(1)
  %nexta = s32[] add(%ia, %onea)
  ROOT %ta = (s32[], s8[1,4,4]{2,1,0}) tuple(%nexta, %ma)
}

%fwd_cond (pb: (s32[], s8[1,4,4])) -> pred[] {
  %pb = (s32[], s8[1,4,4]{2,1,0}) parameter(0)
  %ib = s32[] get-tuple-element(%pb), index=0
  %limb = s32[] constant(2)
  ROOT %ltb = pred[] compare(%ib, %limb), direction=LT
}

%bwd_body (pc: (s32[], s8[1,4,4], bf16[3,4,512,64], bf16[3,512,64])) -> (s32[], s8[1,4,4], bf16[3,4,512,64], bf16[3,512,64]) {
  %pc = (s32[], s8[1,4,4]{2,1,0}, bf16[3,4,512,64]{3,2,1,0}, bf16[3,512,64]{2,1,0}) parameter(0)
  %ic = s32[] get-tuple-element(%pc), index=0
  %mc = s8[1,4,4]{2,1,0} get-tuple-element(%pc), index=1
  %qc = bf16[3,4,512,64]{3,2,1,0} get-tuple-element(%pc), index=2
  %kc = bf16[3,512,64]{2,1,0} get-tuple-element(%pc), index=3
  %cs = (s8[1,4,4]{2,1,0:S(1)}, s8[1,4,4]{2,1,0}, u32[]) copy-start(%mc)
  %cd = s8[1,4,4]{2,1,0:S(1)} copy-done(%cs)
  %splash_mqa_fwd_no_residuals.1 = bf16[3,4,512,64]{3,2,1,0} custom-call(%cd, %cd, %qc, %kc, %kc), custom_call_target="tpu_custom_call"
  %onec = s32[] constant(1)
  %nextc = s32[] add(%ic, %onec)
  ROOT %tc = (s32[], s8[1,4,4]{2,1,0}, bf16[3,4,512,64]{3,2,1,0}, bf16[3,512,64]{2,1,0}) tuple(%nextc, %mc, %splash_mqa_fwd_no_residuals.1, %kc)
}

%bwd_cond (pd: (s32[], s8[1,4,4], bf16[3,4,512,64], bf16[3,512,64])) -> pred[] {
  %pd = (s32[], s8[1,4,4]{2,1,0}, bf16[3,4,512,64]{3,2,1,0}, bf16[3,512,64]{2,1,0}) parameter(0)
  %id = s32[] get-tuple-element(%pd), index=0
  %limd = s32[] constant(3)
  ROOT %ltd = pred[] compare(%id, %limd), direction=LT
}

ENTRY %main (q: bf16[3,4,512,64], k: bf16[3,512,64]) -> bf16[3,4,512,64] {
  %q = bf16[3,4,512,64]{3,2,1,0} parameter(0)
  %k = bf16[3,512,64]{2,1,0} parameter(1)
  %mask = s8[1,4,4]{2,1,0} constant({ { { 1, 0, 0, 0 }, { 2, 1, 0, 0 }, { 2, 2, 1, 0 }, { 2, 2, 2, 1 } } })
  %zero = s32[] constant(0)
  %init_fwd = (s32[], s8[1,4,4]{2,1,0}) tuple(%zero, %mask)
  %fwd = (s32[], s8[1,4,4]{2,1,0}) while(%init_fwd), condition=%fwd_cond, body=%fwd_body
  %carried = s8[1,4,4]{2,1,0} get-tuple-element(%fwd), index=1
  %init_bwd = (s32[], s8[1,4,4]{2,1,0}, bf16[3,4,512,64]{3,2,1,0}, bf16[3,512,64]{2,1,0}) tuple(%zero, %carried, %q, %k)
  %bwd = (s32[], s8[1,4,4]{2,1,0}, bf16[3,4,512,64]{3,2,1,0}, bf16[3,512,64]{2,1,0}) while(%init_bwd), condition=%bwd_cond, body=%bwd_body
  ROOT %out = bf16[3,4,512,64]{3,2,1,0} get-tuple-element(%bwd), index=2
}
"""


def test_a_block_mask_hoisted_into_loop_state_is_still_read():
    # the 2B step's decoder masks reach the backward layer scan through the forward scan's carried state
    full = 2 * 3 * 4 * 512 * 512 * 64 * 2                      # per call, every block pair
    a = roofline.analyze(HOISTED_MASK)
    assert a.total_kernel_flops == 3 * full * 10 / 16           # 3 iterations, 10 of 16 blocks
    # a loop that rewrites the mask element: its value is not the constant any more -> every pair counts
    changing = HOISTED_MASK.replace("tuple(%nextc, %mc, %splash", "tuple(%nextc, %cd, %splash")
    a = roofline.analyze(changing)
    assert a.total_kernel_flops == 3 * full and "block mask not readable" in a.warnings[0]


def test_estimate_terms_bound_mfu_and_last_line():
    cycles_per_s = 459e12 / (2 * 4 * 128 * 128 * 2)       # v5p: 2 TensorCores x 4 MXUs of 128 x 128 MACs
    a = roofline.Analysis(num_devices=4, matmul_flops=459e12, hbm_bytes=2765e9 * 3, estimated_cycles=cycles_per_s)
    a.collectives[("all-gather", 4)] = [1, 1e9, 3e9]
    est = roofline.Estimate(a, V5P, useful_flops=459e12 / 3, six_nd_flops=459e12 / 4)
    assert est.terms == pytest.approx({"compute": 1.0, "hbm": 3.0, "ici": 3e9 / 200e9})
    assert (est.bound, est.step_s) == ("hbm", pytest.approx(3.0))
    assert est.no_overlap_s == pytest.approx(1.0 + 3.0 + 0.015)
    assert est.compiler_s == pytest.approx(1.0) and est.compiler_view_s == pytest.approx(1.0)
    text = roofline.format_estimate(est)
    assert text.splitlines()[-1] == ("estimate (compiler view): 1 s/step, MFU 0.333 "
                                     "[upper bound (roofline): 3 s/step, MFU 0.111, hbm-bound]")
    assert "MFU vs 6ND" in text and "0.250 compiler view; 0.083 roofline bound" in text


COMPILER_VIEW = """HloModule compiler_view, num_partitions=4

%mm (a: bf16[256,512], b: bf16[512,1024]) -> bf16[256,1024] {
  %a = bf16[256,512]{1,0} parameter(0)
  %b = bf16[512,1024]{1,0} parameter(1)
  ROOT %d = bf16[256,1024]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%neg (g: f32[1024,256]) -> f32[1024,256] {
  %g = f32[1024,256]{1,0} parameter(0)
  ROOT %n = f32[1024,256]{1,0} negate(%g)
}

%sum (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[256,512], bf16[512,1024], f32[1024,256])) -> (s32[], bf16[256,512], bf16[512,1024], f32[1024,256]) {
  %p = (s32[], bf16[256,512]{1,0}, bf16[512,1024]{1,0}, f32[1024,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %a = bf16[256,512]{1,0} get-tuple-element(%p), index=1
  %b = bf16[512,1024]{1,0} get-tuple-element(%p), index=2
  %g = f32[1024,256]{1,0} get-tuple-element(%p), index=3
  %f = bf16[256,1024]{1,0} fusion(%a, %b), kind=kOutput, calls=%mm, backend_config={"window_config":{"estimated_cycles":"40000"}}
  %u = f32[1024,256]{1,0} fusion(%g), kind=kLoop, calls=%neg
  %ar = f32[1024,256]{1,0} all-reduce(%u), replica_groups={}, to_apply=%sum
  %cs = (f32[1024,256]{1,0}, f32[1024,256]{1,0}, u32[]) copy-start(%ar)
  %cd = f32[1024,256]{1,0} copy-done(%cs)
  %k = bf16[1,4,1024,80]{3,2,1,0} custom-call(%f), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/my_kernel/pallas_call"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[256,512]{1,0}, bf16[512,1024]{1,0}, f32[1024,256]{1,0}) tuple(%next, %a, %b, %cd)
}

%cond (c: (s32[], bf16[256,512], bf16[512,1024], f32[1024,256])) -> pred[] {
  %c = (s32[], bf16[256,512]{1,0}, bf16[512,1024]{1,0}, f32[1024,256]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%ci, %three), direction=LT
}

ENTRY %main (a: bf16[256,512], b: bf16[512,1024], g: f32[1024,256]) -> f32[1024,256] {
  %a = bf16[256,512]{1,0} parameter(0)
  %b = bf16[512,1024]{1,0} parameter(1)
  %g = f32[1024,256]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[256,512]{1,0}, bf16[512,1024]{1,0}, f32[1024,256]{1,0}) tuple(%zero, %a, %b, %g)
  %loop = (s32[], bf16[256,512]{1,0}, bf16[512,1024]{1,0}, f32[1024,256]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[1024,256]{1,0} get-tuple-element(%loop), index=3
}
"""


def test_compiler_view_counts_cycles_ops_without_cycles_and_modelled_kernels_per_trip():
    """Hand count of the compiler view of a loop run 3 times. Per trip: a matmul fusion the compiler gives
    40000 cycles; ops it gives none, each at its roofline time: a fusion reading and writing 1 MiB (HBM), a
    synchronous all-reduce of 1 MiB over 4 devices (ring: 2 x 3/4 MiB sent), the scalar counter add (12 B);
    an asynchronous copy-start (charged nothing); a kernel of 1 GFLOP with head_dim 80, run as 128 lanes, at
    the fraction of peak the compiler's cycles give the matmul fusion."""
    def mine(call):
        return roofline.KernelCost(flops=1e9, mxu_flops=roofline.lane_padded(1e9, roofline.parse_shape(call.result)[0].dims[-1]))

    est = roofline.estimate(COMPILER_VIEW, V5P, kernel_costs=[mine], useful_flops=4 * 1e12)
    clock, peak, mib = V5P.clock_hz, V5P.peak_bf16_flops, 1024 * 256 * 4
    mm = 2 * 256 * 1024 * 512
    assert est.analysis.estimated_cycles == 3 * 40000 and est.compiler_s == pytest.approx(3 * 40000 / clock)
    fraction = mm / (40000 / clock * peak)
    assert est.matmul_efficiency == pytest.approx(fraction) and est.kernel_fraction == pytest.approx(fraction)
    uncosted = 3 * (2 * mib / V5P.hbm_bandwidth + 2 * 3 / 4 * mib / V5P.ring_bandwidth + 12 / V5P.hbm_bandwidth)
    assert est.uncosted_s == pytest.approx(uncosted)
    kernel = 3 * 1e9 * 128 / 80 / (fraction * peak)
    assert est.kernel_s == pytest.approx(kernel)
    assert est.compiler_view_s == pytest.approx(3 * 40000 / clock + uncosted + kernel)
    assert est.mfu(est.useful_flops, est.compiler_view_s) == pytest.approx(1e12 / est.compiler_view_s / peak)
    # a given kernel efficiency replaces the program's matmul fraction; out of (0, 1] it is refused
    half = roofline.estimate(COMPILER_VIEW, V5P, kernel_costs=[mine], kernel_efficiency=0.5)
    assert half.kernel_s == pytest.approx(3 * 1e9 * 128 / 80 / (0.5 * peak))
    with pytest.raises(ValueError, match="kernel_efficiency=1.5; valid: 0 < fraction <= 1"):
        roofline.estimate(COMPILER_VIEW, V5P, kernel_efficiency=1.5)


def test_lane_padding_of_the_attention_kernels():
    """head_dim D runs on the MXU as D rounded up to 128 lanes: the splash and block-sparse kernels' MXU
    FLOPs are their FLOPs x 128 / 64 (splash call with D = 64), x 128 / 80 (block-sparse, Qwen2-VL's ViT)
    and x 1 at D = 128."""
    assert roofline.lane_padded(1e9, 80) == pytest.approx(1.6e9) and roofline.lane_padded(1e9, 128) == 1e9
    assert roofline.lane_padded(1e9, 200) == pytest.approx(1e9 * 256 / 200)
    splash = roofline.splash_cost(_splash_call("fwd", np.ones((1, 4, 4), np.int8)))
    assert splash.mxu_flops == pytest.approx(2 * splash.flops)
    from qwen2vl_jax.model import block_sparse_attention as bsa
    for D in (80, 128):
        B, Hq, T = 1, 16, 2048
        bq, bkv = bsa.block_sizes(T, T)
        call = roofline.KernelCall(
            name="block_sparse_fwd", target="tpu_custom_call", op_name="", metadata="", result=f"bf16[{B},{Hq},{T},{D}]",
            operands=("s32[1]", f"s32[{B * (T // bq) * (T // bkv)}]", f"bf16[{B},{Hq},{T},{D}]",
                      f"bf16[{B},2,{T},{D}]", f"bf16[{B},2,{T},{D}]"), constants=(None,) * 5)
        cost = roofline.block_sparse_cost(lambda call, t, s: (np.ones(t, np.int32), np.ones(s, np.int32), False))(call)
        # every block pair of one segment, not causal: T x T pairs per head, q.k and p.v
        assert cost.flops == 2 * 2 * B * Hq * T * T * D
        assert cost.mxu_flops == pytest.approx(cost.flops * 128 / D)


@pytest.mark.parametrize("init, cond, step, direction, trips", [
    (2, lambda i: i <= 6, 1, "LE", 5),            # 2, 3, 4, 5, 6
    (2, lambda i: i < 6, 1, "LT", 4),             # 2, 3, 4, 5
    (9, lambda i: i >= 3, -2, "GE", 4),           # 9, 7, 5, 3
    (9, lambda i: i > 3, -2, "GT", 3),            # 9, 7, 5
    (0, lambda i: i != 12, 3, "NE", 4)])          # 0, 3, 6, 9
def test_trip_count_of_compiled_while_loops_by_compare_direction(init, cond, step, direction, trips):
    """A jax while_loop compiled by XLA (host CPU) whose condition compiles to each compare direction: the
    trip count read from the loop itself (compare, init, increment; the compiler's known_trip_count removed
    from the text) and the matmul FLOPs of its body x trips, against the hand count in the comments."""
    import jax
    import jax.numpy as jnp

    def f(x, w):
        return jax.lax.while_loop(lambda c: cond(c[0]), lambda c: (c[0] + step, jnp.tanh(c[1] @ w)),
                                  (jnp.int32(init), x))[1]

    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    text = jax.jit(f).lower(x, x).compile().as_text()
    assert re.findall(r"direction=(\w+)", text) == [direction]      # the loop tests what this case names
    assert re.findall(r'"known_trip_count":\{"n":"(\d+)"', text) == [str(trips)]   # XLA's own count agrees
    text = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    module = roofline.parse_module(text)
    loop, = [i for i in module.instrs.values() if i.opcode == "while"]
    assert roofline.trip_count(module, loop) == trips
    assert roofline.analyze(text).matmul_flops == trips * 2 * 32 ** 3


# ---------------------------------------------------------------------------------------------
# programs compiled by the TPU compiler (compile-only devices)

@pytest.fixture(scope="module")
def tpu(tpu_devices):
    from qwen2vl_jax.perf import aot
    return aot


def _devices(aot, topology):
    return aot.get_topology_devices(aot.parse_topology(topology))


def _replicated(devices, shape, dtype):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P()))


def test_scanned_matmuls_on_tpu_count_every_iteration(tpu):
    import jax
    import jax.numpy as jnp
    devices = _devices(tpu, "v5p:2x2x1")
    N, OUTER, m, k = 6, 3, 256, 512

    def f(x, w):                                   # OUTER x (scan over N stacked [k, k] weights)
        def layer(c, wi):
            return jnp.tanh(c @ wi), None
        return jax.lax.scan(lambda c, _: (jax.lax.scan(layer, c, w)[0], None), x, None, length=OUTER)[0]

    x, w = _replicated(devices, (m, k), jnp.bfloat16), _replicated(devices, (N, k, k), jnp.bfloat16)
    compiled = jax.jit(f).lower(x, w).compile()
    a = roofline.analyze(roofline.hlo_text(compiled))
    assert a.matmul_flops == OUTER * N * 2 * m * k * k
    assert sorted(t for _, t in a.loops) == [OUTER, N]
    # XLA's own cost analysis takes each loop body once: the reason for this module
    assert compiled.cost_analysis()["flops"] < 1.1 * 2 * m * k * k
    # the stacked weights are read one [k, k] slice per iteration, not the whole stack
    assert a.hbm_bytes < OUTER * N * (3 * m * k + 2 * k * k) * 2


def test_attention_einsums_on_tpu(tpu):
    import jax
    import jax.numpy as jnp
    devices = _devices(tpu, "v5p:2x2x1")
    B, T, H, D = 2, 256, 4, 128

    def f(q, k, w):
        s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("bhts,bshd->bthd", s.astype(q.dtype), k) @ w

    q, w = _replicated(devices, (B, T, H, D), jnp.bfloat16), _replicated(devices, (D, 3 * D), jnp.bfloat16)
    a = roofline.analyze(roofline.hlo_text(jax.jit(f).lower(q, q, w).compile()))
    assert a.matmul_flops == 2 * (2 * B * H * T * T * D) + 2 * B * T * H * D * 3 * D


def test_shard_map_collectives_on_8_chips(tpu):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from qwen2vl_jax.model.attention import shard_map
    mesh = Mesh(np.array(_devices(tpu, "v5p:2x2x2")), ("x",))
    rows, cols = 64, 1024

    def g(x):
        return jax.lax.psum(x, "x"), jax.lax.all_gather(x, "x", tiled=True)

    fn = jax.jit(shard_map(g, mesh, P("x"), (P(), P())))
    x = jax.ShapeDtypeStruct((8 * rows, cols), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    est = roofline.estimate(fn.lower(x).compile(), V5P)
    shard = rows * cols * 4
    got = {k: tuple(v) for k, v in est.analysis.collectives.items()}
    assert got == {("all-reduce", 8): (1, shard, 2 * 7 / 8 * shard), ("all-gather", 8): (1, shard, 7 * shard)}
    assert est.analysis.num_devices == 8
    assert est.ici_s == pytest.approx((2 * 7 / 8 + 7) * shard / 200e9)


def test_splash_kernels_on_tpu_visit_the_causal_blocks(tpu):
    import jax
    import jax.numpy as jnp
    from qwen2vl_jax.model import attention
    devices = _devices(tpu, "v5p:2x2x1")
    B, T, Hq, Hkv, D = 2, 1024, 4, 2, 128

    def loss(q, k, v, seg, causal):
        o = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, impl="splash")
        return o.astype(jnp.float32).sum()

    q = _replicated(devices, (B, T, Hq, D), jnp.bfloat16)
    kv = _replicated(devices, (B, T, Hkv, D), jnp.bfloat16)
    seg = _replicated(devices, (B, T), jnp.int32)
    flops = {}
    with jax.default_matmul_precision("default"):    # Mosaic rejects bf16 under the tests' "highest"
        for causal in (False, True):
            grad = jax.jit(jax.grad(lambda *a: loss(*a, causal), argnums=(0, 1, 2)))
            a = roofline.analyze(roofline.hlo_text(grad.lower(q, kv, kv, seg).compile()))
            assert not a.warnings
            flops[causal] = {re.search(r"splash_mqa_(\w+) ", k).group(1): v for k, v in a.kernel_flops.items()}
    pairs = B * Hq * T * T                          # 512-blocks: 2 x 2 grid per head, causal runs 3 of 4
    assert flops[False] == {"fwd": 2 * pairs * D * 2, "dq": 2 * pairs * D * 3, "dkv": 2 * pairs * D * 4}
    assert flops[True] == {k: v * 3 / 4 for k, v in flops[False].items()}


def test_block_sparse_kernels_on_tpu_count_the_block_pairs_their_segments_meet(tpu):
    """The block-sparse kernels compiled for v5p, costed for three segment layouts of the same program (the
    kernel builds its visit list on device from the segment ids, so the program does not depend on them).
    512 x 512 blocks over T = S = 1024 rows: a 2 x 2 block grid per row and head. Hand counts per row:
    documents of 256 tokens, causal: blocks (0,0) and (1,1) meet (ids 1-2 vs 3-4 do not) -> 2 pairs;
    documents of 384 (ids 1-2 | 2-3), causal: (0,0), (1,0), (1,1) -> 3; no layout: all 4, with a warning."""
    import jax
    import jax.numpy as jnp
    from qwen2vl_jax.model.block_sparse_attention import block_sparse_attention
    devices = _devices(tpu, "v5p:2x2x1")
    B, T, Hq, Hkv, D = 2, 1024, 4, 2, 128

    def loss(q, k, v, seg):
        o = block_sparse_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
        return o.astype(jnp.float32).sum()

    args = (_replicated(devices, (B, T, Hq, D), jnp.bfloat16), _replicated(devices, (B, T, Hkv, D), jnp.bfloat16),
            _replicated(devices, (B, T, Hkv, D), jnp.bfloat16), _replicated(devices, (B, T), jnp.int32))
    with jax.default_matmul_precision("default"):    # Mosaic rejects bf16 under the tests' "highest"
        text = roofline.hlo_text(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile())

    def docs(n):
        ids = np.repeat(np.arange(1, T // n + 2), n)[:T]
        return lambda call, t, s: (ids[:t], ids[:s], True)

    seen = []
    for layout, pairs in ((docs(256), 2), (docs(384), 3), (lambda call, t, s: None, 4)):
        a = roofline.analyze(text, [roofline.block_sparse_cost(layout)])
        got = {re.search(r"block_sparse_(\w+) ", k).group(1): v for k, v in a.kernel_flops.items()}
        per_phase = B * pairs * 512 * 512 * Hq * 2 * D
        assert got == {"fwd": 2 * per_phase, "dq": 3 * per_phase, "dkv": 4 * per_phase}, pairs
        assert a.kernel_calls and all(n == 1 for n in a.kernel_calls.values())
        assert bool(a.warnings) == (pairs == 4)
        seen.append(a.kernel_hbm_bytes)
    # HBM: the same operands and results, plus k and v (fwd, dq) or q and dO (dkv) blocks of [512, 128] bf16
    # streamed per visited block pair and query head: 3 kernels x 2 blocks
    per_pair = B * Hq * 3 * 2 * 512 * D * 2
    assert seen[1] - seen[0] == per_pair and seen[2] - seen[1] == per_pair


@pytest.mark.parametrize("gen, topology", [("v5p", "v5p:2x2x1"), ("v5e", "v5e:2x2"), ("v6e", "v6e:2x2"),
                                           ("v4", "v4:2x2x1")])
def test_chip_clock_turns_compiler_cycles_into_a_time_within_the_roofline(tpu, gen, topology):
    # the compiler's cycle estimate of a large bf16 matmul, at the table's clock, must not beat the chip's
    # peak and should not be far from it (a compute-bound matmul)
    import jax
    import jax.numpy as jnp
    n = 8192
    x = _replicated(_devices(tpu, topology), (n, n), jnp.bfloat16)
    est = roofline.estimate(jax.jit(lambda a, b: a @ b).lower(x, x).compile(), chips.get_chip(gen))
    assert est.analysis.matmul_flops == 2 * n ** 3
    ratio = est.compiler_s / est.compute_s
    assert 1.0 <= ratio < 2.5, ratio


@pytest.mark.parametrize("remat", ["none", "full"])
def test_test_model_train_step_matmul_flops_match_flops_py(tpu, remat):
    """The real train step (launch.aot's compile path), test model, stage 2, xla attention, on 4 v5p chips,
    against flops.py's formulas. Hand count = step_flops with every (query, key) pair of each row (xla
    attention computes the full [T, S] square, not only the useful pairs) + one lm-head forward again (the
    loss's chunk body is jax.checkpoint-ed: the backward recomputes each chunk's logits). remat "full" adds
    the forward of every ViT block and decoder layer again, attention included, except the last MLP matmul
    (fc2 / down_proj): the backward needs its input, not its output, so the compiler drops it."""
    from experiments import registry
    from qwen2vl_jax.train import flops

    # two loss chunks: with one, the compiler merges the backward's logits recompute into the forward's
    exp = registry.get_experiment("stage2", "test", ["mesh.data=-1", f"model.remat_policy={remat}", "loss_chunk=64"])
    cfg = exp.model
    assert cfg.attention_impl == "xla"
    result = tpu.compile_train_step(cfg, exp.step_config(), exp.mesh, tpu.parse_topology("v5p:2x2x1"),
                                    exp.batch_size, exp.data.seq_len, exp.data.max_patches)
    n = result.n_devices
    B, S, P = exp.batch_size, exp.data.seq_len, exp.data.max_patches
    f, v = flops.forward_per_unit(cfg), cfg.vision
    hand = flops.step_flops(cfg, tokens=B * S, patches=B * P, text_pairs=B * S * S, patch_pairs=B * P * P,
                            trainable=exp.trainable).total
    hand += B * S * f["lm_head_token"]
    if remat == "full":
        hand += B * P * (f["vit_patch"] - v.depth * 2 * v.mlp_dim * v.embed_dim) + B * P * P * f["patch_pair"]
        hand += (B * S * (f["decoder_token"] - cfg.num_hidden_layers * 2 * cfg.intermediate_size * cfg.hidden_size)
                 + B * S * S * f["text_pair"])
    # rope.rotate_half is a product with a [D, D] signed permutation (not model FLOPs, so not in flops.py):
    # 2 D FLOPs per rotated element of q and k, in the vision tower and the decoder; once forward, once for
    # its gradient, and once more forward under full remat
    vd, hd = v.embed_dim // v.num_heads, cfg.hidden_size // cfg.num_attention_heads
    rotated = (2 * B * P * v.embed_dim * vd * v.depth
               + B * S * (cfg.num_attention_heads + cfg.num_key_value_heads) * hd * hd * cfg.num_hidden_layers)
    matmul = hand + 2 * rotated * (3 if remat == "full" else 2)
    est = roofline.estimate(result.compiled, V5P, useful_flops=hand)
    assert est.analysis.num_devices == n == 4
    assert est.analysis.matmul_flops == matmul / n
    assert est.analysis.total_kernel_flops == 0 and not est.analysis.warnings
    assert re.fullmatch(r"estimate \(compiler view\): \S+ s/step, MFU 0\.\d+ \[upper bound \(roofline\): \S+ "
                        r"s/step, MFU 0\.\d+, (compute|hbm|ici)-bound\]", roofline.format_estimate(est).splitlines()[-1])
