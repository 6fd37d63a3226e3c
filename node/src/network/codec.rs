//! request-response codec over the protocol crate's own CBOR encoding: size
//! limits are enforced while reading (a peer cannot make us buffer more than a
//! message's limit) and every decoded message is validated.

use std::io;
use std::marker::PhantomData;

use futures::prelude::*;
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;
use swarm_protocol::{decode_msg, encode_msg, WireMessage};

pub struct WireCodec<Req, Resp> {
    _p: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Default for WireCodec<Req, Resp> {
    fn default() -> Self {
        Self { _p: PhantomData }
    }
}

impl<Req, Resp> Clone for WireCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

async fn read_limited<T, M>(io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: WireMessage,
{
    let mut buf = Vec::new();
    // One byte over the limit tells "too big" from "exactly at the limit".
    io.take(M::MAX_BYTES as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > M::MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message over {} bytes", M::MAX_BYTES),
        ));
    }
    decode_msg::<M>(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

async fn write_msg<T, M>(io: &mut T, msg: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: WireMessage,
{
    let bytes = encode_msg(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> Codec for WireCodec<Req, Resp>
where
    Req: WireMessage + Send + Sync + 'static,
    Resp: WireMessage + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Req>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited::<T, Req>(io)
    }

    fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> impl Future<Output = io::Result<Resp>> + Send
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited::<T, Resp>(io)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_msg(io, &req).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Resp) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_msg(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_protocol::{ChatMessage, Task, VoteRequest};

    fn vote() -> VoteRequest {
        VoteRequest {
            id: 7,
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Which is a mammal?".into(),
            }],
            task: Task::Short,
            max_tokens: 16,
            deadline_ms: 1000,
            model: None,
            team: None,
        }
    }

    #[tokio::test]
    async fn round_trip_and_limits() {
        let mut codec = WireCodec::<VoteRequest, swarm_protocol::VoteReply>::default();
        let proto = StreamProtocol::new("/slm-swarm/t/vote/1");
        let mut buf = futures::io::Cursor::new(Vec::new());
        codec
            .write_request(&proto, &mut buf, vote())
            .await
            .expect("write");
        let mut rd = futures::io::Cursor::new(buf.into_inner());
        assert_eq!(codec.read_request(&proto, &mut rd).await.expect("read"), vote());
        // Garbage and oversize inputs are errors, never panics.
        let mut junk = futures::io::Cursor::new(vec![0xff; 64]);
        assert!(codec.read_request(&proto, &mut junk).await.is_err());
        let mut big = futures::io::Cursor::new(vec![0u8; swarm_protocol::codec::MAX_REQUEST_BYTES + 10]);
        let err = codec.read_request(&proto, &mut big).await.expect_err("oversize");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
