//! Who may do what on the job API: the farm's API tokens (a tokens file: token → owner and
//! role), the caller a request's `authorization: Bearer TOKEN` names, and which jobs that caller
//! reaches (its own; every job for an admin).
//!
//! A farm started without a tokens file is open: every caller is [`Caller::local`], an admin
//! with no owner name, which is what the embedded farm and a farm on loopback want. Tokens are
//! kept only as SHA-256 digests, so a lookup compares digests (its timing says nothing about
//! the tokens) and a coordinator's memory holds no token.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// What a caller may do beyond its own jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submits jobs and reaches only its own.
    Studio,
    /// Reaches every job (lists, watches, cancels, fetches).
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "studio" => Some(Self::Studio),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Studio => "studio",
            Self::Admin => "admin",
        }
    }
}

/// The one a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The owner name its token maps to; a job it submits carries it.
    pub owner: String,
    pub role: Role,
}

impl Caller {
    /// Every caller of an open farm (no tokens file): an admin without a name.
    pub fn local() -> Self {
        Self {
            owner: String::new(),
            role: Role::Admin,
        }
    }

    /// Whether this caller may see, watch, cancel and fetch a job of `owner`.
    pub fn reaches(&self, owner: &str) -> bool {
        self.role == Role::Admin || self.owner == owner
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.owner.is_empty() {
            write!(f, "(local {})", self.role.as_str())
        } else {
            write!(f, "{} ({})", self.owner, self.role.as_str())
        }
    }
}

/// Why a request names no caller. The messages say what to do; none repeats the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error(
        "this farm requires an API token: set LONGTAKE_TOKEN or pass --token-file (an admin gives \
         tokens out)"
    )]
    Missing,
    #[error("the authorization header is not `Bearer TOKEN`")]
    Malformed,
    #[error("this farm does not know the API token given (revoked, mistyped, or another farm's)")]
    Unknown,
}

/// The job API's access rule: open, or by token.
#[derive(Debug, Clone, Default)]
pub enum Access {
    /// No tokens: every caller is [`Caller::local`].
    #[default]
    Open,
    Tokens(Tokens),
}

impl Access {
    /// The caller an `authorization` header value names (`None`: the request had none).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, AccessError> {
        match self {
            Self::Open => Ok(Caller::local()),
            Self::Tokens(tokens) => {
                let header = authorization.ok_or(AccessError::Missing)?;
                let token = header
                    .strip_prefix("Bearer ")
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or(AccessError::Malformed)?;
                tokens.caller(token).cloned().ok_or(AccessError::Unknown)
            }
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }
}

/// The farm's API tokens, read from a tokens file: one `TOKEN OWNER [ROLE]` per line (ROLE
/// `studio`, the default, or `admin`), `#` comments and blank lines ignored.
#[derive(Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Caller>,
}

impl fmt::Debug for Tokens {
    /// Owners only: a token must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut owners: Vec<&str> = self.by_digest.values().map(|c| c.owner.as_str()).collect();
        owners.sort_unstable();
        f.debug_struct("Tokens").field("owners", &owners).finish()
    }
}

/// The shortest token accepted: a short one can be guessed.
pub const MIN_TOKEN_CHARS: usize = 16;
/// The longest owner name.
pub const MAX_OWNER_CHARS: usize = 64;

/// What is wrong with a tokens file, by line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokensError {
    #[error("cannot read the tokens file {path}: {why}")]
    Unreadable { path: String, why: String },
    #[error("tokens file line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("the tokens file has no token: a farm with --tokens would let no one in")]
    Empty,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokensError::Unreadable {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let mut by_digest = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let bad = |why: String| TokensError::Line { line, why };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let (token, owner, role) = match fields.as_slice() {
                [token, owner] => (*token, *owner, Role::Studio),
                [token, owner, role] => (
                    *token,
                    *owner,
                    Role::parse(role).ok_or_else(|| {
                        bad(format!("role {role:?} is neither `studio` nor `admin`"))
                    })?,
                ),
                _ => return Err(bad("expected `TOKEN OWNER [studio|admin]`".into())),
            };
            if token.chars().count() < MIN_TOKEN_CHARS || !token.chars().all(is_token_char) {
                return Err(bad(format!(
                    "the token of {owner:?} must be at least {MIN_TOKEN_CHARS} characters of \
                     letters, digits and - . _ ~ + / = (e.g. `openssl rand -hex 24`)"
                )));
            }
            if owner.chars().count() > MAX_OWNER_CHARS || !owner.chars().all(is_owner_char) {
                return Err(bad(format!(
                    "owner {owner:?} must be 1-{MAX_OWNER_CHARS} letters, digits and - . _ @"
                )));
            }
            let caller = Caller {
                owner: owner.to_string(),
                role,
            };
            if let Some(earlier) = by_digest.insert(digest(token), caller) {
                return Err(bad(format!(
                    "this token is also {:?}'s: every token names one owner",
                    earlier.owner
                )));
            }
        }
        if by_digest.is_empty() {
            return Err(TokensError::Empty);
        }
        Ok(Self { by_digest })
    }

    fn caller(&self, token: &str) -> Option<&Caller> {
        self.by_digest.get(&digest(token))
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/=".contains(c)
}

