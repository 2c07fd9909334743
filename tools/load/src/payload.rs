//! What `echo` and `idle --touch` send: the message pool, and its compressed bodies.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{ensure, Result};
use clap::{Args, ValueEnum};
use ringgate::payload::json_message;
use ringgate::ws::deflate::Deflater;
use ringgate::ws::frame::OpCode;

use crate::MAX_SIZE;

/// Distinct messages in a `--payload json` pool: 256 × 512 B is four times a 32 KiB deflate
/// window, so a context-takeover compressor never finds a whole earlier message to copy.
const JSON_POOL: usize = 256;

/// What is sent, and whether it is compressed.
#[derive(Args, Clone, Copy)]
pub struct MsgArgs {
    /// `pattern`: one repeated byte pattern; `json`: 256 different realistic JSON messages of
    /// exactly `--size` bytes, sent in turn as text.
    #[arg(long, value_enum, default_value_t = PayloadKind::Pattern)]
    pub payload: PayloadKind,
    /// Offer permessage-deflate (`permessage-deflate; client_max_window_bits`, like browsers);
    /// fail if the server declines. Messages are then compressed, replies inflated and checked.
    #[arg(long)]
    pub deflate: bool,
    /// zlib level the client compresses with (6, zlib's default, is what Chrome uses).
    #[arg(long, default_value_t = 6)]
    pub deflate_level: u32,
    /// Compress every message on its own even when the server allows client context takeover
    /// (RFC 7692 lets a client always do so; the server still keeps its inflate context). All
    /// servers then inflate the same bytes, and the client's bodies are computed only once.
    #[arg(long)]
    pub deflate_independent: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PayloadKind {
    Pattern,
    Json,
}

impl MsgArgs {
    /// Checks these options together with the message size.
    pub fn check(&self, size: usize) -> Result<()> {
        ensure!(size <= MAX_SIZE, "--size must be at most {MAX_SIZE}");
        ensure!(self.deflate_level <= 9, "--deflate-level must be 0..=9");
        if self.payload == PayloadKind::Json {
            ensure!(size >= 64, "--payload json needs --size of at least 64");
        }
        Ok(())
    }
}

/// Compressed message bodies, one per pool message.
pub type Bodies = Rc<[Vec<u8>]>;

/// The messages the connections send, in turn.
pub struct Pool {
    pub msgs: Vec<Vec<u8>>,
    pub opcode: OpCode,
    pub level: u32,
    /// Compress messages on their own even where context takeover is allowed.
    pub independent: bool,
    /// Bodies compressed on their own (no context takeover), per client window bits; computed
    /// once and shared by every connection that may not use context takeover.
    compressed: RefCell<Vec<(u8, Bodies)>>,
}

impl Pool {
    pub fn new(kind: PayloadKind, size: usize, text: bool, m: &MsgArgs) -> Pool {
        let (msgs, text) = match kind {
            PayloadKind::Json => (
                (0..JSON_POOL as u64)
                    .map(|i| json_message(i, size))
                    .collect(),
                true,
            ),
            PayloadKind::Pattern => {
                let one = (0..size)
                    .map(|i| {
                        if text {
                            b'a' + (i % 26) as u8
                        } else {
                            (i * 31 + 7) as u8
                        }
                    })
                    .collect();
                (vec![one], text)
            }
        };
        Pool {
            msgs,
            opcode: if text { OpCode::Text } else { OpCode::Binary },
            level: m.deflate_level.min(9),
            independent: m.deflate_independent,
            compressed: RefCell::new(Vec::new()),
        }
    }

    /// Every message compressed on its own with a `bits` window, computed on first use.
    pub fn compressed(&self, bits: u8) -> Bodies {
        let mut c = self.compressed.borrow_mut();
        if let Some((_, v)) = c.iter().find(|(b, _)| *b == bits) {
            return v.clone();
        }
        let mut z = Deflater::new(self.level, bits, false);
        let v: Bodies = self
            .msgs
            .iter()
            .map(|m| {
                let mut out = Vec::new();
                z.compress(m, &mut out);
                out
            })
            .collect();
        c.push((bits, v.clone()));
        v
    }

    /// The largest message, in bytes.
    pub fn largest(&self) -> usize {
        self.msgs.iter().map(Vec::len).max().unwrap_or(0)
    }
}
