//! Port inboxes: the bounded queue between the driver and one receiver ([`super::Port`],
//! [`super::Requests`], [`super::DbMonitor`]).
//!
//! The driver hands over each of the engine's deliveries to a port as one [`Chunk`] (the
//! delivery's buffer itself: no copy and no allocation per message), and the receiver is
//! woken once per chunk, not per message. The bound is in
//! messages and in bytes: a chunk that does not fit is split, the inbox takes what fits
//! and the driver holds the rest. An empty inbox takes one message whatever its size, so
//! a message larger than the byte bound still gets through, one at a time. The driver
//! waits for room with [`Inbox::room`], woken once the receiver has taken enough for what
//! it holds (not per message taken).

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use aemp_engine::Value;

use super::decode_args;

/// What one message costs an inbox beyond its bytes (its span and share of a chunk).
const MESSAGE_OVERHEAD: usize = 32;

/// What the message at `span` counts toward an inbox's byte bound.
fn cost(span: &Range<usize>) -> usize {
    span.len().saturating_add(MESSAGE_OVERHEAD)
}

/// Messages for one port, each a range of `data` holding its arguments (a CBOR array).
#[derive(Debug, Clone, Default)]
pub(super) struct Chunk {
    data: Arc<Vec<u8>>,
    spans: Vec<Range<usize>>,
    /// `spans[next..]` are the messages still in the chunk.
    next: usize,
    /// What `spans[next..]` cost (see [`cost`]).
    bytes: usize,
}

impl Chunk {
    /// Messages as ranges of `data` (which may hold other bytes between them).
    pub(super) fn new(data: Vec<u8>, spans: Vec<Range<usize>>) -> Chunk {
        let bytes = spans.iter().map(cost).fold(0, usize::saturating_add);
        Chunk {
            data: Arc::new(data),
            spans,
            next: 0,
            bytes,
        }
    }

    /// Messages one after another in `data`, the length of each in `sizes` (the engine's
    /// `deliver` as it comes); sizes past the data end it.
    pub(super) fn from_sizes(data: Vec<u8>, sizes: &[u32]) -> Chunk {
        let mut start = 0usize;
        let spans = sizes
            .iter()
            .map_while(|&len| {
                let end = start.checked_add(usize::try_from(len).ok()?)?;
                (end <= data.len()).then(|| std::mem::replace(&mut start, end)..end)
            })
            .collect();
        Chunk::new(data, spans)
    }

    /// What the messages in the chunk count toward an inbox's byte bound.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many messages from the front fit in `count` messages and `bytes` bytes (at
    /// least one when `one_anyway`, for an empty inbox).
    fn fitting(&self, count: usize, bytes: usize, one_anyway: bool) -> usize {
        let spans = self.spans.get(self.next..).unwrap_or_default();
        let mut used = 0usize;
        let mut n = 0;
        for span in spans.iter().take(count) {
            used = used.saturating_add(cost(span));
            if used > bytes && !(one_anyway && n == 0) {
                break;
            }
            n += 1;
        }
        n
    }

    /// Takes the front message's span out of the chunk.
    fn pop_span(&mut self) -> Option<Range<usize>> {
        let span = self.spans.get(self.next).cloned()?;
        self.next += 1;
        self.bytes = self.bytes.saturating_sub(cost(&span));
        Some(span)
    }

    /// One message.
    pub(super) fn single(args: Vec<u8>) -> Chunk {
        let len = args.len();
        Chunk::new(args, std::iter::once(0..len).collect())
    }

    /// Messages in the chunk.
    pub(super) fn len(&self) -> usize {
        self.spans.len().saturating_sub(self.next)
    }

    /// Takes the first `n` messages (at most all) as a chunk of their own, sharing the bytes.
    fn split_off_front(&mut self, n: usize) -> Chunk {
        let end = self.next + n.min(self.len());
        let spans = self.spans.get(self.next..end).unwrap_or_default().to_vec();
        let bytes = spans.iter().map(cost).fold(0, usize::saturating_add);
        let front = Chunk {
            data: self.data.clone(),
            spans,
            next: 0,
            bytes,
        };
        self.next = end;
        self.bytes = self.bytes.saturating_sub(bytes);
        front
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let spans = self.spans.get(self.next..).unwrap_or_default();
        spans
            .iter()
            .map(|span| self.data.get(span.clone()).unwrap_or_default())
    }
}

