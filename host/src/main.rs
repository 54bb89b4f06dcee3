//! `aemp`: run AEMP nodes, talk to them and edit the configuration from the shell, with the
//! verbs of AnyEvent::MP's `aemp`, chained as there. Configuration comes from AnyEvent::MP's
//! file (`$PERL_ANYEVENT_MP_RC` or `~/.perl-anyevent-mp`); options override it.

mod cli;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aemp_engine::Framing;
use aemp_host::config;
use aemp_host::{Node, NodeBuilder, TlsConfig, Value};
use serde_json::{Map, Value as Json};

use cli::args::{self, Options};
use cli::verbs::{self, DbQuery, PERL_ONLY, Verb};

/// What `snd` asks the target node to send back to confirm delivery (the reference's text).
const CONFIRMATION: &str = "message sent successfully";

/// A one-line error for the user.
type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let (opts, rest) = match args::split_options(std::env::args().skip(1).collect()) {
        Ok(split) => split,
        Err(e) => return fail(e.to_string()),
    };
    if opts.help {
        say(cli::USAGE);
        return ExitCode::SUCCESS;
    }
    if opts.version {
        say(&format!("aemp {}\n", env!("CARGO_PKG_VERSION")));
        return ExitCode::SUCCESS;
    }
    let verbs = match args::type_args(rest)
        .map_err(|e| e.to_string())
        .and_then(|typed| verbs::parse(typed).map_err(|e| e.to_string()))
    {
        Ok(verbs) => verbs,
        Err(e) => return fail(e),
    };
    let level = match opts.verbose {
        0 => "warn",
        1 => "info,aemp_host=debug",
        _ => "trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Reporting a failed log write goes to stderr too and panics when it is closed
        // (`aemp mon ... 2>&1 | head`), which would stop the node.
        .log_internal_errors(false)
        .init();
    // Every connection is a file descriptor: use all the hard limit allows.
    if let Err(e) = aemp_host::raise_open_file_limit() {
        tracing::warn!("cannot raise the open file limit: {e}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = Session::open(opts).and_then(|mut session| {
        runtime.block_on(async {
            for verb in verbs {
                session.run(verb).await?;
            }
            session.save()
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Writes `text` to stdout; unlike print!, no panic if stdout is closed (`| head`).
fn say(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn fail(message: String) -> ExitCode {
    // Not eprintln!, which panics if stderr is closed.
    let _ = writeln!(std::io::stderr(), "aemp: {message}");
    ExitCode::FAILURE
}

/// The configuration as edited so far and what the verbs share.
struct Session {
    opts: Options,
    /// The file; `None` without `HOME` and `PERL_ANYEVENT_MP_RC`.
    path: Option<PathBuf>,
    /// The whole file.
    rc: Json,
    /// The profile configuration verbs edit (`None`: the top level).
    target: Option<String>,
    /// Whether `rc` has changes not written yet.
    dirty: bool,
}

impl Session {
    fn open(opts: Options) -> Result<Session> {
        let path = config::rc_path();
        let rc = match &path {
            Some(path) if path.exists() => config::load_rc(path).map_err(|e| e.to_string())?,
            // A new file starts as AnyEvent::MP starts one.
            _ => serde_json::json!({ "version": 1 }),
        };
        Ok(Session {
            target: opts.profile.clone(),
            opts,
            path,
            rc,
            dirty: false,
        })
    }

    /// Writes pending changes (before a node starts, and at the end).
    fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let path = self
            .path
            .as_ref()
            .ok_or("no configuration file: set HOME or PERL_ANYEVENT_MP_RC")?;
        config::save_rc(path, &self.rc).map_err(|e| e.to_string())?;
        tracing::info!("configuration written to {}", path.display());
        self.dirty = false;
        Ok(())
    }

    async fn run(&mut self, verb: Verb) -> Result<()> {
        let target = self.target.clone();
        let target = target.as_deref();
        match verb {
            Verb::Set { key, value } => config::set_key(&mut self.rc, target, key, value),
            Verb::Del { key } => config::del_key(&mut self.rc, target, key),
            Verb::GenSecret => {
                let mut bytes = [0u8; 48];
                getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
                let secret: String = bytes
                    .iter()
                    .map(|b| char::from(ALNUM[usize::from(*b) % ALNUM.len()]))
                    .collect();
                config::set_key(&mut self.rc, target, "secret", secret.into());
            }
            Verb::GenCert => {
                let pem = aemp_host::tls::generate_network_pem().map_err(|e| e.to_string())?;
                config::set_key(&mut self.rc, target, "cert", pem.into());
            }
            Verb::SetCert { file } => {
                let pem = std::fs::read_to_string(&file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                TlsConfig::from_pem(pem.as_bytes())
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                config::set_key(&mut self.rc, target, "cert", pem.into());
            }
            Verb::SetList { key, items } => {
                config::set_key(&mut self.rc, target, key, Json::Array(items));
            }
            Verb::AddItem { key, item } => {
                config::list_add(&mut self.rc, target, key, item).map_err(|e| e.to_string())?;
            }
            Verb::DelItem { key, item } => {
                config::list_remove(&mut self.rc, target, key, &item).map_err(|e| e.to_string())?;
            }
            Verb::Profile { name } => {
                config::add_profile(&mut self.rc, &name);
                self.target = Some(name);
            }
            Verb::DelProfile { name } => config::del_profile(&mut self.rc, &name),
            Verb::ShowProfile { name } => {
                say(&config::pretty(&config::own_profile(&self.rc, &name)));
                return Ok(());
            }
            Verb::ShowConfig { name, settings } => {
                let name = name.or_else(|| self.opts.profile.clone());
                let shown = config::effective(&self.rc, name.as_deref(), &settings)
                    .map_err(|e| e.to_string())?;
                say(&config::pretty(&Json::Object(shown)));
                return Ok(());
            }
            Verb::Run { profile, settings } => {
                self.save()?;
                return self.run_node(profile, settings).await;
            }
            Verb::Snd { port, args } => {
                self.save()?;
                return self.snd(&port, typed(args)).await;
            }
            Verb::Cal { port, args } => {
                self.save()?;
                return self.cal(&port, typed(args)).await;
            }
            Verb::Mon { port } => {
                self.save()?;
                return self.mon(&port).await;
            }
            Verb::Db { query, family } => {
                self.save()?;
                return self.db(query, &family).await;
            }
        }
        self.dirty = true;
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.opts.timeout)
    }

    /// A builder from the profile (with `run`'s settings below the file's, as the reference's
    /// `configure` does) and the options applied on top.
    fn builder(
        &self,
        profile: Option<String>,
        settings: &Map<String, Json>,
        listen: bool,
    ) -> Result<NodeBuilder> {
        let name = profile.or_else(|| self.opts.profile.clone());
        let effective =
            config::effective(&self.rc, name.as_deref(), settings).map_err(|e| e.to_string())?;
        // Never silently skip what a Perl node would run.
        for key in ["services", "eval"] {
            let set = match effective.get(key) {
                None | Some(Json::Null) => false,
                Some(Json::String(s)) => !s.is_empty(),
                Some(Json::Array(items)) => !items.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(format!(
                    "the configuration sets {key}: not supported: {PERL_ONLY}"
                ));
            }
        }
        let mut profile =
            config::resolve_with(&self.rc, name.as_deref(), settings).map_err(|e| e.to_string())?;
        let opts = &self.opts;
        if let Some(secret) = &opts.secret {
            profile.secret = Some(secret.clone());
        }
        if let Some(file) = &opts.cert {
            profile.cert = Some(
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?,
            );
        }
        if let Some(framing) = &opts.framing {
            Framing::from_name(framing)
                .ok_or(format!("unknown framing '{framing}' (json or cbor)"))?;
            profile.framing_format = vec![framing.clone()];
        }
        if !opts.listen.is_empty() {
            profile.binds = opts.listen.clone();
        } else if !listen {
            profile.binds = Vec::new();
        }
        let mut b = NodeBuilder::from_profile(&profile).map_err(|e| e.to_string())?;
        if let Some(id) = &opts.nodeid {
            b = b.node_id(id);
        }
        if let Some(mib) = opts.max_memory_mib {
            b = b.sandbox_limits(aemp_host::SandboxLimits {
                max_memory: mib << 20,
                ..Default::default()
            });
        }
        Ok(b)
    }

    /// Starts a node and dials `--connect` addresses.
    async fn start(&self, builder: NodeBuilder) -> Result<Node> {
        let node = builder.start().await.map_err(|e| e.to_string())?;
        for addr in &self.opts.connect {
            node.connect(addr).await.map_err(|e| e.to_string())?;
        }
        Ok(node)
    }

    /// A short-lived node for `snd`, `cal` and `mon` (no listener unless `--listen`).
    async fn client(&self) -> Result<Node> {
        self.start(self.builder(None, &Map::new(), false)?).await
    }

    /// Waits until `node_id` is connected.
    async fn reach(&self, node: &Node, node_id: &str) -> Result<()> {
        node.wait_up(node_id, self.timeout())
            .await
            .map_err(|e| format!("cannot reach {node_id}: {e}"))
    }

    /// Sends, then confirms as the reference does: monitors the port and has the node port
    /// relay [`CONFIRMATION`] (a `snd` request) to a reply port; that arriving means the
    /// message reached the node before it.
    async fn snd(&self, port: &str, args: Vec<Value>) -> Result<()> {
        let (node_id, watched) = node_port(port)?;
        let node = self.client().await?;
        node.send(port, args).await.map_err(|e| e.to_string())?;
        self.reach(&node, &node_id).await?;
        let mut down = node.monitor(&watched).await.map_err(|e| e.to_string())?;
        let mut reply = node.port().await.map_err(|e| e.to_string())?;
        let request = vec![
            Value::text("snd"),
            Value::text(reply.id()),
            Value::text(CONFIRMATION),
        ];
        node.send(&format!("{node_id}#"), request)
            .await
            .map_err(|e| e.to_string())?;
        let died = |reason: std::result::Result<Vec<Value>, aemp_host::NodeError>| match reason {
            Ok(reason) => format!("{port}: {}", words(&reason)),
            Err(e) => format!("{e}"),
        };
        let confirmed = tokio::time::timeout(self.timeout(), async {
            tokio::select! {
                biased;
                reason = &mut down => Err(died(reason)),
                got = reply.recv() => got.ok_or("node stopped".to_owned()),
            }
        })
        .await
        .map_err(|_| {
            format!(
                "no confirmation from {node_id} within {}s",
                self.opts.timeout
            )
        })??;
        // The port's death may have been reported just before the confirmation (a zero
        // timeout still polls the monitor once).
        if let Ok(reason) = tokio::time::timeout(Duration::ZERO, &mut down).await {
            return Err(died(reason));
        }
        say(&format!("{}\n", words(&confirmed)));
        Ok(())
    }

    /// Sends with a fresh reply port appended; prints the reply as a JSON array.
    async fn cal(&self, port: &str, mut args: Vec<Value>) -> Result<()> {
        let node = self.client().await?;
        let mut reply = node.port().await.map_err(|e| e.to_string())?;
        args.push(Value::text(reply.id()));
        node.send(port, args).await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.timeout(), reply.recv()).await {
            Ok(Some(reply)) => {
                say(&format!("{}\n", json(&Value::Array(reply))));
                Ok(())
            }
            _ => Err(format!(
                "no reply from {port} within {}s",
                self.opts.timeout
            )),
        }
    }

    /// Asks the network database (through the seeds: the master answers) and prints the
    /// result as JSON.
    async fn db(&self, query: DbQuery, family: &str) -> Result<()> {
        let node = self.client().await?;
        let asked = async {
            match query {
                DbQuery::Family => node.db_family(family).await,
                DbQuery::Keys => node.db_keys(family).await,
                DbQuery::Values => node.db_values(family).await,
            }
        };
        let answer = tokio::time::timeout(self.timeout(), asked)
            .await
            .map_err(|_| {
                format!(
                    "no answer from a global node within {}s (are seeds configured?)",
                    self.opts.timeout
                )
            })?
            .map_err(|e| e.to_string())?;
        say(&format!("{}\n", json(&answer)));
        Ok(())
    }

    /// Prints the reason (a JSON array) when the port dies.
    async fn mon(&self, port: &str) -> Result<()> {
        let (_, watched) = node_port(port)?;
        let node = self.client().await?;
        let down = node.monitor(&watched).await.map_err(|e| e.to_string())?;
        let reason = down.await.map_err(|e| e.to_string())?;
        say(&format!("{}\n", json(&Value::Array(reason))));
        Ok(())
    }

    async fn run_node(&self, profile: Option<String>, settings: Map<String, Json>) -> Result<()> {
        let node = self.start(self.builder(profile, &settings, true)?).await?;
        let addrs: Vec<String> = node.listen_addrs().iter().map(|a| a.to_string()).collect();
        say(&format!(
            "node {} listening on {}\n",
            node.id(),
            if addrs.is_empty() {
                "nothing".into()
            } else {
                addrs.join(" ")
            }
        ));
        if self.opts.echo {
            let mut port = node.named_port("echo").await.map_err(|e| e.to_string())?;
            say(&format!("echo port {}\n", port.id()));
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
        // A node that stops on its own (a trap, a sandbox limit) ends the program at once
        // with its reason and a failure status, so that a supervisor notices and restarts it.
        tokio::select! {
            signal = tokio::signal::ctrl_c() => signal.map_err(|e| e.to_string()),
            stopped = node.closed() => Err(stopped.to_string()),
        }
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// The node id of `port` and the id to monitor it by (`NODE#` for a bare node id, so the
/// monitor fires when the node's connection is lost).
fn node_port(port: &str) -> Result<(String, String)> {
    let (node_id, name) = aemp_engine::node::split_port_id(port)
        .ok_or_else(|| format!("invalid port id '{port}': the node id is empty"))?;
    Ok((node_id.to_owned(), format!("{node_id}#{name}")))
}

/// The typed arguments as message values.
fn typed(args: Vec<Json>) -> Vec<Value> {
    args.into_iter().map(Value::from).collect()
}

/// Values joined by spaces, strings as they are (the reference prints replies so).
fn words(values: &[Value]) -> String {
    values
        .iter()
        .map(|v| match v {
            Value::Text(s) => s.clone(),
            other => json(other),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn json(value: &Value) -> String {
    let mut out = Vec::new();
    match value.write_json(&mut out) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) => format!("{value:?} ({e})"),
    }
}
