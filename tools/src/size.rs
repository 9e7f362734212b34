//! Sizes on the command line, parsed by clap (`value_parser`), so that a bad
//! one exits 2 with clap's message: `4096`, `64K`, `256KiB`, `10G`.

/// Any byte count.
pub use cairn_engine::size::parse_size as bytes;

/// A power of two from `min` to `max` bytes.
fn power_of_two(text: &str, min: u64, max: u64, what: &str) -> Result<u64, String> {
    let n = bytes(text)?;
    if !n.is_power_of_two() || !(min..=max).contains(&n) {
        return Err(format!(
            "{what} is a power of two from {} to {}, not {n}",
            indicatif::HumanBytes(min),
            indicatif::HumanBytes(max)
        ));
    }
    Ok(n)
}

/// A chunk size: a power of two from 4K to 16M.
pub fn chunk_size(text: &str) -> Result<u32, String> {
    // At most 16 MiB: fits.
    power_of_two(text, 4 << 10, 16 << 20, "a chunk size").map(|n| n as u32)
}

/// A guest page size: a power of two from 4K to 1G.
pub fn page_size(text: &str) -> Result<u64, String> {
    power_of_two(text, 4 << 10, 1 << 30, "a page size")
}

/// What one page fault resolves: a power of two from 4K to 16M.
pub fn fault_size(text: &str) -> Result<u64, String> {
    power_of_two(text, 4 << 10, 16 << 20, "a fault size")
}

/// A share from 0 to 1.
pub fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a share from 0 to 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(
            chunk_size(crate::cli::DEFAULT_CHUNK_SIZE_ARG).unwrap(),
            cairn_engine::import::DEFAULT_CHUNK_SIZE
        );
        assert_eq!(bytes("10G").unwrap(), 10 << 30);
        assert!(bytes("5Q").is_err());
        assert!(chunk_size("3K").unwrap_err().contains("power of two"));
        assert!(chunk_size("32M").is_err());
        assert_eq!(page_size("2M").unwrap(), 2 << 20);
        assert!(fault_size("0").is_err());
    }
}
