//! The inbox of a member: two lanes, so that agreement messages do not queue
//! behind clients' requests.
//!
//! What clients send, and the clients' requests replicas relay
//! ([`WireMessage::is_client_request`]), wait in a lane of their own; everything
//! else the replicas send each other (agreement, checkpoints, view changes) waits
//! in the protocol lane, which the loop takes first. Under a burst of requests (a
//! thousand clients starting at once, retransmitting to widening sets of backups,
//! which relay and forward what they watch) one queue held thousands of requests,
//! each a signature check, in front of the next PREPARE or share: the protocol's
//! timers fired while its messages waited, the tree was rebuilt, views changed.
//!
//! The request lane is never starved: while both lanes hold messages, one request
//! is taken after every [`PROTOCOL_STREAK`] protocol messages, so a Byzantine
//! replica that floods its peers slows clients down but cannot lock them out.
//! (What the transport does when the request lane is full: [`crate::transport`].)
//!
//! [`WireMessage::is_client_request`]: diffuse_core::codec::WireMessage::is_client_request

use crate::transport::Inbound;
use tokio::sync::mpsc;

/// Protocol messages taken in a row, while requests wait, before one request.
pub const PROTOCOL_STREAK: u32 = 8;

/// Which lane a message waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// What replicas send each other but requests: agreement, checkpoints,
    /// view changes, state transfer.
    Protocol,
    /// What clients send, and the clients' requests replicas relay.
    Requests,
}

/// The sending ends of the two lanes.
#[derive(Debug)]
pub(crate) struct LaneSenders<M> {
    protocol: mpsc::Sender<Inbound<M>>,
    requests: mpsc::Sender<Inbound<M>>,
}

impl<M> LaneSenders<M> {
    /// Queues `inbound` in `lane`, waiting for room. Returns false if the inbox is gone.
    pub(crate) async fn send(&self, lane: Lane, inbound: Inbound<M>) -> bool {
        let sender = match lane {
            Lane::Protocol => &self.protocol,
            Lane::Requests => &self.requests,
        };
        sender.send(inbound).await.is_ok()
    }

    /// Queues `inbound` in `lane` if there is room.
    pub(crate) fn try_send(
        &self,
        lane: Lane,
        inbound: Inbound<M>,
    ) -> Result<(), mpsc::error::TrySendError<Inbound<M>>> {
        match lane {
            Lane::Protocol => self.protocol.try_send(inbound),
            Lane::Requests => self.requests.try_send(inbound),
        }
    }
}

/// The receiving end: messages of both lanes, protocol first.
#[derive(Debug)]
pub struct Inbox<M> {
    protocol: mpsc::Receiver<Inbound<M>>,
    requests: mpsc::Receiver<Inbound<M>>,
    /// Protocol messages taken in a row since the last request.
    streak: u32,
}

/// A new inbox whose lanes hold `protocol` and `requests` messages at most.
pub(crate) fn inbox<M>(protocol: usize, requests: usize) -> (LaneSenders<M>, Inbox<M>) {
    let (protocol_tx, protocol_rx) = mpsc::channel(protocol.max(1));
    let (requests_tx, requests_rx) = mpsc::channel(requests.max(1));
    (
        LaneSenders {
            protocol: protocol_tx,
            requests: requests_tx,
        },
        Inbox {
            protocol: protocol_rx,
            requests: requests_rx,
            streak: 0,
        },
    )
}

impl<M> Inbox<M> {
    /// The next message, waiting for one; `None` once the transport is gone and
    /// both lanes are empty.
    pub async fn recv(&mut self) -> Option<Inbound<M>> {
        if let Some(inbound) = self.try_recv() {
            return Some(inbound);
        }
        // Both lanes are empty: whichever fills first.
        let inbound = tokio::select! {
            biased;
            Some(inbound) = self.protocol.recv() => inbound,
            Some(inbound) = self.requests.recv() => inbound,
            else => return None,
        };
        self.streak = 0;
        Some(inbound)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Inbound<M>> {
        if self.streak >= PROTOCOL_STREAK
            && let Ok(inbound) = self.requests.try_recv()
        {
            self.streak = 0;
            return Some(inbound);
        }
        if let Ok(inbound) = self.protocol.try_recv() {
            self.streak = self.streak.saturating_add(1);
            return Some(inbound);
        }
        let inbound = self.requests.try_recv().ok()?;
        self.streak = 0;
        Some(inbound)
    }

    /// Messages waiting in both lanes.
    pub fn len(&self) -> usize {
        self.protocol.len() + self.requests.len()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diffuse_core::ids::{ClientId, NodeId, ReplicaId};
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    fn inbound(from: NodeId, message: u32) -> Inbound<u32> {
        let permits = Arc::new(Semaphore::new(2));
        Inbound::new(
            from,
            message,
            permits.clone().try_acquire_owned().unwrap(),
            permits.try_acquire_owned().unwrap(),
        )
    }

    #[tokio::test]
    async fn protocol_messages_overtake_waiting_requests_but_cannot_starve_them() {
        let (senders, mut inbox) = inbox::<u32>(64, 64);
        let client = NodeId::Client(ClientId(1));
        let replica = NodeId::Replica(ReplicaId(1));
        for i in 0..3 {
            assert!(
                senders
                    .send(Lane::Requests, inbound(client, 1000 + i))
                    .await
            );
        }
        for i in 0..20 {
            assert!(senders.send(Lane::Protocol, inbound(replica, i)).await);
        }
        let mut order = Vec::new();
        while let Some(inbound) = inbox.try_recv() {
            order.push(inbound.message);
        }
        let streak = PROTOCOL_STREAK;
        let mut expected: Vec<u32> = (0..streak).collect();
        expected.push(1000);
        expected.extend(streak..2 * streak);
        expected.push(1001);
        expected.extend(2 * streak..20);
        expected.push(1002);
        assert_eq!(order, expected);
        assert!(inbox.is_empty());
    }

    #[tokio::test]
    async fn recv_waits_for_either_lane_and_ends_with_the_senders() {
        let (senders, mut inbox) = inbox::<u32>(4, 4);
        let client = NodeId::Client(ClientId(1));
        let waiting = tokio::spawn(async move {
            let first = inbox.recv().await.map(|i| i.message);
            let end = inbox.recv().await.map(|i| i.message);
            (first, end)
        });
        assert!(senders.send(Lane::Requests, inbound(client, 7)).await);
        drop(senders);
        assert_eq!(waiting.await.unwrap(), (Some(7), None));
    }
}
