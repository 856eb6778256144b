//! Where the server's connections come from.

use std::io;
use std::net::SocketAddr;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

/// A source of accepted byte-stream connections: tokio's TCP listener in
/// production, simulated TCP in the simulation.
#[async_trait]
pub trait Listener: Send + 'static {
    /// The stream of one connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection.
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)>;
}

#[async_trait]
impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Replies are small and latency matters more than packet count.
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }
}
