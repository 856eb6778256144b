//! The in-process transport: a [`Client`](super::Client) talking to an
//! [`Engine`] in the same process, with no network in between. For programs
//! that embed deadbolt, and for measuring the engine alone.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Connection, Connector, TransportError};
use crate::engine::{Engine, Session};
use crate::proto::{Outcome, Request};

/// Opens in-process connections to an engine.
#[derive(Debug, Clone)]
pub struct LocalConnector {
    engine: Engine,
}

impl LocalConnector {
    /// Connections to `engine`.
    pub fn new(engine: Engine) -> LocalConnector {
        LocalConnector { engine }
    }
}

/// One in-process connection: an engine session.
#[derive(Debug)]
struct LocalConnection {
    session: Session,
    engine: Engine,
}

#[async_trait]
impl Connection for LocalConnection {
    async fn call(&self, request: Request) -> Result<Outcome, TransportError> {
        Ok(self.session.execute(request).await.outcome)
    }

    fn is_open(&self) -> bool {
        !self.session.engine_is_shutting_down()
    }

    async fn closed(&self) {
        // An in-process connection closes only with its engine.
        self.engine.shutting_down().await;
    }
}

#[async_trait]
impl Connector for LocalConnector {
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError> {
        if self.engine.is_shutting_down() {
            return Err(TransportError::Connect {
                server: self.server(),
                reason: "the engine is shutting down".to_owned(),
            });
        }
        Ok(Arc::new(LocalConnection {
            session: self.engine.session(),
            engine: self.engine.clone(),
        }))
    }

    fn server(&self) -> String {
        "local engine".to_owned()
    }
}
