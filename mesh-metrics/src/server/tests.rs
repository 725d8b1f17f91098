//! The responder against real sockets on loopback (no root). Waits are
//! generous upper bounds on events that must happen, never speed checks.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

#[derive(Debug)]
struct Fixed;

impl Scrape for Fixed {
    async fn scrape(&self, format: Format) -> Result<String, Unavailable> {
        Ok(format!("t_up 1\n# format {format:?}\n"))
    }
}

const LONG: Duration = Duration::from_secs(10);

async fn start(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, limits, Arc::new(Fixed)));
    addr
}

/// Sends `request` on `s` and reads until the server closes.
async fn exchange(s: &mut TcpStream, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(LONG, s.read_to_string(&mut out)).await.expect("the server answers and closes").unwrap();
    out
}

async fn get(addr: SocketAddr, request: &str) -> String {
    exchange(&mut TcpStream::connect(addr).await.unwrap(), request).await
}

#[tokio::test]
async fn serves_metrics_in_the_negotiated_format() {
    let addr = start(Limits::default()).await;
    let classic = get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(classic.starts_with("HTTP/1.0 200 OK\r\n"), "{classic}");
    assert!(classic.contains("content-type: text/plain; version=0.0.4"), "{classic}");
    assert!(classic.ends_with("\r\n\r\nt_up 1\n# format Classic\n"), "{classic}");
    let om = get(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,*/*;q=0.1\r\n\r\n",
    )
    .await;
    assert!(om.starts_with("HTTP/1.1 200 OK\r\n"), "{om}");
    assert!(om.contains("content-type: application/openmetrics-text"), "{om}");
    assert!(om.ends_with("# format OpenMetrics\n"), "{om}");
    let other = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let post = get(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
}

#[tokio::test]
async fn a_silent_client_is_disconnected() {
    let limits = Limits { header_timeout: Duration::from_millis(100), ..Limits::default() };
    let addr = start(limits).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    // Without the header timeout this read would wait for ever.
    let read = tokio::time::timeout(LONG, s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server keeps a connection that sent nothing");
    // Still serving after that.
    assert!(get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await.contains(" 200 OK"));
}

#[tokio::test]
async fn at_the_cap_further_clients_wait_until_a_slot_frees() {
    let limits = Limits { max_connections: 2, header_timeout: Duration::from_secs(60), ..Limits::default() };
    let addr = start(limits).await;
    let idle = [TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    waiting.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut byte)).await;
    assert!(early.is_err(), "a third connection was served while two held the cap");
    drop(idle);
    let answer = exchange(&mut waiting, "").await;
    assert!(answer.starts_with("HTTP/1.0 200 OK"), "{answer}");
}

/// Fails every accept with EMFILE, as a process out of descriptors does.
struct OutOfFiles(Arc<AtomicUsize>);

impl Accept for OutOfFiles {
    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        self.0.fetch_add(1, Ordering::Relaxed);
        // Lets the test's timeout run even if the loop never waits.
        tokio::task::yield_now().await;
        Err(io::Error::from_raw_os_error(EMFILE))
    }
}

/// EMFILE on Linux ("too many open files").
const EMFILE: i32 = 24;

#[tokio::test]
async fn accept_errors_back_off_instead_of_spinning() {
    let calls = Arc::new(AtomicUsize::new(0));
    let serve = run(OutOfFiles(calls.clone()), Limits::default(), Arc::new(Fixed));
    assert!(tokio::time::timeout(Duration::from_secs(1), serve).await.is_err());
    let n = calls.load(Ordering::Relaxed);
    // 10 ms doubling to 1 s: about 7 tries in a second; a spinning loop
    // makes hundreds of thousands.
    assert!((2..=20).contains(&n), "{n} accepts in one second");
}