fn is_owner_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._@".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# studio tokens of the farm
3f9c1e0b7a5d4c2e8f61 studio-a
a7d2c9e4b1f08e3d6c57 studio-b   studio   # the second studio
0b1c2d3e4f5a6b7c8d9e ops admin
";

    fn tokens() -> Access {
        Access::Tokens(Tokens::parse(FILE).unwrap())
    }

    #[test]
    fn a_bearer_token_names_its_owner_and_role() {
        let access = tokens();
        let a = access.caller(Some("Bearer 3f9c1e0b7a5d4c2e8f61")).unwrap();
        assert_eq!((a.owner.as_str(), a.role), ("studio-a", Role::Studio));
        let b = access.caller(Some("Bearer a7d2c9e4b1f08e3d6c57")).unwrap();
        assert_eq!((b.owner.as_str(), b.role), ("studio-b", Role::Studio));
        let ops = access.caller(Some("Bearer 0b1c2d3e4f5a6b7c8d9e")).unwrap();
        assert_eq!(ops.role, Role::Admin);

        assert!(a.reaches("studio-a"));
        assert!(!a.reaches("studio-b"));
        assert!(!a.reaches(""));
        assert!(ops.reaches("studio-b") && ops.reaches(""));
    }

    #[test]
    fn requests_without_a_known_token_are_refused() {
        let access = tokens();
        assert_eq!(access.caller(None), Err(AccessError::Missing));
        assert_eq!(
            access.caller(Some("3f9c1e0b7a5d4c2e8f61")),
            Err(AccessError::Malformed)
        );
        assert_eq!(access.caller(Some("Bearer ")), Err(AccessError::Malformed));
        assert_eq!(
            access.caller(Some("Bearer 3f9c1e0b7a5d4c2e8f62")),
            Err(AccessError::Unknown)
        );
        // an open farm needs none
        assert_eq!(Access::Open.caller(None), Ok(Caller::local()));
    }

    #[test]
    fn a_bad_tokens_file_is_refused_by_line_and_never_echoes_a_token() {
        let cases = [
            ("short-token studio-a\n", 1, "at least 16"),
            ("3f9c1e0b7a5d4c2e8f61\n", 1, "expected `TOKEN OWNER"),
            (
                "# c\n3f9c1e0b7a5d4c2e8f61 studio-a root\n",
                2,
                "neither `studio` nor `admin`",
            ),
            ("3f9c1e0b7a5d4c2e8f61 studio/a\n", 1, "owner \"studio/a\""),
            (
                "3f9c1e0b7a5d4c2e8f61 a\n3f9c1e0b7a5d4c2e8f61 b\n",
                2,
                "also \"a\"'s",
            ),
        ];
        for (text, line, says) in cases {
            match Tokens::parse(text) {
                Err(e @ TokensError::Line { line: l, .. }) => {
                    let message = e.to_string();
                    assert_eq!(l, line, "{message}");
                    assert!(message.contains(says), "{message}");
                    assert!(!message.contains("3f9c1e0b7a5d4c2e8f61"), "{message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Tokens::parse("# nothing\n\n"),
            Err(TokensError::Empty)
        ));
        let debug = format!("{:?}", Tokens::parse(FILE).unwrap());
        assert!(
            debug.contains("studio-a") && !debug.contains("3f9c1e0b"),
            "{debug}"
        );
    }
}
