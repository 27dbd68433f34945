//! The open-file limit (RLIMIT_NOFILE). Every open security context holds its `lock` file
//! open (see `lock`), and every Observe relation its own UDP socket, so a gateway with
//! 10 000 contexts needs more descriptors than the usual soft limit of 1024. The soft limit
//! may be raised up to the hard limit without privileges (setrlimit(2)); `raise_to_hard`
//! does that once at start-up, and a lock file that still cannot be opened for lack of
//! descriptors fails with `LockError::TooManyOpenFiles`, which names the limit.
//!
//! Hand-written over `libc` (two calls) rather than a crate: `rlimit` would add a dependency
//! for exactly these two calls.

/// The soft and hard RLIMIT_NOFILE of this process.
pub fn nofile_limits() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub fn raise_to_hard() -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            r.rlim_cur = r.rlim_max;
        }
    }
    Ok(r.rlim_cur)
}

/// Whether `e` is "too many open files" (EMFILE for the process, ENFILE for the system).
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_the_hard_limit() {
        let (_, hard) = nofile_limits().unwrap();
        let soft = raise_to_hard().unwrap();
        assert_eq!(soft, hard);
        assert_eq!(nofile_limits().unwrap(), (hard, hard));
    }

    #[test]
    fn recognises_emfile() {
        assert!(is_out_of_descriptors(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_out_of_descriptors(&std::io::Error::from_raw_os_error(
            libc::ENOENT
        )));
    }
}
