//! The two greeting lines: building ours, parsing the remote's, and reading handshake lines.
//!
//! Line 1 is `PROTOCOL;VERSION;NODEID;AUTHS;FRAMINGS[;KEY=VALUE...]`, line 2 a nonce.
//! Key/value text escapes `;` as `%3b` and `%` as `%25`.

use std::borrow::Cow;

use base64::Engine as _;

use crate::error::Error;

/// Length of the random nonce, in bytes, before base64 (the reference uses 66 bytes).
pub const NONCE_LEN: usize = 66;

/// Longest handshake line, terminator included, accepted before authentication completes.
pub const MAX_LINE: usize = 4096;

/// A parsed first greeting line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Greeting {
    /// The protocol word: `aemp`, or `aemp-NAME` for an upgraded protocol.
    pub protocol: String,
    /// The protocol version, as sent (`1` today).
    pub version: String,
    /// The sender's node id.
    pub node_id: String,
    /// Auth methods the sender accepts, in preference order.
    pub auths: Vec<String>,
    /// Framings the sender understands, in preference order.
    pub framings: Vec<String>,
    /// `KEY=VALUE` pairs in the order sent, unescaped; a key without `=` has no value.
    pub pairs: Vec<(String, Option<String>)>,
}

impl Greeting {
    /// Parses a first greeting line (without its terminator), the way the reference splits
    /// it: missing fields are empty, pairs whose key is empty are skipped.
    pub fn parse(line: &[u8]) -> Greeting {
        let line = String::from_utf8_lossy(line);
        let mut fields = line.split(';');
        let mut next = || fields.next().unwrap_or_default().to_owned();
        let protocol = next();
        let version = next();
        let node_id = next();
        let auths = split_list(&next());
        let framings = split_list(&next());
        let pairs = fields
            .filter_map(|kv| {
                let (key, value) = match kv.split_once('=') {
                    Some((k, v)) => (k, Some(unescape(v).into_owned())),
                    None => (kv, None),
                };
                (!key.is_empty()).then(|| (unescape(key).into_owned(), value))
            })
            .collect();
        Greeting {
            protocol,
            version,
            node_id,
            auths,
            framings,
            pairs,
        }
    }

    /// Renders the line (without terminator), escaping key/value text.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{};{};{};{};{}",
            self.protocol,
            self.version,
            self.node_id,
            self.auths.join(","),
            self.framings.join(",")
        );
        for (key, value) in &self.pairs {
            line.push(';');
            line.push_str(&escape(key));
            if let Some(value) = value {
                line.push('=');
                line.push_str(&escape(value));
            }
        }
        line
    }

    /// The value of the first pair named `key` (`Some("")` for a key without value).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// Whether the sender asks for TLS: the integer part of `tls` is 1, as the reference
    /// tests it (`1 == int $tls`).
    pub fn wants_tls(&self) -> bool {
        self.get("tls").map(perl_int) == Some(1)
    }
}

/// The nonce line: base64 (standard alphabet, padded, unwrapped) of the nonce bytes.
pub fn nonce_line(nonce: &[u8; NONCE_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// Finds the next complete line in `buf`. Returns the line without its LF or CR LF and the
/// number of bytes it used, `None` if the line is still incomplete, or an error once the
/// line cannot fit in [`MAX_LINE`] bytes.
pub fn take_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, Error> {
    let window = &buf[..buf.len().min(MAX_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, end + 1)))
        }
        None if buf.len() >= MAX_LINE => Err(Error::LineTooLong(MAX_LINE)),
        None => Ok(None),
    }
}

/// Splits a comma-separated list as Perl's `split /,/` does: trailing empty items dropped.
fn split_list(text: &str) -> Vec<String> {
    let mut items: Vec<String> = text.split(',').map(str::to_owned).collect();
    while items.last().is_some_and(String::is_empty) {
        items.pop();
    }
    items
}

/// Perl's `int` on a string: the integer part of its leading number, 0 if there is none.
pub(crate) fn perl_int(text: &str) -> i64 {
    let text = text.trim_start();
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse::<i64>().map_or(0, |n| sign * n)
}

