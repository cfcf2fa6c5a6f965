//! The crate's error type. Every checkpoint error names the file, and where one tensor is at
//! fault, the tensor under the name the file uses.

use std::path::PathBuf;

/// Errors of loading, checking and saving TAESD checkpoints.
///
/// Where a variant wraps another error, its message includes it and it is not also the
/// `source()` (the field is `cause`, not `source`): a chain printed with `{:#}` would otherwise
/// say it twice ("x.pth: no such file: no such file").
#[derive(Debug, thiserror::Error)]
pub enum TaesdError {
    #[error("{}: missing tensor `{name}` (shape {expected}) of the {what}", .file.display())]
    MissingTensor { file: PathBuf, name: String, expected: String, what: String },

    #[error("{}: tensor `{name}` has shape {got:?}, the {what} needs {expected:?}", .file.display())]
    ShapeMismatch { file: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize>, what: String },

    #[error("{}: unexpected tensor `{name}` (shape {shape:?}) in the {what}", .file.display())]
    UnexpectedTensor { file: PathBuf, name: String, shape: Vec<usize>, what: String },

    #[error("{}: holds a {found} checkpoint, but {expected} was asked for", .file.display())]
    WrongVariant { file: PathBuf, expected: String, found: String },

    #[error("{}: not a TAESD checkpoint this crate knows: {reason}", .file.display())]
    UnknownLayout { file: PathBuf, reason: String },

    #[error("{}: damaged or not a PyTorch checkpoint: {reason}", .file.display())]
    Damaged { file: PathBuf, reason: String },

    #[error("the {layout} layout cannot hold {what}: {reason}")]
    UnsupportedLayout { layout: String, what: String, reason: String },

    #[error("unknown TAESD variant `{0}` (known: {known})", known = crate::Variant::names())]
    UnknownVariant(String),

    #[error("unknown checkpoint layout `{0}` (known: taesd, diffusers, comfyui, combined)")]
    UnknownLayoutName(String),

    #[error("{}: {cause}", .path.display())]
    Io { path: PathBuf, cause: std::io::Error },

    #[error("{}: bad config.json: {cause}", .path.display())]
    Json { path: PathBuf, cause: serde_json::Error },

    #[error("{}: {reason}", .path.display())]
    Config { path: PathBuf, reason: String },

    #[error("{context}: {cause}")]
    Candle { context: String, cause: candle_core::Error },

    #[error(transparent)]
    CandleOther(#[from] candle_core::Error),

    #[error("{}: cannot write safetensors: {cause}", .path.display())]
    Write { path: PathBuf, cause: safetensors::SafeTensorError },

    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, TaesdError>;

/// Attach a context (usually a file) to a candle error.
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| TaesdError::Candle { context: context(), cause })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cause is said once, also in an anyhow chain (`{:#}`).
    #[test]
    fn wrapped_errors_are_not_repeated_in_a_chain() {
        let e = TaesdError::Io {
            path: "x.pth".into(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain, "x.pth: no such file");
        let e = TaesdError::Json { path: "c.json".into(), cause: serde_json::from_str::<u8>("x").unwrap_err() };
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain.matches("expected value").count(), 1, "{chain}");
    }
}
