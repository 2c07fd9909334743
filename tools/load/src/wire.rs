//! Frames on the wire: reading the server's frames, and the client's masks and close frame.

use anyhow::{ensure, Result};
use ringgate::payload::Rng;
use ringgate::ws::frame::{parse_header, write_masked_frame, OpCode};
use tokio::io::AsyncReadExt;

use crate::stream::Stream;
use crate::MAX_SIZE;

/// A receive buffer that yields whole server frames; grows only for frames that do not fit.
pub struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameBuf {
    /// A buffer of at least `cap` bytes holding `early` (bytes read with the 101 response).
    pub fn new(early: &[u8], cap: usize) -> FrameBuf {
        let mut buf = vec![0u8; cap.max(early.len()).max(64)];
        buf[..early.len()].copy_from_slice(early);
        FrameBuf {
            buf,
            start: 0,
            end: early.len(),
        }
    }

    /// The buffer's size.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Calls `f(opcode, fin, rsv, payload)` for every complete frame buffered, in order, until
    /// `f` returns `false`; an incomplete frame stays for the next `fill`.
    pub fn each(
        &mut self,
        mut f: impl FnMut(OpCode, bool, u8, &[u8]) -> Result<bool>,
    ) -> Result<bool> {
        loop {
            let Some(h) = parse_header(&self.buf[self.start..self.end])
                .map_err(|e| anyhow::anyhow!("bad frame from server: {e}"))?
            else {
                break;
            };
            ensure!(h.mask.is_none(), "server frame is masked");
            ensure!(
                h.payload_len <= MAX_SIZE as u64,
                "server frame of {} bytes",
                h.payload_len
            );
            let total = h.header_len + h.payload_len as usize;
            if self.end - self.start < total {
                if self.start + total > self.buf.len() {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if self.buf.len() < total {
                        self.buf.resize(total, 0);
                    }
                }
                break;
            }
            let body = self.start + h.header_len..self.start + total;
            self.start += total;
            if !f(h.opcode, h.fin, h.rsv, &self.buf[body])? {
                return Ok(false);
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(true)
    }

    /// Reads more bytes from `s`; a closed connection is an error.
    pub async fn fill(&mut self, s: &mut Stream) -> Result<()> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = s.read(&mut self.buf[self.end..]).await?;
        ensure!(n > 0, "server closed the connection");
        self.end += n;
        Ok(())
    }
}

/// A masking key derived from `seed`.
pub fn mask_from(seed: u64) -> [u8; 4] {
    (Rng::new(seed).next_u64() as u32).to_le_bytes()
}

/// The client's close frame with code 1000 (normal closure).
pub fn close_frame(mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8);
    write_masked_frame(&mut f, true, OpCode::Close, mask, &1000u16.to_be_bytes());
    f
}
