//! The token set a running server uses, replaceable while it runs (`SIGHUP`
//! in `crsync serve`): [`TokenHandle`].

use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::{Access, Auth, Principal, TokenError};
use crate::config::ServerConfig;

/// The current token set, shared by the handlers; a reload replaces it.
#[derive(Debug, Clone)]
pub(crate) struct AuthCell(Arc<watch::Sender<Arc<Auth>>>);

impl AuthCell {
    pub(crate) fn new(auth: Auth) -> Self {
        AuthCell(Arc::new(watch::Sender::new(Arc::new(auth))))
    }

    /// The token set now.
    pub(crate) fn current(&self) -> Arc<Auth> {
        self.0.borrow().clone()
    }

    /// Resolves once a reload took `access` on `database` from `principal`
    /// (its token was removed, its secret changed, or its grant narrowed).
    pub(crate) fn revoked(
        &self,
        principal: Principal,
        database: &str,
        access: Access,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        let database = database.to_owned();
        async move {
            loop {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !rx
                    .borrow_and_update()
                    .still_serves(principal, &database, access)
                {
                    return;
                }
            }
        }
    }
}

/// Replaces the tokens of a running [`Server`](crate::Server): new requests
/// are checked against the new set at once; open connections whose token
/// was removed (or lost access to their database) are closed; the others go
/// on untouched.
#[derive(Debug, Clone)]
pub struct TokenHandle(pub(crate) AuthCell);

impl TokenHandle {
    /// Reads the tokens of `config` again (token files too) and uses them.
    /// On an error the old set stays. Returns the names now accepted.
    pub fn reload(&self, config: &ServerConfig) -> Result<Vec<String>, TokenError> {
        let auth = self.0.current().reloaded(config)?;
        Ok(self.replace(auth))
    }

    /// Uses `auth` from now on. Returns the token names it accepts.
    pub fn replace(&self, auth: Auth) -> Vec<String> {
        let names = auth.token_names();
        self.0.0.send_replace(Arc::new(auth));
        names
    }
}
