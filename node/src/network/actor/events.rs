//! The actor's event side: swarm events (connections, dials, listen addresses)
//! and behaviour events (gossip, mDNS, identify, requests) turned into peer-book
//! updates and [`NetEvent`]s.

use super::*;

impl Actor {
    pub(super) fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                self.listen_addrs.push(address.clone());
                let _ = self.emit(NetEvent::ListenAddr(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                for b in self.bootstrap.iter_mut() {
                    let matches_dial = b.dialing == Some(connection_id);
                    let matches_addr =
                        matches!(&endpoint, ConnectedPoint::Dialer { address, .. } if *address == b.addr);
                    if matches_dial || matches_addr {
                        b.peer = Some(peer_id);
                        b.dialing = None;
                        b.backoff = BACKOFF_MIN;
                    }
                }
                let via = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => Some(address),
                    ConnectedPoint::Listener { .. } => None,
                };
                self.book.connected(&peer_id, via, Instant::now());
                if num_established.get() == 1 {
                    let _ = self.emit(NetEvent::Connected(peer_id));
                    self.start_handshake(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let now = Instant::now();
                for b in self.bootstrap.iter_mut().filter(|b| b.peer == Some(peer_id)) {
                    b.next_try = now + b.backoff;
                }
                self.book.disconnected(&peer_id, now);
                if let Some(auth) = &mut self.auth {
                    // Admission is per connection: a returning peer shows its certificate again.
                    auth.admitted.remove(&peer_id);
                    auth.accepted_by.remove(&peer_id);
                    auth.pending.remove(&peer_id);
                }
                self.fail_parked(&peer_id, "disconnected before admission");
                let _ = self.emit(NetEvent::Disconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
                ..
            } => {
                if let Some(p) = peer_id {
                    if !self.swarm.is_connected(&p) {
                        self.fail_parked(&p, "unreachable");
                    }
                }
                for b in self
                    .bootstrap
                    .iter_mut()
                    .filter(|b| b.dialing == Some(connection_id))
                {
                    tracing::debug!("bootstrap {} unreachable: {error}", b.addr);
                    b.dialing = None;
                }
                if let Some(p) = self.book.dial_failed(connection_id) {
                    tracing::debug!("known peer {p} unreachable: {error}");
                }
            }
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            _ => {}
        }
    }

    pub(super) fn behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                if let Some(auth) = &self.auth {
                    // Only admitted peers are heard: anything else is dropped, not passed on.
                    let admitted = auth.admitted.contains_key(&propagation_source);
                    let is_rev = message.topic == auth.rev_topic.hash();
                    if !admitted || is_rev {
                        let acceptance = if admitted {
                            self.revocations_message(&message.data)
                        } else {
                            tracing::debug!("gossip from {propagation_source} (not admitted) dropped");
                            MessageAcceptance::Ignore
                        };
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .report_message_validation_result(&message_id, &propagation_source, acceptance);
                        return;
                    }
                }
                if message.topic != self.topic.hash() {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Reject,
                        );
                    return;
                }
                let verdict = match decode_msg::<Advert>(&message.data) {
                    // The advert must speak for the key that signed it.
                    Ok(a) if message.source.map(|s| s.to_string()) == Some(a.peer.clone()) => Some(a),
                    Ok(a) => {
                        tracing::debug!("advert for {} signed by {:?}: rejected", a.peer, message.source);
                        None
                    }
                    Err(e) => {
                        tracing::debug!("invalid advert from {propagation_source}: {e}");
                        None
                    }
                };
                let acceptance = if verdict.is_some() {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                if let Some(advert) = verdict {
                    if self.emit(NetEvent::Advert { advert }).is_err() {
                        tracing::warn!("node is not keeping up with adverts; one dropped");
                    }
                }
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
                for (p, a) in list {
                    if p != *self.swarm.local_peer_id() && !self.foreign.contains(&p) {
                        by_peer.entry(p).or_default().push(a);
                    }
                }
                for (p, addrs) in by_peer {
                    for a in &addrs {
                        self.swarm.add_peer_address(p, a.clone());
                    }
                    self.book.add(p, &addrs, Instant::now());
                    if !self.swarm.is_connected(&p) {
                        let opts = DialOpts::peer_id(p).addresses(addrs).build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!("mDNS dial {p}: {e}");
                        }
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != identify_version(&self.cfg.namespace) {
                    // Another swarm (or another program) on the same LAN: keep apart.
                    tracing::debug!("{peer_id} speaks {}, not our namespace", info.protocol_version);
                    if self.foreign.len() >= MAX_FOREIGN {
                        if let Some(old) = self.foreign.iter().next().copied() {
                            self.foreign.remove(&old);
                        }
                    }
                    self.foreign.insert(peer_id);
                    self.book.remove(&peer_id);
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let listen: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .take(swarm_protocol::MAX_ADDRS)
                    .collect();
                let now = Instant::now();
                for a in self.book.add(peer_id, &listen, now) {
                    self.swarm.add_peer_address(peer_id, a);
                }
                // Identify runs over a live connection: an inbound-only peer counts as reached too.
                self.book.connected(&peer_id, None, now);
            }
            BehaviourEvent::Identify(_) | BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Blocked(never) => match never {},
            BehaviourEvent::Stream(()) => {}
            BehaviourEvent::Auth(ev) => self.auth_event(ev),
            BehaviourEvent::Vote(ev) => {
                if let Some((peer, req, channel)) = rr_event(ev, &mut self.votes) {
                    if !self.is_admitted(&peer) {
                        // Never reaches the node: no model load, no cloud call.
                        tracing::debug!("vote request from {peer} (not admitted) refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .vote
                            .send_response(channel, VoteReply::Err(unauthorized()));
                        return;
                    }
                    if let Err(ev) = self.emit(NetEvent::Vote { peer, req, channel }) {
                        let NetEvent::Vote { channel, .. } = *ev else {
                            return;
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .vote
                            .send_response(channel, VoteReply::Err(overloaded()));
                    }
                }
            }
            BehaviourEvent::Query(ev) => {
                if let Some((peer, req, channel)) = rr_event(ev, &mut self.queries) {
                    if !self.is_admitted(&peer) {
                        // Never reaches the node: no model load, no cloud call.
                        tracing::debug!("query request from {peer} (not admitted) refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .query
                            .send_response(channel, QueryReply::Err(unauthorized()));
                        return;
                    }
                    if let Err(ev) = self.emit(NetEvent::Query { peer, req, channel }) {
                        let NetEvent::Query { channel, .. } = *ev else {
                            return;
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .query
                            .send_response(channel, QueryReply::Err(overloaded()));
                    }
                }
            }
            BehaviourEvent::Escalate(ev) => {
                if let Some((peer, req, channel)) = rr_event(ev, &mut self.escalations) {
                    if !self.is_admitted(&peer) {
                        // Never reaches the node: no model load, no cloud call.
                        tracing::debug!("escalate request from {peer} (not admitted) refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .escalate
                            .send_response(channel, EscalateReply::Err(unauthorized()));
                        return;
                    }
                    if let Err(ev) = self.emit(NetEvent::Escalate { peer, req, channel }) {
                        let NetEvent::Escalate { channel, .. } = *ev else {
                            return;
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .escalate
                            .send_response(channel, EscalateReply::Err(overloaded()));
                    }
                }
            }
        }
    }
}
