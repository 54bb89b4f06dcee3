//! Node ids and port ids.
//!
//! A node id is free text without `#`; a port id is `NODEID#NAME`; the node port of node
//! `N` is `N#` (empty name), which a bare `N` also names, as in AnyEvent::MP.

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A port id split once into node id and port name, borrowed from the id's text.
///
/// A port id is split at its first `#`; a bare node id (no `#`) names that node's node port
/// (empty name), as the reference's `snd` treats it. An empty node id is no port id: the
/// reference refuses it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortId<'a> {
    /// The node's id: never empty, never holds `#`.
    pub node: &'a str,
    /// The port's name on that node: empty for the node port.
    pub name: &'a str,
}

impl<'a> PortId<'a> {
    /// Splits `id`; `None` for an empty node id.
    #[inline]
    pub fn parse(id: &'a str) -> Option<PortId<'a>> {
        // A byte search ('#' is ASCII, so its index is a char boundary): cheaper than a
        // char pattern for the short ids of every message sent.
        let (node, name) = match id.bytes().position(|b| b == b'#') {
            Some(at) => (id.get(..at)?, id.get(at + 1..)?),
            None => (id, ""),
        };
        (!node.is_empty()).then_some(PortId { node, name })
    }
}

/// The id in full, `NODE#NAME` (`NODE#` for a node port named by its bare node id).
impl std::fmt::Display for PortId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.node, self.name)
    }
}

/// Expands a configured node id as AnyEvent::MP does: `%n` becomes `hostname`, `%u` and a
/// trailing `/` each become (are followed by) 10 random alphanumeric characters taken from
/// `random` (one byte per character).
pub fn expand_node_id(template: &str, hostname: &str, random: &mut dyn FnMut() -> u8) -> String {
    let mut uniq = || -> String {
        (0..10)
            .map(|_| char::from(ALNUM[usize::from(random()) % ALNUM.len()]))
            .collect()
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        match tail.chars().next() {
            Some('n') => out.push_str(hostname),
            Some('u') => out.push_str(&uniq()),
            _ => {
                out.push('%');
                rest = tail;
                continue;
            }
        }
        rest = &tail[1..];
    }
    out.push_str(rest);
    if out.ends_with('/') {
        out.push_str(&uniq());
    }
    out
}

/// A short alphanumeric string from `bytes`, for unique names.
pub(crate) fn alnum(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| char::from(ALNUM[usize::from(b) % ALNUM.len()]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_expands() {
        let split = |id| PortId::parse(id).map(|p| (p.node, p.name));
        assert_eq!(split("a/b#c#d"), Some(("a/b", "c#d")));
        assert_eq!(split("node#"), Some(("node", "")));
        assert_eq!(split("node"), Some(("node", "")));
        assert_eq!(split(""), None);
        assert_eq!(split("#x"), None);
        assert_eq!(split("#"), None);
        assert_eq!(
            PortId::parse("node").map(|p| p.to_string()).as_deref(),
            Some("node#")
        );
        let mut n = 0u8;
        let mut rnd = || {
            n = n.wrapping_add(1);
            n
        };
        assert_eq!(expand_node_id("%n/x", "host", &mut rnd), "host/x");
        let id = expand_node_id("%n/", "host", &mut rnd);
        assert_eq!(id, "host/BCDEFGHIJK");
        let id = expand_node_id("a%u-%z%", "h", &mut rnd);
        assert_eq!(id, "aLMNOPQRSTU-%z%");
    }
}

/// Perl's magic string increment on lowercase letters: `a` -> `b`, `z` -> `aa`, `az` -> `ba`.
pub(crate) fn increment(counter: &mut String) {
    let mut chars: Vec<u8> = counter.bytes().collect();
    let mut i = chars.len();
    loop {
        if i == 0 {
            chars.insert(0, b'a');
            break;
        }
        i -= 1;
        if chars[i] == b'z' {
            chars[i] = b'a';
        } else {
            chars[i] += 1;
            break;
        }
    }
    *counter = String::from_utf8(chars).unwrap_or_default();
}

#[cfg(test)]
mod increment_tests {
    #[test]
    fn perl_magic_increment() {
        let mut s = String::from("a");
        let mut seen = Vec::new();
        for _ in 0..28 {
            super::increment(&mut s);
            seen.push(s.clone());
        }
        assert_eq!(seen[0], "b");
        assert_eq!(seen[24], "z");
        assert_eq!(seen[25], "aa");
        assert_eq!(seen[27], "ac");
        let mut s = String::from("az");
        super::increment(&mut s);
        assert_eq!(s, "ba");
    }
}
