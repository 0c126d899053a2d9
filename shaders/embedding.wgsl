// Token embedding: a gather from the table forward, a scatter-add into its gradient backward.
// The table may be split into chunks of vocabulary rows; each dispatch sees one chunk, rows
// [vocab_start, vocab_start + vocab_rows), and skips the ids outside it. The table is bf16 (two
// per word) or f32 (bit patterns) as TABLE_BF16 says. The id list and the index below are one
// chunk each; out / dout are walked in segments of tokens within one chunk.
//
// The backward is deterministic without atomics: the host sorts the token positions by id into
// a CSR index (distinct ids ascending, `starts` into `positions`, positions ascending), and one
// workgroup per distinct id sums its rows of dout in that order and adds the sum to its row.

struct Params {
    // Rows of out / dout in this dispatch (tokens), and the row length.
    tokens: u32,
    cols: u32,
    // The dispatch's first token: its index in the sequence (and in ids, positions hold these
    // indices) and its row's element offset inside the bound chunk of out (forward) or dout.
    token_start: u32,
    token_off: u32,
    vocab_start: u32,
    vocab_rows: u32,
    // Backward: the dispatch's distinct ids are uniq[first_id .. first_id + id_count].
    first_id: u32,
    id_count: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read> dout: array<f32>;
@group(0) @binding(4) var<storage, read> uniq: array<u32>;
@group(0) @binding(5) var<storage, read> starts: array<u32>;
@group(0) @binding(6) var<storage, read> positions: array<u32>;
// The gathered rows (forward) or the table's gradient (backward).
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
// The forward takes a token per workgroup of WG threads across its row (GPUs), or (variant
// constant ROWS_PER_GROUP > 1) a token per thread and ROWS_PER_GROUP tokens per workgroup (CPU
// adapters, where a workgroup's every SIMD group costs even with nothing to do, and a row of a few
// hundred values leaves most of 256 threads idle).
const ROW_LANES: u32 = select(WG, 1u, ROWS_PER_GROUP > 1u);
const GROUP: u32 = select(WG, ROWS_PER_GROUP, ROWS_PER_GROUP > 1u);

fn table_at(i: u32) -> f32 {
    if TABLE_BF16 {
        return bf16_unpack(table[i >> 1u], (i & 1u) == 1u);
    }
    return bitcast<f32>(table[i]);
}

// A token per workgroup or per thread (above).
@compute @workgroup_size(GROUP)
fn embedding_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_group(wid, nwg) * (GROUP / ROW_LANES) + lid / ROW_LANES;
    if t >= p.tokens {
        return;
    }
    // Unsigned: ids below vocab_start wrap around and fail the test too.
    let row = ids[p.token_start + t] - p.vocab_start;
    if row >= p.vocab_rows {
        return;
    }
    let src = row * p.cols;
    let dst = p.token_off + t * p.cols;
    for (var c = lid % ROW_LANES; c < p.cols; c += ROW_LANES) {
        out[dst + c] = table_at(src + c);
    }
}

// One workgroup per distinct id of this table chunk, threads across the row; adds the id's rows
// of dout that lie in this dispatch's token range.
@compute @workgroup_size(256)
fn embedding_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let k = linear_group(wid, nwg);
    if k >= p.id_count {
        return;
    }
    let id = p.first_id + k;
    let dst = (uniq[id] - p.vocab_start) * p.cols;
    let first = starts[id];
    let last = starts[id + 1u];
    for (var c = lid; c < p.cols; c += WG) {
        var acc = 0.0;
        for (var j = first; j < last; j++) {
            let t = positions[j] - p.token_start;
            if t < p.tokens {
                acc += dout[p.token_off + t * p.cols + c];
            }
        }
        out[dst + c] += acc;
    }
}
