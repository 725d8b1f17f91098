//! The relay end to end on 127.0.0.1: real TLS, the upgrade, forwarding,
//! refusals, replacement, the reflector and the metrics.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_relay::frame::{self, Frame, HEADER_LEN, MAX_BODY};
use mesh_relay::{ClientError, Relay, RelayClient, RelayConfig, RelayReceiver, RelaySender, Ticket, TicketSigner};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

const A: [u8; 32] = [0xa; 32];
const B: [u8; 32] = [0xb; 32];
const C: [u8; 32] = [0xc; 32];
const WAIT: Duration = Duration::from_secs(5);

struct Lab {
    addr: SocketAddr,
    reflector: SocketAddr,
    metrics: SocketAddr,
    pin: [u8; 32],
    signer: TicketSigner,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Lab {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let relay = Relay::bind(RelayConfig {
            listen: any,
            reflector: Some(any),
            metrics: Some(any),
            cert_path: dir.path().join("relay.crt"),
            key_path: dir.path().join("relay.key"),
            names: vec!["relay.test".into()],
            trusted_keys: vec![[0; 32], signer.public_key()],
            region: "test".into(),
            max_connections: 64,
        })
        .await
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let lab = Self {
            addr: relay.local_addr(),
            reflector: relay.reflector_addr().unwrap(),
            metrics: relay.metrics_addr().unwrap(),
            pin: relay.cert_pin(),
            signer,
            _dir: dir,
            _stop: stop,
        };
        tokio::spawn(relay.serve(async {
            let _ = stopped.await;
        }));
        lab
    }

    fn ticket(&self, key: [u8; 32], expires_in: i64) -> String {
        self.signer.sign_b64(&Ticket { public_key: key, node_id: key[0].into(), expires_unix: now() + expires_in })
    }

    async fn attach(&self, key: [u8; 32]) -> (RelaySender, RelayReceiver) {
        RelayClient::connect(self.addr, "relay.test", Some(self.pin), &self.ticket(key, 60))
            .await
            .unwrap_or_else(|e| panic!("attach {key:?}: {e}"))
    }

    async fn refusal(&self, ticket: &str) -> (u16, String) {
        match RelayClient::connect(self.addr, "relay.test", Some(self.pin), ticket).await {
            Err(ClientError::Refused { status, body }) => (status.as_u16(), body),
            Err(e) => panic!("expected a refusal, got {e}"),
            Ok(_) => panic!("expected a refusal, got attached"),
        }
    }

    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Sends until `rx` gets something: the destination's attach may be
/// registered a moment after its client returns, and until then the relay
/// drops packets for it, as it should.
async fn deliver(tx: &RelaySender, dst: [u8; 32], payload: &[u8], rx: &mut RelayReceiver) -> ([u8; 32], Vec<u8>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        tx.send(dst, payload).unwrap();
        if let Ok(got) = timeout(Duration::from_millis(100), rx.recv()).await {
            return got.expect("receiver closed");
        }
    }
    panic!("nothing delivered to {dst:?}");
}

async fn nothing_arrives(rx: &mut RelayReceiver) {
    let got = timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(got.is_err(), "unexpected delivery: {got:?}");
}

