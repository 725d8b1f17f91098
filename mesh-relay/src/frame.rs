//! The framing on an upgraded relay connection.
//!
//! `[u32 BE len][u8 type][body]`, where `len` counts the type byte and the
//! body. Types:
//!
//! | type | name | direction      | body                       |
//! |------|------|----------------|----------------------------|
//! | 1    | Send | client → relay | destination key (32), data |
//! | 2    | Recv | relay → client | source key (32), data      |
//! | 3    | Ping | either         | 8 opaque bytes             |
//! | 4    | Pong | either         | the ping's 8 bytes         |
//!
//! A body is at most [`MAX_BODY`] bytes (a key and a 64 KiB datagram);
//! a bigger length is a protocol error and the connection is closed before
//! anything is allocated for it. The codec ([`encode`], [`decode`]) is pure;
//! [`read_frame`] and [`write_frame`] put it on tokio streams.

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The largest datagram a frame carries.
pub const MAX_PAYLOAD: usize = 65_535;
/// The largest body: a key and a datagram.
pub const MAX_BODY: usize = MAX_PAYLOAD + 32;
/// The length prefix and the type byte.
pub const HEADER_LEN: usize = 5;

const SEND: u8 = 1;
const RECV: u8 = 2;
const PING: u8 = 3;
const PONG: u8 = 4;

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Client → relay: deliver `payload` to the node attached as `dst`.
    Send {
        /// The destination's WireGuard public key.
        dst: [u8; 32],
        /// The (already encrypted) datagram.
        payload: Bytes,
    },
    /// Relay → client: `payload` from the node attached as `src`.
    Recv {
        /// The source's key, stamped by the relay.
        src: [u8; 32],
        /// The datagram.
        payload: Bytes,
    },
    /// A liveness probe.
    Ping([u8; 8]),
    /// The answer to a [`Frame::Ping`], echoing its bytes.
    Pong([u8; 8]),
}

/// A framing error: the connection cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A length beyond [`MAX_BODY`] (plus the type byte).
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// A length of zero: no type byte.
    #[error("empty frame")]
    Empty,
    /// A type this side does not know.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A body of the wrong size for its type.
    #[error("frame type {kind} with a body of {len} bytes")]
    BadBody {
        /// The frame type.
        kind: u8,
        /// The body length.
        len: usize,
    },
    /// The stream failed or ended mid-frame.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Self::Send { .. } => SEND,
            Self::Recv { .. } => RECV,
            Self::Ping(_) => PING,
            Self::Pong(_) => PONG,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Self::Send { payload, .. } | Self::Recv { payload, .. } => 32 + payload.len(),
            Self::Ping(_) | Self::Pong(_) => 8,
        }
    }
}

/// Appends `frame`'s wire form to `out`; refuses a payload over
/// [`MAX_PAYLOAD`] (leaving `out` unchanged).
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
    let body_len = frame.body_len();
    if body_len > MAX_BODY {
        return Err(FrameError::TooLarge(body_len + 1));
    }
    out.reserve(HEADER_LEN + body_len);
    out.put_u32(u32::try_from(body_len + 1).expect("bounded by MAX_BODY"));
    out.put_u8(frame.kind());
    match frame {
        Frame::Send { dst: key, payload } | Frame::Recv { src: key, payload } => {
            out.put_slice(key);
            out.put_slice(payload);
        }
        Frame::Ping(b) | Frame::Pong(b) => out.put_slice(b),
    }
    Ok(())
}

/// Checks a frame header: the type byte and the body length it announces.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(u8, usize), FrameError> {
    let len = u32::from_be_bytes(header[..4].try_into().expect("sliced to 4")) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_BODY + 1 {
        return Err(FrameError::TooLarge(len));
    }
    let kind = header[4];
    let body = len - 1;
    let ok = match kind {
        SEND | RECV => body >= 32,
        PING | PONG => body == 8,
        other => return Err(FrameError::UnknownType(other)),
    };
    if !ok {
        return Err(FrameError::BadBody { kind, len: body });
    }
    Ok((kind, body))
}

