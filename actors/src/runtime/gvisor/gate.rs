//! The connection gate: which host sockets into each sandbox exist, and a
//! way to stop new ones while a checkpoint runs.
//!
//! Why: gVisor's checkpoint of this runsc saves the guest's network stack
//! as it is. A connection the node opens while `runsc checkpoint` runs —
//! or one whose host side is gone but whose guest side still sits in
//! envd's accept queue — is either a failed save (the sandbox lost) or,
//! worse, a saved listener with a half-made connection in it, which
//! restores to an envd that never answers again. Looking at the guest's
//! `/proc/net/tcp` cannot close that race on its own: a connect already
//! under way when the check runs lands right after it. So every stream
//! `connect` hands out holds a ticket from this gate, and a checkpoint
//! first closes the gate (new connects are refused at once) and waits
//! until every ticket is returned, i.e. until no host socket into the
//! guest exists and none is being made. Only then does it look at the
//! guest's side.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::runtime::SandboxId;

/// Per sandbox: is the gate closed, and how many tickets are out.
#[derive(Debug, Default)]
struct Entry {
    closed: bool,
    tickets: usize,
}

#[derive(Debug, Default)]
struct State {
    sandboxes: HashMap<SandboxId, Entry>,
}

/// The gates of every sandbox of one runtime.
#[derive(Debug, Default, Clone)]
pub struct Gates {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// Why no ticket was given.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// Why a gate could not be drained in time: how many tickets are still out.
#[derive(Debug, PartialEq, Eq)]
pub struct StillOpen(pub usize);

/// Held by every stream into a sandbox (and by a connect under way);
/// returned on drop.
#[derive(Debug)]
pub struct Ticket {
    gates: Gates,
    id: SandboxId,
}

impl Gates {
    /// A ticket for a new connection into `id`, unless a checkpoint has
    /// closed its gate.
    pub fn ticket(&self, id: &SandboxId) -> Result<Ticket, Closed> {
        let (lock, _) = &*self.inner;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        let entry = state.sandboxes.entry(id.clone()).or_default();
        if entry.closed {
            return Err(Closed);
        }
        entry.tickets += 1;
        Ok(Ticket {
            gates: self.clone(),
            id: id.clone(),
        })
    }

    /// Close `id`'s gate and wait up to `timeout` for every ticket to come
    /// back. On `Err` the gate stays closed: the caller decides (reopen it
    /// and refuse the checkpoint).
    pub fn close_and_drain(&self, id: &SandboxId, timeout: Duration) -> Result<(), StillOpen> {
        let (lock, cvar) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        state.sandboxes.entry(id.clone()).or_default().closed = true;
        loop {
            let out = state.sandboxes.get(id).map_or(0, |e| e.tickets);
            if out == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StillOpen(out));
            }
            state = cvar
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Open `id`'s gate again (a checkpoint that left the sandbox running).
    pub fn reopen(&self, id: &SandboxId) {
        let (lock, _) = &*self.inner;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = state.sandboxes.get_mut(id) {
            e.closed = false;
        }
    }

    /// Forget `id` (it is gone); tickets still out are simply returned to
    /// nothing. A later sandbox with the same id starts with an open gate.
    pub fn forget(&self, id: &SandboxId) {
        let (lock, _) = &*self.inner;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        if state.sandboxes.get(id).is_some_and(|e| e.tickets == 0) {
            state.sandboxes.remove(id);
        } else if let Some(e) = state.sandboxes.get_mut(id) {
            e.closed = false;
        }
    }

    /// Tickets out for `id`.
    #[cfg(test)]
    pub fn outstanding(&self, id: &SandboxId) -> usize {
        let (lock, _) = &*self.inner;
        let state = lock.lock().unwrap_or_else(|p| p.into_inner());
        state.sandboxes.get(id).map_or(0, |e| e.tickets)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.gates.inner;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = state.sandboxes.get_mut(&self.id) {
            e.tickets = e.tickets.saturating_sub(1);
            if e.tickets == 0 && !e.closed {
                state.sandboxes.remove(&self.id);
            }
        }
        cvar.notify_all();
    }
}

/// A stream into a sandbox that returns its ticket when dropped, after the
/// socket itself is closed.
pub type Gated<S> = crate::holding::Holding<S, Ticket>;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SandboxId {
        SandboxId::new(s).unwrap()
    }

    #[test]
    fn a_closed_gate_refuses_and_drains_when_tickets_return() {
        let gates = Gates::default();
        let a = id("a");
        let t1 = gates.ticket(&a).unwrap();
        let t2 = gates.ticket(&a).unwrap();
        assert_eq!(gates.outstanding(&a), 2);
        // Still out: the drain times out, the gate stays closed.
        assert_eq!(
            gates.close_and_drain(&a, Duration::from_millis(20)),
            Err(StillOpen(2))
        );
        assert_eq!(gates.ticket(&a).unwrap_err(), Closed);
        // Returned from another thread while draining.
        let back = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(t1);
            drop(t2);
        });
        assert_eq!(gates.close_and_drain(&a, Duration::from_secs(5)), Ok(()));
        back.join().unwrap();
        // Other sandboxes are not affected.
        assert!(gates.ticket(&id("b")).is_ok());
        gates.reopen(&a);
        assert!(gates.ticket(&a).is_ok());
    }

    #[test]
    fn forget_opens_the_gate_for_a_new_sandbox_of_that_id() {
        let gates = Gates::default();
        let a = id("a");
        gates.close_and_drain(&a, Duration::ZERO).unwrap();
        assert!(gates.ticket(&a).is_err());
        gates.forget(&a);
        let t = gates.ticket(&a).unwrap();
        drop(t);
        assert_eq!(gates.outstanding(&a), 0);
    }
}
