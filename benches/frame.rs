//! Frame-path micro-benchmarks.
//!
//! * `reader_feed/*`: `Reader::feed` over a buffer of whole masked client frames (header parse,
//!   checks, unmask, and for text the UTF-8 validation), as the session does per read.
//! * `parse_unmask/*`: `parse_header` + `unmask` alone over the same buffer.
//! * `unmask/*`: `ringgate::ws::frame::unmask` (fastwebsockets, word-at-a-time) against a naive
//!   byte-by-byte XOR loop.
//!
//! Unmasking is its own inverse, so the benches unmask the same buffer in place on every
//! iteration: binary payloads simply flip between masked and clear, and the headers are never
//! touched. Text frames use an all-zero mask so the payload stays valid UTF-8 on every pass
//! (the XOR work is the same for any key).
//!
//!     cargo bench --bench frame

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringgate::ws::frame::{parse_header, unmask, write_masked_frame, OpCode};
use ringgate::ws::reader::{Event, Flow, Reader};

const SIZES: [(usize, &str); 3] = [(32, "32B"), (1024, "1KiB"), (64 * 1024, "64KiB")];

/// About 256 KiB of identical frames (at least one), and the number of frames.
fn frames(op: OpCode, size: usize, mask: [u8; 4]) -> (Vec<u8>, usize) {
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut one = Vec::new();
    write_masked_frame(&mut one, true, op, mask, &payload);
    let n = (256 * 1024 / one.len()).max(1);
    let mut buf = Vec::with_capacity(n * one.len());
    for _ in 0..n {
        buf.extend_from_slice(&one);
    }
    (buf, n)
}

fn naive_unmask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// The naive loop with vectorisation defeated: one byte per step, as an unoptimised build or a
/// loop the compiler cannot see through would run it.
fn naive_unmask_bytewise(buf: &mut [u8], mask: [u8; 4]) {
    for i in 0..buf.len() {
        let b = black_box(&mut buf[i]);
        *b ^= mask[i % 4];
    }
}

fn bench_reader(c: &mut Criterion) {
    let mut g = c.benchmark_group("reader_feed");
    for (size, name) in SIZES {
        for (op, mask, kind) in [
            (OpCode::Binary, [0x37, 0xfa, 0x21, 0x3d], "binary"),
            (OpCode::Text, [0; 4], "text"),
        ] {
            let (mut buf, n) = frames(op, size, mask);
            g.throughput(Throughput::Bytes((n * size) as u64));
            let mut reader = Reader::new(16 << 20);
            g.bench_function(BenchmarkId::new(kind, name), |b| {
                b.iter(|| {
                    let mut msgs = 0usize;
                    let fed = reader
                        .feed(black_box(&mut buf), |e| {
                            if let Event::Binary(p) | Event::Text(p) = e {
                                msgs += p.len();
                            }
                            Flow::Continue
                        })
                        .expect("valid frames");
                    assert_eq!(fed.consumed, buf.len());
                    msgs
                })
            });
        }
    }
    g.finish();
}

fn bench_parse_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_unmask");
    for (size, name) in SIZES {
        let (mut buf, n) = frames(OpCode::Binary, size, [0x37, 0xfa, 0x21, 0x3d]);
        g.throughput(Throughput::Bytes((n * size) as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let buf = black_box(&mut buf[..]);
                let mut pos = 0;
                while let Ok(Some(h)) = parse_header(&buf[pos..]) {
                    let start = pos + h.header_len;
                    let end = start + h.payload_len as usize;
                    if let Some(m) = h.mask {
                        unmask(&mut buf[start..end], m);
                    }
                    pos = end;
                }
                pos
            })
        });
    }
    g.finish();
}

fn bench_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    for (size, name) in SIZES {
        let mut buf: Vec<u8> = (0..size).map(|i| i as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("fastwebsockets", name), |b| {
            b.iter(|| unmask(black_box(&mut buf[..]), black_box(mask)))
        });
        g.bench_function(BenchmarkId::new("naive", name), |b| {
            b.iter(|| naive_unmask(black_box(&mut buf[..]), black_box(mask)))
        });
        g.bench_function(BenchmarkId::new("naive_bytewise", name), |b| {
            b.iter(|| naive_unmask_bytewise(black_box(&mut buf[..]), black_box(mask)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .sample_size(30);
    targets = bench_reader, bench_parse_unmask, bench_unmask
}
criterion_main!(benches);
