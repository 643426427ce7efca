//! The end-to-end tests' set-up: a crsync server in this process on
//! 127.0.0.1 (real sockets; port 0, or an address to come back on), and
//! client Stores and Peers for it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crsync::server::{Auth, Server, ServerConfig};
use crsync::{Peer, Store};

/// The table every replica has.
const SCHEMA: &str = "CREATE TABLE todo (id INTEGER PRIMARY KEY NOT NULL, title TEXT, done INTEGER NOT NULL DEFAULT 0);";

/// A running server.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops it and waits until it has.
    pub(crate) async fn kill(self) {
        let _ = self.stop.send(());
        self.task.await.expect("server task");
    }
}

/// Serves `todo` under `dir/data` on `bind`, to `token` (which may create it).
pub(crate) async fn start_server(dir: &Path, bind: SocketAddr, token: &str) -> Running {
    std::fs::write(dir.join("schema.sql"), SCHEMA).expect("schema");
    let mut config = ServerConfig::default();
    config.bind = bind;
    config.data_dir = dir.join("data");
    config.schema = Some(dir.join("schema.sql"));
    config.allow_create = true;
    config.ping_interval = Duration::from_millis(300);
    let auth = Auth::new().with_creating_token(token, ["todo"]);
    let server = Server::bind_with_auth(config, auth).await.expect("bind");
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    Running { addr, stop, task }
}

/// A replica at `path` with `todo` enabled.
pub(crate) async fn store(path: &Path) -> Store {
    let store = Store::builder(path)
        .poll_interval(Duration::from_millis(20))
        .open()
        .await
        .expect("open");
    store
        .write(|tx| tx.execute_batch(&SCHEMA.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")))
        .await
        .expect("schema");
    store.enable_crr(&["todo"]).await.expect("enable");
    store
}

/// A Peer with short timeouts and quick redials; it pings every 300 ms, so
/// a remote with the same 2 s liveness timeout never drops an idle link.
pub(crate) fn peer(store: Store) -> Peer {
    Peer::builder(store)
        .ping_interval(Duration::from_millis(300))
        .ack_timeout(Duration::from_secs(2))
        .liveness_timeout(Duration::from_secs(2))
        .reconnect(crsync::ReconnectPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
            multiplier: 2.0,
        })
        .build()
}
