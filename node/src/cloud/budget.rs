//! Call budget: a sliding one-minute window and a per-UTC-day counter, over an
//! injectable clock so tests advance time instead of sleeping.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::CloudError;

pub(super) const MINUTE_MS: u64 = 60_000;
pub(super) const DAY_MS: u64 = 86_400_000;

/// Wall-clock time in milliseconds since the Unix epoch. Wall time (not a
/// monotonic instant) because the day counter follows UTC calendar days.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self(AtomicU64::new(start_ms))
    }

    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    Minute,
    Day,
}

impl fmt::Display for BudgetWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetWindow::Minute => "minute",
            BudgetWindow::Day => "day",
        })
    }
}

/// Counts calls against both limits. Not thread-safe by itself: the client keeps
/// it behind a mutex (the critical sections never await).
#[derive(Debug)]
pub(super) struct Budget {
    per_minute: u32,
    per_day: u32,
    /// Start times of the calls in the last minute, oldest first.
    window: VecDeque<u64>,
    day: u64,
    day_count: u32,
}

impl Budget {
    pub(super) fn new(per_minute: u32, per_day: u32) -> Self {
        Self {
            per_minute,
            per_day,
            window: VecDeque::new(),
            day: 0,
            day_count: 0,
        }
    }

    fn refresh(&mut self, now: u64) {
        // abs_diff: if the wall clock steps back, recent calls still count (we stay
        // conservative) but a step back of more than a minute cannot lock us out.
        while self.window.front().is_some_and(|&t| now.abs_diff(t) >= MINUTE_MS) {
            self.window.pop_front();
        }
        let today = now / DAY_MS;
        if today != self.day {
            self.day = today;
            self.day_count = 0;
        }
    }

    /// Calls still allowed right now: the smaller of what is left this minute and today.
    pub(super) fn left(&mut self, now: u64) -> u32 {
        self.refresh(now);
        let minute_left = self
            .per_minute
            .saturating_sub(u32::try_from(self.window.len()).unwrap_or(u32::MAX));
        let day_left = self.per_day.saturating_sub(self.day_count);
        minute_left.min(day_left)
    }

    /// Takes one call from the budget, or says which limit refuses it and when
    /// the next call would be allowed.
    pub(super) fn try_take(&mut self, now: u64) -> Result<(), CloudError> {
        self.refresh(now);
        if self.day_count >= self.per_day {
            return Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Day,
                limit: self.per_day,
                retry_after_ms: (self.day + 1) * DAY_MS - now,
            });
        }
        if self.window.len() >= self.per_minute as usize {
            let oldest = self.window.front().copied().unwrap_or(now);
            return Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Minute,
                limit: self.per_minute,
                retry_after_ms: (oldest + MINUTE_MS).saturating_sub(now).max(1),
            });
        }
        self.window.push_back(now);
        self.day_count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn minute_window_slides() {
        let mut b = Budget::new(3, 100);
        assert_eq!(b.left(T0), 3);
        b.try_take(T0).expect("1");
        b.try_take(T0 + 10_000).expect("2");
        b.try_take(T0 + 20_000).expect("3");
        assert_eq!(b.left(T0 + 20_000), 0);
        match b.try_take(T0 + 30_000) {
            Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Minute,
                limit: 3,
                retry_after_ms,
            }) => assert_eq!(retry_after_ms, 30_000),
            other => panic!("expected minute exhaustion, got {other:?}"),
        }
        // The first call leaves the window at T0 + 60 s; only one slot frees.
        assert_eq!(b.left(T0 + MINUTE_MS), 1);
        b.try_take(T0 + MINUTE_MS).expect("slot freed");
        assert!(b.try_take(T0 + MINUTE_MS).is_err());
        assert_eq!(b.left(T0 + 10 * MINUTE_MS), 3);
    }

    #[test]
    fn day_counter_resets_at_utc_midnight() {
        let start = 20_000 * DAY_MS + DAY_MS - 5 * MINUTE_MS; // 23:55 UTC
        let mut b = Budget::new(10, 2);
        b.try_take(start).expect("1");
        b.try_take(start + 1).expect("2");
        assert_eq!(b.left(start + 2), 0);
        match b.try_take(start + 2) {
            Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Day,
                retry_after_ms,
                ..
            }) => assert_eq!(retry_after_ms, 5 * MINUTE_MS - 2),
            other => panic!("expected day exhaustion, got {other:?}"),
        }
        let tomorrow = start + 5 * MINUTE_MS;
        assert_eq!(b.left(tomorrow), 2);
        b.try_take(tomorrow).expect("new day");
    }

    #[test]
    fn clock_stepping_back_far_does_not_lock_out() {
        let mut b = Budget::new(1, 100);
        b.try_take(T0).expect("1");
        assert!(b.try_take(T0 - 1_000).is_err(), "small step back: still counted");
        assert_eq!(b.left(T0 - 2 * MINUTE_MS), 1);
    }

    #[test]
    fn manual_clock_advances() {
        let c = ManualClock::new(5);
        c.advance(Duration::from_secs(2));
        assert_eq!(c.now_ms(), 2_005);
        c.set(1);
        assert_eq!(c.now_ms(), 1);
        assert!(SystemClock.now_ms() > T0);
    }
}
