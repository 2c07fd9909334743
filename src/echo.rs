//! `/ws/echo`: every message back as it came (conformance runs and benchmarks).

use crate::ws::connection::{Close, Handler, Message, ToClient};

/// Sends every message back with the same opcode.
pub struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, msg: Message<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
        match msg {
            Message::Text(t) => {
                #[cfg(debug_assertions)]
                if t == b"panic" {
                    crate::error::inject_panic("connection");
                }
                out.text(t)
            }
            Message::Binary(b) => out.binary(b),
        }
        Ok(())
    }
}
