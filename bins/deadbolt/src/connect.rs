//! From a server URL to a connected client.

use anyhow::{Context, bail};
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_transport_ws::WsConnector;

use crate::cli::ServerArgs;

/// Connects to the server `args` names.
pub async fn client(args: &ServerArgs) -> anyhow::Result<Client> {
    let options = ClientOptions {
        client_id: args.client_id.clone(),
        retry_for: args.retry_for,
        ..ClientOptions::default()
    };
    let url = args.server.as_str();
    if url.starts_with("ws://") {
        let connector = WsConnector::new(url)?;
        return Client::connect(connector, options)
            .await
            .with_context(|| format!("cannot reach the server at {url}"));
    }
    bail!("unsupported server URL {url:?}: use ws://HOST:PORT/ws")
}
