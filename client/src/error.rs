//! The client's error type and gRPC code names.

use std::path::PathBuf;

use filterdb_proto::expr::ParseError;

/// Everything a [`Client`](crate::Client) call can fail with.
///
/// Each message already includes its cause, so no variant reports a `source()`: printing the
/// error chain (as `anyhow`'s `{:#}` does) would otherwise repeat it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL could not be parsed.
    #[error("invalid server URL `{url}`: {}", chain(.error))]
    InvalidUrl {
        /// The URL as given (after adding a missing `http://`).
        url: String,
        /// Why tonic rejected it.
        error: tonic::transport::Error,
    },
    /// No connection could be made to the server.
    #[error("cannot reach FilterDB at {url}: {} (is filterdb-server running?)", chain(.error))]
    Connect {
        /// The URL dialled.
        url: String,
        /// The transport failure.
        error: tonic::transport::Error,
    },
    /// The server answered with a gRPC error; the status is kept whole so callers can match codes.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// A local file could not be read or written.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        error: std::io::Error,
    },
    /// A `--where` expression did not parse.
    #[error("invalid --where expression `{expr}`: {error}")]
    Expr {
        /// The expression text.
        expr: String,
        /// Where and why it failed.
        error: ParseError,
    },
    /// The server sent something the contract does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

impl ClientError {
    /// The gRPC status when the server answered with an error.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }

    /// The gRPC code when the server answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        self.status().map(|s| s.code())
    }
}

pub use filterdb_proto::code_name;

/// An error and its sources joined with `: `, because tonic's transport error alone only says
/// "transport error" and the useful part ("Connection refused") is in the chain.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_display_uses_code_names() {
        let e = ClientError::from(tonic::Status::invalid_argument(
            "bad.safetensors: malformed",
        ));
        assert_eq!(
            e.to_string(),
            "INVALID_ARGUMENT: bad.safetensors: malformed"
        );
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
    }

    #[test]
    fn chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
