//! How the buffers the engine keeps for a peer grow and shrink. Growth follows one rule,
//! so the memory an input will take can be known before it is buffered (the budgets
//! check it first); spare room is given back after use, so one big message does not
//! pin its memory for the rest of the connection.

/// Capacity a buffer may keep after use; spare room beyond it is given back.
pub(crate) const KEEP: usize = 64 << 10;

/// The capacity a buffer of `len` bytes in `capacity` has after [`append`] of `extra`
/// bytes: unchanged if they fit,
/// otherwise doubled (for amortised growth) but never doubled past `ceiling` (the
/// largest size a buffer legitimately reaches), and at least what is needed.
pub(crate) fn capacity_after(len: usize, capacity: usize, extra: usize, ceiling: usize) -> usize {
    let needed = len.saturating_add(extra);
    if needed <= capacity {
        capacity
    } else {
        needed.max(capacity.saturating_mul(2).min(ceiling))
    }
}

/// Appends `data` to `buf`, growing it as [`capacity_after`] says.
pub(crate) fn append(buf: &mut Vec<u8>, data: &[u8], ceiling: usize) {
    let target = capacity_after(buf.len(), buf.capacity(), data.len(), ceiling);
    buf.reserve_exact(target - buf.len());
    buf.extend_from_slice(data);
}

/// Gives back spare room once `buf` holds much less than it can: above [`KEEP`], the
/// capacity goes down to what it holds (at least `KEEP`, so steady traffic does not
/// reallocate on every message). Shrinking only below half full keeps it amortised.
pub(crate) fn release(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP && buf.capacity() / 2 > buf.len() {
        buf.shrink_to(buf.len().max(KEEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_predicted_and_bounded() {
        let mut buf = Vec::new();
        append(&mut buf, &[1; 100], 1000);
        assert_eq!(buf.capacity(), 100);
        assert_eq!(capacity_after(buf.len(), buf.capacity(), 1, 1000), 200);
        append(&mut buf, &[1], 1000);
        assert_eq!(buf.capacity(), 200);
        // Doubling stops at the ceiling; what is needed is always there.
        assert_eq!(capacity_after(101, 600, 600, 1000), 1000);
        assert_eq!(capacity_after(101, 600, 2000, 1000), 2101);
    }

    #[test]
    fn spare_room_is_given_back() {
        let mut buf = vec![0u8; 4 * KEEP];
        buf.truncate(10);
        release(&mut buf);
        assert!(buf.capacity() <= 2 * KEEP, "{}", buf.capacity());
        // Small buffers and full ones are left alone.
        let mut small = Vec::with_capacity(KEEP);
        small.push(1u8);
        release(&mut small);
        assert_eq!(small.capacity(), KEEP);
    }
}
