//! What happens when code on a shard panics.
//!
//! A panic inside one connection's task ends that connection only: the runtime catches it, the
//! shard goes on serving the others. A panic in a shard's own machinery (its control loop and
//! the hub it drives, its accept loops, its tickers) would leave the process half alive, so it
//! is fatal: `/readyz` turns 503, the failure is logged with its location, and the process
//! exits with status 70 (EX_SOFTWARE) so that its supervisor restarts it. Every panic is logged
//! with its location and counted in `ringgate_panics_total`.

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use super::shard::ServerState;
use crate::metrics;

/// The exit status after a fatal shard failure (sysexits' EX_SOFTWARE).
pub const EXIT_SHARD_FAILED: i32 = 70;

/// Logs every panic with its thread and location and counts it. Installed once per process.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let thread = thread.name().unwrap_or("unnamed").to_string();
            let location = info
                .location()
                .map_or_else(|| "unknown".to_string(), |l| l.to_string());
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string payload".into());
            tracing::error!(%thread, %location, message = %payload, "panic");
            ::metrics::counter!(metrics::PANICS, "thread" => thread).increment(1);
        }));
    });
}

/// Runs `fut`, a part of shard `shard`'s own machinery; a panic in it is fatal (see the module
/// docs). Returns its output otherwise.
pub async fn critical<F: Future>(
    global: Arc<ServerState>,
    shard: usize,
    what: &'static str,
    fut: F,
) -> F::Output {
    let mut fut = pin!(fut);
    let caught =
        poll_fn(
            |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
                Ok(Poll::Pending) => Poll::Pending,
                Err(_) => Poll::Ready(Err(())),
            },
        )
        .await;
    match caught {
        Ok(v) => v,
        Err(()) => fail(&global, shard, what),
    }
}

/// Marks the process as not serving and exits with [`EXIT_SHARD_FAILED`].
pub fn fail(global: &ServerState, shard: usize, what: &str) -> ! {
    global.failed.store(true, Ordering::Release);
    tracing::error!(
        shard,
        what,
        "shard failed: exiting so that the supervisor restarts the process"
    );
    // Give a load balancer polling /readyz (served by the other shards) a moment to see 503.
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::process::exit(EXIT_SHARD_FAILED)
}

/// Failure injection for the test of the cross-shard bound: a shard handed a publish of the
/// JSON string `"stall"` by another shard blocks for `RINGGATE_TEST_STALL` milliseconds, as a
/// shard that falls behind would. Compiled only into debug builds.
#[inline]
pub fn inject_stall(msg: &crate::rooms::HubMsg) {
    #[cfg(debug_assertions)]
    {
        static MS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let ms = MS.get_or_init(|| {
            std::env::var("RINGGATE_TEST_STALL")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if let (Some(ms), crate::rooms::HubMsg::Publish { data, .. }) = (ms, msg) {
            if matches!(data, crate::rooms::Payload::Json(d) if &**d == "\"stall\"") {
                std::thread::sleep(std::time::Duration::from_millis(*ms));
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = msg;
}