/// Messages taken from a port at once ([`super::Port::recv_batch`]): each message's
/// arguments as the CBOR array the peer sent, undecoded, in arrival order. Holding them
/// costs no allocation per message.
#[derive(Debug, Default)]
pub struct Messages {
    chunks: Vec<Chunk>,
    len: usize,
}

impl Messages {
    /// How many messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Each message's arguments as the CBOR array the peer sent.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().flat_map(Chunk::iter)
    }

    /// Each message's arguments, decoded (as [`super::Port::recv`] returns them).
    pub fn decode(&self) -> impl Iterator<Item = Vec<Value>> {
        self.iter().map(decode_args)
    }
}

impl<'a> IntoIterator for &'a Messages {
    type Item = &'a [u8];
    type IntoIter = Box<dyn Iterator<Item = &'a [u8]> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Chunk>,
    /// Messages in `chunks`.
    count: usize,
    /// What they cost (see [`cost`]).
    bytes: usize,
    /// The receiver waiting for a message.
    receiver: Option<Waker>,
    /// The driver waiting for room for `want` messages.
    driver: Option<(Waker, usize)>,
    /// The receiver is gone: nothing more is taken.
    receiver_gone: bool,
    /// The driver let go of the inbox (the port was killed, the node stopped): the
    /// receiver gets what is left, then the end.
    sender_gone: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    capacity: usize,
    capacity_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether there is room for `want` messages, and for half the byte bound (or the
    /// inbox is empty): what wakes a driver waiting with [`Inbox::room`].
    fn has_room(&self, state: &State, want: usize) -> bool {
        self.capacity.saturating_sub(state.count) >= want
            && (state.count == 0 || state.bytes <= self.capacity_bytes / 2)
    }
}

/// What [`Inbox::offer`] did with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Offer {
    /// Taken, all of it.
    Taken,
    /// The inbox was full: `taken` messages from the front were taken (perhaps none),
    /// the rest are still in the chunk.
    Full { taken: usize },
    /// The receiver is gone; the chunk is left as it was.
    Closed,
}

/// The driver's end of an inbox. Dropping it ends the receiver's stream once the
/// receiver has taken what is queued.
#[derive(Debug)]
pub(super) struct Inbox {
    shared: Arc<Shared>,
}

/// The receiver's end.
#[derive(Debug)]
pub(super) struct Receiver {
    shared: Arc<Shared>,
}

