//! Per-client budgets of the public routes that make a node work for a request that costs the
//! client little: a submission or a rerun (one small request, minutes of test CPU on every node)
//! and an event stream (a connection held open for minutes).
//!
//! A client is the connection's source address (an IPv6 client by its /64, which one host
//! usually owns whole). Each client may have at most `intake.max_pending_per_client`
//! evaluations submitted through this node that have not finished (those in the middle of being
//! submitted included) and at most `intake.max_streams_per_client` open event streams; beyond
//! that the node answers 429 and the client waits for one to finish. Behind a reverse proxy every
//! client is the proxy: raise the limits there, or let the proxy limit per client.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::app::AppError;
use crate::ids::EvalId;

/// Clients tracked before those with nothing in flight are forgotten.
const TIDY_AT: usize = 4096;

/// A client's key: its IPv4 address, or the /64 of its IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(IpAddr);

impl Client {
    pub fn of(addr: SocketAddr) -> Client {
        match addr.ip().to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Client(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
            }
            v4 => Client(v4),
        }
    }
}

#[derive(Debug, Default)]
struct Spent {
    /// Evaluations it submitted through this node, unfinished when last looked at.
    pending: Vec<EvalId>,
    /// Submissions admitted but not yet created.
    reserved: usize,
    /// Open event streams.
    streams: usize,
}

impl Spent {
    fn idle(&self) -> bool {
        self.pending.is_empty() && self.reserved == 0 && self.streams == 0
    }
}

/// The budgets of every client of one node.
#[derive(Debug)]
pub struct Budgets {
    max_pending: usize,
    max_streams: usize,
    clients: Mutex<HashMap<Client, Spent>>,
}

/// A submission admitted under a client's budget; [`Admission::created`] records the evaluation
/// it made, dropping it gives the place back.
pub struct Admission {
    budgets: Arc<Budgets>,
    client: Client,
    done: bool,
}

/// An open event stream counted against its client, given back on drop.
pub struct StreamSlot {
    budgets: Arc<Budgets>,
    client: Client,
}

impl Budgets {
    pub fn new(max_pending: usize, max_streams: usize) -> Arc<Budgets> {
        Arc::new(Budgets { max_pending, max_streams, clients: Mutex::default() })
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<Client, Spent>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new evaluation from `client` unless it already has `max_pending` unfinished
    /// (`pending` tells whether an evaluation is still unfinished).
    pub fn admit(
        self: &Arc<Self>,
        client: Client,
        pending: impl Fn(EvalId) -> bool,
    ) -> Result<Admission, AppError> {
        let mut clients = self.clients();
        if clients.len() >= TIDY_AT {
            clients.retain(|_, s| {
                s.pending.retain(|id| pending(*id));
                !s.idle()
            });
        }
        let spent = clients.entry(client).or_default();
        spent.pending.retain(|id| pending(*id));
        if spent.pending.len() + spent.reserved >= self.max_pending {
            return Err(AppError::TooMany(format!(
                "{} of your evaluations are unfinished on this node (intake.max_pending_per_client); \
                 submit again when one has finished",
                spent.pending.len() + spent.reserved
            )));
        }
        spent.reserved += 1;
        Ok(Admission { budgets: self.clone(), client, done: false })
    }

    /// Opens an event stream for `client` unless it has `max_streams` open.
    pub fn stream(self: &Arc<Self>, client: Client) -> Result<StreamSlot, AppError> {
        let mut clients = self.clients();
        let spent = clients.entry(client).or_default();
        if spent.streams >= self.max_streams {
            return Err(AppError::TooMany(format!(
                "{} event streams of yours are open on this node (intake.max_streams_per_client); \
                 close one first",
                spent.streams
            )));
        }
        spent.streams += 1;
        Ok(StreamSlot { budgets: self.clone(), client })
    }

    fn release(&self, client: Client, f: impl FnOnce(&mut Spent)) {
        let mut clients = self.clients();
        if let Some(spent) = clients.get_mut(&client) {
            f(spent);
            if spent.idle() {
                clients.remove(&client);
            }
        }
    }
}

impl Admission {
    /// The admitted submission created evaluation `id`: it counts until `id` is finished.
    pub fn created(mut self, id: EvalId) {
        self.done = true;
        self.budgets.release(self.client, |s| {
            s.reserved = s.reserved.saturating_sub(1);
            s.pending.push(id);
        });
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.done {
            self.budgets.release(self.client, |s| s.reserved = s.reserved.saturating_sub(1));
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.budgets.release(self.client, |s| s.streams = s.streams.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(addr: &str) -> Client {
        Client::of(addr.parse().unwrap())
    }

    #[test]
    fn pending_evaluations_are_capped_per_client_until_they_finish() {
        let budgets = Budgets::new(2, 1);
        let unfinished = std::sync::Mutex::new(vec![EvalId::test(1), EvalId::test(2)]);
        let pending = |id: EvalId| unfinished.lock().unwrap().contains(&id);
        let a = client("10.0.0.1:5000");
        budgets.admit(a, pending).unwrap().created(EvalId::test(1));
        let second = budgets.admit(a, pending).unwrap();
        let refused = budgets.admit(a, pending).map(|_| ()).unwrap_err();
        assert!(matches!(refused, AppError::TooMany(_)), "{refused}");
        // Another client has its own budget; a dropped admission gives its place back.
        assert!(budgets.admit(client("10.0.0.2:5000"), pending).is_ok());
        drop(second);
        budgets.admit(a, pending).unwrap().created(EvalId::test(2));
        assert!(budgets.admit(a, pending).is_err());
        unfinished.lock().unwrap().retain(|id| *id != EvalId::test(1));
        assert!(budgets.admit(a, pending).is_ok(), "a finished evaluation frees its place");
    }

    #[test]
    fn streams_are_capped_per_client_and_ipv6_clients_by_their_64() {
        let budgets = Budgets::new(1, 2);
        let a = client("[2001:db8:1:2::1]:80");
        assert_eq!(a, client("[2001:db8:1:2:ffff::9]:81"), "one /64 is one client");
        assert_ne!(a, client("[2001:db8:1:3::1]:80"));
        assert_eq!(client("[::ffff:10.0.0.1]:1"), client("10.0.0.1:2"));
        let s1 = budgets.stream(a).unwrap();
        let _s2 = budgets.stream(a).unwrap();
        assert!(matches!(budgets.stream(a).map(|_| ()), Err(AppError::TooMany(_))));
        drop(s1);
        assert!(budgets.stream(a).is_ok());
        assert!(budgets.clients().len() == 1);
    }
}
