//! Resource limits `vial` sets for itself at start. It never lowers a limit and never touches
//! another process's.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) to the hard limit, and returns
/// the soft limit before and after. Every relayed management connection costs vial two
/// descriptors, and QEMU (which inherits the limit) one more; Docker's usual soft limit of
/// 1024 would otherwise run out first. An unprivileged process may raise its soft limit up to
/// the hard one (setrlimit(2)); nothing here needs privilege.
pub fn raise_fd_limit() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, soft.max(hard)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (_, after) = raise_fd_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((after, soft), (hard, hard));
    }
}
