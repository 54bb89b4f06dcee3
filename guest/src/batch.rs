//! Many messages in two buffers, the form they cross the component boundary in (the node
//! interface's `batch`): for each message its port id (UTF-8) and then its arguments (a
//! CBOR array) one after another in `data`, and two lengths per message in `sizes`. One
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
    data.extend_from_slice(port.as_bytes());
    let start = data.len();
    write_args(data);
    // A message is far below 4 GiB (the message size limit is a u32); a larger one
    // would show as a size mismatch, never as another message.
    sizes.push(u32::try_from(port.len()).unwrap_or(u32::MAX));
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
