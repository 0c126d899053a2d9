// Helpers shared by every kernel; the loader prepends this file (after the variant constants).

// bf16 is the high half of an f32. Two are packed per u32 word, the even element in the low half.
fn bf16_unpack(word: u32, high: bool) -> f32 {
    if high {
        return bitcast<f32>(word & 0xffff0000u);
    }
    return bitcast<f32>(word << 16u);
}

// f32 -> bf16 bits, round to nearest even (NaN stays NaN: its mantissa keeps a high bit set).
fn bf16_round(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Workgroup index of a 1-D launch spread over x and y (see `linear_groups` in gpu.rs).
fn linear_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Threads of a `workgroup_sum` reduction: 8 groups of 8 (the entry point's workgroup size).
const SUM_THREADS: u32 = 64u;
var<workgroup> sum_partial: array<f32, SUM_THREADS>;
var<workgroup> sum_groups: array<f32, 8>;

// Sum of `v` over a 64-thread workgroup in a fixed order (deterministic): 8 threads add 8 values
// each, then every thread adds those 8. Two barriers rather than a six-level tree: barriers are
// what a CPU adapter pays most for. Call from uniform control flow. Back-to-back calls are safe: a
// call writes `sum_partial`, then passes a barrier before writing `sum_groups`, by which time every
// thread has read the previous call's.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    sum_partial[lid] = v;
    workgroupBarrier();
    if lid < 8u {
        var s = 0.0;
        for (var i = 0u; i < 8u; i++) {
            s += sum_partial[lid * 8u + i];
        }
        sum_groups[lid] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < 8u; i++) {
        total += sum_groups[i];
    }
    return total;
}
