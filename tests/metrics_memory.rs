//! Histogram samples do not pile up when nobody scrapes `/metrics`: the recorder queues every
//! sample until upkeep folds it into its buckets, and `metrics::install` must run upkeep on its
//! own. Measured in process with a counting allocator around the system one.

use std::time::{Duration, Instant};

use ringgate::metrics::{install, PUBLISH_TO_WRITE};

mod counting;

const SAMPLES: usize = 1_000_000;

#[test]
fn histogram_samples_are_folded_without_a_scrape() {
    let upkeep = Duration::from_millis(500);
    let handle = install(upkeep, 1).expect("the only recorder of this process");
    let h = metrics::histogram!(PUBLISH_TO_WRITE);
    h.record(0.001); // the series and its first queue block exist from here on
    std::thread::sleep(3 * upkeep);
    let before = counting::live();
    let mut peak = 0;
    for i in 0..SAMPLES {
        h.record(i as f64 * 1e-9);
        if i % 10_000 == 0 {
            peak = peak.max(counting::live() - before);
        }
    }
    // Samples are queued (8 bytes each) between upkeeps: the queue is real, or this test
    // proves nothing. Upkeep may run a few times while we record, hence only 1 MB.
    assert!(peak >= 1 << 20, "queued samples never took 1 MB: {peak}");
    // Upkeep folds them into buckets and frees the queue, with nobody scraping. (The queue's
    // blocks are freed by epoch-based reclamation, which advances as samples keep coming, as
    // they do in a live server: a few are recorded on each turn.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut more = 0;
    loop {
        let held = counting::live() - before;
        if held < 64 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} bytes still held 10 s after recording {SAMPLES} samples"
        );
        for _ in 0..100 {
            h.record(0.0);
            more += 1;
        }
        std::thread::sleep(upkeep / 5);
    }
    // And the samples count.
    let text = handle.render();
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{PUBLISH_TO_WRITE}_count ")))
        .expect("a _count line");
    assert_eq!(
        count.trim().parse::<f64>().ok(),
        Some((SAMPLES + 1 + more) as f64)
    );
}
