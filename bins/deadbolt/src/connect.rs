//! From server URLs to a connected client: one URL, or several nodes of a
//! cluster, comma-separated, that the client fails over between.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use async_trait::async_trait;
use deadbolt_core::client::{
    Client, ClientOptions, Connection, Connector, FailoverConnector, TransportError,
};
use deadbolt_core::proto::Secret;
use deadbolt_transport_quic::{QuicConfig, QuicConnector, Trust, client_config};
use deadbolt_transport_ws::{TlsDialer, WsConnector};
use tokio::sync::OnceCell;

use crate::cli::ServerArgs;

/// Where `deadbolt serve` writes its certificate when run with no flags.
const DEFAULT_CA: &str = "deadbolt-data/cert.pem";

/// Connects to the server, or the first of the servers, that `args` names.
pub async fn client(args: &ServerArgs) -> anyhow::Result<Client> {
    let options = ClientOptions {
        client_id: args.client_id.clone(),
        retry_for: args.retry_for,
        auth: secret(args)?,
        ..ClientOptions::default()
    };
    match server_urls(&args.server)?.as_slice() {
        [url] => connect_one(url, args, options).await,
        urls => Client::connect(failover(urls, args)?, options)
            .await
            .with_context(|| format!("cannot reach any of the servers {}", urls.join(", "))),
    }
}

/// The secret to say in `hello`: the first line of `--auth-file`, else
/// `DEADBOLT_AUTH`, else none.
pub fn secret(args: &ServerArgs) -> anyhow::Result<Option<Secret>> {
    if let Some(path) = &args.auth_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the auth file {}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            bail!(
                "the auth file {} is empty: its first line is the secret",
                path.display()
            );
        }
        return Ok(Some(Secret::new(line)));
    }
    match std::env::var("DEADBOLT_AUTH") {
        Ok(secret) if !secret.trim().is_empty() => Ok(Some(Secret::new(secret.trim()))),
        _ => Ok(None),
    }
}

/// The URLs of `--server`: one, or several separated by commas.
fn server_urls(list: &str) -> anyhow::Result<Vec<&str>> {
    let urls: Vec<&str> = list.split(',').map(str::trim).collect();
    if urls.iter().any(|url| url.is_empty()) {
        bail!("--server {list:?} has an empty URL: give URLs separated by single commas");
    }
    for url in &urls {
        if !["ws://", "wss://", "quic://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            bail!(
                "unsupported server URL {url:?}: use ws://HOST:PORT/ws, wss://HOST:PORT/ws \
                 or quic://HOST:PORT"
            );
        }
    }
    Ok(urls)
}

/// One server, as before there could be several: a quic:// name is looked
/// up before the first connect.
async fn connect_one(
    url: &str,
    args: &ServerArgs,
    options: ClientOptions,
) -> anyhow::Result<Client> {
    let connected = if url.starts_with("quic://") {
        let connector = QuicConnector::from_url(url, &trust(args)?, &QuicConfig::default()).await?;
        Client::connect(connector, options).await
    } else if url.starts_with("wss://") {
        Client::connect(wss(url, &trust(args)?)?, options).await
    } else {
        Client::connect(WsConnector::new(url)?, options).await
    };
    connected.with_context(|| format!("cannot reach the server at {url}"))
}

/// Several servers, tried in the order given.
fn failover(urls: &[&str], args: &ServerArgs) -> anyhow::Result<FailoverConnector> {
    let quic = urls
        .iter()
        .any(|url| url.starts_with("quic://") || url.starts_with("wss://"));
    // Asked once, so that --insecure warns once and a bad CA file fails
    // now rather than at every connect.
    let trust = quic.then(|| trust(args)).transpose()?;
    if let Some(trust) = &trust {
        client_config(trust, &QuicConfig::default())?;
    }
    let mut servers: Vec<Arc<dyn Connector>> = Vec::with_capacity(urls.len());
    for url in urls {
        match &trust {
            Some(trust) if url.starts_with("quic://") => {
                servers.push(Arc::new(LazyQuic::new(url, trust.clone())));
            }
            Some(trust) if url.starts_with("wss://") => servers.push(Arc::new(wss(url, trust)?)),
            _ => servers.push(Arc::new(WsConnector::new(url)?)),
        }
    }
    FailoverConnector::new(servers).context("no server URL given")
}

/// A quic:// server whose name is looked up (and UDP socket opened) at its
/// first connect, and again at each connect until that works: a node whose
/// name does not resolve yet must not keep the client from the others, as
/// a ws:// node's would not (its name is looked up at each connect).
struct LazyQuic {
    url: String,
    trust: Trust,
    config: QuicConfig,
    connector: OnceCell<QuicConnector>,
}

impl LazyQuic {
    fn new(url: &str, trust: Trust) -> LazyQuic {
        LazyQuic {
            url: url.to_owned(),
            trust,
            config: QuicConfig::default(),
            connector: OnceCell::new(),
        }
    }
}

#[async_trait]
impl Connector for LazyQuic {
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError> {
        let make = || QuicConnector::from_url(&self.url, &self.trust, &self.config);
        let connector = self.connector.get_or_try_init(make).await?;
        connector.connect().await
    }

    fn server(&self) -> String {
        self.url.clone()
    }
}

/// A wss:// server, whose certificate is checked as `trust` says.
fn wss(url: &str, trust: &Trust) -> anyhow::Result<WsConnector<TlsDialer>> {
    let tls = deadbolt_transport_quic::tls::client_tls(trust)?;
    Ok(WsConnector::with_dialer(url, TlsDialer::new(tls))?)
}

/// Whom a QUIC (or wss://) client trusts.
pub(crate) fn trust(args: &ServerArgs) -> anyhow::Result<Trust> {
    if args.insecure {
        eprintln!(
            "deadbolt: WARNING: --insecure: the server's certificate is not checked; \
             anyone on the network path can pose as the server"
        );
        return Ok(Trust::Insecure);
    }
    match &args.ca {
        Some(path) => Ok(Trust::CaFile(path.clone())),
        None if Path::new(DEFAULT_CA).exists() => Ok(Trust::CaFile(DEFAULT_CA.into())),
        None => bail!(
            "a quic:// or wss:// server needs a certificate to trust: pass --ca FILE (or \
             set DEADBOLT_CA), e.g. the cert.pem in the server's data directory, or --insecure"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::server_urls;

    #[test]
    fn one_url_or_several_comma_separated() {
        assert_eq!(server_urls("ws://a:7420/ws").unwrap(), ["ws://a:7420/ws"]);
        assert_eq!(
            server_urls("ws://a:7420/ws, quic://b:7421 ,ws://c/ws").unwrap(),
            ["ws://a:7420/ws", "quic://b:7421", "ws://c/ws"]
        );
        assert!(server_urls("ws://a/ws,,ws://b/ws").is_err());
        assert!(server_urls("ws://a/ws,").is_err());
        assert!(server_urls("ws://a/ws,http://b/").is_err());
    }
}
