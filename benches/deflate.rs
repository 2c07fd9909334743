//! permessage-deflate codec benchmarks: `ringgate::ws::deflate::{Deflater, Inflater}` (flate2 on
//! zlib-rs) against `miniz_oxide` (flate2's default backend, called directly through its stream
//! API, which is what flate2's miniz backend does), on realistic JSON realtime messages.
//!
//! * Messages: chat lines (~100 B), stats updates (~1 KiB, per-host metrics) and presence
//!   snapshots (~16 KiB). Keys repeat, values vary; every message in a sequence is different.
//! * `deflate/{backend}/{size}/L{level}/{takeover|no_takeover}`: compress the whole sequence in
//!   order (with takeover the context carries from message to message, as on one connection;
//!   without it the context is reset after every message, as ringgate's shared per-shard
//!   contexts are). A fresh context per iteration, outside the timing.
//! * `inflate/...`: inflate the same sequence, compressed beforehand in the same mode.
//! * Throughput is uncompressed bytes. Compression ratios (compressed / plain) are printed once
//!   before the benchmarks, and every round trip is checked.
//!
//! Run:
//!
//!     cargo bench --bench deflate
//!     cargo bench --bench deflate -- --quick 'deflate/zlib-rs'

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use miniz_oxide::deflate::core::CompressorOxide;
use miniz_oxide::inflate::stream::InflateState;
use miniz_oxide::{DataFormat, MZFlush, MZStatus};
use ringgate::payload::json_message;
use ringgate::ws::deflate::{Deflater, Inflater};

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
const SIZES: [(usize, &str); 3] = [(100, "100B"), (1024, "1KiB"), (16 * 1024, "16KiB")];
const LEVELS: [u32; 2] = [1, 6];
/// Levels in the printed ratio table (zlib-rs level 1 is a different algorithm, "quick":
/// static Huffman codes only; 2 and up use dynamic trees).
const RATIO_LEVELS: [u32; 4] = [1, 2, 6, 9];
const LIMIT: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Messages: `ringgate::payload`, the same generator as `ringgate-load --payload json`

/// A sequence of different messages of one size, about 256 KiB in all (at least 16 messages).
fn sequence(size: usize) -> Vec<Vec<u8>> {
    let n = (256 * 1024 / size).clamp(16, 256);
    (0..n as u64).map(|i| json_message(i, size)).collect()
}

// ---------------------------------------------------------------------------------------------
// Backends

/// One direction's context, either backend; `compress` / `inflate` follow RFC 7692 (sync flush,
/// tail stripped / re-appended).
trait Codec {
    fn compressor(level: u32, takeover: bool) -> Self;
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>);
}

trait Decodec {
    fn inflater(takeover: bool) -> Self;
    fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>);
}

impl Codec for Deflater {
    fn compressor(level: u32, takeover: bool) -> Self {
        Deflater::new(level, 15, takeover)
    }
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        Deflater::compress(self, input, out)
    }
}

impl Decodec for Inflater {
    fn inflater(takeover: bool) -> Self {
        Inflater::new(takeover)
    }
    fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>) {
        Inflater::inflate(self, input, LIMIT, out).expect("valid deflate data")
    }
}

/// miniz_oxide's compressor, used as flate2's `rust_backend` uses it (raw deflate, 32 KiB
/// window: miniz_oxide cannot compress with a smaller one).
struct Miniz {
    c: Box<CompressorOxide>,
    takeover: bool,
}

impl Codec for Miniz {
    fn compressor(level: u32, takeover: bool) -> Self {
        let mut c = Box::<CompressorOxide>::default();
        c.set_format_and_level(DataFormat::Raw, level as u8);
        Miniz { c, takeover }
    }
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let mut done = 0;
        loop {
            let len = out.len();
            out.resize(len + (input.len() - done) + 64, 0);
            let r = miniz_oxide::deflate::stream::deflate(
                &mut self.c,
                &input[done..],
                &mut out[len..],
                MZFlush::Sync,
            );
            r.status.expect("miniz deflate");
            done += r.bytes_consumed;
            let spare = out.len() - len - r.bytes_written;
            out.truncate(len + r.bytes_written);
            if done == input.len() && spare > 0 {
                break;
            }
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if !self.takeover {
            self.c.reset();
        }
    }
}

struct MinizInflate {
    s: Box<InflateState>,
    takeover: bool,
}

impl Decodec for MinizInflate {
    fn inflater(takeover: bool) -> Self {
        MinizInflate {
            s: InflateState::new_boxed(DataFormat::Raw),
            takeover,
        }
    }
    fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for chunk in [input, &TAIL[..]] {
            let mut done = 0;
            loop {
                let len = out.len();
                out.resize(len + 4096.max(out.capacity() - len), 0);
                let r = miniz_oxide::inflate::stream::inflate(
                    &mut self.s,
                    &chunk[done..],
                    &mut out[len..],
                    MZFlush::Sync,
                );
                done += r.bytes_consumed;
                let spare = out.len() - len - r.bytes_written;
                out.truncate(len + r.bytes_written);
                match r.status {
                    Ok(MZStatus::Ok) | Err(miniz_oxide::MZError::Buf) => {}
                    s => panic!("miniz inflate: {s:?}"),
                }
                if done == chunk.len() && spare > 0 {
                    break;
                }
            }
        }
        if !self.takeover {
            self.s.reset(DataFormat::Raw);
        }
    }
}

