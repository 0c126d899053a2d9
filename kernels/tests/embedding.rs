//! Embedding: GPU against the f64 reference on odd shapes, split tables (including the real
//! Qwen vocabulary), out-of-range ids, each rowwise variant of the gather forced; the reference's
//! backward against finite differences.
mod common;
use common::{assert_passed, forced_gpu, gpu, split_gpu};

use wgtrain_kernels::ops::check::{random, to_f64};
use wgtrain_kernels::ops::embedding::{self, cpu, TokenIds};
use wgtrain_kernels::plan::RowwiseVariant;
use wgtrain_kernels::{DType, Tensor};

#[test]
fn matches_cpu_on_odd_shapes() {
    let cases = [(1, 1, 1), (5, 37, 3), (67, 1001, 130), (300, 50, 257)];
    for (i, (tokens, vocab, dim)) in cases.into_iter().enumerate() {
        for bf16 in [false, true] {
            assert_passed(embedding::check(gpu(), tokens, vocab, dim, bf16, i as u64).unwrap());
        }
    }
}

#[test]
fn matches_cpu_on_split_tensors() {
    let gpu = split_gpu(1024);
    for (i, (tokens, vocab, dim)) in [(37, 300, 10), (19, 64, 255), (37, 301, 7), (1, 5, 2)]
        .into_iter()
        .enumerate()
    {
        for bf16 in [false, true] {
            assert_passed(embedding::check(gpu, tokens, vocab, dim, bf16, 10 + i as u64).unwrap());
        }
    }
}

/// The gather with a workgroup and with a thread per token, forced whatever the adapter's plan
/// picks: more tokens than a workgroup of threads, rows shorter and longer than one, whole and on
/// chunks of a few rows.
#[test]
fn every_rowwise_variant_matches_cpu() {
    for &variant in RowwiseVariant::ALL {
        let spec = format!("rowwise={}", variant.name());
        for (i, max_binding_bytes) in [None, Some(1024)].into_iter().enumerate() {
            let gpu = forced_gpu(&spec, max_binding_bytes).unwrap();
            assert_eq!(gpu.plan.rowwise, variant);
            for (tokens, vocab, dim) in [(67, 300, 10), (19, 64, 255)] {
                let checks = embedding::check(&gpu, tokens, vocab, dim, i == 0, 20 + i as u64);
                assert_passed(checks.unwrap());
            }
        }
    }
}

#[test]
fn real_vocabulary_in_chunks() {
    // 256 KiB bindings: the bf16 table splits into 10 chunks, its f32 gradient into 19.
    let gpu = split_gpu(256 << 10);
    for bf16 in [false, true] {
        assert_passed(embedding::check(gpu, 50, 151936, 8, bf16, 3).unwrap());
    }
}

#[test]
fn rejects_ids_outside_the_vocabulary() {
    let gpu = gpu();
    let ids = TokenIds::new(gpu, &[3, 0, 9, 10, 2]).unwrap();
    let table = Tensor::zeros(gpu, &[10, 4], DType::BF16).unwrap();
    let rows = Tensor::zeros(gpu, &[5, 4], DType::F32).unwrap();
    let err = embedding::embedding_forward(&mut gpu.batch(), &ids, &table, &rows).unwrap_err();
    assert!(
        err.to_string().contains("token id 10 at position 3"),
        "{err}"
    );
    let dtable = Tensor::zeros(gpu, &[10, 4], DType::F32).unwrap();
    let err = embedding::embedding_backward(&mut gpu.batch(), &ids, &rows, &dtable).unwrap_err();
    assert!(
        err.to_string().contains("token id 10 at position 3"),
        "{err}"
    );
}

#[test]
fn rejects_mismatched_shapes() {
    let gpu = gpu();
    let ids = TokenIds::new(gpu, &[1, 2, 3]).unwrap();
    let table = Tensor::zeros(gpu, &[10, 4], DType::F32).unwrap();
    let out = Tensor::zeros(gpu, &[4, 4], DType::F32).unwrap();
    let err = embedding::embedding_forward(&mut gpu.batch(), &ids, &table, &out).unwrap_err();
    assert!(err.to_string().contains("embedding out"), "{err}");
    let bf16_grad = Tensor::zeros(gpu, &[10, 4], DType::BF16).unwrap();
    let dout = Tensor::zeros(gpu, &[3, 4], DType::F32).unwrap();
    let err = embedding::embedding_backward(&mut gpu.batch(), &ids, &dout, &bf16_grad).unwrap_err();
    assert!(err.to_string().contains("embedding dtable"), "{err}");
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let (vocab, dim) = (4, 3);
    let ids = [2, 0, 2, 3, 2, 0];
    let mut table = to_f64(&random(1, vocab * dim, 1.0));
    let dout = to_f64(&random(2, ids.len() * dim, 1.0));
    let analytic = cpu::backward(&ids, &dout, vocab, dim);
    let loss = |table: &[f64]| {
        cpu::forward(&ids, table, dim)
            .iter()
            .zip(&dout)
            .map(|(o, g)| o * g)
            .sum::<f64>()
    };
    let h = 1e-6;
    for i in 0..table.len() {
        let keep = table[i];
        table[i] = keep + h;
        let up = loss(&table);
        table[i] = keep - h;
        let down = loss(&table);
        table[i] = keep;
        let numeric = (up - down) / (2.0 * h);
        assert!(
            (analytic[i] - numeric).abs() < 1e-7,
            "dtable[{i}]: {} vs {numeric}",
            analytic[i]
        );
    }
}
