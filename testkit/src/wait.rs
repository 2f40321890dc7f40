//! Polling with a timeout, the one way tests wait (DEVELOPERS.md: never sleep as a way to
//! wait). A condition answers `bool` or `Option<T>`; `wait_until` returns the `T` (or `()`),
//! and panics naming what it waited for once the timeout has passed. This module never
//! decides how long a test may wait: the caller does.

use std::time::{Duration, Instant};

/// How often the blocking `wait_until` asks: a process or a guest, not a busy loop.
const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// How often `wait_until_async` asks: in-process conditions that change within milliseconds.
const ASYNC_INTERVAL: Duration = Duration::from_millis(10);

/// What a polled condition answers: `true`/`Some(value)` when met.
pub trait Condition {
    /// What a met condition yields.
    type Value;
    /// The value when the condition holds.
    fn met(self) -> Option<Self::Value>;
}

impl Condition for bool {
    type Value = ();
    fn met(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Condition for Option<T> {
    type Value = T;
    fn met(self) -> Option<T> {
        self
    }
}

/// Asks `condition` every 100 ms until it holds and returns its value; panics, naming `what`,
/// once `timeout` has passed.
pub fn wait_until<C: Condition>(timeout: Duration, what: &str, mut condition: impl FnMut() -> C) -> C::Value {
    let start = Instant::now();
    loop {
        if let Some(value) = condition().met() {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(SYNC_INTERVAL);
    }
}

/// [`wait_until`] for async tests: asks every 10 ms without blocking the runtime, on tokio's
/// clock (so a paused clock advances instead of hanging the test).
pub async fn wait_until_async<C: Condition>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> C,
) -> C::Value {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = condition().met() {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(ASYNC_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut asked = 0;
        let value = wait_until(Duration::from_secs(5), "the third ask", || {
            asked += 1;
            (asked == 3).then_some(asked)
        });
        assert_eq!(value, 3);
        wait_until(Duration::from_secs(5), "true", || true);
    }

    #[test]
    #[should_panic(expected = "waiting for nothing at all")]
    fn panics_naming_what_it_waited_for() {
        wait_until(Duration::from_millis(150), "nothing at all", || false);
    }

    #[test]
    fn the_async_one_polls_without_blocking_the_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let setter = flag.clone();
            // On a current-thread runtime this task only runs while wait_until_async sleeps.
            tokio::spawn(async move { setter.store(true, std::sync::atomic::Ordering::SeqCst) });
            wait_until_async(Duration::from_secs(5), "the task to run", || {
                flag.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await;
            let value = wait_until_async(Duration::from_secs(5), "a value", || Some(7)).await;
            assert_eq!(value, 7);
        });
    }

    #[test]
    #[should_panic(expected = "timed out after")]
    fn the_async_one_times_out_too() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(wait_until_async(Duration::from_millis(50), "never", || None::<()>));
    }
}
