//! Many messages in two buffers, the forms they cross the component boundary in. A
//! [`Batch`] (what the application sends, the node interface's `batch`) holds for each
//! message its port id (UTF-8) and then its arguments (a CBOR array) one after another in
//! `data`, and two lengths per message in `sizes`. A [`Delivery`] (what the node hands to
//! one local port) holds only arguments, one length each: the port is named once. One
//! list lifted or lowered per batch instead of two per message, and the receiver slices
//! instead of parsing.

use thiserror::Error;

/// Why a batch cannot be taken apart.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BatchError {
    /// `sizes` has an odd length or runs past `data`.
    #[error("batch sizes do not match its data")]
    Sizes,
    /// A port id is not UTF-8.
    #[error("port id is not UTF-8")]
    PortNotUtf8,
}

/// A batch of messages in its two buffers (what the node's deliveries are built in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Port ids and arguments, one after another.
    pub data: Vec<u8>,
    /// Two lengths per message: its port id's and its arguments'.
    pub sizes: Vec<u32>,
}

impl Batch {
    /// How many messages the batch holds.
    pub fn len(&self) -> usize {
        self.sizes.len() / 2
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// The (port id, arguments) pairs, in order.
    pub fn pairs(&self) -> impl Iterator<Item = Result<(&str, &[u8]), BatchError>> {
        pairs(&self.data, &self.sizes)
    }
}

/// Messages for one local port, in the order they arrived: each message's arguments (a
/// CBOR array) one after another in `data`, the length of each in `sizes`. A host hands
/// it to the port's inbox as it is, slicing by `sizes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The port's id (`NODE#NAME`), as `new_port`/`register_port` returned it.
    pub port: String,
    /// The messages' arguments, one after another.
    pub data: Vec<u8>,
    /// One length per message.
    pub sizes: Vec<u32>,
}

impl Delivery {
    /// An empty delivery for `port`.
    pub fn new(port: String) -> Delivery {
        Delivery {
            port,
            ..Delivery::default()
        }
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// Appends one message whose arguments `write_args` encodes straight into `data`.
    pub fn push_with(&mut self, write_args: impl FnOnce(&mut Vec<u8>)) {
        let start = self.data.len();
        write_args(&mut self.data);
        // As in `push_parts`: a message is far below 4 GiB.
        let len = u32::try_from(self.data.len() - start).unwrap_or(u32::MAX);
        self.sizes.push(len);
    }

    /// Each message's arguments, in order; sizes past the data end it.
    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.data[..];
        self.sizes.iter().map_while(move |&len| {
            let (message, after) = split(rest, len).ok()?;
            rest = after;
            Some(message)
        })
    }

    /// The bytes it holds (what counts toward the node's buffered bytes).
    pub fn capacity_bytes(&self) -> usize {
        self.port.capacity() + self.data.capacity() + self.sizes.capacity() * size_of::<u32>()
    }
}

/// Appends one message to a batch.
pub fn push(data: &mut Vec<u8>, sizes: &mut Vec<u32>, port: &str, args: &[u8]) {
    push_with(data, sizes, port, |out| out.extend_from_slice(args));
}

/// Appends one message whose arguments `write_args` encodes straight into the batch
/// (no buffer of their own).
pub fn push_with(
    data: &mut Vec<u8>,
    sizes: &mut Vec<u32>,
    port: &str,
    write_args: impl FnOnce(&mut Vec<u8>),
) {
    push_parts(data, sizes, &[port], write_args);
}

/// Appends one message whose port id is the concatenation of `port` (UTF-8 pieces, so a
/// `NODE#NAME` id needs no string of its own) and whose arguments `write_args` encodes
/// straight into the batch.
pub fn push_parts(
    data: &mut Vec<u8>,
    sizes: &mut Vec<u32>,
    port: &[&str],
    write_args: impl FnOnce(&mut Vec<u8>),
) {
    let port_start = data.len();
    for piece in port {
        data.extend_from_slice(piece.as_bytes());
    }
    let start = data.len();
    write_args(data);
    // A message is far below 4 GiB (the message size limit is a u32); a larger one
    // would show as a size mismatch, never as another message.
    sizes.push(u32::try_from(start - port_start).unwrap_or(u32::MAX));
    sizes.push(u32::try_from(data.len() - start).unwrap_or(u32::MAX));
}

