//! Test-only crash points: with the `failpoints` feature, `IKO_FAILPOINT=<name>` aborts the
//! process at that step, so tests can prove recovery from a crash at every step. Release
//! builds compile the calls away.

/// Abort here when `IKO_FAILPOINT` names this point (only with the `failpoints` feature).
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if std::env::var("IKO_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
