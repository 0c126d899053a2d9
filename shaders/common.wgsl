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
