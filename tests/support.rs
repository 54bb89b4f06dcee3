//! Helpers for the integration tests: one compiled sandbox shared by every node of a
//! test binary, nodes on loopback, and log capture.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aemp_host::{Node, NodeBuilder, Port, Sandbox, Value};

/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(10);

/// The sandbox every node of this test binary runs in (compiling is the slow part).
pub fn sandbox() -> Arc<Sandbox> {
    static SANDBOX: OnceLock<Arc<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| Arc::new(Sandbox::new().expect("sandbox")))
        .clone()
}

/// A node named `id` listening on a free loopback port, sharing `secret`.
pub fn builder(id: &str, secret: &str) -> NodeBuilder {
    logs();
    Node::builder()
        .node_id(id)
        .secret(secret)
        .bind("127.0.0.1:0")
        .sandbox(sandbox())
}

/// The loopback address `node` listens on.
pub fn addr(node: &Node) -> String {
    node.listen_addrs()[0].to_string()
}

/// The next message on `port`, or a panic after [`WAIT`].
pub async fn recv(port: &mut Port) -> Vec<Value> {
    tokio::time::timeout(WAIT, port.recv())
        .await
        .expect("message in time")
        .expect("port open")
}

/// The reason `node` went down, from an events subscription taken before, or a panic
/// saying `what` after [`WAIT`].
pub async fn node_down(
    events: &mut tokio::sync::broadcast::Receiver<aemp_host::Event>,
    node: &str,
    what: &str,
) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(aemp_host::Event::NodeDown { node: n, reason }) = events.recv().await
                && n == node
            {
                return reason;
            }
        }
    })
    .await
    .expect(what)
}

/// Waits until `sent` stops moving for half a second and returns where it stopped, or
/// panics saying `what` after `within`.
pub async fn standstill(sent: &std::sync::atomic::AtomicU64, within: Duration, what: &str) -> u64 {
    use std::sync::atomic::Ordering;
    tokio::time::timeout(within, async {
        loop {
            let before = sent.load(Ordering::Acquire);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if sent.load(Ordering::Acquire) == before {
                return before;
            }
        }
    })
    .await
    .expect(what)
}

/// Text values.
pub fn t(s: &str) -> Value {
    Value::text(s)
}

/// Every log line of this process (debug level), captured for assertions.
pub fn logs() -> Arc<Mutex<Vec<String>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let writer = move || Capture(sink.clone());
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(writer)
            .with_ansi(false)
            .try_init();
        lines
    })
    .clone()
}

/// Whether some log line of node `node` contains `text`, waiting up to [`WAIT`]. Lines
/// carry the node's id in their span (`node{id=...}`), so parallel tests do not mix.
pub async fn logged_by(node: &str, text: &str) -> bool {
    let span = format!("node{{id={node}}}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = {
            let logs = logs();
            let lines = logs.lock().expect("log lock");
            lines.iter().any(|l| l.contains(text) && l.contains(&span))
        };
        if found {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Capture(Arc<Mutex<Vec<String>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(String::from_utf8_lossy(buf).into_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A peer written in the test: the engine's transport over a plain `TcpStream`, without
/// the host (so a test can misbehave on purpose).
pub struct RawPeer {
    pub stream: tokio::net::TcpStream,
    pub conn: aemp_engine::Connection,
    pub messages: Vec<Value>,
    pub error: Option<String>,
    /// A data connection's first bytes, once the transport handed it over.
    pub handed_over: Option<Vec<u8>>,
}

impl RawPeer {
    /// Connects to `addr` as node `id` with `secret`, speaking json.
    pub async fn connect(addr: &str, id: &str, secret: &str) -> RawPeer {
        RawPeer::connect_framing(addr, id, secret, aemp_engine::Framing::Json).await
    }

    /// Connects to `addr` as node `id` with `secret`, sending in `framing`.
    pub async fn connect_framing(
        addr: &str,
        id: &str,
        secret: &str,
        framing: aemp_engine::Framing,
    ) -> RawPeer {
        let mut config = aemp_engine::Config::new(id);
        config.secret = Some(secret.as_bytes().to_vec());
        config.framings = vec![framing];
        RawPeer::connect_with(addr, config).await
    }

    /// Connects to `addr` with the transport settings `config`.
    pub async fn connect_with(addr: &str, config: aemp_engine::Config) -> RawPeer {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let conn = aemp_engine::Connection::new(config, [7; 66], 0).expect("config");
        RawPeer {
            stream,
            conn,
            messages: Vec::new(),
            error: None,
            handed_over: None,
        }
    }

    /// Writes what the engine has to send; returns false once it reported an error.
    async fn pump(&mut self) -> bool {
        use tokio::io::AsyncWriteExt;
        while let Some(o) = self.conn.poll_output() {
            match o {
                aemp_engine::Output::Transmit(b) => self.stream.write_all(&b).await.expect("write"),
                aemp_engine::Output::Greeting(_) => {
                    self.conn.handle_verdict(aemp_engine::Verdict::Accept)
                }
                aemp_engine::Output::Message(m) => {
                    self.messages.push(Value::decode(&m).expect("cbor"))
                }
                aemp_engine::Output::Closed(e) => {
                    self.error = Some(e.to_string());
                    return false;
                }
                aemp_engine::Output::HandedOver { leftover } => self.handed_over = Some(leftover),
                _ => {}
            }
        }
        true
    }

    /// Runs the handshake (and reads) until connected, an error, or [`WAIT`].
    pub async fn handshake(&mut self) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 65536];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if !self.pump().await {
                return Err(self.error.clone().unwrap_or_default());
            }
            if self.conn.session().is_some() || self.handed_over.is_some() {
                return Ok(());
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| "timeout")?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                self.conn.handle_eof();
            } else {
                self.conn.handle_input(&buf[..n]);
            }
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, items: Vec<Value>) {
        self.conn.send(&Value::Array(items).encode()).expect("send");
        self.pump().await;
    }

    /// Reads until a message arrives (or [`WAIT`] passes).
    pub async fn recv(&mut self) -> Option<Value> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 65536];
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.messages.is_empty() {
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.conn.handle_input(&buf[..n]);
            if !self.pump().await {
                return None;
            }
        }
        Some(self.messages.remove(0))
    }
}

