//! The pace of the agent's loops: each waits for news or a timer, and backs off after
//! errors. Written once here for the source, reconcile, publish and inbox loops.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Capped exponential backoff: `first`, twice that, … up to `max`; back to `first` after a
/// success.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff that starts at `first` and doubles up to `max`.
    pub(super) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay after this failure; the next one is twice as long, up to the cap.
    pub(super) fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// A success: the next failure waits `first` again.
    pub(super) fn succeeded(&mut self) {
        self.next = self.first;
    }
}

/// What ended a [`Pace::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Woke {
    /// The timer ran out.
    Timer,
    /// The notifier at this index in the list given to `wait` fired.
    News(usize),
    /// The agent stops.
    Stopped,
}

/// One loop's pace: the delay until its next round after a success or an error, and the
/// wait for that delay or news.
#[derive(Debug, Clone)]
pub(super) struct Pace {
    backoff: Backoff,
    failed: bool,
}

impl Pace {
    /// A pace whose errors back off from `first` up to `max`.
    pub(super) fn new(first: Duration, max: Duration) -> Pace {
        Pace {
            backoff: Backoff::new(first, max),
            failed: false,
        }
    }

    /// The round succeeded: the loop waits `wait` (or news).
    pub(super) fn success(&mut self, wait: Duration) -> Duration {
        self.backoff.succeeded();
        self.failed = false;
        wait
    }

    /// The round failed: the loop waits out its backoff, whatever news comes meanwhile.
    pub(super) fn error(&mut self) -> Duration {
        self.failed = true;
        self.backoff.failed()
    }

    /// Waits `delay`, or until one of `news` fires (not after an error: a failed round
    /// waits out its backoff; news that came meanwhile is kept for the next wait), or
    /// until the agent stops.
    pub(super) async fn wait(
        &self,
        delay: Duration,
        news: &[&Notify],
        stop: &watch::Sender<bool>,
    ) -> Woke {
        let mut stop = stop.subscribe();
        let listen = if self.failed { &[][..] } else { news };
        tokio::select! {
            _ = tokio::time::sleep(delay) => Woke::Timer,
            i = any(listen) => Woke::News(i),
            _ = super::stopped(&mut stop) => Woke::Stopped,
        }
    }
}

/// Resolves with the index of the first of `news` to fire; never when there is none.
async fn any(news: &[&Notify]) -> usize {
    let mut waits: Vec<Pin<Box<tokio::sync::futures::Notified<'_>>>> =
        news.iter().map(|n| Box::pin(n.notified())).collect();
    std::future::poll_fn(|cx| {
        for (i, w) in waits.iter_mut().enumerate() {
            if w.as_mut().poll(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    /// Guards issue 13, part 1 (one backoff helper): the delay doubles after each error up
    /// to its cap, and starts again after a success.
    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets_on_success() {
        let ms = Duration::from_millis;
        let mut p = Pace::new(ms(500), ms(3000));
        let waits: Vec<_> = (0..5).map(|_| p.error()).collect();
        assert_eq!(waits, [ms(500), ms(1000), ms(2000), ms(3000), ms(3000)]);
        assert_eq!(p.success(ms(7)), ms(7));
        assert_eq!(p.error(), ms(500));
    }

    /// News ends a wait at once; the timer ends one without news.
    #[tokio::test]
    async fn news_wakes_a_wait_and_the_timer_ends_one() {
        let (a, b) = (Notify::new(), Notify::new());
        let stop = watch::channel(false).0;
        let p = Pace::new(Duration::from_millis(1), LONG);
        b.notify_one();
        assert_eq!(p.wait(LONG, &[&a, &b], &stop).await, Woke::News(1));
        assert_eq!(
            p.wait(Duration::from_millis(1), &[&a, &b], &stop).await,
            Woke::Timer
        );
    }

    /// After an error the wait ignores news (the round backs off), and the news is kept
    /// for the wait after it.
    #[tokio::test]
    async fn a_failed_round_waits_out_its_backoff_and_keeps_the_news() {
        let a = Notify::new();
        let stop = watch::channel(false).0;
        let mut p = Pace::new(Duration::from_millis(1), LONG);
        a.notify_one();
        let d = p.error();
        assert_eq!(p.wait(d, &[&a], &stop).await, Woke::Timer);
        p.success(LONG);
        assert_eq!(p.wait(LONG, &[&a], &stop).await, Woke::News(0));
    }

    /// Shutdown ends a wait, however long, news or not.
    #[tokio::test]
    async fn shutdown_ends_a_wait() {
        let a = Notify::new();
        let stop = watch::channel(false).0;
        let p = Pace::new(Duration::from_millis(1), LONG);
        stop.send_replace(true);
        assert_eq!(p.wait(LONG, &[&a], &stop).await, Woke::Stopped);
    }
}
