//! The shared secret that admits the application's backend to `/v1/backend/...`:
//! where it comes from, and how a request's `Authorization: Bearer <key>` is checked.

use std::path::Path;

use hyper::header::HeaderValue;
use subtle::ConstantTimeEq;

use crate::config::{Secret, secret_text};

/// The configured key. Its `Debug` shows nothing, so that it cannot reach a log.
pub struct BackendKey(Box<[u8]>);

impl std::fmt::Debug for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendKey(..)")
    }
}

/// Why a backend call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header at all.
    Missing,
    /// A key was presented, and it is not ours.
    Wrong,
}

impl BackendKey {
    /// The key from `backend_key` or the trimmed contents of `backend_key_file`;
    /// `None` when neither is set (the backend API is then disabled). Both at once,
    /// or an empty key, is a mistake the operator should hear about at start.
    pub fn from_config(key: Option<&Secret>, file: Option<&Path>) -> anyhow::Result<Option<Self>> {
        let Some(text) = secret_text("backend_key", key, file)? else {
            return Ok(None);
        };
        Ok(Some(BackendKey(text.into_bytes().into_boxed_slice())))
    }

    /// Checks an `Authorization` header. The comparison takes the same time however
    /// many leading bytes match, so the key cannot be guessed byte by byte from
    /// response times (only its length can be learnt, which says little).
    pub fn admits(&self, authorization: Option<&HeaderValue>) -> Result<(), Denied> {
        let token = authorization
            .and_then(|value| bearer_token(value.as_bytes()))
            .ok_or(Denied::Missing)?;
        if bool::from(token.ct_eq(&self.0)) {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }
}

/// The token of `Bearer <token>`; the scheme's case does not matter (RFC 9110 11.1).
pub(crate) fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = value[SCHEME.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> BackendKey {
        BackendKey::from_config(Some(&Secret(text.into())), None)
            .unwrap()
            .unwrap()
    }

    fn admits(key: &BackendKey, header: Option<&str>) -> Result<(), Denied> {
        let header = header.map(|h| HeaderValue::from_str(h).unwrap());
        key.admits(header.as_ref())
    }

    #[test]
    fn only_the_configured_bearer_token_is_admitted() {
        let k = key("s3cret");
        assert_eq!(admits(&k, Some("Bearer s3cret")), Ok(()));
        assert_eq!(admits(&k, Some("bearer  s3cret")), Ok(()));
        assert_eq!(admits(&k, Some("Bearer s3cre")), Err(Denied::Wrong));
        assert_eq!(admits(&k, Some("Bearer s3cret2")), Err(Denied::Wrong));
        assert_eq!(admits(&k, Some("Bearer S3CRET")), Err(Denied::Wrong));
        assert_eq!(admits(&k, None), Err(Denied::Missing));
        assert_eq!(admits(&k, Some("Basic s3cret")), Err(Denied::Missing));
        assert_eq!(admits(&k, Some("Bearer ")), Err(Denied::Missing));
        assert_eq!(admits(&k, Some("s3cret")), Err(Denied::Missing));
    }

    #[test]
    fn the_key_file_is_read_and_trimmed() {
        let path = std::env::temp_dir().join(format!("msghandler-key-{}", std::process::id()));
        std::fs::write(&path, "  from-file\n").unwrap();
        let k = BackendKey::from_config(None, Some(&path)).unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(admits(&k, Some("Bearer from-file")), Ok(()));
    }

    #[test]
    fn no_key_disables_and_ambiguous_or_empty_keys_are_refused() {
        assert!(BackendKey::from_config(None, None).unwrap().is_none());
        let secret = Secret("k".into());
        assert!(BackendKey::from_config(Some(&secret), Some(Path::new("/x"))).is_err());
        assert!(BackendKey::from_config(Some(&Secret(" \n".into())), None).is_err());
        assert!(BackendKey::from_config(None, Some(Path::new("/nonexistent/key"))).is_err());
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        assert!(!format!("{:?}", key("hunter2")).contains("hunter2"));
        assert!(!format!("{:?}", Secret("hunter2".into())).contains("hunter2"));
    }
}
