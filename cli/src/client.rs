//! Reaching the coordinator: its URL from `--coordinator` or `LONGTAKE_COORDINATOR`, the API
//! token from `--token-file` or `LONGTAKE_TOKEN`, a gRPC connection with a time-out that sends
//! the token with every call, and gRPC statuses turned into one-line errors that keep the
//! server's message (which names the field or the job).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use longtake_proto::cluster_service_client::ClusterServiceClient;
use longtake_proto::render_service_client::RenderServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// The environment variable that names the coordinator when `--coordinator` is not given.
pub const COORDINATOR_ENV: &str = "LONGTAKE_COORDINATOR";

/// The environment variable holding the API token when `--token-file` is not given.
pub const TOKEN_ENV: &str = "LONGTAKE_TOKEN";

/// The environment variable naming the farm's CA certificate when `--ca-cert` is not given.
pub const CA_CERT_ENV: &str = "LONGTAKE_CA_CERT";

/// How long connecting to the coordinator may take before the CLI gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `--coordinator URL` flag of every command that talks to a farm.
#[derive(Args, Clone, Debug, Default)]
pub struct CoordinatorArg {
    /// Coordinator URL, e.g. http://farm:7070 [default: $LONGTAKE_COORDINATOR]. A farm with
    /// standby coordinators: every one's URL, comma-separated; the CLI uses the one that
    /// answers (the leader: standbys do not listen) and follows a job across a failover.
    #[arg(long, value_name = "URL[,URL...]")]
    pub coordinator: Option<String>,
    /// A file holding the API token a farm with tokens gave you [default: $LONGTAKE_TOKEN]. A
    /// file rather than a flag, so the token stays out of shell history and `ps`.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The farm's CA certificate (PEM), to trust an https:// coordinator's certificate
    /// [default: $LONGTAKE_CA_CERT].
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl CoordinatorArg {
    /// The URL(s) from the flag, else from the environment, comma-separated; `None` when
    /// neither names one.
    pub fn url(&self) -> Option<String> {
        self.coordinator
            .clone()
            .or_else(|| std::env::var(COORDINATOR_ENV).ok())
            .map(|urls| {
                urls.split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(normalize_url)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .filter(|u| !u.is_empty())
    }

    /// The API token from `--token-file`, else from the environment; `None` when neither
    /// gives one (a farm without tokens needs none).
    pub fn token(&self) -> Result<Option<String>> {
        let token = match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?;
                let token = text.trim().to_string();
                if token.is_empty() {
                    bail!("the token file {} is empty", path.display());
                }
                Some(token)
            }
            None => std::env::var(TOKEN_ENV)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        };
        Ok(token)
    }

    /// The farm's CA certificate from `--ca-cert`, else from the environment.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.ca_cert.clone().or_else(|| {
            std::env::var_os(CA_CERT_ENV)
                .map(PathBuf::from)
                .filter(|p| !p.as_os_str().is_empty())
        })
    }

    /// How to reach the coordinator this names: its URL, token and CA.
    pub fn target(&self) -> Result<Target> {
        Ok(Target {
            url: self.require()?,
            token: self.token()?,
            ca_cert: self.ca_cert(),
        })
    }

    /// Connects to the coordinator this names, with its token.
    pub async fn connect(&self) -> Result<Client> {
        Client::connect(&self.target()?).await
    }

    /// The URL, or an error saying how to give one.
    pub fn require(&self) -> Result<String> {
        self.url().ok_or_else(|| {
            anyhow!(
                "no coordinator given: pass --coordinator URL or set {COORDINATOR_ENV} (e.g. http://127.0.0.1:7070)"
            )
        })
    }
}

/// A coordinator to connect to: where, with which API token, trusting which CA.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// One URL, or several comma-separated (a leader and its standbys).
    pub url: String,
    pub token: Option<String>,
    /// The farm's CA certificate, for an https:// URL.
    pub ca_cert: Option<PathBuf>,
}

