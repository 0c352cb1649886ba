//! RAID-6 arithmetic: the P and Q syndromes of a stripe and the recovery of up
//! to two of its chunks, over GF(2^8) with the polynomial `x^8+x^4+x^3+x^2+1`
//! (0x11d) and generator `g = 2`, as Linux md's RAID-6 (H. Peter Anvin, "The
//! mathematics of RAID-6").
//!
//! For data chunks `D_0 .. D_{n-1}` of a stripe, byte by byte:
//!
//! - `P = D_0 ^ D_1 ^ ... ^ D_{n-1}` (RAID-5's parity), and
//! - `Q = g^0·D_0 ^ g^1·D_1 ^ ... ^ g^{n-1}·D_{n-1}` (products in GF(2^8)).
//!
//! Any two of the `n + 2` chunks can be computed from the others
//! ([`recover`]). Q is computed by Horner's rule, `Q = (..(D_{n-1}·g ^
//! D_{n-2})·g ^ ..)·g ^ D_0`, where multiplying by `g` is a shift and a
//! conditional XOR, written without a branch so that 64 bytes at a time
//! vectorise.
//! Recovering data from Q multiplies by other constants, through a 256-byte
//! table per constant: that is only done for failed or corrupt chunks.

use crate::raid::xor_into;

/// The field's reducing polynomial, without its `x^8` term.
const POLY: u8 = 0x1d;

/// `EXP[i] = g^i` for `i` in `0..255`, twice over so that sums of two logs
/// need no reduction.
const EXP: [u8; 510] = {
    let mut table = [0u8; 510];
    let mut value: u8 = 1;
    let mut i = 0;
    while i < 255 {
        table[i] = value;
        table[i + 255] = value;
        value = mul2(value);
        i += 1;
    }
    table
};

/// `LOG[v]` = `i` with `g^i = v`, for `v != 0` (`LOG[0]` is unused).
const LOG: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 255 {
        table[EXP[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// `v · g`.
const fn mul2(v: u8) -> u8 {
    let carry = v & 0x80 != 0;
    let shifted = v << 1;
    if carry {
        shifted ^ POLY
    } else {
        shifted
    }
}

/// `a · b` in GF(2^8).
pub fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        0
    } else {
        EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
    }
}

/// `1 / a` in GF(2^8); `a` must not be zero.
pub fn inverse(a: u8) -> u8 {
    assert_ne!(a, 0, "zero has no inverse");
    EXP[255 - LOG[a as usize] as usize]
}

/// `g^i`.
pub fn gen_pow(i: usize) -> u8 {
    EXP[i % 255]
}

/// `dst ^= c · src`, bytewise.
fn mul_xor(dst: &mut [u8], c: u8, src: &[u8]) {
    let table: [u8; 256] = std::array::from_fn(|v| mul(c, v as u8));
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= table[*s as usize];
    }
}

/// Computes P and Q of the data chunks `data` (in stripe order, equal lengths)
/// into `p` and `q`.
pub fn syndromes(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
    p.fill(0);
    for d in data {
        xor_into(p, d);
    }
    q_syndrome(data, q);
}

/// Bytes [`q_syndrome`] keeps in registers at once.
const LANE: usize = 64;

/// `v · g`, without a branch, so that a loop of it vectorises.
fn mul2_branchless(v: u8) -> u8 {
    let top = ((v as i8) >> 7) as u8; // 0xff when the top bit is set
    (v << 1) ^ (top & POLY)
}

/// Computes Q alone of the data chunks `data` (equal lengths) into `q`: 64
/// bytes at a time through every chunk (Horner's rule), the running value
/// kept in registers.
pub fn q_syndrome(data: &[&[u8]], q: &mut [u8]) {
    let len = q.len();
    assert!(
        data.iter().all(|d| d.len() == len),
        "chunks of unequal lengths"
    );
    let whole = len - len % LANE;
    for start in (0..whole).step_by(LANE) {
        let mut acc = [0u8; LANE];
        for d in data.iter().rev() {
            let d: &[u8; LANE] = d[start..start + LANE].try_into().expect("a lane");
            for (a, b) in acc.iter_mut().zip(d) {
                *a = mul2_branchless(*a) ^ b;
            }
        }
        q[start..start + LANE].copy_from_slice(&acc);
    }
    let tail = &mut q[whole..];
    tail.fill(0);
    for d in data.iter().rev() {
        for (a, b) in tail.iter_mut().zip(&d[whole..]) {
            *a = mul2_branchless(*a) ^ b;
        }
    }
}

