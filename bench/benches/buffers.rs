//! What making a send buffer costs, per buffer: allocate, write every byte, turn into the
//! `Buffer` an entry call carries, drop (as a program that makes a fresh buffer every step does).
//!
//! - `make_fill_drop/vec/{size}`: `Buffer::from(vec![0; size])` written through first;
//! - `make_fill_drop/buffer_mut_for_overwrite/{size}`: `BufferMut::for_overwrite`, which from
//!   1 MiB reuses the huge-page mapping the previous iteration dropped;
//! - `make_fill_drop/buffer_mut_zeroed/{size}`: the same, cleared first;
//! - `make_fill_drop/huge_fresh/{size}`: a new huge-page mapping every time (what `BufferMut`
//!   costs without its cache: `charmrs_transport::HugeRegion::zeroed`).
//!
//! Run: `cargo bench -p charmrs-bench --bench buffers` (about a minute).

use charmrs::{Buffer, BufferMut};
use charmrs_transport::HugeRegion;
use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn make_fill_drop(c: &mut Criterion) {
    let mut g = c.benchmark_group("make_fill_drop");
    for size in [1usize << 20, 4 << 20] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("vec", size), &size, |b, &size| {
            b.iter(|| {
                let mut v = vec![0u8; size];
                v.fill(1);
                black_box(Buffer::from(v));
            })
        });
        g.bench_with_input(
            BenchmarkId::new("buffer_mut_for_overwrite", size),
            &size,
            |b, &size| {
                b.iter(|| {
                    let mut m = BufferMut::for_overwrite(size);
                    m.fill(1);
                    black_box(m.freeze());
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("buffer_mut_zeroed", size),
            &size,
            |b, &size| {
                b.iter(|| {
                    let mut m = BufferMut::zeroed(size);
                    m.fill(1);
                    black_box(m.freeze());
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("huge_fresh", size), &size, |b, &size| {
            b.iter(|| {
                let mut r = HugeRegion::zeroed(size).expect("a mapping");
                r.as_mut_slice().fill(1);
                black_box(r);
            })
        });
    }
    g.finish();
}

/// Runs every group (what `criterion_group!` would generate, with a doc comment).
fn benches() {
    let mut c = Criterion::default().configure_from_args();
    make_fill_drop(&mut c);
}

criterion_main!(benches);