impl Target {
    /// A coordinator without tokens or TLS (the embedded farm).
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_string(),
            ..Self::default()
        }
    }
}

/// `host:port` means `http://host:port`: the scheme is the part people leave out.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Sends the API token, if any, as `authorization: Bearer TOKEN` with every call, and the
/// trace context of the command's span where traces are exported.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self> {
        let value = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        anyhow!("the API token has characters an HTTP header cannot carry")
                    })
            })
            .transpose()?;
        Ok(Self(value))
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        // the command's span: the coordinator's spans for this call join its trace
        longtake_proto::telemetry::inject(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}

type Authorized = InterceptedService<Channel, BearerToken>;

/// How long a client that lost its coordinator keeps trying to reach one again (a standby
/// takes over within its `--leader-ttl`, 10 s by default, then loads the jobs).
const REATTACH_WINDOW: Duration = Duration::from_secs(45);

/// Both client-facing services of one coordinator over one connection.
pub struct Client {
    target: Target,
    url: String,
    pub render: RenderServiceClient<Authorized>,
    pub cluster: ClusterServiceClient<Authorized>,
}

impl Client {
    /// Connects now, to the first of the target's URLs that answers, so a coordinator that is
    /// not there is reported once, by URL; every call carries the target's token when there is
    /// one; an https:// URL is checked against the target's CA.
    pub async fn connect(target: &Target) -> Result<Self> {
        let mut failures = Vec::new();
        for url in target.url.split(',') {
            match Self::connect_to(target, url).await {
                Ok(client) => return Ok(client),
                Err(e) => failures.push(e),
            }
        }
        match failures.len() {
            0 => bail!("no coordinator URL given"),
            1 => Err(failures.remove(0)),
            _ => bail!(
                "no coordinator of {} answers: {}",
                target.url,
                failures
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }

    /// Connects again after the coordinator went away, to whichever of the target's URLs
    /// answers first (a standby that took over, or the same one restarted), trying for
    /// [`REATTACH_WINDOW`].
    pub async fn reconnect(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + REATTACH_WINDOW;
        loop {
            match Self::connect(&self.target).await {
                Ok(client) => {
                    *self = client;
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "no coordinator came back within {} s",
                        REATTACH_WINDOW.as_secs()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn connect_to(target: &Target, url: &str) -> Result<Self> {
        let bearer = BearerToken::new(target.token.as_deref())?;
        let unreachable = |why: String| {
            anyhow!(
                "cannot reach the coordinator at {url}: {why} (start one with `longtake serve coordinator` or set {COORDINATOR_ENV})"
            )
        };
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| unreachable(error_chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT);
        match (url.starts_with("https://"), &target.ca_cert) {
            (true, Some(ca)) => {
                endpoint = endpoint
                    .tls_config(longtake_proto::tls::client_trusting(ca)?)
                    .map_err(|e| unreachable(error_chain(&e)))?;
            }
            (true, None) => bail!(
                "{url} speaks TLS: pass --ca-cert FILE or set {CA_CERT_ENV} to the farm's CA \
                 certificate (ca.pem of `longtake certs init`)"
            ),
            (false, Some(_)) => bail!(
                "a CA certificate is given but {url} is plain http: use https:// for a farm with \
                 TLS, or unset {CA_CERT_ENV}"
            ),
            (false, None) => {}
        }
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| unreachable(format!("no answer in {} s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(error_chain(&e)))?;
        let max = longtake_proto::MAX_MESSAGE_BYTES;
        Ok(Self {
            target: target.clone(),
            url: url.to_string(),
            render: RenderServiceClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            cluster: ClusterServiceClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A failed call as a one-line error (see [`status_error`]).
    pub fn error(&self, status: tonic::Status) -> anyhow::Error {
        status_error(&self.url, status)
    }
}

/// A gRPC status as a one-line error. The server's message already names the field or the job
/// (`spec.width: ...`, `no job j-...`), so it is kept as is; only statuses that are about the
/// connection say which coordinator they came from.
pub fn status_error(url: &str, status: tonic::Status) -> anyhow::Error {
    let message = status.message().trim().replace('\n', " ");
    let lowered = message.to_ascii_lowercase();
    if url.starts_with("http://")
        && (lowered.contains("h2 protocol error")
            || lowered == "transport error"
            || lowered == "operation was canceled")
    {
        // what plain HTTP/2 gets from a TLS listener (which of the three depends on timing:
        // the listener closes the connection as soon as the HTTP/2 preface fails its handshake)
        return anyhow!(
            "the coordinator at {url} did not answer plain gRPC ({message}): a farm with TLS \
             takes an https:// URL and --ca-cert FILE (or {CA_CERT_ENV})"
        );
    }
    match status.code() {
        Code::Unavailable | Code::Unknown if message.is_empty() => {
            anyhow!(
                "the coordinator at {url} is unavailable ({})",
                status.code()
            )
        }
        Code::Unavailable if looks_like_transport(&message) => {
            anyhow!("lost the coordinator at {url}: {message}")
        }
        Code::DeadlineExceeded => anyhow!("the coordinator at {url} timed out: {message}"),
        _ if message.is_empty() => anyhow!("{}", status.code().description()),
        _ => anyhow!("{message}"),
    }
}

/// Whether `status` says the connection to the coordinator was lost (the coordinator died or
/// stopped), rather than an answer of the coordinator.
pub fn is_lost_connection(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) && (status.message().is_empty() || looks_like_transport(status.message()))
}

/// tonic reports a dropped connection as UNAVAILABLE with the transport's words, while a busy
/// worker is UNAVAILABLE with the coordinator's: only the former needs the URL.
fn looks_like_transport(message: &str) -> bool {
    ["transport", "connect", "broken pipe", "h2 protocol"]
        .iter()
        .any(|w| message.to_ascii_lowercase().contains(w))
}

/// An error and its sources on one line: tonic's transport error alone says only "transport
/// error", the cause (e.g. "Connection refused") is further down.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_gets_http() {
        assert_eq!(normalize_url("farm:7070"), "http://farm:7070");
        assert_eq!(normalize_url("https://farm:7070"), "https://farm:7070");
    }

    #[test]
    fn server_messages_are_kept_and_transport_failures_name_the_url() {
        let e = status_error(
            "http://h:1",
            tonic::Status::invalid_argument("spec.width: 250 is not a multiple of 16"),
        );
        assert_eq!(e.to_string(), "spec.width: 250 is not a multiple of 16");
        let e = status_error("http://h:1", tonic::Status::not_found("no job j-9"));
        assert_eq!(e.to_string(), "no job j-9");
        let e = status_error(
            "http://h:1",
            tonic::Status::unavailable("error trying to connect: tcp connect error"),
        );
        assert!(e.to_string().contains("http://h:1"), "{e}");
        let e = status_error("http://h:1", tonic::Status::unavailable(""));
        assert!(e.to_string().contains("http://h:1"), "{e}");
        // plain HTTP/2 to a TLS listener fails in one of three ways
        for said in [
            "h2 protocol error: http2 error",
            "transport error",
            "operation was canceled",
        ] {
            let e = status_error("http://h:1", tonic::Status::unknown(said)).to_string();
            assert!(e.contains("https:// URL and --ca-cert"), "{e}");
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_reported_with_the_url() {
        // A port that was free a moment ago: nothing accepts on it.
        let port = longtake_proto::membership::testing::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let err = Client::connect(&Target::plain(&url))
            .await
            .err()
            .expect("must fail");
        let text = err.to_string();
        assert!(text.contains(&url), "{text}");
        assert!(text.contains("longtake serve coordinator"), "{text}");
    }
}
