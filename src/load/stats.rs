//! Latency percentiles and the generator's report.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// What one run of the generator measured. Latencies are from the first transmission of a
/// request to its final response, in microseconds, over the successful (2.xx) requests.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub proxy: Option<String>,
    pub oscore: bool,
    pub confirmable: bool,
    pub method: String,
    pub window: usize,
    /// Requests asked for (`--count`).
    pub requested: u64,
    /// Requests that got a final answer or timed out (`ok + errors + timeouts`).
    pub completed: u64,
    /// Answered with a 2.xx code (after OSCORE verification, if OSCORE).
    pub ok: u64,
    /// Answered with another code, a Reset, or a response that failed verification.
    pub errors: u64,
    /// No response within the retransmissions / `--timeout`.
    pub timeouts: u64,
    /// Still outstanding or never sent when `--duration-limit` ended the run.
    pub unfinished: u64,
    /// Retransmissions sent (CON only).
    pub retransmissions: u64,
    /// Requests re-sent once with the server's Echo (RFC 8613 App. B.1.2).
    pub echo_retries: u64,
    /// Response codes other than 2.xx, e.g. {"4.04": 3}; "reset" and "oscore" for the rest.
    pub error_codes: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub latency_us: Percentiles,
    /// CPU time (user + system) the generator itself used, seconds.
    pub cpu_s: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentiles of `samples` (nanoseconds; sorted in place), in microseconds.
pub fn percentiles(samples: &mut [u64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |q: f64| {
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        samples[rank - 1] as f64 / 1000.0
    };
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    Percentiles {
        min: samples[0] as f64 / 1000.0,
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: samples[n - 1] as f64 / 1000.0,
        mean: (sum as f64 / n as f64) / 1000.0,
    }
}

/// User + system CPU time of this process.
pub fn process_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the pointer it is given.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if r != 0 {
        return Duration::ZERO;
    }
    // SAFETY: initialised by the successful call above.
    let u = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

impl Report {
    pub fn to_json(&self) -> String {
        // A struct of numbers and strings always serialises.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let l = &self.latency_us;
        let mut s = format!(
            "{} {} {}{} window={} via {}\n",
            self.method,
            self.target,
            if self.confirmable { "CON" } else { "NON" },
            if self.oscore { " OSCORE" } else { "" },
            self.window,
            self.proxy.as_deref().unwrap_or("(direct)"),
        );
        s += &format!(
            "requests: {} ok, {} errors, {} timeouts, {} unfinished of {} ({} retransmissions, {} Echo retries)\n",
            self.ok, self.errors, self.timeouts, self.unfinished, self.requested,
            self.retransmissions, self.echo_retries
        );
        s += &format!(
            "throughput: {:.0} requests/s over {:.3} s (generator CPU {:.3} s)\n",
            self.requests_per_s, self.elapsed_s, self.cpu_s
        );
        s += &format!(
            "latency us: min {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} mean {:.1}\n",
            l.min, l.p50, l.p99, l.p999, l.max, l.mean
        );
        if !self.error_codes.is_empty() {
            s += &format!("error codes: {:?}\n", self.error_codes);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=1000).rev().map(|x| x * 1000).collect();
        let p = percentiles(&mut v);
        assert_eq!(p.min, 1.0);
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.p999, 999.0);
        assert_eq!(p.max, 1000.0);
        assert_eq!(p.mean, 500.5);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(percentiles(&mut []).p99, 0.0);
    }
}
