//! Client authentication (`auth = "token"`): the application's backend signs a JWT
//! for each browser session, and msghandler admits a request only for what that
//! token grants — its own session, and the channels and sessions it lists.
//!
//! `auth = "none"` is the x0 behaviour: anyone may act for any session. It is for
//! development and for x0 applications that cannot send a token.
//!
//! The claims (docs/API.md, "Tokens"):
//!
//! ```json
//! {"sid": "<session>", "sub": "<user>", "exp": 1767225600,
//!  "publish": ["chat.>"], "subscribe": ["chat.>", "news.*"], "send": ["*"]}
//! ```
//!
//! `publish` and `subscribe` are channel patterns (`*` one token, a final `>` the
//! rest); `send` lists the sessions the client may message directly (`"*"` any).
//! Replies to a message the client was given are always allowed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hyper::header::{self, HeaderMap};
use ipc::Target;
use jsonwebtoken::errors::ErrorKind as JwtError;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::backend_key::bearer_token;
use crate::config::{HandlerConfig, Secret, secret_text};
use crate::v1;
use crate::x0::{self, X0Error};

/// Longer tokens are refused unread: a real one is a few hundred bytes.
const MAX_TOKEN_LEN: usize = 8192;

/// How tokens are checked: the key and the rules of `etc/msghandler.toml`.
pub struct Tokens {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// The `token_*` keys of the configuration.
#[derive(Debug, Clone, Default)]
pub struct TokenConfig {
    pub algorithm: String,
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: u64,
}

impl TokenConfig {
    pub fn of(config: &HandlerConfig) -> Self {
        TokenConfig {
            algorithm: config.token_algorithm.clone(),
            secret: config.token_secret.clone(),
            secret_file: config.token_secret_file.clone(),
            public_key_file: config.token_public_key_file.clone(),
            issuer: config.token_issuer.clone(),
            audience: config.token_audience.clone(),
            leeway: config.token_leeway,
        }
    }
}

impl Tokens {
    pub fn new(config: &TokenConfig) -> anyhow::Result<Self> {
        let (algorithm, key) = match config.algorithm.as_str() {
            "HS256" => {
                let secret = secret_text(
                    "token_secret",
                    config.secret.as_ref(),
                    config.secret_file.as_deref(),
                )?
                .context("auth = \"token\" with HS256 needs token_secret or token_secret_file")?;
                // A short HMAC key can be brute-forced offline from one token.
                anyhow::ensure!(
                    secret.len() >= 32,
                    "token_secret must be at least 32 bytes (e.g. `openssl rand -hex 32`)"
                );
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
            name @ ("EdDSA" | "RS256") => {
                let file = config.public_key_file.as_deref().with_context(|| {
                    format!("auth = \"token\" with {name} needs token_public_key_file")
                })?;
                let pem = std::fs::read(file)
                    .with_context(|| format!("reading token_public_key_file {}", file.display()))?;
                let parsed = if name == "EdDSA" {
                    DecodingKey::from_ed_pem(&pem).map(|k| (Algorithm::EdDSA, k))
                } else {
                    DecodingKey::from_rsa_pem(&pem).map(|k| (Algorithm::RS256, k))
                };
                parsed.with_context(|| {
                    format!(
                        "token_public_key_file {} is not a {name} public key in PEM",
                        file.display()
                    )
                })?
            }
            other => anyhow::bail!("token_algorithm {other:?} is not one of HS256, EdDSA, RS256"),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(Tokens { key, validation })
    }

    /// The grant of the request's token: `Authorization: Bearer <token>`, else the
    /// `token` query parameter (EventSource and WebSocket cannot set headers).
    pub fn grant(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Grant, X0Error> {
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()))
            .map(|t| String::from_utf8_lossy(t).into_owned());
        let token = from_header
            .or_else(|| v1::query_value(query.unwrap_or(""), "token"))
            .ok_or_else(|| {
                X0Error::new(
                    "Unauthorized",
                    "a token is required: send Authorization: Bearer <token> (or ?token= on /v1/ws and /v1/events)",
                )
            })?;
        self.verify(&token)
    }

    pub fn verify(&self, token: &str) -> Result<Grant, X0Error> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(X0Error::new(
                "InvalidToken",
                format!("the token is longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                JwtError::ExpiredSignature => expired(),
                JwtError::ImmatureSignature => {
                    X0Error::new("InvalidToken", "the token is not valid yet (nbf)")
                }
                JwtError::InvalidSignature => {
                    X0Error::new("InvalidToken", "the token's signature does not verify")
                }
                JwtError::InvalidIssuer | JwtError::InvalidAudience => {
                    X0Error::new("InvalidToken", "the token was issued for someone else")
                }
                JwtError::InvalidAlgorithm => {
                    X0Error::new("InvalidToken", "the token is signed with another algorithm")
                }
                JwtError::MissingRequiredClaim(claim) => {
                    X0Error::new("InvalidToken", format!("the token has no {claim} claim"))
                }
                JwtError::Json(_) | JwtError::InvalidClaimFormat(_) => X0Error::new(
                    "InvalidToken",
                    "the token's claims are not what micromsg expects (sid, exp, ...)",
                ),
                _ => X0Error::new("InvalidToken", "the token is not a valid JWT"),
            })?
            .claims;
        let session = x0::checked_session("sid", Some(claims.sid))
            .map_err(|e| X0Error::new("InvalidToken", format!("the token's {}", e.message)))?;
        Ok(Grant {
            session,
            user: claims.sub,
            expires: claims.exp,
            publish: claims.publish,
            subscribe: claims.subscribe,
            send: claims.send,
        })
    }
}

/// What a client is told when its token runs out, on a request or an open stream.
pub fn expired() -> X0Error {
    X0Error::new(
        "TokenExpired",
        "the token has expired: get a new one from the application and retry",
    )
}

/// Waits until a stream's token runs out, or forever when there is no token.
pub async fn until(expires: Option<tokio::time::Instant>) {
    match expires {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sid: String,
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    send: Vec<String>,
}

/// What one verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub session: String,
    /// The user the application says the session belongs to.
    pub user: Option<String>,
    /// Unix seconds.
    pub expires: u64,
    publish: Vec<String>,
    subscribe: Vec<String>,
    send: Vec<String>,
}

impl Grant {
    /// How long the token is still good for: a stream ends when it runs out, and
    /// the client reconnects with a fresh one.
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(self.expires).saturating_sub(now)
    }

