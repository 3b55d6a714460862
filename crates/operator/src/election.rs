//! Leader election on a `coordination.k8s.io/v1` Lease, as a pure state
//! machine: the IO loop reads the Lease, asks [`Elector::decide`] what to
//! write, writes it with the read `resourceVersion` (so two candidates can
//! never both win one round), and reports back.
//!
//! Time is only ever local and monotonic: a candidate considers a lease
//! expired when the Lease object has not changed for `leaseDurationSeconds`
//! *since it saw it change* (as client-go does), so clock skew between
//! replicas does not matter. A leader stops acting `retry_period` before the
//! earliest moment another replica could take over: one that saw our last
//! renewal no earlier than we sent it and then waits a full lease duration.

use std::time::{Duration, Instant};

/// The election's timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_period: Duration,
    /// How often a follower checks whether the lease expired, and the
    /// safety margin before expiry at which a leader that cannot renew stops.
    pub retry_period: Duration,
}

impl Timing {
    /// Rejects timings under which a leader could not renew in time.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_period.is_zero() || self.retry_period.is_zero() {
            return Err("--renew-period and --retry-period must be positive".into());
        }
        if self.lease_duration < Duration::from_secs(1) || self.lease_duration.subsec_nanos() != 0 {
            return Err("--lease-duration must be a whole number of seconds, at least 1s (the Lease stores seconds)".into());
        }
        if self.renew_period + self.retry_period >= self.lease_duration {
            return Err(format!(
                "--renew-period ({:?}) plus --retry-period ({:?}) must be shorter than --lease-duration ({:?}), or the leader steps down between renewals",
                self.renew_period, self.retry_period, self.lease_duration
            ));
        }
        Ok(())
    }
}

/// The parts of a Lease the election reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `spec.holderIdentity` (empty means released).
    pub holder: Option<String>,
    /// `spec.leaseDurationSeconds`.
    pub lease_duration: Option<Duration>,
    /// `spec.leaseTransitions`.
    pub transitions: i32,
    /// `metadata.resourceVersion`: any write changes it.
    pub version: String,
}

impl LeaseRecord {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// What to do after reading the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// There is no Lease: create it naming us.
    Create,
    /// Write ourselves as holder over the version read: a renewal, or a
    /// takeover of an expired or released lease.
    Write {
        /// `spec.leaseTransitions` to write.
        transitions: i32,
        /// A takeover (set `acquireTime`), not a renewal.
        acquire: bool,
    },
    /// Someone else holds a live lease.
    Follow { holder: String },
}

/// A change of leadership to log and act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Elected,
    /// Leadership ended; the reason is for the log.
    Lost(String),
}

/// One candidate's view of the election.
#[derive(Clone, Debug)]
pub struct Elector {
    identity: String,
    timing: Timing,
    /// The last distinct record seen and when it was first seen.
    observed: Option<(LeaseRecord, Instant)>,
    /// While leading: the moment to stop acting unless renewed.
    leading_until: Option<Instant>,
}

