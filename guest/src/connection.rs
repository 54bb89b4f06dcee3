//! One AEMP connection as a state machine: greeting, optional TLS switch, authentication,
//! data phase. Bytes come in through `handle_*`, everything else goes out through `poll_*`.
//!
//! The states follow the wire, top to bottom:
//!
//! ```text
//! Greeting1 --line 1--> Verdict --host accepts--> Greeting2 --nonce--> [StartTls] AuthLine
//!     --auth line--> Data (or HandedOver for an upgraded protocol)
//! ```
//! Any error moves to `Closed` and is reported once as [`Output::Closed`].

use std::collections::VecDeque;

use crate::auth::{self, AuthMethod, Transcript};
use crate::buffer;
use crate::config::{Config, is_protocol};
use crate::error::{ConfigError, Error, SendError};
use crate::framing::{self, Checker, Decoder, Framing};
use crate::greeting::{self, Greeting, MAX_LINE, NONCE_LEN};
use crate::protocol::{PROTOCOL_VERSION, PROVIDER};

/// The TLS role this side takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// Our nonce line sorts lower: we connect.
    Client,
    /// Our nonce line sorts higher: we accept.
    Server,
}

/// The host's answer to [`Output::Greeting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the handshake.
    Accept,
    /// The remote node already has a working connection: refuse it.
    AlreadyConnected,
}

/// What the handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The remote node id.
    pub remote_node: String,
    /// `aemp`, or the upgraded protocol both sides now speak.
    pub protocol: String,
    /// Whether the connection runs inside TLS.
    pub tls: bool,
    /// The method we authenticated with.
    pub send_auth: AuthMethod,
    /// The method the remote authenticated with.
    pub recv_auth: AuthMethod,
    /// The remote used `tls_anon`: it proved only that its certificate is signed by our CA.
    pub untrusted: bool,
    /// The framing we send in.
    pub send_framing: Framing,
    /// The framing the remote sends in.
    pub recv_framing: Framing,
}

/// Something the host must act on, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the peer (through TLS once TLS has started).
    Transmit(Vec<u8>),
    /// The remote's first greeting line passed the protocol checks; answer with
    /// [`Connection::handle_verdict`] before the handshake goes on.
    Greeting(Greeting),
    /// Start TLS now in this role; `leftover` holds bytes already received that are TLS
    /// records. From now on feed decrypted bytes and encrypt what is transmitted.
    StartTls { role: TlsRole, leftover: Vec<u8> },
    /// The handshake is complete.
    Connected(Session),
    /// A message received (CBOR array `[PORT, ARGS...]`); keepalives are not reported.
    Message(Vec<u8>),
    /// Consecutive messages received, after [`Connection::set_message_sequences`]: one
    /// CBOR sequence (items `[PORT, ARGS...]` one after another) and each item's length.
    Messages { data: Vec<u8>, sizes: Vec<u32> },
    /// The stream now belongs to the upgraded protocol; `leftover` holds bytes already
    /// received for it. The engine reads and writes nothing more.
    HandedOver { leftover: Vec<u8> },
    /// The connection failed; nothing follows. Close the socket after writing any
    /// `Transmit` that came before.
    Closed(Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting1,
    Verdict,
    Greeting2,
    AuthLine,
    Data,
    HandedOver,
    Closed,
}

/// Everything known about the remote once its greeting is in.
#[derive(Debug)]
struct Remote {
    greeting: Greeting,
    /// Line 1 as received (without terminator), for the transcript.
    line1: Vec<u8>,
}

/// Settled after the remote nonce line: what we send and how.
#[derive(Debug)]
struct Plan {
    tls: bool,
    send_auth: AuthMethod,
    send_framing: Framing,
    transcript: Transcript,
}

/// Sends a keepalive when nothing was sent for a whole interval.
#[derive(Debug)]
struct Keepalive {
    interval: u64,
    due: u64,
    sent_since: bool,
}

/// One connection's protocol engine. See the module documentation.
#[derive(Debug)]
pub struct Connection {
    config: Config,
    state: State,
    /// Our line 1 and nonce line, each followed by LF.
    local_lines: Vec<u8>,
    local_nonce: String,
    remote: Option<Remote>,
    plan: Option<Plan>,
    session: Option<Session>,
    /// Handshake input not consumed yet.
    input: Vec<u8>,
    decoder: Option<Decoder>,
    /// Checks the messages the application sends.
    checker: Checker,
    outputs: VecDeque<Output>,
    handshake_deadline: u64,
    keepalive: Option<Keepalive>,
    /// The latest time the host told us about.
    now: u64,
    /// Report consecutive received messages as one CBOR sequence.
    message_sequences: bool,
}

