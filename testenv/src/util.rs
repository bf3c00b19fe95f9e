//! Small helpers: free ports, unique names, a minimal HTTP probe.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// A port on 127.0.0.1 that was free a moment ago and that this process has not handed out
/// before (two environments starting at once in one process never get the same port; another
/// process may still take it, which a start detects and retries).
pub(crate) fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| Error::io("cannot bind a free port on 127.0.0.1", e))?;
        let port = listener.local_addr().map_err(|e| Error::io("cannot read a bound port", e))?.port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.insert(port) {
            return Ok(port);
        }
    }
    Err(Error::new(ErrorKind::Io, "no free port found on 127.0.0.1"))
}

/// Six random base-36 characters, different on every call.
pub(crate) fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut x = RandomState::new().hash_one((n, std::process::id()));
    let mut out = String::with_capacity(6);
    for _ in 0..6 {
        let d = (x % 36) as u32;
        x /= 36;
        out.push(char::from_digit(d, 36).unwrap_or('x'));
    }
    out
}

/// `prefix-xxxxxx`, a valid DNS-1123 label (namespace name): lowercase alphanumerics and '-',
/// starting and ending with an alphanumeric, at most 63 characters.
pub(crate) fn unique_dns_label(prefix: &str) -> String {
    let mut p: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .collect();
    p.truncate(63 - 7);
    let p = p.trim_matches('-');
    let p = if p.is_empty() { "test" } else { p };
    format!("{p}-{}", random_suffix())
}

/// `prefix-xxxxxx`, a valid IAM user name (`[\w+=,.@-]{1,64}`).
pub(crate) fn unique_iam_name(prefix: &str) -> String {
    let mut p: String =
        prefix.chars().map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' }).collect();
    p.truncate(64 - 7);
    let p = if p.is_empty() { "test" } else { p.as_str() };
    format!("{p}-{}", random_suffix())
}

/// GET `path` over plain HTTP/1.0; the status code and the body.
pub(crate) fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_are_valid() {
        for prefix in ["", "My_Test", "-a-", &"x".repeat(100), "ns.with.dots"] {
            let name = unique_dns_label(prefix);
            assert!(name.len() <= 63, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        }
        assert_ne!(unique_dns_label("a"), unique_dns_label("a"));
    }

    #[test]
    fn iam_names_are_valid() {
        for prefix in ["", "user/with/slash", &"y".repeat(100), "a+b=c,d.e@f_g-h"] {
            let name = unique_iam_name(prefix);
            assert!(!name.is_empty() && name.len() <= 64, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)), "{name}");
        }
    }

    #[test]
    fn ports_are_not_repeated() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
    }
}
