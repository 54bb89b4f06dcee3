//! `aemp`: run AEMP nodes and talk to them from the shell, with the verbs AnyEvent::MP
//! users know. Configuration comes from AnyEvent::MP's file (`$PERL_ANYEVENT_MP_RC` or
//! `~/.perl-anyevent-mp`); options override it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aemp_engine::Framing;
use aemp_host::config::{self, Profile};
use aemp_host::{Event, Node, NodeBuilder, TlsConfig, Value};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "aemp",
    version,
    about = "Run AEMP (AnyEvent::MP) nodes and send them messages"
)]
struct Cli {
    /// Configuration profile (default: the host name).
    #[arg(long, global = true)]
    profile: Option<String>,
    /// Reach a node at HOST:PORT directly, without seeds (repeatable).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    connect: Vec<String>,
    /// Shared secret (overrides the configuration).
    #[arg(long, global = true)]
    secret: Option<String>,
    /// PEM file with this node's certificate, key and the CA certificate: enables TLS.
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Framing to ask for: json or cbor (default: cbor, then json).
    #[arg(long, global = true)]
    framing: Option<String>,
    /// Listen on HOST:PORT (repeatable; replaces the configured binds).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Node id (overrides the configuration; %n, %u and a trailing / are expanded).
    #[arg(long, global = true)]
    nodeid: Option<String>,
    /// Seconds to wait for connections and replies.
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
    /// More log output (-v: connections and protocol, -vv: everything).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node until interrupted.
    Run {
        /// Add a port named `echo` that sends each message's remaining arguments back to
        /// the port id given as its first argument.
        #[arg(long)]
        echo: bool,
    },
    /// Send a message: PORT ARGS... (each argument JSON, or else a plain string).
    Snd { port: String, args: Vec<String> },
    /// Send a message with a fresh reply port appended; print the reply as JSON.
    Cal { port: String, args: Vec<String> },
    /// Monitor a port; print the reason when it dies.
    Mon { port: String },
    /// Generate a random secret and store it in the configuration.
    Gensecret,
    /// Store a secret in the configuration.
    Setsecret { secret: String },
    /// Generate a network certificate (self-signed, as AnyEvent::MP's) and store it.
    Gencert,
    /// Store the certificate PEM file in the configuration.
    Setcert { file: PathBuf },
    /// Set the seed addresses (HOST:PORT...).
    Seeds { addrs: Vec<String> },
    /// Set the listening addresses (HOST:PORT...).
    Binds { addrs: Vec<String> },
    /// Set the node id.
    Nodeid { id: String },
}

