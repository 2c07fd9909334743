//! Publishers: each sends its share of the messages at its share of the rate.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use ringgate::ws::frame::{write_masked_frame, OpCode};
use tokio::time::Instant;

use super::msg::{close_text, parse_incoming, publish_json, text_frame};
use super::FanStats;
use crate::stream::Stream;
use crate::wire::FrameBuf;

/// One publisher's share of the run.
pub struct Publisher {
    pub s: Stream,
    pub fb: FrameBuf,
    pub mask: [u8; 4],
    /// This publisher's index, and how many there are: its k-th message is message
    /// `k * count + index` of the run.
    pub index: u64,
    pub count: u64,
    pub quota: u64,
}

/// What every publisher shares.
pub struct PubPlan {
    pub topics: Rc<[String]>,
    /// Messages sent per topic.
    pub sent: Rc<[Cell<u64>]>,
    pub size: usize,
    /// Realistic JSON `data` (`--json`).
    pub realistic: bool,
    /// Messages per second for one publisher.
    pub rate: f64,
    /// Timestamps are nanoseconds since this instant.
    pub epoch: Instant,
    pub t0: Instant,
    pub deadline: Instant,
}

impl Publisher {
    pub async fn run(mut self, st: Rc<FanStats>, plan: Rc<PubPlan>) -> Result<u64> {
        let (mut sent, mut wbuf, mut json, mut pong) =
            (0u64, Vec::new(), String::new(), Vec::new());
        while sent < self.quota {
            let now = Instant::now();
            if now >= plan.deadline {
                break;
            }
            let due = (((now - plan.t0).as_secs_f64() * plan.rate) as u64 + 1).min(self.quota);
            if due > sent {
                wbuf.clear();
                let ts = plan.epoch.elapsed().as_nanos() as u64;
                for k in sent..due {
                    let n = k * self.count + self.index;
                    let topic = (n % plan.topics.len() as u64) as usize;
                    publish_json(
                        &mut json,
                        &plan.topics[topic],
                        ts,
                        n,
                        plan.size,
                        plan.realistic,
                    );
                    text_frame(&mut wbuf, self.mask, &json);
                    let c = &plan.sent[topic];
                    c.set(c.get() + 1);
                }
                tokio::time::timeout_at(plan.deadline + Duration::from_secs(1), self.s.send(&wbuf))
                    .await
                    .context("publish write blocked past the time limit")??;
                sent = due;
                continue;
            }
            let at = plan.t0 + Duration::from_secs_f64(sent as f64 / plan.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(at.min(plan.deadline)) => {}
                r = self.fb.fill(&mut self.s) => {
                    r?;
                    let mask = self.mask;
                    self.fb.each(|op, fin, _, body| {
                        match op {
                            OpCode::Text if fin => st.other_message(&parse_incoming(body)?),
                            OpCode::Ping => write_masked_frame(&mut pong, true, OpCode::Pong, mask, body),
                            OpCode::Pong => {}
                            OpCode::Close => bail!("server closed the publisher: {}", close_text(body)),
                            op => bail!("unexpected {op:?} frame (fin={fin}) to a publisher"),
                        }
                        Ok(true)
                    })?;
                    if !pong.is_empty() {
                        self.s.send(&pong).await?;
                        pong.clear();
                    }
                }
            }
        }
        Ok(sent)
    }
}
