//! The one error type of this crate.

use std::fmt;

/// What went wrong, coarsely; the message says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A binary (kube-apiserver, etcd, moto_server, ...) is not installed: run `make tools`.
    ToolsMissing,
    /// A process of the environment did not start or did not become ready.
    Startup,
    /// A file or process operation failed.
    Io,
    /// A call to the Kubernetes API failed.
    Kube,
    /// A call to the IAM/STS endpoint failed.
    Aws,
    /// Anything else (certificate generation, bad options, ...).
    Other,
}

/// Error of every fallible operation of this crate.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Io, context, source)
    }

    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        Self::with_source(ErrorKind::Kube, context, source)
    }

    /// An AWS SDK error, flattened to text with its whole chain of causes.
    pub(crate) fn aws<E>(context: impl Into<String>, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let detail = aws_sdk_iam::error::DisplayErrorContext(&source).to_string();
        Self::new(ErrorKind::Aws, format!("{}: {detail}", context.into()))
    }

    /// The coarse category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the sources.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        // Print the whole chain: these errors end up in test panics, where nobody walks sources.
        let mut next: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(err) = next {
            write!(f, ": {err}")?;
            next = err.source();
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // Already part of Display; not repeated through source() to keep reports short.
        None
    }
}