/// The frame of type `kind` with `body` (as announced by [`parse_header`]).
pub fn parse_body(kind: u8, body: Bytes) -> Result<Frame, FrameError> {
    let bad = || FrameError::BadBody { kind, len: body.len() };
    match kind {
        SEND | RECV => {
            let key: [u8; 32] = body.get(..32).ok_or_else(bad)?.try_into().expect("sliced to 32");
            let payload = body.slice(32..);
            Ok(if kind == SEND { Frame::Send { dst: key, payload } } else { Frame::Recv { src: key, payload } })
        }
        PING | PONG => {
            let b: [u8; 8] = body.as_ref().try_into().map_err(|_| bad())?;
            Ok(if kind == PING { Frame::Ping(b) } else { Frame::Pong(b) })
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

/// Takes one frame off the front of `buf`: `Ok(None)` when `buf` does not
/// hold a whole frame yet (a bad header is an error at once).
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else { return Ok(None) };
    let (kind, body_len) = parse_header(header.try_into().expect("sliced to HEADER_LEN"))?;
    if buf.len() < HEADER_LEN + body_len {
        return Ok(None);
    }
    let mut frame = buf.split_to(HEADER_LEN + body_len);
    let body = frame.split_off(HEADER_LEN).freeze();
    parse_body(kind, body).map(Some)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
/// Not cancel-safe: a frame cut by a timeout leaves the stream unusable,
/// which is fine where a timeout means the connection is dead anyway.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let n = r.read(&mut header).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut header[n..]).await?;
    let (kind, body_len) = parse_header(&header)?;
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await?;
    parse_body(kind, body.into()).map(Some)
}

/// Writes and flushes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), FrameError> {
    let mut buf = BytesMut::new();
    encode(frame, &mut buf)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Send { dst: [1; 32], payload: Bytes::from_static(b"hello") },
            Frame::Recv { src: [2; 32], payload: Bytes::new() },
            Frame::Recv { src: [3; 32], payload: vec![9; MAX_PAYLOAD].into() },
            Frame::Ping(*b"12345678"),
            Frame::Pong(*b"abcdefgh"),
        ]
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in frames() {
            encode(&f, &mut wire).unwrap();
        }
        // Fed one byte at a time, the decoder never errs and never loses a frame.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(f) = decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames());
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn stream_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        for f in frames() {
            write_frame(&mut a, &f).await.unwrap();
        }
        drop(a);
        for f in frames() {
            assert_eq!(read_frame(&mut b).await.unwrap(), Some(f));
        }
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[test]
    fn oversized_payload_is_not_encoded() {
        let mut buf = BytesMut::new();
        let f = Frame::Send { dst: [0; 32], payload: vec![0; MAX_PAYLOAD + 1].into() };
        assert!(matches!(encode(&f, &mut buf), Err(FrameError::TooLarge(_))));
        assert!(buf.is_empty());
    }

    #[test]
    fn hostile_headers() {
        let h = |len: u32, kind: u8| {
            let mut b = [0u8; HEADER_LEN];
            b[..4].copy_from_slice(&len.to_be_bytes());
            b[4] = kind;
            parse_header(&b)
        };
        assert!(matches!(h(u32::MAX, SEND), Err(FrameError::TooLarge(_))));
        assert!(matches!(h((MAX_BODY + 2) as u32, SEND), Err(FrameError::TooLarge(_))));
        assert_eq!(h((MAX_BODY + 1) as u32, SEND).unwrap(), (SEND, MAX_BODY));
        assert!(matches!(h(0, SEND), Err(FrameError::Empty)));
        assert!(matches!(h(1, 0), Err(FrameError::UnknownType(0))));
        assert!(matches!(h(9, 5), Err(FrameError::UnknownType(5))));
        assert!(matches!(h(32, SEND), Err(FrameError::BadBody { kind: SEND, len: 31 })));
        assert!(matches!(h(8, PING), Err(FrameError::BadBody { .. })));
        assert!(matches!(h(10, PONG), Err(FrameError::BadBody { .. })));
        // A bad header fails before the body arrives.
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        assert!(decode(&mut buf).is_err());
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let mut wire = BytesMut::new();
        encode(&Frame::Ping([0; 8]), &mut wire).unwrap();
        let mut r = &wire[..wire.len() - 1];
        assert!(matches!(read_frame(&mut r).await, Err(FrameError::Io(_))));
    }
}