impl Connection {
    /// Starts a connection at time `now` (milliseconds on any monotonic clock) with a
    /// fresh random `nonce` from the host. Our greeting is ready to transmit at once.
    pub fn new(
        config: Config,
        nonce: [u8; NONCE_LEN],
        now: u64,
    ) -> Result<Connection, ConfigError> {
        config.validate()?;
        let mut pairs: Vec<(String, Option<String>)> = Vec::new();
        if config.tls {
            pairs.push(("tls".into(), Some("1.0".into())));
        }
        // A `provider` pair in the configuration replaces ours.
        let provider = config
            .greeting
            .iter()
            .find(|(k, _)| k == "provider")
            .map_or(PROVIDER, |(_, v)| v);
        pairs.push(("provider".into(), Some(provider.to_owned())));
        if let Some(addr) = &config.peer_addr {
            pairs.push(("peeraddr".into(), Some(addr.clone())));
        }
        let extra = config.greeting.iter().filter(|(k, _)| k != "provider");
        pairs.extend(extra.map(|(k, v)| (k.clone(), Some(v.clone()))));
        let line1 = Greeting {
            protocol: config.protocol.clone(),
            version: PROTOCOL_VERSION.to_string(),
            node_id: config.node_id.clone(),
            auths: config
                .auth_accept
                .iter()
                .map(|m| m.name().to_owned())
                .collect(),
            framings: config
                .framings
                .iter()
                .map(|f| f.name().to_owned())
                .collect(),
            pairs,
        }
        .line();
        let local_nonce = greeting::nonce_line(&nonce);
        let local_lines = format!("{line1}\n{local_nonce}\n").into_bytes();
        let handshake_deadline = now.saturating_add(config.monitor_timeout_ms);
        let mut conn = Connection {
            config,
            state: State::Greeting1,
            local_lines,
            local_nonce,
            remote: None,
            plan: None,
            session: None,
            input: Vec::new(),
            decoder: None,
            checker: Checker::default(),
            outputs: VecDeque::new(),
            handshake_deadline,
            keepalive: None,
            now,
            message_sequences: false,
        };
        conn.transmit(conn.local_lines.clone());
        Ok(conn)
    }

    /// With `on`, consecutive received messages are reported as one [`Output::Messages`]
    /// (a CBOR sequence and the items' lengths) instead of one [`Output::Message`] each:
    /// fewer allocations for hosts that pass batches on.
    pub fn set_message_sequences(&mut self, on: bool) {
        self.message_sequences = on;
    }

