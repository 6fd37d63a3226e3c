//! The streamed escalation relay, `/slm-swarm/<ns>/escalate-stream/1`, over raw
//! libp2p streams (`libp2p-stream`): the coordinator sends one
//! [`EscalateRequest`]; the gateway answers with [`EscalateFrame::Piece`]s as
//! the cloud's own SSE arrives, then one [`EscalateFrame::End`] whose reply is
//! authoritative. Frames are length-prefixed (u32, big-endian); a length over
//! the message's limit is refused before anything is buffered, and every
//! decoded frame is validated. Every read and write has a deadline, inbound
//! streams are capped in number (beyond it: `Overloaded` at once) and only
//! admitted peers are served, as on the request-response protocols.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::prelude::*;
use libp2p::{PeerId, Stream};
use swarm_protocol::{
    clip, decode_msg, encode_msg, ErrorCode, EscalateFrame, EscalateReply, EscalateRequest, WireError,
    WireMessage, MAX_PIECE_BYTES, MAX_TEXT_BYTES,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{NetError, NetEvent};

/// How long a peer has to send its request once its stream is open.
const REQUEST_READ: Duration = Duration::from_secs(5);
/// How long one frame may take to leave (a peer that stops reading is dropped).
const FRAME_WRITE: Duration = Duration::from_secs(10);

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Write one length-prefixed frame.
pub(crate) async fn write_frame<T, M>(io: &mut T, msg: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin,
    M: WireMessage,
{
    let bytes = encode_msg(msg).map_err(invalid)?;
    let len = u32::try_from(bytes.len()).map_err(invalid)?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await
}

/// Read one length-prefixed frame: the length is checked against the
/// message's limit before the body is read, the body is validated after.
pub(crate) async fn read_frame<T, M>(io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin,
    M: WireMessage,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > M::MAX_BYTES {
        return Err(invalid(format!("frame of {len} bytes, limit {}", M::MAX_BYTES)));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    decode_msg::<M>(&buf).map_err(invalid)
}

/// The gateway's end of one relayed escalation: pieces, then the reply. Holds
/// one of the node's relay slots until it is dropped.
pub struct RelaySink {
    stream: Stream,
    sent: usize,
    _slot: OwnedSemaphorePermit,
}

impl RelaySink {
    /// Relay a piece of the cloud's answer (split into frames within
    /// [`MAX_PIECE_BYTES`], cut on character boundaries). `Err`: the
    /// coordinator stopped reading or left; stop relaying.
    pub async fn piece(&mut self, mut text: &str) -> Result<(), NetError> {
        while !text.is_empty() {
            // Never more than the whole answer may hold: the rest is in `End`.
            let room = MAX_TEXT_BYTES.saturating_sub(self.sent).min(MAX_PIECE_BYTES);
            let head = clip(text, room);
            if head.is_empty() {
                return Ok(());
            }
            let frame = EscalateFrame::Piece(head.to_string());
            match tokio::time::timeout(FRAME_WRITE, write_frame(&mut self.stream, &frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(gone(e.to_string())),
                Err(_) => return Err(gone("the coordinator stopped reading".into())),
            }
            self.sent += head.len();
            text = &text[head.len()..];
        }
        Ok(())
    }

    /// End the relay with the whole reply and close the stream.
    pub async fn end(mut self, reply: EscalateReply) {
        let s = &mut self.stream;
        let _ = tokio::time::timeout(FRAME_WRITE, async {
            write_frame(s, &EscalateFrame::End(reply)).await?;
            s.close().await
        })
        .await;
    }
}

fn gone(reason: String) -> NetError {
    NetError::Request {
        peer: "coordinator".into(),
        reason,
    }
}

fn refusal(code: ErrorCode, message: &str) -> EscalateReply {
    EscalateReply::Err(WireError {
        code,
        message: message.into(),
    })
}

/// Inbound relay slots (one per escalation being relayed).
pub(crate) fn slots(n: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(n.max(1)))
}

/// Serve one inbound stream: refuse it (not admitted, no slot), or read its
/// request within [`REQUEST_READ`] and hand it to the node.
pub(crate) async fn accept(
    peer: PeerId,
    mut stream: Stream,
    admitted: bool,
    slots: Arc<Semaphore>,
    events: mpsc::Sender<NetEvent>,
) {
    let slot = if admitted {
        slots
            .try_acquire_owned()
            .map_err(|_| refusal(ErrorCode::Overloaded, "too many escalations in flight here"))
    } else {
        tracing::debug!("escalate stream from {peer} (not admitted) refused");
        Err(refusal(
            ErrorCode::Unauthorized,
            "not admitted to this swarm: present a valid certificate first",
        ))
    };
    let slot = match slot {
        Ok(s) => s,
        Err(reply) => {
            let _ = tokio::time::timeout(FRAME_WRITE, async {
                write_frame(&mut stream, &EscalateFrame::End(reply)).await?;
                stream.close().await
            })
            .await;
            return;
        }
    };
    let req = match tokio::time::timeout(REQUEST_READ, read_frame::<_, EscalateRequest>(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!("bad escalate stream from {peer}: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("escalate stream from {peer}: no request within {REQUEST_READ:?}");
            return;
        }
    };
    let sink = RelaySink {
        stream,
        sent: 0,
        _slot: slot,
    };
    if let Err(e) = events.try_send(NetEvent::EscalateStream { peer, req, sink }) {
        let (mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev)) = e;
        if let NetEvent::EscalateStream { sink, .. } = ev {
            sink.end(refusal(ErrorCode::Overloaded, "node busy")).await;
        }
    }
}

/// What the coordinator reads back: pieces, then the reply.
pub type RelayFrames = std::pin::Pin<Box<dyn futures::Stream<Item = Result<EscalateFrame, NetError>> + Send>>;

/// The coordinator's end: send `req` on an open stream and read frames until
/// `End`, all within `deadline`; a gateway that relays more than an answer may
/// hold is cut off.
pub(crate) async fn request(
    peer: PeerId,
    mut stream: Stream,
    req: EscalateRequest,
    deadline: Instant,
) -> Result<RelayFrames, NetError> {
    let timeout = move || NetError::Timeout {
        peer: peer.to_string(),
        ms: 0,
    };
    let failed = move |e: io::Error| NetError::Request {
        peer: peer.to_string(),
        reason: e.to_string(),
    };
    tokio::time::timeout_at(deadline.into(), write_frame(&mut stream, &req))
        .await
        .map_err(|_| timeout())?
        .map_err(failed)?;
    Ok(Box::pin(async_stream::stream! {
        let mut total = 0usize;
        loop {
            let frame = match tokio::time::timeout_at(
                deadline.into(),
                read_frame::<_, EscalateFrame>(&mut stream),
            )
            .await
            {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    yield Err(failed(e));
                    return;
                }
                Err(_) => {
                    yield Err(timeout());
                    return;
                }
            };
            match frame {
                EscalateFrame::Piece(t) => {
                    total += t.len();
                    if total > MAX_TEXT_BYTES {
                        yield Err(failed(invalid("relayed more than an answer may hold")));
                        return;
                    }
                    yield Ok(EscalateFrame::Piece(t));
                }
                end @ EscalateFrame::End(_) => {
                    yield Ok(end);
                    return;
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use swarm_protocol::EscalateResponse;

    #[tokio::test]
    async fn frames_round_trip_and_an_oversized_length_is_refused_unread() {
        let mut buf = Cursor::new(Vec::new());
        let piece = EscalateFrame::Piece("Hé".into());
        let end = EscalateFrame::End(EscalateReply::Ok(EscalateResponse {
            id: 1,
            text: "Hé".into(),
            model: "m".into(),
            cloud_ms: 3,
            gateway: "g".into(),
        }));
        write_frame(&mut buf, &piece).await.expect("write");
        write_frame(&mut buf, &end).await.expect("write");
        let mut r = Cursor::new(buf.into_inner());
        assert_eq!(read_frame::<_, EscalateFrame>(&mut r).await.expect("read"), piece);
        assert_eq!(read_frame::<_, EscalateFrame>(&mut r).await.expect("read"), end);
        // A length over the limit: refused from the 4-byte prefix alone.
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend_from_slice(b"xx");
        let err = read_frame::<_, EscalateFrame>(&mut Cursor::new(huge))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("limit"), "{err}");
        // A truncated frame is an error, not a hang or a panic.
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(read_frame::<_, EscalateFrame>(&mut Cursor::new(short))
            .await
            .is_err());
    }
}
