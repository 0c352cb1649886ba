//! What a workload write puts in a block: a pure function of (seed, write
//! sequence number, block index within the volume), so `verify` can regenerate
//! any write's bytes from the record alone.
//!
//! A block starts with a 16-byte stamp, the write's sequence number and the
//! block index as big-endian u64s (readable in a hexdump); the rest is a
//! splitmix64 stream seeded from the three numbers. Sequence numbers start at
//! 1, so a zeroed block never looks like one of ours.

/// Bytes of the stamp at the start of every written block.
pub const STAMP_BYTES: usize = 16;

/// One step of splitmix64 (Steele, Lea, Flood): advances `state`, returns the
/// next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix64(*state)
}

/// splitmix64's output function: a bijective 64-bit mix.
pub fn mix64(value: u64) -> u64 {
    let mut z = value;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (one block, a multiple of 8 bytes and at least 16) with the
/// content write `seq` gives block `block` in a run seeded with `seed`.
pub fn fill_block(seed: u64, seq: u64, block: u64, out: &mut [u8]) {
    debug_assert!(out.len() >= STAMP_BYTES && out.len().is_multiple_of(8));
    let mut state = mix64(seed ^ mix64(seq ^ mix64(block ^ 0x5752_4954_454f_5243)));
    for word in out.chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out[0..8].copy_from_slice(&seq.to_be_bytes());
    out[8..16].copy_from_slice(&block.to_be_bytes());
}

/// The content of one block, allocated.
pub fn block_content(seed: u64, seq: u64, block: u64, block_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; block_size];
    fill_block(seed, seq, block, &mut out);
    out
}

/// The (seq, block) stamp at the start of `bytes`, if it could be ours (seq
/// not 0).
pub fn stamp(bytes: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
    let block = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    (seq != 0).then_some((seq, block))
}

/// A PRNG for the workload's choices (splitmix64; seeded, so a run's sequence
/// of offsets and lengths is reproducible from its seed and the timing of
/// completions).
#[derive(Debug, Clone)]
pub struct Prng {
    state: u64,
}

impl Prng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: mix64(seed ^ 0x504e_5247_5345_4544),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.state)
    }

    /// A number in `0..bound` (`bound` > 0; the modulo bias is negligible for
    /// the small bounds used here).
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        self.next_u64() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_stamped() {
        let a = block_content(42, 7, 1000, 4096);
        let b = block_content(42, 7, 1000, 4096);
        assert_eq!(a, b);
        assert_eq!(stamp(&a), Some((7, 1000)));
        assert_eq!(&a[0..8], &[0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn content_depends_on_every_input() {
        let base = block_content(42, 7, 1000, 4096);
        assert_ne!(base[16..], block_content(43, 7, 1000, 4096)[16..]);
        assert_ne!(base[16..], block_content(42, 8, 1000, 4096)[16..]);
        assert_ne!(base[16..], block_content(42, 7, 1001, 4096)[16..]);
    }

    #[test]
    fn known_value_does_not_drift() {
        // Records written by an older build must still verify: pin the output.
        let block = block_content(1, 1, 0, 32);
        assert_eq!(
            &block[0..16],
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let words: Vec<u64> = block[16..32]
            .chunks_exact(8)
            .map(|word| u64::from_le_bytes(word.try_into().unwrap_or_default()))
            .collect();
        // Computed independently (a few lines of Python of splitmix64).
        assert_eq!(words, [0xecbb_d63c_d285_1921, 0x66c8_019e_d5a1_7135]);
    }

    #[test]
    fn zero_block_has_no_stamp() {
        assert_eq!(stamp(&[0u8; 4096]), None);
        assert_eq!(stamp(&[1u8; 8]), None);
    }

    #[test]
    fn prng_is_seeded() {
        let mut a = Prng::new(5);
        let mut b = Prng::new(5);
        let mut c = Prng::new(6);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }
}
