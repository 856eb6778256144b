//! From a server URL to a connected client.

use std::path::Path;

use anyhow::{Context, bail};
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_transport_quic::{QuicConfig, QuicConnector, Trust};
use deadbolt_transport_ws::WsConnector;

use crate::cli::ServerArgs;

/// Where `deadbolt serve` writes its certificate when run with no flags.
const DEFAULT_CA: &str = "deadbolt-data/cert.pem";

/// Connects to the server `args` names.
pub async fn client(args: &ServerArgs) -> anyhow::Result<Client> {
    let options = ClientOptions {
        client_id: args.client_id.clone(),
        retry_for: args.retry_for,
        ..ClientOptions::default()
    };
    let url = args.server.as_str();
    let connected = if url.starts_with("ws://") {
        Client::connect(WsConnector::new(url)?, options).await
    } else if url.starts_with("quic://") {
        let connector = QuicConnector::from_url(url, &trust(args)?, &QuicConfig::default()).await?;
        Client::connect(connector, options).await
    } else {
        bail!("unsupported server URL {url:?}: use ws://HOST:PORT/ws or quic://HOST:PORT")
    };
    connected.with_context(|| format!("cannot reach the server at {url}"))
}

/// Whom a QUIC client trusts.
fn trust(args: &ServerArgs) -> anyhow::Result<Trust> {
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
            "a quic:// server needs a certificate to trust: pass --ca FILE (or set \
             DEADBOLT_CA), e.g. the cert.pem in the server's data directory, or --insecure"
        ),
    }
}
