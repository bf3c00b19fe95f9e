//! Reading Prometheus text (the operator's, the API server's, etcd's) and a minimal HTTP GET
//! for plain-HTTP endpoints on loopback.

use std::{collections::BTreeMap, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample: metric name, labels, value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(i) if !line[..i].contains(' ') => (&line[..i], &line[i..]),
        _ => {
            let (n, v) = line.split_once(' ')?;
            return Some(Sample { name: n.into(), labels: BTreeMap::new(), value: parse_value(v)? });
        }
    };
    let mut labels = BTreeMap::new();
    let bytes = rest.as_bytes();
    let mut i = 1;
    loop {
        while i < bytes.len() && (bytes[i] == b',' || bytes[i] == b' ') {
            i += 1;
        }
        if i >= bytes.len() {
            return None;
        }
        if bytes[i] == b'}' {
            i += 1;
            break;
        }
        let eq = i + rest[i..].find('=')?;
        let key = rest[i..eq].to_string();
        i = eq + 2; // past ="
        let mut value = String::new();
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' && i + 1 < bytes.len() {
                i += 1;
            }
            value.push(bytes[i] as char);
            i += 1;
        }
        i += 1; // closing quote
        labels.insert(key, value);
    }
    Some(Sample { name: name.into(), labels, value: parse_value(rest[i..].trim())? })
}

fn parse_value(v: &str) -> Option<f64> {
    // A timestamp may follow the value.
    v.split_whitespace().next()?.parse().ok()
}

/// Sum of the samples named `name` that pass `keep`.
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    samples.iter().filter(|s| s.name == name && keep(s)).map(|s| s.value).sum()
}

/// Per label value sums of the samples named `name`, keyed by `key(sample)`.
pub fn by(samples: &[Sample], name: &str, key: impl Fn(&Sample) -> Option<String>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some(k) = key(s) {
            *out.entry(k).or_insert(0.0) += s.value;
        }
    }
    out
}

/// `after - before`, key by key (keys only in `after` count from zero); zero entries dropped.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| v.abs() > 1e-9)
        .collect()
}

/// `GET http://addr/path` with HTTP/1.0 (so the body is never chunked); status and body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, body.to_string()))
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("GET {addr}{path} timed out"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_plain_samples() {
        let s = parse(
            "# HELP x\niam_key_operator_iam_calls_total{operation=\"ListAccessKeys\",outcome=\"ok\"} 12\nup 1\nm{a=\"q\\\"x\",b=\"\"} 2.5 1700000000\n",
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].label("operation"), "ListAccessKeys");
        assert_eq!(s[0].value, 12.0);
        assert_eq!(s[1].name, "up");
        assert_eq!(s[2].label("a"), "q\"x");
        assert_eq!(s[2].value, 2.5);
    }
}
