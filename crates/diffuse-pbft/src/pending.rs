//! Client requests a replica knows about but has not executed yet (shared by the
//! ordering protocols whose clients follow PBFT's, such as MinBFT).

use crate::message::Request;
use diffuse_core::ids::{ClientId, View};
use std::collections::BTreeMap;

/// One pending request.
#[derive(Debug, Clone)]
pub struct PendingRequest {
    /// The request.
    pub request: Request,
    /// Arrival order, for fair batching and for the request timer.
    pub arrival: u64,
    /// The view in which this replica (as primary) proposed it, if any.
    pub proposed_in: Option<View>,
    /// Whether this replica checked the client's signature on it. A PBFT backup may
    /// hold a request it authenticated only by its MAC (from a PRE-PREPARE); such a
    /// request is proposed or relayed only once its signature is checked.
    pub proven: bool,
}

/// At most one pending request per client (a client has one outstanding request),
/// so the table is bounded by the number of registered clients.
#[derive(Debug, Default)]
pub struct Pending {
    by_client: BTreeMap<ClientId, PendingRequest>,
    next_arrival: u64,
}

impl Pending {
    /// Whether `request` is well-formed and signed by its registered client. A
    /// request identical to the pending one of its client, whose signature was
    /// checked, was checked already.
    pub fn request_is_valid(
        &self,
        request: &Request,
        keys: &diffuse_core::config::ClusterKeys,
        max_operation_bytes: usize,
    ) -> bool {
        if request.operation.len() > max_operation_bytes {
            return false;
        }
        let Some(key) = keys.client(request.client) else {
            return false;
        };
        if self.holds_proven(request) {
            return true;
        }
        request.signature_is_valid(key)
    }

    /// Whether every request of `requests` is valid as [`Pending::request_is_valid`]
    /// judges it, with the signatures still to check verified in one batch (same
    /// answer, less work).
    pub fn all_valid<'a>(
        &self,
        requests: impl IntoIterator<Item = &'a Request>,
        keys: &diffuse_core::config::ClusterKeys,
        max_operation_bytes: usize,
    ) -> bool {
        let mut batch = diffuse_core::crypto::SignatureBatch::new();
        for request in requests {
            if request.operation.len() > max_operation_bytes {
                return false;
            }
            let Some(key) = keys.client(request.client) else {
                return false;
            };
            if !self.holds_proven(request) {
                request.push_signature(key, &mut batch);
            }
        }
        batch.verify().into_iter().all(|valid| valid)
    }

    /// Whether `request` is, byte for byte, the pending request of its client.
    pub fn holds(&self, request: &Request) -> bool {
        self.get(request.client)
            .is_some_and(|p| p.request == *request)
    }

    /// Whether `request` is the pending request of its client and its signature
    /// was checked.
    pub fn holds_proven(&self, request: &Request) -> bool {
        self.get(request.client)
            .is_some_and(|p| p.proven && p.request == *request)
    }

    /// The pending request of `client`.
    pub fn get(&self, client: ClientId) -> Option<&PendingRequest> {
        self.by_client.get(&client)
    }

    /// Adds `request` unless the client already has one at least as new; `proven`
    /// says whether its signature was checked. Returns whether it was added.
    pub fn offer(&mut self, request: Request, proposed_in: Option<View>, proven: bool) -> bool {
        if let Some(existing) = self.by_client.get(&request.client) {
            if existing.request.timestamp >= request.timestamp {
                return false;
            }
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.by_client.insert(
            request.client,
            PendingRequest {
                request,
                arrival,
                proposed_in,
                proven,
            },
        );
        true
    }

    /// Replaces the client's pending request of the same timestamp, if its signature
    /// was not checked, by `request`, whose signature was. Returns whether it did.
    pub fn upgrade(&mut self, request: &Request) -> bool {
        match self.by_client.get_mut(&request.client) {
            Some(p) if !p.proven && p.request.timestamp == request.timestamp => {
                p.request = request.clone();
                p.proven = true;
                true
            }
            _ => false,
        }
    }

    /// The pending requests whose signature was not checked.
    pub fn unproven(&self) -> Vec<Request> {
        self.by_client
            .values()
            .filter(|p| !p.proven)
            .map(|p| p.request.clone())
            .collect()
    }

    /// Marks the client's pending request as proven if it is `request`, or drops it
    /// (its signature is invalid) when `valid` is false.
    pub fn settle(&mut self, request: &Request, valid: bool) {
        let Some(p) = self.by_client.get_mut(&request.client) else {
            return;
        };
        if p.request != *request {
            return;
        }
        if valid {
            p.proven = true;
        } else {
            self.by_client.remove(&request.client);
        }
    }

    /// Drops the client's pending request if it is not newer than `timestamp`.
    pub fn executed(&mut self, client: ClientId, timestamp: u64) {
        if self
            .by_client
            .get(&client)
            .is_some_and(|p| p.request.timestamp <= timestamp)
        {
            self.by_client.remove(&client);
        }
    }

    /// Drops every pending request that `last_executed` (the latest timestamp
    /// executed per client) shows done: after a state transfer, the requests the
    /// installed state already executed.
    pub fn drop_executed(&mut self, last_executed: impl Fn(ClientId) -> u64) {
        self.by_client
            .retain(|client, p| p.request.timestamp > last_executed(*client));
    }

    /// Marks the client's request (at this timestamp) as proposed in `view`.
    pub fn mark_proposed(&mut self, client: ClientId, timestamp: u64, view: View) {
        if let Some(p) = self.by_client.get_mut(&client) {
            if p.request.timestamp == timestamp {
                p.proposed_in = Some(view);
            }
        }
    }

    /// Requests not yet proposed in `view`, oldest first.
    pub fn unproposed(&self, view: View) -> Vec<&PendingRequest> {
        let mut list: Vec<_> = self
            .by_client
            .values()
            .filter(|p| p.proposed_in != Some(view))
            .collect();
        list.sort_by_key(|p| p.arrival);
        list
    }

    /// The oldest pending request's (client, timestamp).
    pub fn oldest(&self) -> Option<(ClientId, u64)> {
        self.by_client
            .values()
            .min_by_key(|p| p.arrival)
            .map(|p| (p.request.client, p.request.timestamp))
    }

    /// Whether `(client, timestamp)` is still pending.
    pub fn contains(&self, client: ClientId, timestamp: u64) -> bool {
        self.by_client
            .get(&client)
            .is_some_and(|p| p.request.timestamp == timestamp)
    }

    /// All pending requests.
    pub fn iter(&self) -> impl Iterator<Item = &PendingRequest> {
        self.by_client.values()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }
}