/// A chunk of a RAID-6 stripe by its role: data chunk `k`, P or Q.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Data chunk `k` of the stripe.
    Data(usize),
    /// The XOR parity.
    P,
    /// The Reed-Solomon syndrome.
    Q,
}

/// A stripe's chunks (equal lengths) by role: `data[k]`, `p`, `q`.
#[derive(Debug)]
pub struct Stripe<'a> {
    /// Data chunks in stripe order.
    pub data: Vec<&'a mut [u8]>,
    /// P.
    pub p: &'a mut [u8],
    /// Q.
    pub q: &'a mut [u8],
}

impl Stripe<'_> {
    /// Q of the data, the chunks in `skip` taken as zeros.
    fn q_of_data(&self, skip: &[usize]) -> Vec<u8> {
        let zeros = vec![0u8; self.p.len()];
        let data: Vec<&[u8]> = (0..self.data.len())
            .map(|k| match skip.contains(&k) {
                true => &zeros[..],
                false => &self.data[k][..],
            })
            .collect();
        let mut q = vec![0u8; self.p.len()];
        q_syndrome(&data, &mut q);
        q
    }

    fn p_of_data(&self, skip: &[usize]) -> Vec<u8> {
        let mut p = vec![0u8; self.p.len()];
        for (k, d) in self.data.iter().enumerate() {
            if !skip.contains(&k) {
                xor_into(&mut p, d);
            }
        }
        p
    }

    /// Data chunk `x` from P and the other data.
    fn data_from_p(&mut self, x: usize) {
        let mut p = self.p_of_data(&[x]);
        xor_into(&mut p, self.p);
        self.data[x].copy_from_slice(&p);
    }

    /// Data chunk `x` from Q and the other data: `D_x = (Q ^ Q_x) · g^-x`,
    /// `Q_x` being Q with `D_x` taken as zero.
    fn data_from_q(&mut self, x: usize) {
        let mut qx = self.q_of_data(&[x]);
        xor_into(&mut qx, self.q);
        self.data[x].fill(0);
        mul_xor(self.data[x], inverse(gen_pow(x)), &qx);
    }

    /// Data chunks `x < y` from P, Q and the other data:
    /// `D_x = A·(P ^ P_xy) ^ B·(Q ^ Q_xy)`, `D_y = (P ^ P_xy) ^ D_x`, with
    /// `A = g^(y-x) / (g^(y-x) ^ 1)` and `B = g^-x / (g^(y-x) ^ 1)`.
    fn two_data(&mut self, x: usize, y: usize) {
        let mut pxy = self.p_of_data(&[x, y]);
        xor_into(&mut pxy, self.p);
        let mut qxy = self.q_of_data(&[x, y]);
        xor_into(&mut qxy, self.q);
        let gyx = gen_pow(y - x);
        let denominator = inverse(gyx ^ 1);
        let a = mul(gyx, denominator);
        let b = mul(inverse(gen_pow(x)), denominator);
        let mut dx = vec![0u8; pxy.len()];
        mul_xor(&mut dx, a, &pxy);
        mul_xor(&mut dx, b, &qxy);
        xor_into(&mut pxy, &dx);
        self.data[x].copy_from_slice(&dx);
        self.data[y].copy_from_slice(&pxy);
    }

    fn recompute_p(&mut self) {
        let p = self.p_of_data(&[]);
        self.p.copy_from_slice(&p);
    }

    fn recompute_q(&mut self) {
        let q = self.q_of_data(&[]);
        self.q.copy_from_slice(&q);
    }
}

