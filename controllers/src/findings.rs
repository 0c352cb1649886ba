//! What a rebuild or scrub finds: one type, [`Findings`], for a range of work,
//! a partition (saved beside the coordination object, so that a controller that
//! resumes a partition starts from what was found before), and a whole task's
//! report. The coordination object itself holds only the counts
//! ([`crate::coordination::FindingCounts`]), which fit its fixed slots.

use serde::{Deserialize, Serialize};

use crate::coordination::FindingCounts;

/// What work on some range found. (Fields missing from a saved file read as
/// zero or empty.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Findings {
    /// Block rows checked (a rebuild: blocks rebuilt).
    pub rows_checked: u64,
    /// Member blocks whose CRC did not match (scrub).
    pub checksum_errors: u64,
    /// Rows whose parity or mirror copies disagree (scrub).
    pub parity_mismatches: u64,
    /// Blocks rewritten from redundancy (scrub with repair).
    pub repaired: u64,
    /// Array byte offsets of data that could not be recovered.
    pub unrecoverable: Vec<u64>,
}

impl Findings {
    /// `self` followed by what a later range found.
    pub fn plus(&self, later: &Findings) -> Findings {
        let mut sum = self.clone();
        sum.add(later);
        sum
    }

    /// Adds what another range found.
    pub fn add(&mut self, other: &Findings) {
        self.rows_checked += other.rows_checked;
        self.checksum_errors += other.checksum_errors;
        self.parity_mismatches += other.parity_mismatches;
        self.repaired += other.repaired;
        self.unrecoverable.extend_from_slice(&other.unrecoverable);
    }

    /// The counts the coordination object keeps of a partition's findings.
    pub fn counts(&self) -> FindingCounts {
        FindingCounts {
            checked: self.rows_checked,
            errors: self.checksum_errors,
            repaired: self.repaired,
            unrecoverable: self.unrecoverable.len() as u64,
        }
    }

    /// Whether nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.checksum_errors == 0 && self.parity_mismatches == 0 && self.unrecoverable.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_add_up_and_count() {
        let a = Findings {
            rows_checked: 10,
            checksum_errors: 1,
            parity_mismatches: 2,
            repaired: 1,
            unrecoverable: vec![4096],
        };
        let b = Findings {
            rows_checked: 5,
            unrecoverable: vec![8192, 12288],
            ..Findings::default()
        };
        let sum = a.plus(&b);
        assert_eq!(sum.rows_checked, 15);
        assert_eq!(sum.unrecoverable, vec![4096, 8192, 12288]);
        assert_eq!(
            sum.counts(),
            FindingCounts {
                checked: 15,
                errors: 1,
                repaired: 1,
                unrecoverable: 3
            }
        );
        assert!(!sum.is_clean());
        assert!(Findings::default().is_clean());
    }
}