impl Elector {
    pub fn new(identity: impl Into<String>, timing: Timing) -> Self {
        Self {
            identity: identity.into(),
            timing,
            observed: None,
            leading_until: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Whether this candidate may act as leader at `now`.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.leading_until.is_some_and(|t| now < t)
    }

    /// When leadership ends unless renewed.
    pub fn leading_until(&self) -> Option<Instant> {
        self.leading_until
    }

    /// Ends leadership whose deadline passed.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.leading_until {
            Some(t) if now >= t => {
                self.leading_until = None;
                Some(Transition::Lost(
                    "could not renew the lease before it could expire".into(),
                ))
            }
            _ => None,
        }
    }

    /// Decides from the Lease just read (`None`: it does not exist). When
    /// someone else holds it, leadership ends at once and the transition
    /// says so.
    pub fn decide(
        &mut self,
        lease: Option<&LeaseRecord>,
        now: Instant,
    ) -> (Step, Option<Transition>) {
        let Some(record) = lease else {
            self.observed = None;
            return (Step::Create, None);
        };
        match &self.observed {
            Some((seen, _)) if seen == record => {}
            _ => self.observed = Some((record.clone(), now)),
        }
        let seen_at = self.observed.as_ref().map_or(now, |(_, t)| *t);
        match record.holder() {
            Some(h) if h == self.identity => (
                Step::Write {
                    transitions: record.transitions,
                    acquire: !self.is_leader(now),
                },
                None,
            ),
            None => (
                Step::Write {
                    transitions: record.transitions.saturating_add(1),
                    acquire: true,
                },
                self.step_down("the lease was released"),
            ),
            Some(h) => {
                let lost = self.step_down(&format!("{h} holds the lease"));
                let duration = record.lease_duration.unwrap_or(self.timing.lease_duration);
                if now >= seen_at + duration {
                    (
                        Step::Write {
                            transitions: record.transitions.saturating_add(1),
                            acquire: true,
                        },
                        lost,
                    )
                } else {
                    (
                        Step::Follow {
                            holder: h.to_owned(),
                        },
                        lost,
                    )
                }
            }
        }
    }

    /// Our write (sent at `sent_at`) succeeded and produced `record`.
    pub fn written(
        &mut self,
        sent_at: Instant,
        record: LeaseRecord,
        now: Instant,
    ) -> Option<Transition> {
        let was = self.is_leader(now);
        self.observed = Some((record, now));
        let until = sent_at + self.timing.lease_duration - self.timing.retry_period;
        if now >= until {
            // The answer came too late to act on.
            self.leading_until = None;
            return was.then(|| Transition::Lost("renewal answered too late".into()));
        }
        self.leading_until = Some(until);
        (!was).then_some(Transition::Elected)
    }

    /// Our write was rejected because the Lease changed since we read it:
    /// someone else wrote it, so stop at once.
    pub fn conflicted(&mut self) -> Option<Transition> {
        self.step_down("the lease changed under us (another replica wrote it)")
    }

    /// Ends leadership now, e.g. on shutdown.
    pub fn step_down(&mut self, reason: &str) -> Option<Transition> {
        self.leading_until
            .take()
            .map(|_| Transition::Lost(reason.to_owned()))
    }

    /// How long to sleep before the next round.
    pub fn next_round(&self, now: Instant) -> Duration {
        match self.leading_until {
            Some(until) => self
                .timing
                .renew_period
                .min(until.saturating_duration_since(now)),
            None => self.timing.retry_period,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timing() -> Timing {
        Timing {
            lease_duration: 15 * S,
            renew_period: 2 * S,
            retry_period: 2 * S,
        }
    }

    fn rec(holder: &str, version: &str) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()).filter(|h: &String| !h.is_empty()),
            lease_duration: Some(15 * S),
            transitions: 3,
            version: version.into(),
        }
    }

    #[test]
    fn creates_a_missing_lease_and_leads_until_just_before_expiry() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        assert_eq!(e.decide(None, t0), (Step::Create, None));
        assert_eq!(
            e.written(t0, rec("a", "1"), t0 + S),
            Some(Transition::Elected)
        );
        assert!(e.is_leader(t0 + S));
        assert_eq!(e.next_round(t0 + S), 2 * S);
        // Renewing: same holder, same transitions, not an acquisition.
        assert_eq!(
            e.decide(Some(&rec("a", "1")), t0 + 3 * S).0,
            Step::Write {
                transitions: 3,
                acquire: false
            }
        );
        // No successful renewal: leadership ends 13 s after the last send.
        assert!(e.is_leader(t0 + 12 * S));
        assert_eq!(e.next_round(t0 + 12 * S), S);
        assert_eq!(e.tick(t0 + 12 * S), None);
        assert!(matches!(e.tick(t0 + 13 * S), Some(Transition::Lost(_))));
        assert!(!e.is_leader(t0 + 13 * S));
        assert_eq!(e.tick(t0 + 14 * S), None, "lost once");
    }

    #[test]
    fn follower_waits_a_full_lease_duration_after_the_last_change_it_saw() {
        let t0 = Instant::now();
        let mut b = Elector::new("b", timing());
        assert_eq!(
            b.decide(Some(&rec("a", "1")), t0).0,
            Step::Follow { holder: "a".into() }
        );
        // a renews: the clock restarts.
        assert_eq!(
            b.decide(Some(&rec("a", "2")), t0 + 10 * S).0,
            Step::Follow { holder: "a".into() }
        );
        assert_eq!(
            b.decide(Some(&rec("a", "2")), t0 + 24 * S).0,
            Step::Follow { holder: "a".into() }
        );
        // 15 s without a change: take over, counting a transition.
        assert_eq!(
            b.decide(Some(&rec("a", "2")), t0 + 25 * S).0,
            Step::Write {
                transitions: 4,
                acquire: true
            }
        );
        assert_eq!(
            b.written(t0 + 25 * S, rec("b", "3"), t0 + 25 * S),
            Some(Transition::Elected)
        );
    }

    #[test]
    fn a_leader_never_overlaps_a_follower_that_takes_over() {
        // a's last renewal is sent at t0 and lands at once; b sees it at the
        // earliest possible moment. b may take over at t0 + 15 s; a has
        // stopped by t0 + 13 s.
        let t0 = Instant::now();
        let mut a = Elector::new("a", timing());
        let mut b = Elector::new("b", timing());
        a.written(t0, rec("a", "7"), t0);
        b.decide(Some(&rec("a", "7")), t0);
        for s in 0..=20 {
            let now = t0 + s * S;
            a.tick(now);
            let takes_over = matches!(b.decide(Some(&rec("a", "7")), now).0, Step::Write { .. });
            assert!(!(a.is_leader(now) && takes_over), "both lead at +{s}s");
        }
    }

    #[test]
    fn stops_at_once_when_someone_else_holds_or_wrote_the_lease() {
        let t0 = Instant::now();
        let mut a = Elector::new("a", timing());
        a.written(t0, rec("a", "1"), t0);
        let (step, lost) = a.decide(Some(&rec("b", "2")), t0 + S);
        assert_eq!(step, Step::Follow { holder: "b".into() });
        assert!(matches!(lost, Some(Transition::Lost(r)) if r.contains("b holds")));
        assert!(!a.is_leader(t0 + S));
        a.written(t0 + 2 * S, rec("a", "3"), t0 + 2 * S);
        assert!(matches!(a.conflicted(), Some(Transition::Lost(_))));
        assert!(!a.is_leader(t0 + 2 * S));
        // A late answer to a renewal does not make a leader.
        assert_eq!(a.written(t0, rec("a", "4"), t0 + 14 * S), None);
        assert!(!a.is_leader(t0 + 14 * S));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut b = Elector::new("b", timing());
        assert_eq!(
            b.decide(Some(&rec("", "5")), t0).0,
            Step::Write {
                transitions: 4,
                acquire: true
            }
        );
    }

    #[test]
    fn timing_is_validated() {
        assert!(timing().validate().is_ok());
        let mut t = timing();
        t.renew_period = 14 * S;
        assert!(
            t.validate()
                .unwrap_err()
                .contains("shorter than --lease-duration")
        );
        t = timing();
        t.lease_duration = Duration::from_millis(1500);
        assert!(t.validate().is_err());
    }
}
