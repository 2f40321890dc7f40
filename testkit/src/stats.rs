//! Figures of a benchmark: the median of its rounds, and elapsed times in the units its tables
//! print. Benchmarks compare medians as ratios within one run (DEVELOPERS.md); this module
//! never judges a figure.

use std::time::Instant;

/// The median of `values` (the upper one of an even count). Panics when `values` is empty: a
/// benchmark without rounds has nothing to report.
pub fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "the median of no rounds");
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The median of `value` over `rounds`: `median_by(&rounds, |r| r.ready)`.
pub fn median_by<T>(rounds: &[T], value: impl Fn(&T) -> f64) -> f64 {
    median(rounds.iter().map(value).collect())
}

/// Milliseconds since `start`.
pub fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Seconds since `start`.
pub fn secs_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_table() {
        assert_eq!(median(vec![3.0]), 3.0);
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
        // An even count takes the upper middle value, as the benches always have.
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(vec![f64::NAN, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn median_by_reads_one_field_of_each_round() {
        let rounds = [(1.0, 30.0), (2.0, 10.0), (3.0, 20.0)];
        assert_eq!(median_by(&rounds, |r| r.1), 20.0);
        let refs: Vec<&(f64, f64)> = rounds.iter().collect();
        assert_eq!(median_by(&refs, |r| r.0), 2.0);
    }

    #[test]
    #[should_panic(expected = "no rounds")]
    fn median_of_nothing_panics() {
        median(Vec::new());
    }
}