fn escape(text: &str) -> Cow<'_, str> {
    if text.contains(['%', ';']) {
        Cow::Owned(text.replace('%', "%25").replace(';', "%3b"))
    } else {
        Cow::Borrowed(text)
    }
}

fn unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let code = tail.get(1..3).map(str::to_ascii_lowercase);
        match code.as_deref() {
            Some("3b") => out.push(';'),
            Some("25") => out.push('%'),
            _ => {
                out.push('%');
                rest = &tail[1..];
                continue;
            }
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_line() {
        let g = Greeting::parse(
            b"aemp;1;rain;tls_sha3_512,hmac_sha3_512,tls_anon,cleartext;cbor,json,storable;provider=AE-2.02;peeraddr=10.0.0.1:48082;tls=1.0;flag;=skipped",
        );
        assert_eq!(g.protocol, "aemp");
        assert_eq!(g.version, "1");
        assert_eq!(g.node_id, "rain");
        assert_eq!(g.auths.len(), 4);
        assert_eq!(g.framings, ["cbor", "json", "storable"]);
        assert_eq!(g.get("provider"), Some("AE-2.02"));
        assert_eq!(g.get("peeraddr"), Some("10.0.0.1:48082"));
        assert_eq!(g.get("flag"), Some(""));
        assert_eq!(g.pairs.len(), 4);
        assert!(g.wants_tls());
    }

    #[test]
    fn missing_fields_are_empty() {
        let g = Greeting::parse(b"aemp;1;n;;");
        assert_eq!(g.node_id, "n");
        assert!(g.auths.is_empty() && g.framings.is_empty() && g.pairs.is_empty());
        let g = Greeting::parse(b"");
        assert_eq!(g, Greeting::default());
    }

    #[test]
    fn escaping_round_trips() {
        let g = Greeting {
            protocol: "aemp".into(),
            version: "1".into(),
            node_id: "a".into(),
            auths: vec!["cleartext".into()],
            framings: vec!["json".into()],
            pairs: vec![
                ("k;1".into(), Some("50%;x=y".into())),
                ("bare".into(), None),
            ],
        };
        let line = g.line();
        assert_eq!(line, "aemp;1;a;cleartext;json;k%3b1=50%25%3bx=y;bare");
        assert_eq!(Greeting::parse(line.as_bytes()), g);
        // Upper-case escapes and stray percent signs are accepted as they are.
        assert_eq!(unescape("%3B%zz%"), ";%zz%");
    }

    #[test]
    fn tls_integer_part() {
        for (value, wants) in [
            ("1.0", true),
            ("1", true),
            ("1.9", true),
            ("2.0", false),
            ("", false),
            ("x", false),
        ] {
            let g = Greeting::parse(format!("aemp;1;n;a;b;tls={value}").as_bytes());
            assert_eq!(g.wants_tls(), wants, "tls={value}");
        }
        assert_eq!(perl_int(" -3abc"), -3);
    }

    #[test]
    fn lines_end_in_lf_or_crlf_and_are_bounded() {
        assert_eq!(take_line(b"abc\r\nrest").unwrap(), Some((&b"abc"[..], 5)));
        assert_eq!(take_line(b"abc\nrest").unwrap(), Some((&b"abc"[..], 4)));
        assert_eq!(take_line(b"abc").unwrap(), None);
        let mut long = vec![b'x'; MAX_LINE - 1];
        long.push(b'\n');
        assert_eq!(
            take_line(&long).unwrap().map(|(l, n)| (l.len(), n)),
            Some((MAX_LINE - 1, MAX_LINE))
        );
        let long = vec![b'x'; MAX_LINE];
        assert_eq!(take_line(&long), Err(Error::LineTooLong(MAX_LINE)));
        assert_eq!(
            Error::LineTooLong(MAX_LINE).to_string(),
            "greeting line longer than 4096 bytes"
        );
    }

    #[test]
    fn nonce_is_88_chars() {
        assert_eq!(nonce_line(&[0xab; NONCE_LEN]).len(), 88);
    }
}