/// The (port id, arguments) pairs of a batch, in order; an error ends it.
pub fn pairs<'a>(
    data: &'a [u8],
    sizes: &'a [u32],
) -> impl Iterator<Item = Result<(&'a str, &'a [u8]), BatchError>> + 'a {
    let mut rest = data;
    let mut failed = false;
    sizes.chunks(2).map_while(move |pair| {
        if failed {
            return None;
        }
        let item = take(&mut rest, pair);
        failed = item.is_err();
        Some(item)
    })
}

/// The next pair from `rest`, whose lengths are `pair`.
fn take<'a>(rest: &mut &'a [u8], pair: &[u32]) -> Result<(&'a str, &'a [u8]), BatchError> {
    let &[port_len, args_len] = pair else {
        return Err(BatchError::Sizes);
    };
    let (port, after) = split(rest, port_len)?;
    let (args, after) = split(after, args_len)?;
    *rest = after;
    let port = std::str::from_utf8(port).map_err(|_| BatchError::PortNotUtf8)?;
    Ok((port, args))
}

fn split(buf: &[u8], len: u32) -> Result<(&[u8], &[u8]), BatchError> {
    let len = usize::try_from(len).map_err(|_| BatchError::Sizes)?;
    if len > buf.len() {
        return Err(BatchError::Sizes);
    }
    Ok(buf.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_come_back_as_pushed() {
        let (mut data, mut sizes) = (Vec::new(), Vec::new());
        push(&mut data, &mut sizes, "a#p", b"\x81\x01");
        push(&mut data, &mut sizes, "", b"\x80");
        push(&mut data, &mut sizes, "b#\u{e9}", b"\x82\x01\x02");
        let got: Vec<_> = pairs(&data, &sizes).collect();
        assert_eq!(
            got,
            [
                Ok(("a#p", &b"\x81\x01"[..])),
                Ok(("", &b"\x80"[..])),
                Ok(("b#\u{e9}", &b"\x82\x01\x02"[..])),
            ]
        );
    }

    #[test]
    fn port_ids_in_pieces() {
        let mut b = Batch::default();
        assert!(b.is_empty());
        push_parts(&mut b.data, &mut b.sizes, &["a", "#", "p"], |out| {
            out.push(0x80)
        });
        push_parts(&mut b.data, &mut b.sizes, &[], |out| out.push(0x80));
        assert_eq!(b.len(), 2);
        let got: Vec<_> = b.pairs().collect();
        assert_eq!(got, [Ok(("a#p", &b"\x80"[..])), Ok(("", &b"\x80"[..]))]);
    }

    #[test]
    fn a_delivery_slices_by_its_sizes() {
        let mut d = Delivery::new("a#p".into());
        assert!(d.is_empty());
        d.push_with(|out| out.extend_from_slice(b"\x81\x01"));
        d.push_with(|out| out.push(0x80));
        assert_eq!(d.len(), 2);
        assert_eq!(
            d.messages().collect::<Vec<_>>(),
            [&b"\x81\x01"[..], &b"\x80"[..]]
        );
        d.sizes.push(5);
        assert_eq!(d.messages().count(), 2);
    }

    #[test]
    fn bad_sizes_end_the_batch_with_an_error() {
        let (mut data, mut sizes) = (Vec::new(), Vec::new());
        push(&mut data, &mut sizes, "a#p", b"\x80");
        let mut odd = sizes.clone();
        odd.push(1);
        assert_eq!(pairs(&data, &odd).last(), Some(Err(BatchError::Sizes)));
        assert_eq!(
            pairs(&data, &[3, 2]).collect::<Vec<_>>(),
            [Err(BatchError::Sizes)]
        );
        assert_eq!(
            pairs(&data, &[u32::MAX, 0]).collect::<Vec<_>>(),
            [Err(BatchError::Sizes)]
        );
        assert_eq!(
            pairs(b"\xff\x80", &[1, 1]).collect::<Vec<_>>(),
            [Err(BatchError::PortNotUtf8)]
        );
        // Nothing after the first error.
        let (mut data, mut sizes) = (b"\xff\x80".to_vec(), vec![1, 1]);
        push(&mut data, &mut sizes, "a#p", b"\x80");
        assert_eq!(pairs(&data, &sizes).count(), 1);
    }
}
