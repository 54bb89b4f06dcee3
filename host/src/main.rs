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
use aemp_host::{Event, INFO_TAG, Node, NodeBuilder, NodeInfo, TlsConfig, Value};
use serde_json::{Map, Value as Json};

use cli::args::{self, Options};
use cli::verbs::{self, DbQuery, PERL_ONLY, Verb};

/// What `snd` asks the target node to send back to confirm delivery (the reference's text).
const CONFIRMATION: &str = "message sent successfully";

/// The profile and node id the protocol verbs configure themselves with, as the
/// reference's (`--profile` chooses another profile).
const CLIENT_PROFILE: &str = "aemp";
const CLIENT_NODE_ID: &str = "aemp/%n/%u";

/// The characters of a generated secret, and its length (the reference's `nonce62 180`,
/// about 1071 bits).
const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const SECRET_LEN: usize = 180;

/// What `restart` asks a node to evaluate (the reference's request: restart through
/// AnyEvent::Watchdog once the node is idle).
const RESTART_EXPR: &str = "my $w; $w = AE::idle sub { undef $w; use AnyEvent::Watchdog::Util ();AnyEvent::Watchdog::Util::restart}; ()";

/// What `trace` asks each node to evaluate: the nodes it is connected to.
const UP_NODES_EXPR: &str = "AnyEvent::MP::Kernel::up_nodes";

