//! Who gets a connection slot when the proxy is full (`max_connections`).
//!
//! A slot held by a connection that has not yet said what it is — still being detected, or
//! in its TLS handshake — is worth less than one that has: a flood of connections that never
//! finish their first bytes (slowloris, stalled ClientHellos) would otherwise keep every slot
//! until its timeout and lock out the peers and apps whose connections would have served
//! requests. So when a new connection finds no free slot, the proxy closes the *oldest*
//! unidentified connection and gives its slot to the newcomer (Envoy's overload manager does
//! the like by shortening timeouts under pressure). An attacker must then reconnect faster
//! than everyone else to hold the proxy, and established connections are never touched.
//!
//! Counted: `palisade_connections_refused_total{reason="evicted_unidentified"}` for each
//! connection closed to make room, `reason="connection_limit"` when every slot is held by an
//! established connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a newcomer waits for an evicted connection to give its slot back.
const HANDOVER: Duration = Duration::from_millis(100);

/// The slots and the unidentified connections holding some, oldest first.
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    unidentified: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    next: u64,
    waiting: VecDeque<(u64, Arc<Notify>)>,
}

/// Why a connection got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// Every slot is held by an established connection.
    Limit,
}

/// An admitted connection that has not yet identified itself; dropping it (or calling
/// [`Unidentified::identified`]) takes it off the eviction queue.
pub(crate) struct Unidentified {
    id: u64,
    notify: Arc<Notify>,
    admission: Arc<Admission>,
}

impl Admission {
    pub(crate) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(max_connections)),
            unidentified: Mutex::default(),
        })
    }

    /// The semaphore of slots, for what waits on all of them (a graceful drain).
    pub(crate) fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// A slot for a new connection, evicting the oldest unidentified one if the proxy is
    /// full (`evicted` is called once per connection closed to make room).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        evicted: impl Fn(),
    ) -> Result<(OwnedSemaphorePermit, Unidentified), Full> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !self.evict_oldest() {
                    return Err(Full::Limit);
                }
                evicted();
                match tokio::time::timeout(HANDOVER, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => return Err(Full::Limit),
                }
            }
        };
        let notify = Arc::new(Notify::new());
        let id = {
            let Ok(mut q) = self.unidentified.lock() else {
                return Err(Full::Limit);
            };
            let id = q.next;
            q.next = q.next.wrapping_add(1);
            q.waiting.push_back((id, notify.clone()));
            id
        };
        Ok((
            permit,
            Unidentified {
                id,
                notify,
                admission: self.clone(),
            },
        ))
    }

    fn evict_oldest(&self) -> bool {
        let Ok(mut q) = self.unidentified.lock() else {
            return false;
        };
        match q.waiting.pop_front() {
            Some((_, notify)) => {
                // `notify_one` stores the wake-up if the connection is not waiting yet.
                notify.notify_one();
                true
            }
            None => false,
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut q) = self.unidentified.lock() {
            // Oldest first, so the one identifying itself is usually near the front.
            if let Some(i) = q.waiting.iter().position(|(w, _)| *w == id) {
                q.waiting.remove(i);
            }
        }
    }
}

impl Unidentified {
    /// Resolves when the proxy closes this connection to make room for a newer one.
    pub(crate) async fn evicted(&self) {
        self.notify.notified().await;
    }

    /// The connection said what it is (its protocol detected, its handshake done): it keeps
    /// its slot for good.
    pub(crate) fn identified(self) {}
}

impl Drop for Unidentified {
    fn drop(&mut self) {
        self.admission.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_proxy_evicts_the_oldest_unidentified_connection() {
        let a = Admission::new(2);
        let evictions = std::sync::atomic::AtomicUsize::new(0);
        let count = || {
            evictions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let (p1, u1) = a.admit(&count).await.expect("first");
        let (p2, u2) = a.admit(&count).await.expect("second");
        // The second identifies itself: it can no longer be evicted.
        u2.identified();
        // Full: the newcomer evicts the first, which gives its slot back when it closes.
        let first = tokio::spawn(async move {
            u1.evicted().await;
            drop(p1);
        });
        let (_p3, u3) = a.admit(&count).await.expect("third gets the first's slot");
        first.await.expect("first closed");
        assert_eq!(evictions.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Now the unidentified third is evicted for a fourth.
        let third = tokio::spawn(async move {
            u3.evicted().await;
        });
        let fourth = a.admit(&count).await;
        third.await.expect("third told");
        // The third never gave its slot back (the task dropped only the notice), so the
        // fourth waited its handover time and was refused.
        assert_eq!(fourth.err(), Some(Full::Limit));
        drop(p2);
    }

    #[tokio::test(start_paused = true)]
    async fn established_connections_are_never_evicted() {
        let a = Admission::new(1);
        let (_p, u) = a.admit(|| {}).await.expect("first");
        u.identified();
        assert_eq!(a.admit(|| {}).await.err(), Some(Full::Limit));
    }
}
