//! Subscribers: connect, subscribe to one topic, then read and check every delivery.

use std::rc::Rc;

use anyhow::{bail, Context as _, Result};
use ringgate::ws::deflate::Inflater;
use ringgate::ws::frame::{write_masked_frame, OpCode};
use tokio::time::Instant;

use super::check::{Finals, SeqCheck};
use super::msg::{close_text, parse_incoming, text_frame};
use super::FanStats;
use crate::stream::Stream;
use crate::target::{connect_timeout, Target, HANDSHAKE_TIMEOUT};
use crate::wire::{mask_from, FrameBuf};
use crate::MAX_SIZE;

pub struct Subscriber {
    s: Stream,
    fb: FrameBuf,
    mask: [u8; 4],
    pub topic: usize,
    check: SeqCheck,
    /// With permessage-deflate: the inflater (in the context mode the server answered) and
    /// its output buffer.
    inflate: Option<(Inflater, Vec<u8>)>,
}

/// Connects, subscribes to `topics[topic]` and waits for the `subscribed` reply. `conflated`:
/// the topics are conflated and these are the run's last values.
pub async fn subscribe(
    t: &Target,
    sd: u64,
    topics: &[String],
    topic: usize,
    deflate: bool,
    conflated: Option<Rc<Finals>>,
) -> Result<Subscriber> {
    let u = connect_timeout(t, sd, deflate).await?;
    let inflate = u
        .pmd
        .map(|p| (Inflater::new(!p.server_no_context_takeover), Vec::new()));
    let mask = mask_from(sd);
    let mut sub = Subscriber {
        s: u.s,
        fb: FrameBuf::new(&u.early, 4096),
        mask,
        topic,
        check: SeqCheck::new(conflated.map(|f| (f, topic))),
        inflate,
    };
    let name = &topics[topic];
    let mut f = Vec::new();
    text_frame(
        &mut f,
        mask,
        &format!(r#"{{"action":"subscribe","topic":"{name}","id":"s{sd}"}}"#),
    );
    let sub = tokio::time::timeout(HANDSHAKE_TIMEOUT, async move {
        sub.s.send(&f).await?;
        let mut pong = Vec::new();
        loop {
            let mut base = None;
            let mut err = None;
            sub.fb.each(|op, fin, _, body| {
                match op {
                    OpCode::Text if fin => {
                        let m = parse_incoming(body)?;
                        match m.ty.as_ref() {
                            "subscribed" if m.topic.as_deref() == Some(name.as_str()) => {
                                base = Some(m.seq);
                                return Ok(false);
                            }
                            "error" => {
                                err = Some(format!(
                                    "subscribe refused: {} ({})",
                                    m.error.as_deref().unwrap_or("?"),
                                    m.code.as_deref().unwrap_or("?")
                                ));
                                return Ok(false);
                            }
                            "message" => bail!("room message before the subscribe was confirmed"),
                            _ => {}
                        }
                    }
                    OpCode::Ping => write_masked_frame(&mut pong, true, OpCode::Pong, mask, body),
                    OpCode::Pong => {}
                    OpCode::Close => bail!("server closed during subscribe"),
                    op => bail!("unexpected {op:?} frame (fin={fin}) during subscribe"),
                }
                Ok(true)
            })?;
            if let Some(e) = err {
                bail!(e);
            }
            if !pong.is_empty() {
                sub.s.send(&pong).await?;
                pong.clear();
            }
            if let Some(base) = base {
                sub.check.subscribed(base);
                return Ok(sub);
            }
            sub.fb.fill(&mut sub.s).await?;
        }
    })
    .await
    .context("subscribe timed out")??;
    Ok(sub)
}

impl Subscriber {
    /// Reads and checks deliveries until `stop` changes.
    pub async fn run(
        mut self,
        st: Rc<FanStats>,
        epoch: Instant,
        topics: Rc<[String]>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let mut pong = Vec::new();
        loop {
            let now_ns = epoch.elapsed().as_nanos() as u64;
            let topic = topics[self.topic].as_str();
            let check = &mut self.check;
            let inflate = &mut self.inflate;
            let mask = self.mask;
            self.fb.each(|op, fin, rsv, wire| {
                match op {
                    OpCode::Text | OpCode::Binary if fin => {
                        let body = match (rsv, inflate.as_mut()) {
                            (0, _) => wire,
                            (0b100, Some((z, out))) => {
                                out.clear();
                                z.inflate(wire, MAX_SIZE, out)
                                    .map_err(|e| anyhow::anyhow!("inflate: {e:?}"))?;
                                &out[..]
                            }
                            _ => bail!("reserved bits {rsv:#b} set"),
                        };
                        let m = parse_incoming(body)?;
                        if m.ty != "message" {
                            st.other_message(&m);
                            return Ok(true);
                        }
                        if m.topic.as_deref() != Some(topic) {
                            st.wrong_topic.set(st.wrong_topic.get() + 1);
                            return Ok(true);
                        }
                        let seq = m.seq.context("room message without seq")?;
                        let ts = m
                            .data
                            .as_ref()
                            .and_then(|d| d.ts)
                            .context("room message without data.ts")?;
                        let n = m.data.as_ref().and_then(|d| d.n);
                        let fresh = check.delivery(&st.seq, seq, n)?;
                        if fresh {
                            st.delivered.set(st.delivered.get() + 1);
                            // Bytes on the wire (compressed, when it came so).
                            st.delivered_bytes
                                .set(st.delivered_bytes.get() + wire.len() as u64);
                            st.hist
                                .borrow_mut()
                                .saturating_record(now_ns.saturating_sub(ts).max(1));
                        }
                        st.last_ns.set(now_ns);
                    }
                    OpCode::Ping => write_masked_frame(&mut pong, true, OpCode::Pong, mask, wire),
                    OpCode::Pong => {}
                    OpCode::Close => bail!("server closed the subscriber: {}", close_text(wire)),
                    op => bail!("unexpected {op:?} frame (fin={fin}); fragments are not supported"),
                }
                Ok(true)
            })?;
            if !pong.is_empty() {
                self.s.send(&pong).await?;
                pong.clear();
            }
            tokio::select! {
                r = self.fb.fill(&mut self.s) => r?,
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}

/// Why a subscriber task ended: it should run until the end of the run.
pub fn subscriber_ended(r: Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    let e = match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::anyhow!("subscriber stopped early"),
        Err(e) => anyhow::anyhow!("subscriber task failed: {e}"),
    };
    e.context("subscriber")
}