    /// The request acts for `session`: only the token's own.
    pub fn own(&self, session: &str) -> Result<(), X0Error> {
        if session == self.session {
            Ok(())
        } else {
            Err(X0Error::new(
                "Forbidden",
                format!(
                    "this token is for session {:?}, not {session:?}",
                    self.session
                ),
            ))
        }
    }

    fn may_send_to(&self, session: &str) -> Result<(), X0Error> {
        if self.send.iter().any(|s| s == "*" || s == session) {
            Ok(())
        } else {
            Err(X0Error::new(
                "Forbidden",
                format!("this token may not send to session {session:?}"),
            ))
        }
    }

    fn may_publish(&self, channel: &str) -> Result<(), X0Error> {
        if self.publish.iter().any(|p| covers(p, channel)) {
            Ok(())
        } else {
            Err(X0Error::new(
                "Forbidden",
                format!("this token may not publish to channel {channel:?}"),
            ))
        }
    }

    fn may_subscribe(&self, pattern: &str) -> Result<(), X0Error> {
        if self.subscribe.iter().any(|p| covers(p, pattern)) {
            Ok(())
        } else {
            Err(X0Error::new(
                "Forbidden",
                format!("this token may not subscribe to {pattern:?}"),
            ))
        }
    }

    fn may_target(&self, target: Option<&Target>) -> Result<(), X0Error> {
        match target {
            // A reply: it goes only to whoever asked for replies to that message.
            None => Ok(()),
            Some(Target::Session(dst)) => self.may_send_to(dst),
            Some(Target::Channel(channel)) => self.may_publish(channel),
            // The parser keeps these for the backend; refused here as well, so that
            // this check stands on its own.
            Some(_) => Err(X0Error::new(
                "Forbidden",
                "only the backend may send to users or everyone",
            )),
        }
    }