/// A new inbox holding at most `capacity` messages (at least one) and `capacity_bytes`
/// bytes of them (see [`cost`]; an empty inbox takes one message of any size).
pub(super) fn inbox(capacity: usize, capacity_bytes: usize) -> (Inbox, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        capacity: capacity.max(1),
        capacity_bytes,
    });
    (
        Inbox {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl Inbox {
    /// Queues what fits of `chunk` (taken from its front), waking the receiver once.
    pub(super) fn offer(&self, chunk: &mut Chunk) -> Offer {
        let mut state = self.shared.lock();
        if state.receiver_gone {
            return Offer::Closed;
        }
        let n = chunk.len();
        if n == 0 {
            // Nothing to queue: the inbox never holds an empty chunk.
            return Offer::Taken;
        }
        let taken = chunk.fitting(
            self.shared.capacity.saturating_sub(state.count),
            self.shared.capacity_bytes.saturating_sub(state.bytes),
            state.count == 0,
        );
        if taken == 0 {
            return Offer::Full { taken };
        }
        let front = if taken == n {
            std::mem::take(chunk)
        } else {
            chunk.split_off_front(taken)
        };
        state.bytes = state.bytes.saturating_add(front.bytes);
        state.chunks.push_back(front);
        state.count = state.count.saturating_add(taken);
        let waker = state.receiver.take();
        drop(state);
        if let Some(w) = waker {
            w.wake();
        }
        if taken == n {
            Offer::Taken
        } else {
            Offer::Full { taken }
        }
    }

    /// Messages queued and not taken yet, and their bytes.
    pub(super) fn depth(&self) -> (usize, usize) {
        let state = self.shared.lock();
        (state.count, state.bytes)
    }

    /// Whether the receiver is gone.
    pub(super) fn is_closed(&self) -> bool {
        self.shared.lock().receiver_gone
    }

    /// Resolves once the inbox has room for `want` messages (or all it can hold) and
    /// half its bytes, or the receiver is gone.
    pub(super) fn room(&self, want: usize) -> impl Future<Output = ()> + use<> {
        let shared = self.shared.clone();
        let want = want.clamp(1, shared.capacity);
        poll_fn(move |cx| {
            let mut state = shared.lock();
            if state.receiver_gone || shared.has_room(&state, want) {
                state.driver = None;
                Poll::Ready(())
            } else {
                state.driver = Some((cx.waker().clone(), want));
                Poll::Pending
            }
        })
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.sender_gone = true;
            state.receiver.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Receiver {
    /// Waits for messages, then lets `take_from` take some (it returns how many with what
    /// it made of them) and wakes the driver if that made room for what it holds (once
    /// there is room for all it waits for, not per message). `None` once the inbox is
    /// empty and its driver let go. Cancel-safe: nothing is taken unless this returns.
    async fn take_with<R>(
        &mut self,
        mut take_from: impl FnMut(&mut VecDeque<Chunk>) -> (usize, usize, R),
    ) -> Option<R> {
        let (taken, driver) = poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.count == 0 {
                if state.sender_gone {
                    return Poll::Ready(None);
                }
                state.receiver = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let (n, bytes, taken) = take_from(&mut state.chunks);
            state.count = state.count.saturating_sub(n);
            state.bytes = state.bytes.saturating_sub(bytes);
            let driver = match state.driver.take() {
                Some((waker, want)) if self.shared.has_room(&state, want) => Some(waker),
                kept => {
                    state.driver = kept;
                    None
                }
            };
            Poll::Ready(Some((taken, driver)))
        })
        .await?;
        if let Some(w) = driver {
            w.wake();
        }
        Some(taken)
    }

    /// Waits for messages and takes up to `limit` of them (at least one); `None` once
    /// the inbox is empty and its driver let go. Cancel-safe.
    pub(super) async fn take(&mut self, limit: usize) -> Option<Messages> {
        let limit = limit.max(1);
        self.take_with(|chunks| {
            let mut taken = Messages::default();
            let mut bytes = 0usize;
            while taken.len < limit {
                let Some(front) = chunks.front_mut() else {
                    break;
                };
                let chunk = if front.len() <= limit - taken.len {
                    chunks.pop_front()
                } else {
                    Some(front.split_off_front(limit - taken.len))
                };
                if let Some(chunk) = chunk {
                    taken.len += chunk.len();
                    bytes = bytes.saturating_add(chunk.bytes);
                    taken.chunks.push(chunk);
                }
            }
            (taken.len, bytes, taken)
        })
        .await
    }

    /// Takes the next message and makes `T` of its arguments (outside the inbox's lock,
    /// and without a buffer of its own: the message stays in its chunk's bytes).
    pub(super) async fn recv_with<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let (data, span) = self
            .take_with(|chunks| {
                let Some(front) = chunks.front_mut() else {
                    return (0, 0, None);
                };
                let span = front.pop_span();
                let data = front.data.clone();
                if front.len() == 0 {
                    chunks.pop_front();
                }
                let bytes = span.as_ref().map_or(0, cost);
                (
                    usize::from(span.is_some()),
                    bytes,
                    span.map(|span| (data, span)),
                )
            })
            .await??;
        Some(f(data.get(span).unwrap_or_default()))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.receiver_gone = true;
            state.chunks.clear();
            state.count = 0;
            state.bytes = 0;
            state.driver.take()
        };
        if let Some((w, _)) = waker {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(messages: &[&[u8]]) -> Chunk {
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for m in messages {
            // Something between messages, as in a deliver batch (the port ids).
            data.extend_from_slice(b"#p");
            spans.push(data.len()..data.len() + m.len());
            data.extend_from_slice(m);
        }
        Chunk::new(data, spans)
    }

    fn raw(m: &Messages) -> Vec<Vec<u8>> {
        m.iter().map(<[u8]>::to_vec).collect()
    }

    #[tokio::test]
    async fn a_chunk_that_does_not_fit_is_split_in_order() {
        let (tx, mut rx) = inbox(3, usize::MAX);
        let mut c = chunk(&[b"\x81\x01", b"\x81\x02"]);
        assert_eq!(tx.offer(&mut c), Offer::Taken);
        let mut c = chunk(&[b"\x81\x03", b"\x81\x04", b"\x81\x05"]);
        assert_eq!(tx.offer(&mut c), Offer::Full { taken: 1 });
        assert_eq!(c.len(), 2);
        assert_eq!(tx.offer(&mut c), Offer::Full { taken: 0 });
        let got = rx.take(2).await.unwrap();
        assert_eq!(raw(&got), [b"\x81\x01", b"\x81\x02"]);
        assert_eq!(tx.offer(&mut c), Offer::Taken);
        let got = rx.take(10).await.unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got.decode().collect::<Vec<_>>(),
            [[Value::Int(3)], [Value::Int(4)], [Value::Int(5)]]
        );
    }

    #[tokio::test]
    async fn the_receiver_gets_what_is_left_then_the_end() {
        let (tx, mut rx) = inbox(4, usize::MAX);
        assert_eq!(tx.offer(&mut Chunk::single(b"\x80".to_vec())), Offer::Taken);
        drop(tx);
        assert_eq!(rx.recv_with(<[u8]>::to_vec).await, Some(b"\x80".to_vec()));
        assert!(rx.take(1).await.is_none());
    }

    #[tokio::test]
    async fn a_gone_receiver_takes_nothing_and_frees_the_driver() {
        let (tx, rx) = inbox(1, usize::MAX);
        assert_eq!(tx.offer(&mut Chunk::single(b"\x80".to_vec())), Offer::Taken);
        let room = tx.room(1);
        drop(rx);
        room.await;
        assert!(tx.is_closed());
        let mut c = Chunk::single(b"\x80".to_vec());
        assert_eq!(tx.offer(&mut c), Offer::Closed);
        assert_eq!(c.len(), 1);
    }

    #[tokio::test]
    async fn the_driver_is_woken_once_there_is_room_for_what_it_holds() {
        let (tx, mut rx) = inbox(4, usize::MAX);
        let mut c = chunk(&[&b"\x80"[..]; 4]);
        assert_eq!(tx.offer(&mut c), Offer::Taken);
        let mut room = Box::pin(tx.room(2));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(room.as_mut().poll(&mut cx).is_pending());
        rx.take(1).await.unwrap();
        assert!(room.as_mut().poll(&mut cx).is_pending());
        rx.take(1).await.unwrap();
        assert!(room.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn the_byte_bound_splits_and_an_empty_inbox_takes_one_message_of_any_size() {
        let big = [0x81u8; 1000];
        let small = [0x81u8, 0x01];
        // Room for two big messages' bytes, whatever the count allows.
        let (tx, mut rx) = inbox(100, 2 * cost(&(0..1000)));
        let mut c = chunk(&[&big, &big, &big, &small]);
        assert_eq!(tx.offer(&mut c), Offer::Full { taken: 2 });
        assert_eq!(c.len(), 2);
        // Waiting for room: woken only once half the bytes are free.
        let mut room = Box::pin(tx.room(1));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(room.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            rx.recv_with(<[u8]>::to_vec).await.map(|m| m.len()),
            Some(1000)
        );
        assert!(room.as_mut().poll(&mut cx).is_ready());
        assert_eq!(tx.offer(&mut c), Offer::Full { taken: 1 });
        let got = rx.take(10).await.unwrap();
        assert_eq!(got.len(), 2);
        // Empty now: the small one fits, and a message larger than the whole bound is
        // taken alone into an empty inbox.
        assert_eq!(tx.offer(&mut c), Offer::Taken);
        rx.take(10).await.unwrap();
        let huge = vec![0x81u8; 5000];
        let mut c = chunk(&[&huge, &small]);
        assert_eq!(tx.offer(&mut c), Offer::Full { taken: 1 });
        assert_eq!(rx.take(10).await.unwrap().len(), 1);
        assert_eq!(tx.offer(&mut c), Offer::Taken);
    }
}