/// A one-line error for the user.
type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info,aemp_host=debug",
        _ => "trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Every connection is a file descriptor: use all the hard limit allows.
    if let Err(e) = aemp_host::raise_open_file_limit() {
        tracing::warn!("cannot raise the open file limit: {e}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("aemp: {message}");
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Gensecret => {
            let mut bytes = [0u8; 48];
            getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
            let secret: String = bytes
                .iter()
                .map(|b| char::from(ALNUM[usize::from(*b) % ALNUM.len()]))
                .collect();
            store(&cli, "secret", secret.into())
        }
        Command::Setsecret { secret } => store(&cli, "secret", secret.clone().into()),
        Command::Gencert => {
            let pem = aemp_host::tls::generate_network_pem().map_err(|e| e.to_string())?;
            store(&cli, "cert", pem.into())
        }
        Command::Setcert { file } => {
            let pem =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            TlsConfig::from_pem(pem.as_bytes()).map_err(|e| format!("{}: {e}", file.display()))?;
            store(&cli, "cert", pem.into())
        }
        Command::Seeds { addrs } => store(&cli, "seeds", addrs.clone().into()),
        Command::Binds { addrs } => store(&cli, "binds", addrs.clone().into()),
        Command::Nodeid { id } => store(&cli, "nodeid", id.clone().into()),
        Command::Run { echo } => run_node(&cli, *echo).await,
        Command::Snd { port, args } => {
            let node = client(&cli).await?;
            node.send(port, parse_args(args))
                .await
                .map_err(|e| e.to_string())?;
            reach(&cli, &node, port).await?;
            node.flush(timeout(&cli))
                .await
                .map_err(|e| format!("sending: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cal { port, args } => {
            let node = client(&cli).await?;
            let mut reply = node.port().await.map_err(|e| e.to_string())?;
            let mut args = parse_args(args);
            args.push(Value::text(reply.id()));
            node.send(port, args).await.map_err(|e| e.to_string())?;
            match tokio::time::timeout(timeout(&cli), reply.recv()).await {
                Ok(Some(reply)) => {
                    println!("{}", json(&Value::Array(reply)));
                    Ok(ExitCode::SUCCESS)
                }
                _ => Err(format!("no reply from {port} within {}s", cli.timeout)),
            }
        }
        Command::Mon { port } => {
            let node = client(&cli).await?;
            let mut events = node.events();
            node.monitor(port).await.map_err(|e| e.to_string())?;
            loop {
                match events.recv().await {
                    Ok(Event::PortDown { port: p, reason }) if &p == port => {
                        println!("{}", json(&Value::Array(reason)));
                        return Ok(ExitCode::SUCCESS);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return Err("node stopped".into()),
                }
            }
        }
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn timeout(cli: &Cli) -> Duration {
    Duration::from_secs_f64(cli.timeout.max(0.0))
}

fn json(value: &Value) -> String {
    let mut out = Vec::new();
    match value.write_json(&mut out) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) => format!("{value:?} ({e})"),
    }
}

/// Each argument as JSON if it parses, else as a string.
fn parse_args(args: &[String]) -> Vec<Value> {
    args.iter()
        .map(|a| {
            serde_json::from_str::<serde_json::Value>(a)
                .map(Value::from)
                .unwrap_or_else(|_| Value::text(a.as_str()))
        })
        .collect()
}

/// Sets `key` in the configuration file (in `--profile`'s section if given).
fn store(cli: &Cli, key: &str, value: serde_json::Value) -> Result<ExitCode> {
    let path = config::rc_path().ok_or("no configuration file: set HOME or PERL_ANYEVENT_MP_RC")?;
    let mut rc = config::load_rc(&path).map_err(|e| e.to_string())?;
    config::set_key(&mut rc, cli.profile.as_deref(), key, value);
    config::save_rc(&path, &rc).map_err(|e| e.to_string())?;
    eprintln!("aemp: {key} stored in {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// The profile from the configuration file (built-in defaults without one).
fn profile(cli: &Cli) -> Result<Profile> {
    let rc = match config::rc_path() {
        Some(path) => config::load_rc(&path).map_err(|e| e.to_string())?,
        None => serde_json::json!({}),
    };
    config::resolve(&rc, cli.profile.as_deref()).map_err(|e| e.to_string())
}

/// A builder from the profile with the command-line overrides applied.
fn builder(cli: &Cli, listen: bool) -> Result<NodeBuilder> {
    let mut profile = profile(cli)?;
    if let Some(secret) = &cli.secret {
        profile.secret = Some(secret.clone());
    }
    if let Some(file) = &cli.cert {
        profile.cert =
            Some(std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?);
    }
    if let Some(framing) = &cli.framing {
        Framing::from_name(framing).ok_or(format!("unknown framing '{framing}' (json or cbor)"))?;
        profile.framing_format = vec![framing.clone()];
    }
    if !cli.listen.is_empty() {
        profile.binds = cli.listen.clone();
    } else if !listen {
        profile.binds = Vec::new();
    }
    let mut b = NodeBuilder::from_profile(&profile).map_err(|e| e.to_string())?;
    if let Some(id) = &cli.nodeid {
        b = b.node_id(id);
    }
    Ok(b)
}

/// Starts a node and dials `--connect` addresses.
async fn start(cli: &Cli, listen: bool) -> Result<Node> {
    let node = builder(cli, listen)?
        .start()
        .await
        .map_err(|e| e.to_string())?;
    for addr in &cli.connect {
        node.connect(addr).map_err(|e| e.to_string())?;
    }
    Ok(node)
}

/// A short-lived node for `snd`, `cal` and `mon` (no listener unless `--listen`).
async fn client(cli: &Cli) -> Result<Node> {
    start(cli, false).await
}

/// Waits until the node of `port` is connected.
async fn reach(cli: &Cli, node: &Node, port: &str) -> Result<()> {
    let target = port.split_once('#').map_or(port, |(n, _)| n);
    node.wait_up(target, timeout(cli))
        .await
        .map_err(|e| format!("cannot reach {target}: {e}"))
}

async fn run_node(cli: &Cli, echo: bool) -> Result<ExitCode> {
    let node = start(cli, true).await?;
    let addrs: Vec<String> = node.listen_addrs().iter().map(|a| a.to_string()).collect();
    println!(
        "node {} listening on {}",
        node.id(),
        if addrs.is_empty() {
            "nothing".into()
        } else {
            addrs.join(" ")
        }
    );
    if echo {
        let mut port = node.named_port("echo").await.map_err(|e| e.to_string())?;
        println!("echo port {}", port.id());
        let echoer = node.clone();
        tokio::spawn(async move {
            while let Some(mut args) = port.recv().await {
                if args.is_empty() {
                    continue;
                }
                let reply_to = args.remove(0);
                match reply_to.as_name() {
                    Some(to) => {
                        if let Err(e) = echoer.send(&to, args).await {
                            tracing::warn!("echo to {to}: {e}");
                        }
                    }
                    None => tracing::warn!("echo: first argument is not a port id"),
                }
            }
        });
    }
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}
