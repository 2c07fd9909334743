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
    let recording = Instant::now();
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
    // And the samples count. Not exactly: metrics-util's bucket loses a sample when a record
    // reserves its slot in a block that an upkeep pass has just read and unlinked (the record
    // loaded the block before the pass took it). With one recording thread that is at most
    // one sample per pass, and the passes that overlapped recording are bounded by the time it
    // took (the upkeep thread's period is wall-clock time), plus the drain in `render`.
    let passes = (recording.elapsed().as_millis() / upkeep.as_millis()) as usize + 2;
    let text = handle.render();
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{PUBLISH_TO_WRITE}_count ")))
        .and_then(|c| c.trim().parse::<f64>().ok())
        .expect("a _count line") as usize;
    let recorded = SAMPLES + 1 + more;
    assert!(
        count <= recorded && count + passes >= recorded,
        "{count} samples counted of {recorded} recorded, over at most {passes} upkeep passes"
    );
}
