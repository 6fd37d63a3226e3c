//! The actor's admission side (keyed swarms): the certificate handshake on each
//! connection, requests parked until a peer is admitted, refusals and the block
//! list, revocation lists. Every method is a no-op or a pass-through in an open swarm.

use super::*;

/// Admission (keyed swarms); every method is a no-op or a pass-through in an open swarm.
impl Actor {
    /// May `peer`'s requests and gossip reach the node?
    pub(super) fn is_admitted(&self, peer: &PeerId) -> bool {
        self.auth.as_ref().is_none_or(|a| a.admitted.contains_key(peer))
    }

    /// Send a request now if the peer is admitted both ways (or the swarm is
    /// open); park it while the handshake runs; refuse it at once if the peer
    /// is blocked.
    pub(super) fn send_or_park(&mut self, peer: PeerId, req: Parked) {
        let Some(auth) = &mut self.auth else {
            self.send_now(peer, req);
            return;
        };
        if auth.admitted.contains_key(&peer) && auth.accepted_by.contains(&peer) {
            self.send_now(peer, req);
            return;
        }
        let refused = |reason: &str| NetError::NotAdmitted {
            peer: peer.to_string(),
            reason: reason.into(),
        };
        if auth.blocked.contains_key(&peer) || auth.refusing.iter().any(|(p, _)| *p == peer) {
            req.fail(refused("refused by this node"));
            return;
        }
        if auth.parked.len() >= MAX_PARKED {
            req.fail(refused("too many requests waiting for admission"));
            return;
        }
        auth.parked.push((peer, Instant::now() + AUTH_TIMEOUT, req));
        if self.swarm.is_connected(&peer) {
            // Admitted by us but our own handshake was lost (e.g. its connection
            // lost a simultaneous-dial race): show the certificate again.
            self.start_handshake(peer);
        } else {
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                if !matches!(e, DialError::DialPeerConditionFalse(_)) {
                    self.fail_parked(&peer, &format!("cannot dial: {e}"));
                }
            }
        }
    }

    pub(super) fn send_now(&mut self, peer: PeerId, req: Parked) {
        let b = self.swarm.behaviour_mut();
        match req {
            Parked::Vote(req, reply) => {
                let id = b.vote.send_request(&peer, req);
                self.votes.insert(id, (peer, reply));
            }
            Parked::Query(req, reply) => {
                let id = b.query.send_request(&peer, req);
                self.queries.insert(id, (peer, reply));
            }
            Parked::Escalate(req, reply) => {
                let id = b.escalate.send_request(&peer, req);
                self.escalations.insert(id, (peer, reply));
            }
        }
    }

    /// Fail every request parked for `peer`.
    pub(super) fn fail_parked(&mut self, peer: &PeerId, reason: &str) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        let (failed, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.parked)
            .into_iter()
            .partition(|(p, _, _)| p == peer);
        auth.parked = kept;
        for (_, _, req) in failed {
            req.fail(NetError::NotAdmitted {
                peer: peer.to_string(),
                reason: reason.into(),
            });
        }
    }

    /// Send the requests parked for `peer` (now admitted both ways).
    pub(super) fn release_parked(&mut self, peer: &PeerId) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        let (ready, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.parked)
            .into_iter()
            .partition(|(p, _, _)| p == peer);
        auth.parked = kept;
        for (p, _, req) in ready {
            self.send_now(p, req);
        }
    }

    /// First connection to `peer`: show our certificate and start its clock.
    pub(super) fn start_handshake(&mut self, peer: PeerId) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        if auth.accepted_by.contains(&peer) || auth.handshakes.values().any(|p| *p == peer) {
            return;
        }
        if !auth.admitted.contains_key(&peer) {
            auth.pending.entry(peer).or_insert(Instant::now() + AUTH_TIMEOUT);
        }
        let hello = AuthHello {
            cert: auth.own_bytes.clone(),
            revocations: auth.adm.revocations_serial(),
        };
        if let Some(rr) = self.swarm.behaviour_mut().auth.as_mut() {
            let id = rr.send_request(&peer, hello);
            auth.handshakes.insert(id, peer);
        }
    }

    /// Checks a certificate `peer` presented; admits it if valid.
    pub(super) fn check_cert(&mut self, peer: PeerId, hello: &AuthHello) -> Result<Role, String> {
        let Some(auth) = &mut self.auth else {
            return Err("open swarm".into());
        };
        let cert = Certificate::from_bytes(&hello.cert).map_err(|e| e.to_string())?;
        let role = auth
            .adm
            .verify(&cert, &peer.to_string(), now_ms())
            .map_err(|e| e.to_string())?;
        if hello.revocations < auth.adm.revocations_serial() {
            // The peer missed a revocation: pass ours on soon.
            auth.next_republish = auth.next_republish.min(Instant::now() + REPUBLISH_SOON);
        }
        auth.pending.remove(&peer);
        let new = auth.admitted.insert(peer, cert).is_none();
        if new {
            tracing::info!("peer {peer} admitted ({role})");
            let _ = self.emit(NetEvent::Admitted { peer, role });
        }
        Ok(role)
    }

    /// Refuse `peer`: not admitted, nothing of it reaches the node, and it is
    /// disconnected and blocked (after `grace`, so a refusal can leave first).
    pub(super) fn refuse(&mut self, peer: PeerId, reason: String, grace: Duration) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        auth.admitted.remove(&peer);
        auth.accepted_by.remove(&peer);
        auth.pending.remove(&peer);
        if !auth.refusing.iter().any(|(p, _)| *p == peer) && !auth.blocked.contains_key(&peer) {
            tracing::warn!("peer {peer} refused: {reason}");
            auth.refusing.push((peer, Instant::now() + grace));
            let _ = self.emit(NetEvent::Refused {
                peer,
                reason: reason.clone(),
            });
        }
        self.fail_parked(&peer, &reason);
    }

    pub(super) fn block(&mut self, peer: PeerId) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        if auth.blocked.len() >= MAX_BLOCKED {
            if let Some(oldest) = auth.blocked.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                auth.blocked.remove(&oldest);
                self.swarm.behaviour_mut().blocked.unblock_peer(oldest);
            }
        }
        let Some(auth) = &mut self.auth else {
            return;
        };
        auth.blocked.insert(peer, Instant::now() + BLOCK_FOR);
        self.book.remove(&peer);
        // Closes its connections too.
        self.swarm.behaviour_mut().blocked.block_peer(peer);
    }

    pub(super) fn auth_event(&mut self, ev: request_response::Event<AuthHello, AuthReply>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let reply = match self.check_cert(peer, &request) {
                        Ok(_) => match &self.auth {
                            Some(auth) => AuthReply::Ok(AuthHello {
                                cert: auth.own_bytes.clone(),
                                revocations: auth.adm.revocations_serial(),
                            }),
                            None => return,
                        },
                        Err(reason) => {
                            self.refuse(peer, format!("invalid certificate: {reason}"), REFUSE_GRACE);
                            AuthReply::Err(WireError {
                                code: ErrorCode::Unauthorized,
                                message: swarm_protocol::clip_owned(
                                    reason,
                                    swarm_protocol::message::MAX_ERROR_LEN,
                                ),
                            })
                        }
                    };
                    if let Some(rr) = self.swarm.behaviour_mut().auth.as_mut() {
                        let _ = rr.send_response(channel, reply);
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(auth) = &mut self.auth {
                        auth.handshakes.remove(&request_id);
                    }
                    match response {
                        AuthReply::Ok(hello) => match self.check_cert(peer, &hello) {
                            Ok(_) => {
                                if let Some(auth) = &mut self.auth {
                                    auth.accepted_by.insert(peer);
                                }
                                self.release_parked(&peer);
                            }
                            Err(reason) => {
                                self.refuse(peer, format!("invalid certificate: {reason}"), Duration::ZERO)
                            }
                        },
                        AuthReply::Err(e) => {
                            // Our own certificate was refused: nothing will work with this peer.
                            tracing::error!(
                                "peer {peer} refused this node's certificate: {}; ask the swarm owner \
                                 for a new one (`slm-swarm swarm invite`)",
                                e.message
                            );
                            self.fail_parked(&peer, "it refused this node's certificate");
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(auth) = &mut self.auth {
                    auth.handshakes.remove(&request_id);
                }
                if matches!(error, request_response::OutboundFailure::UnsupportedProtocols) {
                    self.refuse(
                        peer,
                        "does not speak the admission protocol (an open or foreign swarm)".into(),
                        Duration::ZERO,
                    );
                } else {
                    tracing::debug!("admission handshake with {peer} failed: {error}");
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!("admission request from {peer} failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A revocation list gossiped by an admitted peer: adopt it if newer, then
    /// drop admitted peers it revokes.
    pub(super) fn revocations_message(&mut self, data: &[u8]) -> MessageAcceptance {
        let Some(auth) = &mut self.auth else {
            return MessageAcceptance::Ignore;
        };
        let list = match Revocations::from_bytes(data) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("invalid revocation list: {e}");
                return MessageAcceptance::Reject;
            }
        };
        let serial = list.serial;
        match auth.adm.apply_revocations(list.clone()) {
            Ok(true) => {
                tracing::info!("revocation list version {serial} adopted");
                // Membership drops revoked authors of adverts relayed by others too.
                let _ = self.emit(NetEvent::Revocations(Box::new(list)));
                self.recheck_admitted();
                MessageAcceptance::Accept
            }
            Ok(false) => {
                if serial < auth.adm.revocations_serial() {
                    auth.next_republish = auth.next_republish.min(Instant::now() + REPUBLISH_SOON);
                }
                MessageAcceptance::Ignore
            }
            Err(e) => {
                tracing::debug!("revocation list refused: {e}");
                MessageAcceptance::Reject
            }
        }
    }

    /// Re-verify every admitted peer (after a new revocation list or as
    /// certificates expire); revoked ones are refused and blocked, expired ones
    /// only disconnected (a renewed certificate may come straight back).
    pub(super) fn recheck_admitted(&mut self) {
        let Some(auth) = &self.auth else {
            return;
        };
        let now = now_ms();
        let mut revoked = Vec::new();
        let mut expired = Vec::new();
        for (p, cert) in &auth.admitted {
            match auth.adm.verify(cert, &p.to_string(), now) {
                Ok(_) => {}
                Err(swarm_protocol::AdmissionError::Expired { .. }) => expired.push(*p),
                Err(e) => revoked.push((*p, e.to_string())),
            }
        }
        for (p, reason) in revoked {
            self.refuse(p, reason, Duration::ZERO);
        }
        for p in expired {
            if let Some(auth) = &mut self.auth {
                auth.admitted.remove(&p);
                auth.accepted_by.remove(&p);
            }
            tracing::info!("certificate of {p} expired: disconnecting");
            let _ = self.emit(NetEvent::Refused {
                peer: p,
                reason: "certificate expired".into(),
            });
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Deadlines of the handshake: slow peers are refused, refusals become
    /// blocks, blocks expire, parked requests time out, expired certificates
    /// are dropped, and the revocation list is re-published.
    pub(super) fn auth_tick(&mut self) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        let now = Instant::now();
        let wall = now_ms();
        let late: Vec<PeerId> = auth
            .pending
            .iter()
            .filter(|(p, t)| **t <= now && !auth.admitted.contains_key(*p))
            .map(|(p, _)| *p)
            .collect();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.refusing)
            .into_iter()
            .partition(|(_, t)| *t <= now);
        auth.refusing = waiting;
        let lifted: Vec<PeerId> = auth
            .blocked
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &lifted {
            auth.blocked.remove(p);
        }
        let (stale, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.parked)
            .into_iter()
            .partition(|(_, t, _)| *t <= now);
        auth.parked = parked;
        let expiring = auth
            .admitted
            .values()
            .any(|c| wall >= c.expires_ms.saturating_add(MAX_CLOCK_SKEW_MS));
        if !auth.own_expiry_warned && wall >= auth.own.expires_ms {
            auth.own_expiry_warned = true;
            tracing::error!(
                "this node's certificate expired: peers will refuse it; ask the swarm owner for a new one \
                 (`slm-swarm swarm invite --peer {}`) and restart with it",
                auth.own.peer
            );
        }
        let republish = (now >= auth.next_republish)
            .then(|| {
                auth.next_republish = now + REPUBLISH_EVERY;
                auth.adm
                    .revocations()
                    .map(|l| (auth.rev_topic.clone(), l.to_bytes()))
            })
            .flatten();
        for p in lifted {
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
        }
        for p in late {
            self.refuse(
                p,
                format!("no valid certificate within {} s", AUTH_TIMEOUT.as_secs()),
                Duration::ZERO,
            );
        }
        for (p, _) in due {
            self.block(p);
        }
        for (p, _, req) in stale {
            req.fail(NetError::NotAdmitted {
                peer: p.to_string(),
                reason: format!("not admitted within {} s", AUTH_TIMEOUT.as_secs()),
            });
        }
        if expiring {
            self.recheck_admitted();
        }
        if let Some((topic, bytes)) = republish {
            if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                tracing::trace!("revocation list not published: {e}");
            }
        }
    }
}