    /// What the handshake settled, once connected.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Whether the connection has failed or was handed over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed | State::HandedOver)
    }

    /// Feeds bytes received from the peer (decrypted, once TLS has started). Input that
    /// would make the connection hold more than
    /// [`Limits::max_buffered_bytes`](crate::Limits::max_buffered_bytes) closes it with
    /// [`Error::ConnectionBufferFull`] before anything is buffered.
    pub fn handle_input(&mut self, data: &[u8]) {
        match self.state {
            State::Closed => return,
            State::HandedOver => return self.fail(Error::InputAfterHandover),
            _ => {}
        }
        let limit = self.config.limits.max_buffered_bytes();
        if self.buffered_after(data.len()) > limit {
            return self.fail(Error::ConnectionBufferFull(limit));
        }
        if self.state == State::Data {
            self.decode(data);
        } else {
            buffer::append(&mut self.input, data, MAX_LINE);
            self.advance();
            buffer::release(&mut self.input);
        }
    }

    /// [`Connection::handle_input`] of bytes the caller gives away. When they are the
    /// start of a CBOR sequence of messages (CBOR framing, no partial message before
    /// them, [`set_message_sequences`](Self::set_message_sequences) on), the complete
    /// messages are reported in `data` itself rather than copied out of it.
    pub fn handle_input_owned(&mut self, mut data: Vec<u8>) {
        let in_place = self.state == State::Data
            && self.message_sequences
            && self
                .decoder
                .as_ref()
                .is_some_and(|d| d.framing() == Framing::Cbor && !d.has_partial())
            && !matches!(self.outputs.back(), Some(Output::Messages { .. }));
        if !in_place {
            return self.handle_input(&data);
        }
        // With no partial message before them, the decoder hands over CBOR messages as
        // slices of `data`: while they follow one another from its start they stay
        // there; after a gap (a keepalive) they are gathered into a new buffer.
        let base = data.as_ptr() as usize;
        let (mut sizes, mut end, mut gathered) = (Vec::new(), 0, None::<Vec<u8>>);
        let before = std::mem::take(&mut self.outputs);
        self.handle_input_with(&data, &mut |m| {
            // A message is below the u32 message size limit.
            sizes.push(u32::try_from(m.len()).unwrap_or(u32::MAX));
            match &mut gathered {
                Some(out) => out.extend_from_slice(m),
                None if (m.as_ptr() as usize).wrapping_sub(base) == end => end += m.len(),
                None => {
                    let mut out = data.get(..end).unwrap_or_default().to_vec();
                    out.extend_from_slice(m);
                    gathered = Some(out);
                }
            }
        });
        let after = std::mem::replace(&mut self.outputs, before);
        if !sizes.is_empty() {
            let data = gathered.unwrap_or_else(|| {
                data.truncate(end);
                data
            });
            self.outputs.push_back(Output::Messages { data, sizes });
        }
        // A failure's output came after the messages.
        self.outputs.extend(after);
    }

    /// [`Connection::handle_input`] that hands each message received in the data phase
    /// to `sink` as the decoder finds it (CBOR where it lies in `data`), instead of
    /// copying it into an output: the node routes it from there. Before the data phase
    /// the input is handled as `handle_input` does it, and `sink` is not called.
    pub(crate) fn handle_input_with(&mut self, data: &[u8], sink: &mut dyn FnMut(&[u8])) {
        if self.state != State::Data {
            return self.handle_input(data);
        }
        let limit = self.config.limits.max_buffered_bytes();
        if self.buffered_after(data.len()) > limit {
            return self.fail(Error::ConnectionBufferFull(limit));
        }
        self.decode_with(data, sink);
    }

    /// Bytes this connection holds for its peer: handshake input not consumed, the
    /// partial message, and outputs not polled yet (buffer capacities, not just contents).
    pub fn buffered_bytes(&self) -> usize {
        let outputs: usize = self.outputs.iter().map(output_bytes).sum();
        let decoder = self.decoder.as_ref().map_or(0, Decoder::buffered_bytes);
        self.input.capacity() + decoder + outputs
    }

    /// At most what [`buffered_bytes`](Self::buffered_bytes) becomes when `extra` more
    /// bytes arrive: the input buffer's growth, plus the bytes themselves once more for
    /// the messages they complete (received JSON converted to CBOR can come out a
    /// little larger; that slack is not counted).
    pub fn buffered_after(&self, extra: usize) -> usize {
        let buffer = match &self.decoder {
            Some(decoder) => {
                decoder.buffered_after(extra, &self.config.limits) - decoder.buffered_bytes()
            }
            None => {
                let (len, capacity) = (self.input.len(), self.input.capacity());
                buffer::capacity_after(len, capacity, extra, MAX_LINE) - capacity
            }
        };
        self.buffered_bytes()
            .saturating_add(buffer)
            .saturating_add(extra)
    }

    /// Closes the connection with `error` (for a host enforcing a limit of its own,
    /// such as the node's memory budget); ignored once closed.
    pub fn abort(&mut self, error: Error) {
        if !self.is_closed() {
            self.fail(error);
        }
    }

    /// The peer closed its side of the stream.
    pub fn handle_eof(&mut self) {
        match self.state {
            State::Closed | State::HandedOver => {}
            State::Data if self.decoder.as_ref().is_some_and(Decoder::has_partial) => {
                self.fail(Error::TruncatedMessage)
            }
            _ => self.fail(Error::PeerClosed),
        }
    }

    /// The host's answer to [`Output::Greeting`]; ignored at any other time.
    pub fn handle_verdict(&mut self, verdict: Verdict) {
        if self.state != State::Verdict {
            return;
        }
        match verdict {
            Verdict::Accept => {
                self.state = State::Greeting2;
                self.advance();
            }
            Verdict::AlreadyConnected => {
                let node = self
                    .remote
                    .as_ref()
                    .map(|r| r.greeting.node_id.clone())
                    .unwrap_or_default();
                self.fail(Error::AlreadyConnected(node));
            }
        }
    }

    /// Advances the clock: fails a handshake past its deadline, sends due keepalives.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = self.now.max(now);
        match self.state {
            State::Closed | State::HandedOver => {}
            State::Data => {
                let Some(k) = &mut self.keepalive else { return };
                if now < k.due {
                    return;
                }
                k.due = now.saturating_add(k.interval);
                if !std::mem::take(&mut k.sent_since) {
                    // `[]`, the reference's keepalive, cannot fail to encode.
                    let _ = self.send(&[0x80]);
                    if let Some(k) = &mut self.keepalive {
                        k.sent_since = false;
                    }
                }
            }
            _ if now >= self.handshake_deadline => self.fail(Error::HandshakeTimeout),
            _ => {}
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Closed | State::HandedOver => None,
            State::Data => self.keepalive.as_ref().map(|k| k.due),
            _ => Some(self.handshake_deadline),
        }
    }

    /// The next thing for the host to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Queues one message (a CBOR array `[PORT, ARGS...]`) for the peer, converted to the
    /// framing we send in. Nothing is queued when it fails.
    pub fn send(&mut self, message: &[u8]) -> Result<(), SendError> {
        self.sendable()?;
        self.checker.check_item(message, &self.config.limits)?;
        self.send_checked(message, message.len())
    }

    /// Whether outputs are waiting to be polled.
    pub(crate) fn has_outputs(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// Like [`send`](Self::send), but when no output is pending (so nothing can be
    /// reordered) the message is appended as it goes on the wire to `out`, bytes the host
    /// is about to transmit on this connection anyway: no buffer per message for a node
    /// sending many. `checked`: the caller has checked the message against these limits
    /// already.
    pub(crate) fn send_into(
        &mut self,
        message: &[u8],
        out: &mut Vec<u8>,
        checked: bool,
    ) -> Result<(), SendError> {
        if self.has_outputs() {
            return self.send(message);
        }
        let framing = self.send_framing()?;
        if !checked {
            self.checker.check_item(message, &self.config.limits)?;
        }
        framing::encode(framing, message, &self.config.limits, out)?;
        self.note_sent();
        Ok(())
    }

    /// Queues every message of `messages`, a CBOR sequence (items one after another). On
    /// a refusal the messages before it stay queued and its index is returned with the
    /// reason. Returns how many messages were queued.
    pub fn send_sequence(&mut self, messages: &[u8]) -> Result<usize, (usize, SendError)> {
        let mut rest = messages;
        let mut index = 0;
        while !rest.is_empty() {
            let queued = self.sendable().and_then(|()| {
                let end = self.checker.first_item(rest, &self.config.limits)?;
                let (message, tail) = rest.split_at(end);
                // The rest of the sequence usually follows into the same buffer.
                self.send_checked(message, rest.len())?;
                rest = tail;
                Ok(())
            });
            queued.map_err(|e| (index, e))?;
            index += 1;
        }
        Ok(index)
    }

    /// [`Connection::send_sequence`] of a sequence the caller gives away. In CBOR
    /// framing a CBOR sequence is what goes on the wire, so with no transmit waiting
    /// to be appended to, the checked messages go out in `messages` itself.
    pub fn send_sequence_owned(
        &mut self,
        mut messages: Vec<u8>,
    ) -> Result<usize, (usize, SendError)> {
        if self.send_framing() != Ok(Framing::Cbor)
            || matches!(self.outputs.back(), Some(Output::Transmit(_)))
        {
            return self.send_sequence(&messages);
        }
        let (mut end, mut index) = (0, 0);
        let refused = loop {
            let rest = messages.get(end..).unwrap_or_default();
            if rest.is_empty() {
                break None;
            }
            match self.checker.first_item(rest, &self.config.limits) {
                Ok(len) => {
                    end += len;
                    index += 1;
                }
                Err(e) => break Some((index, SendError::from(e))),
            }
        };
        if index > 0 {
            messages.truncate(end);
            self.outputs.push_back(Output::Transmit(messages));
            self.note_sent();
        }
        refused.map_or(Ok(index), Err)
    }

    /// Whether messages can be sent now.
    fn sendable(&self) -> Result<(), SendError> {
        match self.state {
            State::Data => Ok(()),
            State::Closed | State::HandedOver => Err(SendError::Closed),
            _ => Err(SendError::NotConnected),
        }
    }

    /// The framing messages go out in, once they can be sent.
    fn send_framing(&self) -> Result<Framing, SendError> {
        self.sendable()?;
        self.session
            .as_ref()
            .map(|s| s.send_framing)
            .ok_or(SendError::NotConnected)
    }

    /// Queues a message already checked by the scanner; a new transmit buffer gets
    /// `room` bytes (what is about to follow) at once.
    fn send_checked(&mut self, message: &[u8], room: usize) -> Result<(), SendError> {
        let framing = self.send_framing()?;
        // Consecutive sends share one transmit buffer.
        if !matches!(self.outputs.back(), Some(Output::Transmit(_))) {
            self.outputs
                .push_back(Output::Transmit(Vec::with_capacity(room)));
        }
        let Some(Output::Transmit(buf)) = self.outputs.back_mut() else {
            unreachable!("a transmit buffer was just pushed")
        };
        let result = framing::encode(framing, message, &self.config.limits, buf);
        if buf.is_empty() {
            self.outputs.pop_back();
        }
        result?;
        self.note_sent();
        Ok(())
    }

    /// A message went out: no keepalive is needed this interval.
    fn note_sent(&mut self) {
        if let Some(k) = &mut self.keepalive {
            k.sent_since = true;
        }
    }

    fn transmit(&mut self, bytes: Vec<u8>) {
        match self.outputs.back_mut() {
            Some(Output::Transmit(buf)) => buf.extend_from_slice(&bytes),
            _ => self.outputs.push_back(Output::Transmit(bytes)),
        }
    }

    fn fail(&mut self, error: Error) {
        self.state = State::Closed;
        self.input = Vec::new();
        self.decoder = None;
        self.outputs.push_back(Output::Closed(error));
    }

    /// Consumes complete handshake lines until the handshake waits for input or the host.
    fn advance(&mut self) {
        loop {
            if self.state == State::Verdict {
                // A correct peer sends at most its nonce and auth lines before our verdict.
                if self.input.len() > 2 * MAX_LINE {
                    self.fail(Error::LineTooLong(MAX_LINE));
                }
                return;
            }
            let line = match greeting::take_line(&self.input) {
                Ok(Some((line, used))) => {
                    let line = line.to_vec();
                    self.input.drain(..used);
                    line
                }
                Ok(None) => return,
                Err(e) => return self.fail(e),
            };
            let step = match self.state {
                State::Greeting1 => self.on_greeting1(line),
                State::Greeting2 => self.on_nonce(line),
                State::AuthLine => self.on_auth_line(&line),
                _ => return,
            };
            if let Err(e) = step {
                return self.fail(e);
            }
            if !matches!(
                self.state,
                State::Greeting1 | State::Verdict | State::Greeting2 | State::AuthLine
            ) {
                return;
            }
        }
    }

    fn on_greeting1(&mut self, line: Vec<u8>) -> Result<(), Error> {
        let g = Greeting::parse(&line);
        // An `aemp` side follows a remote that asks for an upgraded protocol.
        if self.config.protocol == "aemp" && g.protocol != "aemp" && is_protocol(&g.protocol) {
            self.config.protocol = g.protocol.clone();
        }
        if g.protocol != self.config.protocol && g.protocol != "aemp" {
            return Err(Error::UnparsableGreeting {
                expected: self.config.protocol.clone(),
                got: g.protocol,
            });
        }
        if g.version.trim().parse::<f64>().ok() != Some(f64::from(PROTOCOL_VERSION)) {
            return Err(Error::VersionMismatch(g.version));
        }
        if self.config.protocol == "aemp" && g.node_id == self.config.node_id {
            return Err(Error::SelfConnection);
        }
        self.outputs.push_back(Output::Greeting(g.clone()));
        self.remote = Some(Remote {
            greeting: g,
            line1: line,
        });
        self.state = State::Verdict;
        Ok(())
    }

    fn on_nonce(&mut self, nonce: Vec<u8>) -> Result<(), Error> {
        let Some(remote) = &self.remote else {
            unreachable!("line 1 precedes the nonce")
        };
        if nonce == self.local_nonce.as_bytes() {
            // Identical nonces are an echo, whatever line 1 said (and would leave both
            // sides wanting the same TLS role).
            return Err(Error::EchoAttack);
        }
        let mut remote_lines = remote.line1.clone();
        remote_lines.push(b'\n');
        remote_lines.extend_from_slice(&nonce);
        remote_lines.push(b'\n');
        let g = &remote.greeting;
        let tls = self.config.tls && g.wants_tls();
        let send_auth = auth::choose(&g.auths, &self.config.auth_offer, tls)?;
        let send_framing = g
            .framings
            .iter()
            .find_map(|name| Framing::from_name(name).filter(|f| self.config.framings.contains(f)))
            .ok_or_else(|| Error::NoCommonFraming(g.framings.join(",")))?;
        let transcript = Transcript {
            local: self.local_lines.clone(),
            remote: remote_lines,
        };
        let token = auth::local_token(send_auth, tls, self.config.secret(), &transcript)?;
        if tls {
            let role = if self.local_nonce.as_bytes() < nonce.as_slice() {
                TlsRole::Client
            } else {
                TlsRole::Server
            };
            let leftover = std::mem::take(&mut self.input);
            self.outputs.push_back(Output::StartTls { role, leftover });
        }
        self.transmit(
            format!("{};{};{}\n", send_auth.name(), token, send_framing.name()).into_bytes(),
        );
        self.plan = Some(Plan {
            tls,
            send_auth,
            send_framing,
            transcript,
        });
        self.state = State::AuthLine;
        Ok(())
    }

    fn on_auth_line(&mut self, line: &[u8]) -> Result<(), Error> {
        let (Some(plan), Some(remote)) = (&self.plan, &self.remote) else {
            unreachable!("the nonce precedes the auth line")
        };
        let line = String::from_utf8_lossy(line);
        let mut fields = line.split(';');
        let method = fields.next().unwrap_or_default();
        let token = fields.next().unwrap_or_default();
        let framing_name = fields.next().unwrap_or_default();
        let recv_auth = auth::verify(
            method,
            token,
            &self.config.auth_accept,
            plan.tls,
            self.config.secret(),
            &plan.transcript,
        )?;
        let recv_framing = Framing::from_name(framing_name)
            .filter(|f| self.config.framings.contains(f))
            .ok_or_else(|| Error::UnusableRemoteFraming(framing_name.to_owned()))?;
        let session = Session {
            remote_node: remote.greeting.node_id.clone(),
            protocol: self.config.protocol.clone(),
            tls: plan.tls,
            send_auth: plan.send_auth,
            recv_auth,
            untrusted: recv_auth == AuthMethod::TlsAnon,
            send_framing: plan.send_framing,
            recv_framing,
        };
        let upgraded = session.protocol != "aemp";
        self.outputs.push_back(Output::Connected(session.clone()));
        self.session = Some(session);
        self.plan = None;
        let rest = std::mem::take(&mut self.input);
        if upgraded {
            self.state = State::HandedOver;
            self.outputs
                .push_back(Output::HandedOver { leftover: rest });
        } else {
            self.state = State::Data;
            self.decoder = Some(Decoder::new(recv_framing));
            self.keepalive = self.config.keepalive_interval_ms.map(|interval| Keepalive {
                interval,
                due: self.now.saturating_add(interval),
                sent_since: true,
            });
            self.decode(&rest);
        }
        Ok(())
    }

    /// Decodes `data`, the messages found going to the outputs.
    fn decode(&mut self, data: &[u8]) {
        let mut outputs = std::mem::take(&mut self.outputs);
        let sequences = self.message_sequences;
        self.decode_with(data, &mut |m| {
            // A message is below the u32 message size limit.
            let size = u32::try_from(m.len()).unwrap_or(u32::MAX);
            match outputs.back_mut() {
                Some(Output::Messages { data, sizes }) if sequences => {
                    data.extend_from_slice(m);
                    sizes.push(size);
                }
                _ if sequences => {
                    // The messages of this input follow: room for them at once.
                    let mut seq = Vec::with_capacity(data.len().max(m.len()));
                    seq.extend_from_slice(m);
                    outputs.push_back(Output::Messages {
                        data: seq,
                        sizes: vec![size],
                    });
                }
                _ => outputs.push_back(Output::Message(m.to_vec())),
            }
        });
        // A failure's output came after the messages; put it back behind them.
        outputs.append(&mut self.outputs);
        self.outputs = outputs;
    }

    /// Decodes `data`, handing each message found to `sink`; fails the connection on a
    /// framing error (after the messages before it).
    fn decode_with(&mut self, data: &[u8], sink: &mut dyn FnMut(&[u8])) {
        let Some(decoder) = &mut self.decoder else {
            return;
        };
        if let Err(e) = decoder.decode(data, &self.config.limits, &mut { sink }) {
            self.fail(e.into());
        }
    }
}

/// The bytes an output holds.
fn output_bytes(output: &Output) -> usize {
    match output {
        Output::Transmit(bytes)
        | Output::Message(bytes)
        | Output::StartTls {
            leftover: bytes, ..
        }
        | Output::HandedOver { leftover: bytes } => bytes.capacity(),
        Output::Messages { data, sizes } => data.capacity() + 4 * sizes.capacity(),
        Output::Greeting(_) | Output::Connected(_) | Output::Closed(_) => 0,
    }
}