/// How long `trace` waits for each node's answer, as the reference.
const TRACE_TIMEOUT: Duration = Duration::from_secs(15);

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
    // A read of standard input may still wait (`dataconn` ends with the other node's
    // side): the runtime must not wait for it.
    runtime.shutdown_background();
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
    warn(&message);
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
                config::set_key(&mut self.rc, target, "secret", gen_secret()?.into());
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
            Verb::PushItem { key, item } => {
                config::list_push(&mut self.rc, target, key, item).map_err(|e| e.to_string())?;
            }
            Verb::RemoveFirst { key, item } => {
                config::list_remove_first(&mut self.rc, target, key, &item)
                    .map_err(|e| e.to_string())?;
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
                return self
                    .protocol(|node| self.snd(node, &port, typed(args)))
                    .await;
            }
            Verb::Cal { port, args } => {
                self.save()?;
                return self
                    .protocol(|node| self.cal(node, &port, typed(args)))
                    .await;
            }
            Verb::Mon { port } => {
                self.save()?;
                return self.protocol(|node| self.mon(node, &port)).await;
            }
            Verb::Eval { node, expr } => {
                self.save()?;
                return self.protocol(|n| self.eval(n, &node, &expr)).await;
            }
            Verb::Restart { node } => {
                self.save()?;
                return self.protocol(|n| self.eval(n, &node, RESTART_EXPR)).await;
            }
            Verb::Shell { node } => {
                self.save()?;
                return self.protocol(|n| self.shell(n, node)).await;
            }
            Verb::Trace { node } => {
                self.save()?;
                return self.protocol(|n| self.trace(n, &node)).await;
            }
            Verb::Info { node } => {
                self.save()?;
                return self.protocol(|n| self.info(n, &node)).await;
            }
            Verb::DataConn {
                node,
                handler,
                args,
            } => {
                self.save()?;
                return self
                    .protocol(|n| self.dataconn(n, &node, &handler, typed(args)))
                    .await;
            }
            Verb::Db { query, family } => {
                self.save()?;
                return self.protocol(|node| self.db(node, query, &family)).await;
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
        if listen {
            // A node that runs says once what a Perl node would run and it does not; a
            // client has nothing to run anyway.
            let effective = config::effective(&self.rc, name.as_deref(), settings)
                .map_err(|e| e.to_string())?;
            if let Some(skipped) = perl_entries(&effective) {
                warn(&format!("not running {skipped}: {PERL_ONLY}"));
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

    /// Runs a protocol verb on a short-lived node (no listener unless `--listen`): profile
    /// `aemp` (or `--profile`), node id `aemp/%n/%u` unless the file sets one, as the
    /// reference configures them. While no node is up, a connection that fails (its
    /// handshake: a wrong secret, no certificate) ends the verb at once with the reason.
    async fn protocol<F, Fut>(&self, verb: F) -> Result<()>
    where
        F: FnOnce(Node) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let profile = self
            .opts
            .profile
            .clone()
            .unwrap_or_else(|| CLIENT_PROFILE.to_owned());
        let mut settings = Map::new();
        settings.insert("nodeid".into(), CLIENT_NODE_ID.into());
        let node = self
            .builder(Some(profile), &settings, false)?
            .start()
            .await
            .map_err(|e| e.to_string())?;
        // Subscribed before the first connection is made.
        let mut events = node.events();
        for addr in &self.opts.connect {
            node.connect(addr).await.map_err(|e| e.to_string())?;
        }
        tokio::select! {
            done = verb(node) => done,
            reason = first_failure(&mut events) => Err(format!("connection failed: {reason}")),
        }
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
    async fn snd(&self, node: Node, port: &str, args: Vec<Value>) -> Result<()> {
        let (node_id, watched) = node_port(port)?;
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
        say(&self.listed(&confirmed));
        Ok(())
    }

    /// Values as the reference's `snd` and `mon` print them (joined by spaces, then a
    /// space and a newline), or a JSON array with `--json`.
    fn listed(&self, values: &[Value]) -> String {
        if self.opts.json {
            return format!("{}\n", json(&Value::Array(values.to_vec())));
        }
        let mut words: Vec<String> = values.iter().map(word).collect();
        words.push("\n".into());
        words.join(" ")
    }

    /// Values as the reference's `cal` and `eval` print them (JSON, separated by commas:
    /// an array without its brackets), or the whole JSON array with `--json`.
    fn returned(&self, values: Vec<Value>) -> String {
        let array = json(&Value::Array(values));
        if self.opts.json {
            return format!("{array}\n");
        }
        let inner = array
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(&array);
        format!("{inner}\n")
    }

    /// Sends with a fresh reply port appended; prints the reply's values.
    async fn cal(&self, node: Node, port: &str, args: Vec<Value>) -> Result<()> {
        let answer = self.ask(&node, port, args).await?;
        say(&self.returned(answer));
        Ok(())
    }

    /// Sends `args` with a fresh reply port appended to `port` and returns the reply.
    /// The node's connection is watched meanwhile, so a node nobody can reach (`no known
    /// address` from the seed, a connect timeout) fails at once with the reason.
    async fn ask(&self, node: &Node, port: &str, mut args: Vec<Value>) -> Result<Vec<Value>> {
        let (node_id, _) = node_port(port)?;
        let mut reply = node.port().await.map_err(|e| e.to_string())?;
        let mut down = node
            .monitor(&format!("{node_id}#"))
            .await
            .map_err(|e| e.to_string())?;
        args.push(Value::text(reply.id()));
        node.send(port, args).await.map_err(|e| e.to_string())?;
        tokio::time::timeout(self.timeout(), async {
            tokio::select! {
                biased;
                got = reply.recv() => got.ok_or("node stopped".to_owned()),
                reason = &mut down => Err(match reason {
                    Ok(reason) => format!("cannot reach {node_id}: {}", words(&reason)),
                    Err(e) => e.to_string(),
                }),
            }
        })
        .await
        .map_err(|_| format!("no reply from {port} within {}s", self.opts.timeout))?
    }

    /// Pipes standard input through a data connection to `node_id`'s data handler
    /// `handler` and what comes back to standard output, as netcat does: the end of
    /// standard input ends our side of the stream; the program ends when the other
    /// node's side ends.
    async fn dataconn(
        &self,
        node: Node,
        node_id: &str,
        handler: &str,
        args: Vec<Value>,
    ) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let stream = node
            .data_connect(node_id, self.timeout(), handler, args)
            .await
            .map_err(|e| e.to_string())?;
        let (mut from, mut to) = tokio::io::split(stream);
        let upload = async {
            tokio::io::copy(&mut tokio::io::stdin(), &mut to).await?;
            to.shutdown().await
        };
        let download = async {
            let mut stdout = tokio::io::stdout();
            tokio::io::copy(&mut from, &mut stdout).await?;
            stdout.flush().await
        };
        let (mut upload, mut download) = (std::pin::pin!(upload), std::pin::pin!(download));
        let mut uploading = true;
        loop {
            tokio::select! {
                done = &mut download => {
                    return done.map_err(|e| format!("data connection to {node_id}: {e}"));
                }
                done = &mut upload, if uploading => {
                    uploading = false;
                    // The other node may have ended the stream meanwhile: its end says.
                    if let Err(e) = done
                        && e.kind() != std::io::ErrorKind::BrokenPipe
                    {
                        return Err(format!("data connection to {node_id}: {e}"));
                    }
                }
            }
        }
    }

    /// Asks an aemp node what it is doing (ours, not the reference's): first `can
    /// aemp_info`, so that a node that does not understand the request (a Perl node, an
    /// aemp node with `node_info` off) is said at once, then the request itself; prints
    /// the answer readably, or as JSON with `--json`.
    async fn info(&self, node: Node, node_id: &str) -> Result<()> {
        let port = format!("{node_id}#");
        let can = self
            .ask(
                &node,
                &port,
                vec![Value::text("can"), Value::text(INFO_TAG)],
            )
            .await?;
        if !can.first().is_some_and(perl_true) {
            return Err(format!(
                "{node_id} does not answer info requests: not an aemp node, or its operator \
                 turned them off (node_info)"
            ));
        }
        let answer = self.ask(&node, &port, vec![Value::text(INFO_TAG)]).await?;
        let info = answer
            .into_iter()
            .next()
            .ok_or_else(|| format!("{node_id} answered the info request with nothing"))?;
        if self.opts.json {
            say(&format!("{}\n", json(&info)));
        } else {
            let info: NodeInfo = aemp_host::from_value(&info)
                .map_err(|e| format!("{node_id} answered the info request oddly: {e}"))?;
            say(&cli::show::readable(&info));
        }
        Ok(())
    }

    /// Asks the network database (through the seeds: the master answers) and prints the
    /// result as JSON.
    async fn db(&self, node: Node, query: DbQuery, family: &str) -> Result<()> {
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

    /// Prints the reason when the port dies.
    async fn mon(&self, node: Node, port: &str) -> Result<()> {
        let (_, watched) = node_port(port)?;
        let down = node.monitor(&watched).await.map_err(|e| e.to_string())?;
        let reason = down.await.map_err(|e| e.to_string())?;
        say(&self.listed(&reason));
        Ok(())
    }

    /// Asks `node` to evaluate `expr` (`["", "eval", EXPR, REPLY]`), as the reference's
    /// `eval` and `restart` do, and prints what it returned. The reply is `[ERROR,
    /// RESULTS...]`; a non-empty error (an aemp node's `remote execution not allowed`) or
    /// the node going down fails with it.
    async fn eval(&self, node: Node, node_id: &str, expr: &str) -> Result<()> {
        let request = vec![Value::text("eval"), Value::text(expr)];
        let answer = self.ask(&node, &format!("{node_id}#"), request).await?;
        say(&self.returned(evaluated(answer)?));
        Ok(())
    }

    /// The reference's interactive shell: each line is evaluated on the current node (an
    /// `eval` with `package PKG; my $ECHO = 'PORT';` in front, `$ECHO` a port whose
    /// messages are printed), with its time and its result as pretty JSON, or its error;
    /// `=` lists the nodes (the keys of `'l`), `=NODE` switches node, `package P` the
    /// package. Lines are read with line editing and a history (`~/.aemp_history`).
    async fn shell(&self, node: Node, target: Option<String>) -> Result<()> {
        let mut target = target.unwrap_or_else(|| node.id().to_owned());
        let mut package = "AnyEvent::MP::Kernel".to_owned();
        let mut echo = node.port().await.map_err(|e| e.to_string())?;
        let mut reply = node.port().await.map_err(|e| e.to_string())?;
        say(
            "Interactive shell on the nodes of this network; Ctrl-D ends it.\n\n\
             =           list the nodes\n\
             =NODE       switch to node NODE\n\
             package P   evaluate in package P\n\
             $ECHO       a port that prints every message sent to it\n\n",
        );
        let mut lines = LineReader::start();
        loop {
            // What was sent to $ECHO since the last line.
            while let Ok(Some(args)) = tokio::time::timeout(Duration::ZERO, echo.recv()).await {
                say(&format!("ECHO> {}\n", json(&Value::Array(args))));
            }
            let Some(line) = lines.read(format!("{target} {package}> ")).await else {
                return Ok(());
            };
            if let Some(name) = line.strip_prefix('=') {
                if !name.is_empty() {
                    target = name.trim().to_owned();
                    continue;
                }
                let nodes = tokio::time::timeout(self.timeout(), node.db_keys("'l")).await;
                match nodes {
                    Ok(Ok(Value::Array(nodes))) => {
                        let mut nodes: Vec<String> = nodes.iter().map(word).collect();
                        nodes.sort();
                        say(&format!("nodes: {}\n", nodes.join(" ")));
                    }
                    Ok(Ok(other)) => say(&format!("nodes: {}\n", json(&other))),
                    Ok(Err(e)) => say(&format!("nodes: {e}\n")),
                    Err(_) => say("nodes: no answer from a global node (are seeds configured?)\n"),
                }
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["package", name] = words[..] {
                package = name.trim_end_matches(';').to_owned();
                continue;
            }
            if words.is_empty() {
                continue;
            }
            let expr = format!("package {package}; my $ECHO = '{}'; {line}", echo.id());
            let request = vec![
                Value::text("eval"),
                Value::text(expr),
                Value::text(reply.id()),
            ];
            let asked = tokio::time::Instant::now();
            if let Err(e) = node.send(&format!("{target}#"), request).await {
                say(&format!("{target}: {e}\n"));
                continue;
            }
            match tokio::time::timeout(self.timeout(), reply.recv()).await {
                Ok(Some(answer)) => {
                    let took = asked.elapsed().as_secs_f64();
                    let shown = evaluated(answer)
                        .map_or_else(|error| error, |r| pretty_json(&Value::Array(r)));
                    say(&format!("{target}: {line}\n{took:.3}s\n{shown}\n"));
                }
                Ok(None) => return Err("node stopped".into()),
                Err(_) => say(&format!(
                    "{target}: no reply within {}s\n",
                    self.opts.timeout
                )),
            }
        }
    }

    /// Prints `NODE -> NEIGHBOURS...` for `start`, then for each node found, as the
    /// reference's `trace`: each node is asked (an `eval` of `up_nodes`) for the nodes it
    /// is connected to. A node that does not answer within 15 s is printed as `NODE
    /// (timeout)` and makes the exit status non-zero. aemp nodes refuse the `eval`, so
    /// they list no neighbours.
    async fn trace(&self, node: Node, start: &str) -> Result<()> {
        let me = node.id().to_owned();
        let mut reply = node.port().await.map_err(|e| e.to_string())?;
        let mut seen = std::collections::BTreeSet::new();
        let mut waiting = std::collections::BTreeMap::new();
        let mut answers = vec![("seed".to_owned(), vec![start.to_owned()])];
        let mut timed_out = false;
        loop {
            for (from, neighbours) in answers.drain(..) {
                waiting.remove(&from);
                let neighbours: Vec<String> = neighbours.into_iter().filter(|n| *n != me).collect();
                say(&format!("{from} -> {}\n", neighbours.join(" ")));
                for neighbour in neighbours {
                    if !seen.insert(neighbour.clone()) {
                        continue;
                    }
                    let request = vec![
                        Value::text("eval"),
                        Value::text(UP_NODES_EXPR),
                        Value::text(reply.id()),
                        Value::text(neighbour.as_str()),
                    ];
                    node.send(&format!("{neighbour}#"), request)
                        .await
                        .map_err(|e| e.to_string())?;
                    waiting.insert(neighbour, tokio::time::Instant::now() + TRACE_TIMEOUT);
                }
            }
            let Some((first, &deadline)) = waiting.iter().min_by_key(|(_, d)| **d) else {
                break;
            };
            let first = first.clone();
            match tokio::time::timeout_at(deadline, reply.recv()).await {
                // (NODE, ERROR, NEIGHBOURS...)
                Ok(Some(got)) => {
                    let mut got = got.into_iter();
                    let from = got.next().map(|n| word(&n)).unwrap_or_default();
                    answers.push((from, got.skip(1).map(|n| word(&n)).collect()));
                }
                Ok(None) => return Err("node stopped".into()),
                Err(_) => {
                    say(&format!("{first} (timeout)\n"));
                    waiting.remove(&first);
                    timed_out = true;
                }
            }
        }
        if timed_out {
            return Err("some nodes did not answer".into());
        }
        Ok(())
    }

    async fn run_node(&self, profile: Option<String>, settings: Map<String, Json>) -> Result<()> {
        // Bound first, so that a bad address stops `run` before its node starts.
        let metrics = match &self.opts.metrics {
            Some(addr) => {
                let bound = async {
                    let listener = tokio::net::TcpListener::bind(addr).await?;
                    let local = listener.local_addr()?;
                    Ok::<_, std::io::Error>((listener, local))
                };
                Some(bound.await.map_err(|e| format!("--metrics {addr}: {e}"))?)
            }
            None => None,
        };
        let node = self
            .builder(profile, &settings, true)?
            .start()
            .await
            .map_err(|e| e.to_string())?;
        for addr in &self.opts.connect {
            node.connect(addr).await.map_err(|e| e.to_string())?;
        }
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
        if let Some((listener, local)) = metrics {
            say(&format!("metrics on http://{local}/metrics\n"));
            tokio::spawn(aemp_host::metrics::serve(node.clone(), listener));
        }
        if self.opts.echo {
            let mut port = node.named_port("echo").await.map_err(|e| e.to_string())?;
            let data = node
                .handle_data_connections("echo")
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(echo_data(data));
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

/// `run --echo`'s data handler `echo`: sends back what each data connection brings,
/// and ends its side when the other node ends its own.
async fn echo_data(mut incoming: aemp_host::DataConnections) {
    use tokio::io::AsyncWriteExt;
    while let Some(stream) = incoming.accept().await {
        tokio::spawn(async move {
            let id = stream.id().to_owned();
            let (mut from, mut to) = tokio::io::split(stream);
            let echoed = async {
                tokio::io::copy(&mut from, &mut to).await?;
                to.shutdown().await
            };
            if let Err(e) = echoed.await {
                tracing::warn!("echo data connection {id}: {e}");
            }
        });
    }
}

/// A random secret of [`SECRET_LEN`] characters of [`ALNUM`], each equally likely.
fn gen_secret() -> Result<String> {
    let mut secret = String::with_capacity(SECRET_LEN);
    let mut bytes = [0u8; 64];
    while secret.len() < SECRET_LEN {
        getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
        // Bytes past the last whole multiple of 62 would favour the first characters.
        let fair = bytes.iter().filter(|b| usize::from(**b) < 4 * ALNUM.len());
        for b in fair.take(SECRET_LEN - secret.len()) {
            secret.push(char::from(ALNUM[usize::from(*b) % ALNUM.len()]));
        }
    }
    Ok(secret)
}

/// The Perl entries (`services`, `eval`) a configuration sets, described, if any.
fn perl_entries(config: &Map<String, Json>) -> Option<String> {
    let mut found = Vec::new();
    match config.get("services") {
        Some(Json::Array(items)) if !items.is_empty() => {
            let names: Vec<String> = items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect();
            found.push(format!("services {}", names.join(", ")));
        }
        None | Some(Json::Null | Json::Array(_)) => {}
        Some(other) => found.push(format!("services {other}")),
    }
    match config.get("eval") {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) if s.is_empty() => {}
        Some(_) => found.push("eval".into()),
    }
    (!found.is_empty()).then(|| found.join(" and "))
}

/// Lines from the terminal, read with line editing and a history on a thread of their
/// own (the editor blocks), one per [`LineReader::read`].
struct LineReader {
    prompts: std::sync::mpsc::Sender<String>,
    lines: tokio::sync::mpsc::Receiver<String>,
}

impl LineReader {
    fn start() -> LineReader {
        let (prompts, prompt_rx) = std::sync::mpsc::channel::<String>();
        let (line_tx, lines) = tokio::sync::mpsc::channel(1);
        std::thread::spawn(move || {
            let mut editor = match rustyline::DefaultEditor::new() {
                Ok(editor) => editor,
                Err(e) => return warn(&format!("cannot read the terminal: {e}")),
            };
            let history =
                std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".aemp_history"));
            if let Some(path) = &history {
                // A missing history is a fresh one.
                let _ = editor.load_history(path);
            }
            while let Ok(prompt) = prompt_rx.recv() {
                let line = loop {
                    match editor.readline(&prompt) {
                        // Ctrl-C abandons the line, as in a shell.
                        Err(rustyline::error::ReadlineError::Interrupted) => continue,
                        other => break other,
                    }
                };
                let Ok(line) = line else { break };
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if line_tx.blocking_send(line).is_err() {
                    break;
                }
            }
            if let Some(path) = &history
                && let Err(e) = editor.save_history(path)
            {
                warn(&format!("{}: {e}", path.display()));
            }
        });
        LineReader { prompts, lines }
    }

    /// The next line after showing `prompt`; `None` at the end of the input (Ctrl-D).
    async fn read(&mut self, prompt: String) -> Option<String> {
        self.prompts.send(prompt).ok()?;
        self.lines.recv().await
    }
}

/// `value` as indented JSON (the shell's results, as the reference prints them).
fn pretty_json(value: &Value) -> String {
    serde_json::from_str::<Json>(&json(value))
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| json(value))
}

/// The reason of the first connection that fails while no node is up (pending forever
/// once one is, or when the node stops: the verb notices that itself).
async fn first_failure(events: &mut tokio::sync::broadcast::Receiver<Event>) -> String {
    use tokio::sync::broadcast::error::RecvError;
    let mut up = 0usize;
    loop {
        match events.recv().await {
            Ok(Event::NodeUp(_)) => up += 1,
            Ok(Event::NodeDown { .. }) => up = up.saturating_sub(1),
            Ok(Event::ConnectionFailed { reason }) if up == 0 => return reason,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// One line on stderr (not eprintln!, which panics if stderr is closed).
fn warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "aemp: {message}");
}

/// The node id of `port` and the id to monitor it by (`NODE#` for a bare node id, so the
/// monitor fires when the node's connection is lost).
fn node_port(port: &str) -> Result<(String, String)> {
    let id = aemp_engine::node::PortId::parse(port)
        .ok_or_else(|| format!("invalid port id '{port}': the node id is empty"))?;
    Ok((id.node.to_owned(), id.to_string()))
}

/// The typed arguments as message values.
fn typed(args: Vec<Json>) -> Vec<Value> {
    args.into_iter().map(Value::from).collect()
}

/// An `eval`'s answer `[ERROR, RESULTS...]`: the results, or the error followed by them
/// as the reference prints it (`"$err @res"`) when the error is not empty.
fn evaluated(answer: Vec<Value>) -> Result<Vec<Value>> {
    match answer.split_first() {
        Some((error, _)) if !word(error).is_empty() => Err(words(&answer)),
        Some((_, results)) => Ok(results.to_vec()),
        None => Ok(Vec::new()),
    }
}

/// Perl's truth of a value a Perl node may answer with (`exists` gives 1 or "").
fn perl_true(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Int(n) => *n != 0,
        Value::Text(s) => !(s.is_empty() || s == "0"),
        Value::Float(f) => *f != 0.0,
        Value::Null | Value::Undefined => false,
        _ => true,
    }
}

/// Values joined by spaces, each as [`word`] writes it.
fn words(values: &[Value]) -> String {
    values.iter().map(word).collect::<Vec<_>>().join(" ")
}

/// A value as the reference prints one it joins with others: strings as they are (Perl's
/// undef as nothing), anything else as JSON.
fn word(value: &Value) -> String {
    match value {
        Value::Text(s) => s.clone(),
        Value::Null => String::new(),
        other => json(other),
    }
}

fn json(value: &Value) -> String {
    let mut out = Vec::new();
    match value.write_json(&mut out) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) => format!("{value:?} ({e})"),
    }
}