    /// Whether the token allows a `/v1` operation (over HTTP or a WebSocket frame):
    /// it must act for the token's session (presence names none), and reach only
    /// what the token lists.
    pub fn permits(&self, operation: &v1::Operation) -> Result<(), X0Error> {
        use ipc::Request as R;
        match (operation, operation.caller()) {
            (v1::Operation::Request(R::Presence { channel }, _), _) => {
                // Who is in a channel is for those who may read it.
                return self.may_subscribe(channel);
            }
            (_, Some(session)) => self.own(session)?,
            (_, None) => {
                return Err(X0Error::new("Forbidden", "this request is not for clients"));
            }
        }
        match operation {
            v1::Operation::Send(send) => self.may_target(send.target.as_ref()),
            v1::Operation::Batch(sends) => sends
                .iter()
                .try_for_each(|send| self.may_target(send.target.as_ref())),
            v1::Operation::Request(R::Subscribe { subscription, .. }, _) => {
                self.may_subscribe(&subscription.channel)
            }
            v1::Operation::Request(R::Bind { .. } | R::Kick { .. }, _) => {
                Err(X0Error::new("Forbidden", "this request is for the backend"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the token allows an x0 operation.
    pub fn permits_x0(&self, operation: &x0::Operation) -> Result<(), X0Error> {
        self.own(operation.caller())?;
        match operation {
            x0::Operation::Set { dst, .. } => self.may_send_to(dst),
            x0::Operation::Get { .. } | x0::Operation::Del { .. } => Ok(()),
        }
    }
}

/// The sessions this worker recently bound to their token's user (`sub`), so that
/// the binding costs the core one request per session every [`Bindings::FRESH`],
/// not one per request. A binding lost at the core meanwhile (a restart without
/// durable storage) comes back within that time.
#[derive(Debug, Default)]
pub struct Bindings {
    // A std mutex: held for one map operation, never across an await.
    recent: Mutex<HashMap<String, (String, tokio::time::Instant)>>,
}

impl Bindings {
    const FRESH: Duration = Duration::from_secs(30);
    /// More sessions than this and stale entries are dropped; the map never holds
    /// more than the sessions of the last [`Bindings::FRESH`].
    const MAX: usize = 100_000;

    /// Whether `session` should be bound to `user` now.
    pub fn due(&self, session: &str, user: &str) -> bool {
        let recent = self.recent.lock().expect("not poisoned");
        !matches!(recent.get(session), Some((u, at)) if u == user && at.elapsed() < Self::FRESH)
    }

    pub fn bound(&self, session: &str, user: &str) {
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.len() >= Self::MAX {
            recent.retain(|_, (_, at)| at.elapsed() < Self::FRESH);
            if recent.len() >= Self::MAX {
                recent.clear();
            }
        }
        recent.insert(
            session.to_owned(),
            (user.to_owned(), tokio::time::Instant::now()),
        );
    }
}

/// Whether every channel that `asked` matches is matched by `allowed` (both channel
/// patterns; a plain channel name is a pattern that matches itself). So a token for
/// `chat.>` may subscribe to `chat.*` and publish to `chat.room1`, but one for
/// `chat.*` may not subscribe to `chat.>`.
pub fn covers(allowed: &str, asked: &str) -> bool {
    let mut allowed = allowed.split('.');
    let mut asked = asked.split('.');
    loop {
        match (allowed.next(), asked.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return allowed.next().is_none(),
            (Some("*"), Some(token)) if token != ">" => {}
            (Some(a), Some(b)) if a == b && a != ">" && a != "*" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn tokens() -> Tokens {
        Tokens::new(&TokenConfig {
            algorithm: "HS256".into(),
            secret: Some(Secret(SECRET.into())),
            leeway: 0,
            ..Default::default()
        })
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn grant(claims: serde_json::Value) -> Grant {
        tokens().verify(&sign(claims, SECRET)).unwrap()
    }

    #[test]
    fn a_pattern_covers_only_what_it_matches_in_full() {
        assert!(covers("chat.>", "chat.room1"));
        assert!(covers("chat.>", "chat.*"));
        assert!(covers("chat.>", "chat.>"));
        assert!(covers("chat.>", "chat.a.b"));
        assert!(!covers("chat.>", "chat"));
        assert!(covers("chat.*", "chat.room1"));
        assert!(covers("chat.*", "chat.*"));
        assert!(!covers("chat.*", "chat.>"));
        assert!(!covers("chat.*", "chat.a.b"));
        assert!(covers("chat.room1", "chat.room1"));
        assert!(!covers("chat.room1", "chat.*"));
        assert!(!covers("chat.room1", "chat.room2"));
        assert!(covers(">", "$sys"));
        assert!(!covers("news", "news.x"));
    }

    #[test]
    fn a_valid_token_grants_its_session_and_patterns() {
        let g = grant(
            json!({"sid":"A","sub":"u1","exp":now()+60,"publish":["chat.>"],"subscribe":["news.*"],"send":["B"]}),
        );
        assert_eq!(g.session, "A");
        assert_eq!(g.user.as_deref(), Some("u1"));
        assert!(g.own("A").is_ok());
        assert_eq!(g.own("B").unwrap_err().kind, "Forbidden");
        assert!(g.may_publish("chat.room1").is_ok());
        assert!(g.may_publish("news.x").is_err());
        assert!(g.may_subscribe("news.*").is_ok());
        assert!(g.may_subscribe("news.>").is_err());
        assert!(g.may_send_to("B").is_ok());
        assert!(g.may_send_to("C").is_err());
        assert!(g.remaining() > Duration::from_secs(50));
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused_with_their_reason() {
        let t = tokens();
        let expired = sign(json!({"sid":"A","exp":now()-10}), SECRET);
        assert_eq!(t.verify(&expired).unwrap_err().kind, "TokenExpired");
        let foreign = sign(
            json!({"sid":"A","exp":now()+60}),
            "another-secret-another-secret-another",
        );
        assert_eq!(t.verify(&foreign).unwrap_err().kind, "InvalidToken");
        // Claims for another session, spliced into a token signed for A: the
        // signature no longer covers what the token says.
        let good = sign(json!({"sid":"A","exp":now()+60}), SECRET);
        let other = sign(
            json!({"sid":"B","exp":now()+60}),
            "another-secret-another-secret-another",
        );
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        assert_eq!(t.verify(&parts.join(".")).unwrap_err().kind, "InvalidToken");
        assert_eq!(t.verify("not.a.jwt").unwrap_err().kind, "InvalidToken");
        assert_eq!(
            t.verify(&"x".repeat(9000)).unwrap_err().kind,
            "InvalidToken"
        );
        let no_exp = sign(json!({"sid":"A"}), SECRET);
        assert_eq!(t.verify(&no_exp).unwrap_err().kind, "InvalidToken");
        let no_sid = sign(json!({"exp":now()+60}), SECRET);
        assert_eq!(t.verify(&no_sid).unwrap_err().kind, "InvalidToken");
    }

    #[test]
    fn the_token_travels_in_the_header_or_the_query() {
        let t = tokens();
        let token = sign(json!({"sid":"A","exp":now()+60}), SECRET);
        let mut headers = HeaderMap::new();
        assert_eq!(t.grant(&headers, None).unwrap_err().kind, "Unauthorized");
        assert_eq!(
            t.grant(&headers, Some(&format!("session=A&token={token}")))
                .unwrap()
                .session,
            "A"
        );
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        assert_eq!(t.grant(&headers, None).unwrap().session, "A");
    }

    // A key pair made for this test only (`openssl genpkey -algorithm ed25519`).
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIPmr6Y6o/2Eo5zb9jb6PU9CGqWa/JOrdBf0pW9cgZX6T
-----END PRIVATE KEY-----
";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEATZl8msAMUHccRbtRM/41YwoTlWqk14LwmvmnQhMrdG8=
-----END PUBLIC KEY-----
";

    #[test]
    fn an_eddsa_token_verifies_with_the_public_key_alone() {
        let dir = std::env::temp_dir().join(format!("micromsg-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let public = dir.join("token.pub");
        std::fs::write(&public, ED_PUBLIC).unwrap();
        let tokens = Tokens::new(&TokenConfig {
            algorithm: "EdDSA".into(),
            public_key_file: Some(public.clone()),
            ..Default::default()
        })
        .unwrap();
        let claims = json!({"sid":"A","exp":now()+60});
        let signed = encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(tokens.verify(&signed).unwrap().session, "A");
        // An HS256 token, even one "signed" with the public key as its secret (the
        // classic algorithm-confusion forgery), is refused.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(ED_PUBLIC.as_bytes()),
        )
        .unwrap();
        assert_eq!(tokens.verify(&confused).unwrap_err().kind, "InvalidToken");
        std::fs::write(&public, "not a key").unwrap();
        assert!(
            Tokens::new(&TokenConfig {
                algorithm: "EdDSA".into(),
                public_key_file: Some(public),
                ..Default::default()
            })
            .is_err()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_short_hmac_secret_or_an_unknown_algorithm_is_refused_at_start() {
        let short = TokenConfig {
            algorithm: "HS256".into(),
            secret: Some(Secret("short".into())),
            ..Default::default()
        };
        assert!(Tokens::new(&short).is_err());
        let unknown = TokenConfig {
            algorithm: "none".into(),
            ..Default::default()
        };
        assert!(Tokens::new(&unknown).is_err());
    }

    #[test]
    fn x0_operations_are_held_to_the_session_and_send_list() {
        let g = grant(json!({"sid":"A","exp":now()+60,"send":["B"]}));
        let set = |src: &str, dst: &str| x0::Operation::Set {
            src: src.into(),
            dst: dst.into(),
            body: "{}".into(),
            key: None,
        };
        assert!(g.permits_x0(&set("A", "B")).is_ok());
        assert!(g.permits_x0(&set("A", "C")).is_err());
        assert!(g.permits_x0(&set("B", "B")).is_err());
        let get = |s: &str| x0::Operation::Get {
            session: s.into(),
            ack_previous: true,
        };
        assert!(g.permits_x0(&get("A")).is_ok());
        assert_eq!(g.permits_x0(&get("B")).unwrap_err().kind, "Forbidden");
    }

    #[test]
    fn v1_operations_are_held_to_the_grant() {
        let g =
            grant(json!({"sid":"A","exp":now()+60,"publish":["chat.>"],"subscribe":["chat.*"]}));
        let op =
            |route, body: serde_json::Value| v1::parse(route, body.to_string().as_bytes()).unwrap();
        let publish = |channel: &str| {
            op(
                v1::Route::Publish,
                json!({"session":"A","target":{"channel":channel},"data":1}),
            )
        };
        assert!(g.permits(&publish("chat.x")).is_ok());
        assert!(g.permits(&publish("news.x")).is_err());
        let reply = op(
            v1::Route::Publish,
            json!({"session":"A","reference":7,"data":1}),
        );
        assert!(g.permits(&reply).is_ok());
        let to_b = op(
            v1::Route::Publish,
            json!({"session":"A","target":{"session":"B"},"data":1}),
        );
        assert!(g.permits(&to_b).is_err());
        let subscribe = |channel: &str| {
            op(
                v1::Route::Subscribe,
                json!({"session":"A","channel":channel}),
            )
        };
        assert!(g.permits(&subscribe("chat.*")).is_ok());
        assert!(g.permits(&subscribe("chat.>")).is_err());
        assert!(g.permits(&subscribe("$sys")).is_err());
        let poll = |s: &str| op(v1::Route::Poll, json!({"session":s}));
        assert!(g.permits(&poll("A")).is_ok());
        assert!(g.permits(&poll("B")).is_err());
        let ack = op(v1::Route::Ack, json!({"session":"B"}));
        assert!(g.permits(&ack).is_err());
    }
}
