//! Read-only requests (Castro and Liskov, §5.1.3): answered at once from the
//! replica's current state, never ordered, nothing written.
//!
//! A replica executes only committed batches, so whatever a read sees is durable at
//! a quorum. The client needs `2f + 1` matching answers (`crate::client`), which is
//! what makes such a read linearizable; a replica that lags answers with an older
//! state, which only delays the client's quorum or sends it to the ordered path.

use super::{Out, PbftReplica};
use crate::message::{Message, ReadRequest};
use diffuse_core::ids::NodeId;

impl PbftReplica {
    pub(super) fn on_read(&mut self, from: NodeId, read: ReadRequest, out: &mut Out) {
        let client = read.body.client;
        if from != NodeId::Client(client) {
            out.fault(from, "read-for-another-client");
            return;
        }
        if read.body.operation.len() > self.options.max_operation_bytes
            || self.macs.verify_read(&read, &self.keys).is_err()
        {
            out.fault(from, "bad-read");
            return;
        }
        // A replica whose state is being replaced by a transfer has none to offer.
        if self.needs_state {
            return;
        }
        // An operation that may write is not answered: the client times out and
        // orders it.
        if let Some(result) = self.service.query(&read.body.operation) {
            let reply = self.reply(client, read.body.timestamp, result);
            out.send(client, Message::Reply(reply));
        }
    }
}
