//! `/healthz`: whether the agent does its job, and if not why. A pure function of what
//! the agent's loops last recorded ([`Seen`]) and a probe of the host's beanstalkd, so
//! each way to be unhealthy is a unit test.

use std::time::Duration;

/// How the source loop's last fetch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEnd<'a> {
    /// The branch has not moved.
    Unchanged,
    /// A new commit loaded and validated.
    Loaded,
    /// The new tip does not validate (its commit, why).
    Invalid(&'a str, &'a str),
    /// The fetch failed (why).
    Failed(&'a str),
}

/// What the agent's loops last recorded, for `/healthz` and the status page.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Seen {
    /// When the agent started (Unix seconds).
    pub started_at: u64,
    /// When the source loop last ended a fetch, however it went.
    pub fetch_turn: Option<u64>,
    /// When a fetch last succeeded (the repo answered).
    pub fetch_ok_at: Option<u64>,
    /// Why the last fetch failed, while it does.
    pub fetch_error: Option<String>,
    /// The desired tip that does not validate, and why, until a good one loads.
    pub invalid_tip: Option<(String, String)>,
    /// When the reconcile loop last began a pass.
    pub reconcile_turn: Option<u64>,
    /// What the last plan left alone, and why (the whole cluster's).
    pub blocked: Vec<crate::planner::Blocked>,
}

impl Seen {
    /// Records the end of a fetch at `now`.
    pub fn fetch_ended(&mut self, now: u64, end: FetchEnd<'_>) {
        self.fetch_turn = Some(now);
        match end {
            FetchEnd::Failed(why) => self.fetch_error = Some(why.to_string()),
            FetchEnd::Unchanged => {
                self.fetch_error = None;
                self.fetch_ok_at = Some(now);
            }
            FetchEnd::Loaded => {
                self.fetch_error = None;
                self.fetch_ok_at = Some(now);
                self.invalid_tip = None;
            }
            FetchEnd::Invalid(commit, why) => {
                self.fetch_error = None;
                self.fetch_ok_at = Some(now);
                self.invalid_tip = Some((commit.to_string(), why.to_string()));
            }
        }
    }
}

/// Everything `/healthz` judges, read at one moment.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// What the loops recorded.
    pub seen: &'a Seen,
    /// Whether a desired state is loaded.
    pub loaded: bool,
    /// The probe of this host's beanstalkd: `Err(why)` when it did not answer.
    pub beanstalkd: Result<(), String>,
    /// The poll interval in force.
    pub poll: Duration,
    /// Now (Unix seconds).
    pub now: u64,
}

/// How many poll intervals (at least 10 s each) a loop may go without a turn before the
/// agent counts as stalled.
pub const STALL_INTERVALS: u64 = 3;

/// Healthy, or every reason why not.
pub fn assess(i: &Inputs<'_>) -> Result<(), Vec<String>> {
    let mut why = Vec::new();
    let s = i.seen;
    if let Some(e) = &s.fetch_error {
        why.push(format!("the last fetch of the desired repo failed: {e}"));
    }
    if let Some((commit, e)) = &s.invalid_tip {
        why.push(format!(
            "the desired state at {commit} does not load (the last good one is kept): {e}"
        ));
    }
    if !i.loaded && s.fetch_error.is_none() && s.invalid_tip.is_none() {
        why.push("no desired state read yet".into());
    }
    if let Err(e) = &i.beanstalkd {
        why.push(format!("this host's beanstalkd is unreachable: {e}"));
    }
    let limit = STALL_INTERVALS * i.poll.as_secs().max(10);
    for (name, turn, wanted) in [
        ("source", s.fetch_turn, true),
        // Passes run only once a desired state is loaded.
        ("reconcile", s.reconcile_turn, i.loaded),
    ] {
        let since = turn.unwrap_or(s.started_at);
        let age = i.now.saturating_sub(since);
        if wanted && age > limit {
            why.push(format!(
                "stalled: the {name} loop has not turned for {age}s (limit {limit}s)"
            ));
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Seen {
        let mut s = Seen {
            started_at: 1000,
            ..Seen::default()
        };
        s.fetch_ended(1000, FetchEnd::Loaded);
        s.reconcile_turn = Some(1000);
        s
    }

    fn inputs(seen: &Seen, now: u64) -> Inputs<'_> {
        Inputs {
            seen,
            loaded: true,
            beanstalkd: Ok(()),
            poll: Duration::from_secs(5),
            now,
        }
    }

    fn why(i: &Inputs<'_>) -> String {
        assess(i).expect_err("unhealthy").join("; ")
    }

    /// Guards issue 15, truth 3: a loaded, turning agent with its beanstalkd is ok.
    #[test]
    fn healthy_when_loaded_turning_and_connected() {
        let s = healthy();
        assert_eq!(assess(&inputs(&s, 1010)), Ok(()));
    }

    /// Guards issue 15, truth 3: a failed fetch makes /healthz not ok, and says why,
    /// even while the last good desired state is kept.
    #[test]
    fn a_failed_fetch_is_unhealthy() {
        let mut s = healthy();
        s.fetch_ended(1005, FetchEnd::Failed("connection refused"));
        let w = why(&inputs(&s, 1006));
        assert!(
            w.contains("last fetch") && w.contains("connection refused"),
            "{w}"
        );
        s.fetch_ended(1007, FetchEnd::Unchanged);
        assert_eq!(assess(&inputs(&s, 1008)), Ok(()));
    }

    /// Guards issue 15, truth 3: a desired tip that does not load is unhealthy until a
    /// good commit loads, even though later fetches find the branch unchanged.
    #[test]
    fn an_invalid_tip_is_unhealthy_until_a_good_one_loads() {
        let mut s = healthy();
        s.fetch_ended(1005, FetchEnd::Invalid("abc123", "vms/a.yaml:3: bad"));
        s.fetch_ended(1006, FetchEnd::Unchanged);
        let w = why(&inputs(&s, 1007));
        assert!(w.contains("abc123") && w.contains("vms/a.yaml:3"), "{w}");
        s.fetch_ended(1008, FetchEnd::Loaded);
        assert_eq!(assess(&inputs(&s, 1009)), Ok(()));
    }

    /// Guards issue 15, truth 3: an unreachable beanstalkd is unhealthy.
    #[test]
    fn an_unreachable_beanstalkd_is_unhealthy() {
        let s = healthy();
        let mut i = inputs(&s, 1001);
        i.beanstalkd = Err("127.0.0.1:1: connection refused".into());
        assert!(why(&i).contains("beanstalkd is unreachable"));
    }

    /// Guards issue 15, truth 3: a loop that has not turned for several poll intervals
    /// is a stalled agent; before its first turn the agent's start counts.
    #[test]
    fn a_stalled_loop_is_unhealthy() {
        let s = healthy();
        // poll 5s counts as 10s: 30s allowed.
        assert_eq!(assess(&inputs(&s, 1030)), Ok(()));
        let w = why(&inputs(&s, 1031));
        assert!(w.contains("reconcile loop has not turned for 31s"), "{w}");
        let fresh = Seen {
            started_at: 1000,
            ..Seen::default()
        };
        let mut i = inputs(&fresh, 1005);
        i.loaded = false;
        assert_eq!(why(&i), "no desired state read yet");
        i.now = 1100;
        assert!(why(&i).contains("source loop has not turned"));
    }
}