/// Whether the relay closes `stream` (end of stream or an error) in time.
async fn closed_by_relay(mut stream: impl tokio::io::AsyncRead + Unpin) -> bool {
    let mut buf = [0u8; 1024];
    timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn two_nodes_exchange_packets_both_ways() {
    let lab = Lab::start().await;
    let (a_tx, mut a_rx) = lab.attach(A).await;
    let (b_tx, mut b_rx) = lab.attach(B).await;
    assert_eq!(deliver(&a_tx, B, b"to b", &mut b_rx).await, (A, b"to b".to_vec()));
    assert_eq!(deliver(&b_tx, A, b"to a", &mut a_rx).await, (B, b"to a".to_vec()));
    // Now both are attached: every packet arrives, in order, stamped.
    for i in 0..100u32 {
        a_tx.send(B, &i.to_be_bytes()).unwrap();
    }
    for i in 0..100u32 {
        assert_eq!(timeout(WAIT, b_rx.recv()).await.unwrap(), Some((A, i.to_be_bytes().to_vec())));
    }
    let big = vec![7u8; frame::MAX_PAYLOAD];
    b_tx.send(A, &big).unwrap();
    assert_eq!(timeout(WAIT, a_rx.recv()).await.unwrap(), Some((B, big)));
    assert!(matches!(a_tx.send(B, &[0; frame::MAX_PAYLOAD + 1]), Err(ClientError::TooLarge(_))));
    // To a key nobody holds: dropped, counted, and the sender is unharmed.
    a_tx.send(C, b"void").unwrap();
    assert_eq!(deliver(&a_tx, B, b"still", &mut b_rx).await, (A, b"still".to_vec()));
    let m = lab.metrics().await;
    assert!(m.contains("mesh_relay_clients 2\n"), "{m}");
    assert!(m.contains("mesh_relay_packets_total{result=\"no_peer\"}"), "{m}");
    assert!(m.contains("mesh_relay_attach_total{result=\"ok\"} 2\n"), "{m}");
    assert!(!a_tx.is_closed());
}

#[tokio::test]
async fn a_node_cannot_send_as_another() {
    let lab = Lab::start().await;
    let (_a_tx, mut a_rx) = lab.attach(A).await;
    let (b_tx, _b_rx) = lab.attach(B).await;
    let mut raw = RelayClient::connect_stream(lab.addr, "relay.test", Some(lab.pin), &lab.ticket(C, 60)).await.unwrap();
    // The client API has no way to name a source; on the raw stream, C
    // forges a Recv frame claiming to be B: the relay closes C's connection.
    frame::write_frame(&mut raw, &Frame::Recv { src: B, payload: b"forged".as_slice().into() }).await.unwrap();
    assert!(closed_by_relay(&mut raw).await, "the relay kept a node that forged a source");
    nothing_arrives(&mut a_rx).await;
    // A genuine packet from B still carries B.
    assert_eq!(deliver(&b_tx, A, b"real", &mut a_rx).await, (B, b"real".to_vec()));
}

#[tokio::test]
async fn bad_tickets_are_refused_with_the_reason() {
    let lab = Lab::start().await;
    let other = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
    let forged = other.sign_b64(&Ticket { public_key: A, node_id: 1, expires_unix: now() + 60 });
    let (status, body) = lab.refusal(&forged).await;
    assert_eq!(status, 403);
    assert!(body.contains("bad signature"), "{body}");
    let (status, body) = lab.refusal(&lab.ticket(A, -1)).await;
    assert_eq!(status, 403);
    assert!(body.contains("expired"), "{body}");
    let (status, body) = lab.refusal("!!garbage!!").await;
    assert_eq!(status, 401);
    assert!(body.contains("base64"), "{body}");
    let (status, body) = lab.refusal("AAAA").await;
    assert_eq!(status, 401);
    assert!(body.contains("malformed"), "{body}");
    let m = lab.metrics().await;
    for result in ["bad_signature", "expired", "malformed"] {
        assert!(m.contains(&format!("mesh_relay_attach_total{{result=\"{result}\"}}")), "{m}");
    }
}

#[tokio::test]
async fn the_client_trusts_only_the_pinned_certificate() {
    let lab = Lab::start().await;
    let t = lab.ticket(A, 60);
    let wrong = RelayClient::connect(lab.addr, "relay.test", Some([0; 32]), &t).await.map(|_| ()).unwrap_err();
    assert!(matches!(wrong, ClientError::Tls { .. }), "{wrong}");
    assert!(wrong.to_string().contains("TLS"), "{wrong}");
    let none = RelayClient::connect(lab.addr, "relay.test", None, &t).await.map(|_| ()).unwrap_err();
    assert!(matches!(none, ClientError::Config(_)) && none.to_string().contains("pin is required"), "{none}");
}

#[tokio::test]
async fn a_second_attach_of_the_same_key_replaces_the_first() {
    let lab = Lab::start().await;
    let (b_tx, mut b_rx) = lab.attach(B).await;
    let (a1_tx, mut a1_rx) = lab.attach(A).await;
    assert_eq!(deliver(&b_tx, A, b"one", &mut a1_rx).await.1, b"one");
    let (_a2_tx, mut a2_rx) = lab.attach(A).await;
    assert_eq!(timeout(WAIT, a1_rx.recv()).await.expect("the first attach was not closed"), None);
    assert!(
        timeout(WAIT, async {
            while !a1_tx.is_closed() {
                tokio::task::yield_now().await
            }
        })
        .await
        .is_ok()
    );
    assert!(matches!(a1_tx.send(B, b"late"), Err(ClientError::Closed)));
    assert_eq!(deliver(&b_tx, A, b"two", &mut a2_rx).await, (B, b"two".to_vec()));
    nothing_arrives(&mut b_rx).await;
    assert!(lab.metrics().await.contains("mesh_relay_clients 2\n"));
}

#[tokio::test]
async fn dropping_the_receiver_closes_a_quiet_connection() {
    let lab = Lab::start().await;
    let (_a_tx, a_rx) = lab.attach(A).await;
    let (_b_tx, _b_rx) = lab.attach(B).await;
    drop(a_rx);
    // Nothing arrives for A, and its client pings: only the drop can end it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !lab.metrics().await.contains("mesh_relay_clients 1\n") {
        assert!(tokio::time::Instant::now() < deadline, "a dropped receiver's connection stayed attached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_session_ends_when_its_ticket_expires() {
    let lab = Lab::start().await;
    let (b_tx, _b_rx) = lab.attach(B).await;
    let (_a_tx, mut a_rx) =
        RelayClient::connect(lab.addr, "relay.test", Some(lab.pin), &lab.ticket(A, 2)).await.expect("attach");
    assert_eq!(deliver(&b_tx, A, b"before", &mut a_rx).await.1, b"before");
    // Held open by nothing but the ticket: closed within its 2 s.
    let closed = timeout(WAIT, async { while a_rx.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "the relay kept a session past its ticket");
    let (status, body) = lab.refusal(&lab.ticket(A, 0)).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection() {
    let lab = Lab::start().await;
    let mut raw = RelayClient::connect_stream(lab.addr, "relay.test", Some(lab.pin), &lab.ticket(A, 60)).await.unwrap();
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&((MAX_BODY + 2) as u32).to_be_bytes());
    header[4] = 1;
    raw.write_all(&header).await.unwrap();
    raw.flush().await.unwrap();
    assert!(closed_by_relay(&mut raw).await, "the relay kept a connection announcing an oversized frame");
}

#[tokio::test]
async fn the_reflector_answers_requests_and_ignores_garbage() {
    use mesh_relay::reflect;
    let lab = Lab::start().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let mut buf = [0u8; 1500];
    // Garbage first: no answer.
    let mut bad = reflect::encode_request(&[1; 16]);
    bad[0] = b'X';
    for junk in [&bad[..], b"", &[0u8; 200][..], &reflect::encode_reply(&[2; 16], me)[..]] {
        sock.send_to(junk, lab.reflector).await.unwrap();
    }
    let txid = *b"0123456789abcdef";
    sock.send_to(&reflect::encode_request(&txid), lab.reflector).await.unwrap();
    let (n, from) = timeout(WAIT, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(from, lab.reflector);
    assert_eq!(reflect::parse_reply(&buf[..n]), Ok((txid, me)));
    // UDP on loopback keeps order: had garbage been answered, it would have
    // come first. And nothing follows.
    assert!(timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await.is_err());
    let m = lab.metrics().await;
    assert!(m.contains("mesh_relay_reflector_requests_total{result=\"answered\"} 1\n"), "{m}");
    assert!(m.contains("mesh_relay_reflector_requests_total{result=\"ignored\"} 4\n"), "{m}");
}