/// Compresses the sequence in order with one fresh context; returns the bodies.
fn compress_all<C: Codec>(msgs: &[Vec<u8>], level: u32, takeover: bool) -> Vec<Vec<u8>> {
    let mut c = C::compressor(level, takeover);
    msgs.iter()
        .map(|m| {
            let mut out = Vec::new();
            c.compress(m, &mut out);
            out
        })
        .collect()
}

/// Inflates `bodies` in order with one fresh context and checks them against `msgs`.
fn check_round_trip<D: Decodec>(msgs: &[Vec<u8>], bodies: &[Vec<u8>], takeover: bool) {
    let mut d = D::inflater(takeover);
    let mut out = Vec::new();
    for (m, b) in msgs.iter().zip(bodies) {
        out.clear();
        d.inflate(b, &mut out);
        assert!(out == *m, "round trip changed a message");
    }
}

// ---------------------------------------------------------------------------------------------
// Ratios

fn print_ratios() {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "compressed / plain (lower is better), each sequence compressed in order:"
    );
    let _ = writeln!(
        t,
        "{:<6} {:>5} {:>6} | {:>12} {:>12} | {:>12} {:>12}",
        "size", "msgs", "level", "zlib-rs tko", "zlib-rs no", "miniz tko", "miniz no"
    );
    for (size, name) in SIZES {
        let msgs = sequence(size);
        let plain: usize = msgs.iter().map(Vec::len).sum();
        for level in RATIO_LEVELS {
            let mut cells = Vec::new();
            for zlib in [true, false] {
                for takeover in [true, false] {
                    let bodies = if zlib {
                        compress_all::<Deflater>(&msgs, level, takeover)
                    } else {
                        compress_all::<Miniz>(&msgs, level, takeover)
                    };
                    // Every body must inflate with either backend.
                    check_round_trip::<Inflater>(&msgs, &bodies, takeover);
                    check_round_trip::<MinizInflate>(&msgs, &bodies, takeover);
                    let z: usize = bodies.iter().map(Vec::len).sum();
                    cells.push(format!(
                        "{:.3} ({}B)",
                        z as f64 / plain as f64,
                        z / msgs.len()
                    ));
                }
            }
            let _ = writeln!(
                t,
                "{:<6} {:>5} {:>6} | {:>12} {:>12} | {:>12} {:>12}",
                name,
                msgs.len(),
                level,
                cells[0],
                cells[1],
                cells[2],
                cells[3]
            );
        }
    }
    let _ = writeln!(
        t,
        "(tko = context takeover, no = no_context_takeover; in brackets: mean bytes per message)"
    );
    print!("{t}");
}

// ---------------------------------------------------------------------------------------------
// Benchmarks

fn bench_backend<C: Codec, D: Decodec>(
    c: &mut Criterion,
    backend: &str,
    (size, name): (usize, &str),
) {
    let msgs = sequence(size);
    let plain: usize = msgs.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group(format!("deflate/{backend}/{name}"));
    g.throughput(Throughput::Bytes(plain as u64));
    for level in LEVELS {
        for takeover in [true, false] {
            let mode = if takeover { "takeover" } else { "no_takeover" };
            let mut out = Vec::with_capacity(2 * size + 64);
            g.bench_function(BenchmarkId::new(format!("L{level}"), mode), |b| {
                b.iter_batched_ref(
                    || C::compressor(level, takeover),
                    |z| {
                        for m in &msgs {
                            out.clear();
                            z.compress(black_box(m), &mut out);
                        }
                        black_box(out.len())
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group(format!("inflate/{backend}/{name}"));
    g.throughput(Throughput::Bytes(plain as u64));
    for level in LEVELS {
        for takeover in [true, false] {
            let mode = if takeover { "takeover" } else { "no_takeover" };
            let bodies = compress_all::<C>(&msgs, level, takeover);
            let mut out = Vec::with_capacity(size + 4096);
            g.bench_function(BenchmarkId::new(format!("L{level}"), mode), |b| {
                b.iter_batched_ref(
                    || D::inflater(takeover),
                    |z| {
                        for body in &bodies {
                            out.clear();
                            z.inflate(black_box(body), &mut out);
                        }
                        black_box(out.len())
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn main() {
    print_ratios();
    let mut c = Criterion::default().configure_from_args();
    // Backends interleaved per size, so that drifting background load hits both alike.
    for size in SIZES {
        bench_backend::<Deflater, Inflater>(&mut c, "zlib-rs", size);
        bench_backend::<Miniz, MinizInflate>(&mut c, "miniz_oxide", size);
    }
    c.final_summary();
}