/// Fills in the chunks of `stripe` named in `missing` (at most two, no
/// repeats) from the others. Returns false, changing nothing, for more than
/// two.
pub fn recover(stripe: &mut Stripe<'_>, missing: &[Role]) -> bool {
    let mut missing = missing.to_vec();
    missing.sort_unstable();
    missing.dedup();
    match *missing.as_slice() {
        [] => {}
        [Role::P] => stripe.recompute_p(),
        [Role::Q] => stripe.recompute_q(),
        [Role::P, Role::Q] => {
            stripe.recompute_p();
            stripe.recompute_q();
        }
        [Role::Data(x)] | [Role::Data(x), Role::Q] => {
            stripe.data_from_p(x);
            if missing.contains(&Role::Q) {
                stripe.recompute_q();
            }
        }
        [Role::Data(x), Role::P] => {
            stripe.data_from_q(x);
            stripe.recompute_p();
        }
        [Role::Data(x), Role::Data(y)] => stripe.two_data(x, y),
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Multiplication the slow way: shift and add, reducing as it goes.
    fn mul_by_bits(mut a: u8, mut b: u8) -> u8 {
        let mut product = 0;
        while b != 0 {
            if b & 1 != 0 {
                product ^= a;
            }
            a = mul2(a);
            b >>= 1;
        }
        product
    }

    #[test]
    fn the_tables_multiply_like_shift_and_add() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), mul_by_bits(a, b), "{a} x {b}");
            }
            if a != 0 {
                assert_eq!(mul(a, inverse(a)), 1, "{a} x 1/{a}");
            }
        }
        // g generates the whole multiplicative group.
        let mut seen = [false; 256];
        (0..255).for_each(|i| seen[gen_pow(i) as usize] = true);
        assert_eq!(seen.iter().filter(|&&s| s).count(), 255);
    }

    #[test]
    fn the_branch_free_doubling_matches_the_table() {
        for v in 0..=255u8 {
            assert_eq!(mul2_branchless(v), mul2(v), "{v:#04x}");
            assert_eq!(mul2(v), mul(v, 2), "{v:#04x}");
        }
    }

    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn q_is_the_sum_of_g_powers_times_data() {
        // Three 64-byte lanes and a tail.
        let data: Vec<Vec<u8>> = (0..5).map(|k| pseudo_random(k + 11, 200)).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let (mut p, mut q) = (vec![0u8; 200], vec![0u8; 200]);
        syndromes(&refs, &mut p, &mut q);
        for i in 0..200 {
            let want_p = data.iter().fold(0, |acc, d| acc ^ d[i]);
            let want_q = data
                .iter()
                .enumerate()
                .fold(0, |acc, (k, d)| acc ^ mul(gen_pow(k), d[i]));
            assert_eq!((p[i], q[i]), (want_p, want_q), "byte {i}");
        }
    }

    #[test]
    fn any_one_or_two_chunks_are_recovered() {
        for n in 2..7usize {
            let len = 64 + 3; // not a multiple of 8: the byte-wise tails too
            let data: Vec<Vec<u8>> = (0..n)
                .map(|k| pseudo_random(k as u64 * 7 + n as u64, len))
                .collect();
            let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            let (mut p, mut q) = (vec![0u8; len], vec![0u8; len]);
            syndromes(&refs, &mut p, &mut q);
            let roles: Vec<Role> = (0..n).map(Role::Data).chain([Role::P, Role::Q]).collect();
            for (i, &a) in roles.iter().enumerate() {
                for &b in &roles[i..] {
                    let missing: Vec<Role> = if a == b { vec![a] } else { vec![a, b] };
                    let mut chunks: Vec<Vec<u8>> = data.clone();
                    let (mut p2, mut q2) = (p.clone(), q.clone());
                    for role in &missing {
                        match role {
                            Role::Data(k) => chunks[*k].fill(0xEE),
                            Role::P => p2.fill(0xEE),
                            Role::Q => q2.fill(0xEE),
                        }
                    }
                    let mut stripe = Stripe {
                        data: chunks.iter_mut().map(|c| c.as_mut_slice()).collect(),
                        p: &mut p2,
                        q: &mut q2,
                    };
                    assert!(recover(&mut stripe, &missing));
                    assert_eq!(chunks, data, "n={n}, missing {missing:?}: data");
                    assert_eq!((&p2, &q2), (&p, &q), "n={n}, missing {missing:?}: P, Q");
                }
            }
            let mut chunks = data.clone();
            let (mut p2, mut q2) = (p.clone(), q.clone());
            let mut stripe = Stripe {
                data: chunks.iter_mut().map(|c| c.as_mut_slice()).collect(),
                p: &mut p2,
                q: &mut q2,
            };
            assert!(
                !recover(&mut stripe, &[Role::Data(0), Role::P, Role::Q]),
                "three"
            );
        }
    }
}
