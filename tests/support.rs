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

/// Whether some log line contains `text`, waiting up to [`WAIT`] for it.
pub async fn logged(text: &str) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if logs()
            .lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains(text))
        {
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
