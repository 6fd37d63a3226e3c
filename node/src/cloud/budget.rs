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

/// What a refused limit counts: calls, or tokens (prompt + completion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetUnit {
    Calls,
    Tokens,
}

impl fmt::Display for BudgetUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetUnit::Calls => "calls",
            BudgetUnit::Tokens => "tokens",
        })
    }
}

/// The limits a [`Budget`] enforces (all > 0, checked by `CloudConfig::validate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    pub(super) calls_per_minute: u32,
    pub(super) calls_per_day: u32,
    pub(super) tokens_per_minute: u64,
    pub(super) tokens_per_day: u64,
    /// The largest call: the unit in which tokens left are advertised as calls.
    pub(super) tokens_per_call: u64,
}

/// Tokens taken up front for one call, to be settled once its usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reservation {
    id: u64,
    day: u64,
    tokens: u64,
}

/// What is left right now, for the advert and the status API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Left {
    pub(super) calls: u32,
    pub(super) tokens: u64,
}

/// The day counters that survive a restart (see `persist`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DayUsage {
    /// Days since the Unix epoch (UTC).
    pub(super) day: u64,
    pub(super) calls: u32,
    pub(super) tokens: u64,
}

/// One call in the minute window.
#[derive(Debug)]
struct Slot {
    at: u64,
    id: u64,
    tokens: u64,
}

/// Counts calls and tokens against the per-minute and per-day limits. Not
/// thread-safe by itself: the client keeps it behind a mutex (the critical
/// sections never await).
#[derive(Debug)]
pub(super) struct Budget {
    limits: Limits,
    /// Calls of the last minute, oldest first.
    window: VecDeque<Slot>,
    day: u64,
    day_calls: u32,
    /// Reserved tokens of calls in flight plus the settled usage of the others.
    day_tokens: u64,
    next_id: u64,
    /// Bumped on every change worth persisting, so the writer skips idle periods.
    version: u64,
}

