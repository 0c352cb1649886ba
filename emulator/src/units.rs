//! Parsing of human sizes such as `1GiB` or `256MiB` for the command line.

/// Parses a size: a whole number of bytes, optionally followed by a binary unit
/// (`K`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB`; case-insensitive; `B` alone
/// means bytes). Decimal units (`GB`) are refused rather than guessed at.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a size (expected e.g. 1GiB, 256MiB or 4096)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{digits:?} is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            return Err(format!(
                "{unit:?} is ambiguous: use binary units such as KiB, MiB, GiB"
            ))
        }
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("1GB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
