//! Rate-limited log lines: a guest that makes every request fail (or a
//! dying host disk) must not flood the VMM's stderr.

use std::time::{Duration, Instant};

/// Lets through at most `burst` lines per `window`, and tells how many were
/// held back when it lets the next one through.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimit {
    /// At most `burst` lines per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        LogLimit {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`: `Some(n)` with the number of
    /// lines held back since the last one written, `None` to drop it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = match self.window_start {
            Some(start) => now.saturating_duration_since(start) >= self.window,
            None => true,
        };
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Writes `line` to stderr if admitted now, with the count held back.
    pub fn eprint(&mut self, line: &str) {
        match self.admit(Instant::now()) {
            Some(0) => eprintln!("{line}"),
            Some(n) => eprintln!("{line} ({n} similar messages suppressed)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12, item 10: host-error log lines are rate-limited. A burst
    /// passes, the rest of the window is dropped and counted, and the next
    /// window's first line says how many were dropped. (Synthetic instants:
    /// nothing here depends on the test's speed.)
    #[test]
    fn a_burst_passes_then_lines_are_counted_until_the_next_window() {
        let mut limit = LogLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let got: Vec<_> = (0..10)
            .map(|i| limit.admit(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none));
        assert_eq!(limit.admit(t0 + Duration::from_secs(11)), Some(7));
        assert_eq!(limit.admit(t0 + Duration::from_secs(12)), Some(0));
    }
}