/// `openssl req -newkey` options for the reference's RSA 2048 key.
pub const RSA: &[&str] = &["-newkey", "rsa:2048"];

/// `openssl req -newkey` options for an ECDSA P-256 key.
pub const ECDSA: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// Runs `openssl ARGS` in `dir`. The TLS tests make their certificates the way
/// AnyEvent::MP does, so a missing `openssl` is a loud failure, not a skip.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = match std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run openssl ({e}): the TLS tests need it; run scripts/setup as root \
             or `apt-get install openssl`"
        ),
    };
    assert!(
        out.status.success(),
        "openssl {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads `name` in `dir` as text.
fn read(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).expect("openssl output")
}

/// A network certificate made exactly as AnyEvent::MP's `aemp gencert` makes
/// it (`openssl req -new -nodes -x509 -days 3650 -batch -subj /CN=AnyEvent::MP`
/// with the `key` options): the certificate followed by its key.
pub fn reference_pem(key: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["req", "-new", "-nodes", "-x509", "-days", "3650"];
    args.extend_from_slice(key);
    args.extend([
        "-batch",
        "-subj",
        "/CN=AnyEvent::MP",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
    ]);
    openssl(dir.path(), &args);
    read(dir.path(), "cert.pem") + &read(dir.path(), "key.pem")
}

/// Like [`reference_pem`] (RSA 2048, self-signed, CA:TRUE) but valid only from
/// `start` to `end` (`YYYYMMDDHHMMSSZ`), which `openssl req` cannot set: made
/// with `openssl ca -selfsign`.
pub fn reference_pem_valid(start: &str, end: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[ca]\ndefault_ca = window\n\
                  [window]\ndatabase = index.txt\nserial = serial\nnew_certs_dir = .\n\
                  default_md = sha256\npolicy = any\nx509_extensions = ext\n\
                  [any]\ncommonName = supplied\n\
                  [ext]\nbasicConstraints = critical,CA:TRUE\nsubjectKeyIdentifier = hash\n";
    std::fs::write(dir.path().join("ca.cnf"), config).expect("write");
    std::fs::write(dir.path().join("index.txt"), "").expect("write");
    std::fs::write(dir.path().join("serial"), "01\n").expect("write");
    let mut args = vec!["req", "-new", "-nodes"];
    args.extend_from_slice(RSA);
    args.extend([
        "-batch",
        "-subj",
        "/CN=AnyEvent::MP",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
    ]);
    openssl(dir.path(), &args);
    openssl(
        dir.path(),
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            "key.pem",
            "-in",
            "req.csr",
            "-startdate",
            start,
            "-enddate",
            end,
            "-notext",
            "-out",
            "cert.pem",
        ],
    );
    read(dir.path(), "cert.pem") + &read(dir.path(), "key.pem")
}

/// A node certificate (X.509 v3, CA:FALSE, ECDSA) signed by the network
/// certificate `network` (certificate then key, as [`reference_pem`]), as one
/// node file: node certificate, node key, network certificate.
pub fn leaf_pem(network: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("network.pem"), network).expect("write");
    std::fs::write(dir.path().join("ext"), "basicConstraints = CA:FALSE\n").expect("write");
    let mut args = vec!["req", "-new", "-nodes"];
    args.extend_from_slice(ECDSA);
    args.extend([
        "-batch", "-subj", "/CN=node", "-keyout", "key.pem", "-out", "req.csr",
    ]);
    openssl(dir.path(), &args);
    openssl(
        dir.path(),
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "network.pem",
            "-CAkey",
            "network.pem",
            "-days",
            "30",
            "-extfile",
            "ext",
            "-out",
            "cert.pem",
        ],
    );
    let network_cert = network
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .expect("network certificate");
    read(dir.path(), "cert.pem") + &read(dir.path(), "key.pem") + network_cert
}

/// A fresh node `check-N` reaches `node` and delivers a message to one of its ports
/// within `limit`, from connect to receipt.
pub async fn served_within(node: &Node, secret: &str, n: usize, limit: Duration) {
    let other = builder(&format!("check-{n}-{}", node.id()), secret)
        .start()
        .await
        .unwrap();
    let mut port = node.port().await.unwrap();
    let served = tokio::time::timeout(limit, async {
        other.connect(&addr(node)).await.unwrap();
        other.wait_up(node.id(), limit).await.unwrap();
        other.send(port.id(), vec![t("served")]).await.unwrap();
        port.recv().await
    })
    .await;
    assert_eq!(
        served.ok().flatten(),
        Some(vec![t("served")]),
        "check {n} was not served within {limit:?}"
    );
    other.shutdown(WAIT).await.unwrap();
}

/// How many keys `family` has, as `node` learns from its master.
pub async fn keys_of(node: &Node, family: &str) -> usize {
    match tokio::time::timeout(WAIT, node.db_keys(family)).await {
        Ok(Ok(Value::Array(keys))) => keys.len(),
        other => panic!("db_keys {family}: {other:?}"),
    }
}