impl Budget {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            limits,
            window: VecDeque::new(),
            day: 0,
            day_calls: 0,
            day_tokens: 0,
            next_id: 0,
            version: 0,
        }
    }

    /// Continues from persisted counters if they belong to the current UTC day;
    /// returns whether they were taken (a file from another day is ignored).
    pub(super) fn restore(&mut self, saved: DayUsage, now: u64) -> bool {
        self.refresh(now);
        if saved.day != self.day {
            return false;
        }
        // max: never lower what this process has already counted.
        self.day_calls = self.day_calls.max(saved.calls);
        self.day_tokens = self.day_tokens.max(saved.tokens);
        true
    }

    /// The day counters as of now (the current UTC day).
    pub(super) fn usage(&mut self, now: u64) -> DayUsage {
        self.refresh(now);
        DayUsage {
            day: self.day,
            calls: self.day_calls,
            tokens: self.day_tokens,
        }
    }

    pub(super) fn version(&self) -> u64 {
        self.version
    }

    fn refresh(&mut self, now: u64) {
        // abs_diff: if the wall clock steps back, recent calls still count (we stay
        // conservative) but a step back of more than a minute cannot lock us out.
        while self
            .window
            .front()
            .is_some_and(|s| now.abs_diff(s.at) >= MINUTE_MS)
        {
            self.window.pop_front();
        }
        let today = now / DAY_MS;
        if today != self.day {
            self.day = today;
            self.day_calls = 0;
            self.day_tokens = 0;
        }
    }

    fn minute_tokens(&self) -> u64 {
        self.window.iter().map(|s| s.tokens).fold(0, u64::saturating_add)
    }

    /// Calls and tokens still allowed right now. `calls` is what peers see as
    /// `budget_left`: it counts only calls the tokens left can pay for at the
    /// largest size, so it reaches 0 when either the calls or the tokens run out.
    pub(super) fn left(&mut self, now: u64) -> Left {
        self.refresh(now);
        let l = self.limits;
        let calls = l
            .calls_per_minute
            .saturating_sub(u32::try_from(self.window.len()).unwrap_or(u32::MAX))
            .min(l.calls_per_day.saturating_sub(self.day_calls));
        let tokens = l
            .tokens_per_minute
            .saturating_sub(self.minute_tokens())
            .min(l.tokens_per_day.saturating_sub(self.day_tokens));
        let by_tokens = tokens / l.tokens_per_call.max(1);
        Left {
            calls: calls.min(u32::try_from(by_tokens).unwrap_or(u32::MAX)),
            tokens,
        }
    }

    /// Takes one call and reserves `tokens` for it, or says which limit refuses
    /// it and when the next call would be allowed. Reserving the most the call
    /// can cost, before it is sent, means concurrent calls cannot overshoot.
    pub(super) fn try_take(&mut self, now: u64, tokens: u64) -> Result<Reservation, CloudError> {
        self.refresh(now);
        let l = self.limits;
        let next_day = (self.day + 1) * DAY_MS - now;
        let exhausted = |window, unit, limit, retry_after_ms| CloudError::BudgetExhausted {
            window,
            unit,
            limit,
            retry_after_ms,
        };
        if self.day_calls >= l.calls_per_day {
            let limit = u64::from(l.calls_per_day);
            return Err(exhausted(BudgetWindow::Day, BudgetUnit::Calls, limit, next_day));
        }
        if self.day_tokens.saturating_add(tokens) > l.tokens_per_day {
            return Err(exhausted(
                BudgetWindow::Day,
                BudgetUnit::Tokens,
                l.tokens_per_day,
                next_day,
            ));
        }
        let oldest = self.window.front().map_or(now, |s| s.at);
        let minute_retry = (oldest + MINUTE_MS).saturating_sub(now).max(1);
        if self.window.len() >= l.calls_per_minute as usize {
            let limit = u64::from(l.calls_per_minute);
            return Err(exhausted(
                BudgetWindow::Minute,
                BudgetUnit::Calls,
                limit,
                minute_retry,
            ));
        }
        if self.minute_tokens().saturating_add(tokens) > l.tokens_per_minute {
            return Err(exhausted(
                BudgetWindow::Minute,
                BudgetUnit::Tokens,
                l.tokens_per_minute,
                minute_retry,
            ));
        }
        self.next_id += 1;
        let id = self.next_id;
        self.window.push_back(Slot { at: now, id, tokens });
        self.day_calls += 1;
        self.day_tokens = self.day_tokens.saturating_add(tokens);
        self.version += 1;
        Ok(Reservation {
            id,
            day: self.day,
            tokens,
        })
    }

    /// Replaces a call's reservation by what it actually used (more or less).
    /// A call settled after midnight changes nothing: the new day starts at 0.
    pub(super) fn settle(&mut self, r: Reservation, used: u64, now: u64) {
        self.refresh(now);
        if let Some(slot) = self.window.iter_mut().find(|s| s.id == r.id) {
            slot.tokens = used;
        }
        if r.day == self.day {
            self.day_tokens = self.day_tokens.saturating_sub(r.tokens).saturating_add(used);
            self.version += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    /// Call limits only: token limits high enough never to bite.
    fn calls(per_minute: u32, per_day: u32) -> Budget {
        Budget::new(Limits {
            calls_per_minute: per_minute,
            calls_per_day: per_day,
            tokens_per_minute: u64::MAX,
            tokens_per_day: u64::MAX,
            tokens_per_call: 1,
        })
    }

    #[test]
    fn minute_window_slides() {
        let mut b = calls(3, 100);
        assert_eq!(b.left(T0).calls, 3);
        b.try_take(T0, 1).expect("1");
        b.try_take(T0 + 10_000, 1).expect("2");
        b.try_take(T0 + 20_000, 1).expect("3");
        assert_eq!(b.left(T0 + 20_000).calls, 0);
        match b.try_take(T0 + 30_000, 1) {
            Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Minute,
                unit: BudgetUnit::Calls,
                limit: 3,
                retry_after_ms,
            }) => assert_eq!(retry_after_ms, 30_000),
            other => panic!("expected minute exhaustion, got {other:?}"),
        }
        // The first call leaves the window at T0 + 60 s; only one slot frees.
        assert_eq!(b.left(T0 + MINUTE_MS).calls, 1);
        b.try_take(T0 + MINUTE_MS, 1).expect("slot freed");
        assert!(b.try_take(T0 + MINUTE_MS, 1).is_err());
        assert_eq!(b.left(T0 + 10 * MINUTE_MS).calls, 3);
    }

    #[test]
    fn day_counter_resets_at_utc_midnight() {
        let start = 20_000 * DAY_MS + DAY_MS - 5 * MINUTE_MS; // 23:55 UTC
        let mut b = calls(10, 2);
        b.try_take(start, 1).expect("1");
        b.try_take(start + 1, 1).expect("2");
        assert_eq!(b.left(start + 2).calls, 0);
        match b.try_take(start + 2, 1) {
            Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Day,
                retry_after_ms,
                ..
            }) => assert_eq!(retry_after_ms, 5 * MINUTE_MS - 2),
            other => panic!("expected day exhaustion, got {other:?}"),
        }
        let tomorrow = start + 5 * MINUTE_MS;
        assert_eq!(b.left(tomorrow).calls, 2);
        b.try_take(tomorrow, 1).expect("new day");
    }

    #[test]
    fn clock_stepping_back_far_does_not_lock_out() {
        let mut b = calls(1, 100);
        b.try_take(T0, 1).expect("1");
        assert!(
            b.try_take(T0 - 1_000, 1).is_err(),
            "small step back: still counted"
        );
        assert_eq!(b.left(T0 - 2 * MINUTE_MS).calls, 1);
    }

    fn tokens(per_minute: u64, per_day: u64, per_call: u64) -> Budget {
        Budget::new(Limits {
            calls_per_minute: 1_000,
            calls_per_day: 10_000,
            tokens_per_minute: per_minute,
            tokens_per_day: per_day,
            tokens_per_call: per_call,
        })
    }

    #[test]
    fn reservations_bound_a_burst_and_settle_to_usage() {
        let mut b = tokens(10_000, 1_000, 100);
        assert_eq!(
            b.left(T0),
            Left {
                calls: 10,
                tokens: 1_000
            }
        );
        // Five calls in flight reserve 5 × 200: the sixth is refused before any is answered.
        let rs: Vec<_> = (0..5).map(|_| b.try_take(T0, 200).expect("within")).collect();
        assert_eq!(b.left(T0), Left { calls: 0, tokens: 0 });
        match b.try_take(T0, 1) {
            Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Day,
                unit: BudgetUnit::Tokens,
                limit: 1_000,
                ..
            }) => {}
            other => panic!("expected day token exhaustion, got {other:?}"),
        }
        // Answers used 50 each: 750 come back.
        for r in rs {
            b.settle(r, 50, T0 + 1);
        }
        assert_eq!(b.usage(T0 + 1).tokens, 250);
        assert_eq!(
            b.left(T0 + 1),
            Left {
                calls: 7,
                tokens: 750
            }
        );
        // A call that used more than it reserved is counted at its real cost.
        let r = b.try_take(T0 + 2, 100).expect("take");
        b.settle(r, 700, T0 + 3);
        assert_eq!(b.left(T0 + 3), Left { calls: 0, tokens: 50 });
        assert!(b.try_take(T0 + 3, 51).is_err());
        b.try_take(T0 + 3, 50).expect("exactly what is left");
    }

    #[test]
    fn minute_token_window_slides_and_settles() {
        let mut b = tokens(300, 1_000_000, 100);
        let r = b.try_take(T0, 300).expect("take");
        match b.try_take(T0 + 1_000, 1) {
            Err(CloudError::BudgetExhausted {
                window: BudgetWindow::Minute,
                unit: BudgetUnit::Tokens,
                retry_after_ms,
                ..
            }) => assert_eq!(retry_after_ms, MINUTE_MS - 1_000),
            other => panic!("expected minute token exhaustion, got {other:?}"),
        }
        b.settle(r, 100, T0 + 2_000);
        assert_eq!(
            b.left(T0 + 2_000),
            Left {
                calls: 2,
                tokens: 200
            }
        );
        assert_eq!(b.left(T0 + MINUTE_MS).tokens, 300);
        assert_eq!(b.usage(T0 + MINUTE_MS).tokens, 100, "the day keeps it");
    }

    #[test]
    fn a_reservation_from_yesterday_does_not_touch_today() {
        let start = 20_000 * DAY_MS + DAY_MS - 1;
        let mut b = tokens(10_000, 1_000, 100);
        let r = b.try_take(start, 500).expect("take");
        b.try_take(start + 1, 400).expect("new day");
        b.settle(r, 0, start + 2);
        assert_eq!(b.usage(start + 2).tokens, 400);
    }

    #[test]
    fn restore_takes_only_the_same_day() {
        let mut b = tokens(10_000, 1_000, 100);
        let day = T0 / DAY_MS;
        assert!(!b.restore(
            DayUsage {
                day: day - 1,
                calls: 5,
                tokens: 900
            },
            T0
        ));
        assert_eq!(b.left(T0).tokens, 1_000);
        assert!(b.restore(
            DayUsage {
                day,
                calls: 5,
                tokens: 900
            },
            T0
        ));
        assert_eq!(
            b.left(T0),
            Left {
                calls: 1,
                tokens: 100
            }
        );
        assert_eq!(
            b.usage(T0),
            DayUsage {
                day,
                calls: 5,
                tokens: 900
            }
        );
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
